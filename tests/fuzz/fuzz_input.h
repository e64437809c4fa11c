// Shared by the input harnesses (fuzz_h5ad.c, fuzz_10x_h5.c, fuzz_mtx.c):
// open an input with the given options, read every cell in small ranges, and
// check what a successful read returns.
#ifndef PERFCELL_FUZZ_INPUT_H
#define PERFCELL_FUZZ_INPUT_H

#include "fuzz_common.h"

#include "perfcell/input.h"

// Cells per range read (small: ranges cross the readers' internal blocks).
#define FUZZ_INPUT_RANGE 5

static inline void fuzz_check_rows(const Input *in, const InputRows *r, size_t cells) {
    FUZZ_REQUIRE(r->n_cells == cells, "read %zu cells, asked for %zu", r->n_cells, cells);
    FUZZ_REQUIRE(r->indptr[0] == 0 && (size_t)r->indptr[cells] == r->nnz, "row offsets inconsistent");
    for (size_t i = 0; i < cells; i++) {
        FUZZ_REQUIRE(r->indptr[i] <= r->indptr[i + 1], "cell %zu: offsets decrease", i);
        for (int64_t k = r->indptr[i]; k < r->indptr[i + 1]; k++) {
            FUZZ_REQUIRE(r->gene[k] >= 0 && (size_t)r->gene[k] < in->n_genes, "cell %zu: gene %d of %zu", i,
                         r->gene[k], in->n_genes);
            FUZZ_REQUIRE(r->count[k] > 0, "cell %zu: count %d", i, r->count[k]);
        }
    }
}

// Open `path` with `opt` and read it all; the result of the read is
// discarded, only crashes, hangs and broken promises matter.
static inline void fuzz_input_read(const char *path, const InputOptions *opt) {
    fuzz_clear_error();
    Input *in = input_open(path, opt);
    if (!in) {
        fuzz_expect_message("input_open");
        return;
    }
    FUZZ_REQUIRE(in->n_cells == 0 || in->cells, "cells without barcodes");
    FUZZ_REQUIRE(in->n_genes == 0 || (in->symbols && in->ids), "genes without names");
    for (size_t i = 0; i < in->n_cells; i++) FUZZ_REQUIRE(in->cells[i], "barcode %zu is NULL", i);
    for (size_t g = 0; g < in->n_genes; g++) FUZZ_REQUIRE(in->symbols[g] && in->ids[g], "gene %zu is NULL", g);
    if (in->label_codes)
        for (size_t i = 0; i < in->n_cells; i++)
            FUZZ_REQUIRE(in->label_codes[i] >= -1 && in->label_codes[i] < (int32_t)in->n_label_names,
                         "cell %zu: label code %d of %zu", i, in->label_codes[i], in->n_label_names);
    (void)input_describe(in);
    InputRows rows;
    input_rows_init(&rows);
    CountsCheck all;
    counts_check_init(&all);
    for (size_t c = 0; c < in->n_cells; c += FUZZ_INPUT_RANGE) {
        size_t e = c + FUZZ_INPUT_RANGE < in->n_cells ? c + FUZZ_INPUT_RANGE : in->n_cells;
        fuzz_clear_error();
        if (input_read_rows(in, c, e, &rows) != 0) {
            fuzz_expect_message("input_read_rows");
            break;
        }
        fuzz_check_rows(in, &rows, e - c);
        counts_check_merge(&all, &rows.check);
    }
    fuzz_clear_error();
    if (input_counts_verdict(in, &all) != 0) fuzz_expect_message("input_counts_verdict");
    input_rows_free(&rows);
    input_close(in);
}

#endif
