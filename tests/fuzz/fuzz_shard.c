// Fuzz the shard file reader: the input is one shard .h5ad. It is opened as a
// lone file (no manifest), every cell is decoded in ranges, and the content
// CRC is computed; then the same file is opened with SHARD_LAZY and read range
// by range again. Both reads must agree cell for cell.
//
// Seeds: tests/fuzz/corpus/shard/ (shards of real pbmc3k cells written by
// perfcell-shard; tests/fuzz/make_corpus.sh).
#define FUZZ_HDF5
#include "fuzz_common.h"

#include "perfcell/shard_reader.h"
#include "perfcell/stream.h"

// Cells per range read: small, so that a file may not make one read allocate
// more than its cells justify, and ranges cross chunk boundaries.
#define RANGE 7

static int read_all(ShardFile *f, CellBatch *b) {
    for (int64_t c = 0; c < f->n_cells; c += RANGE) {
        int64_t e = c + RANGE < f->n_cells ? c + RANGE : f->n_cells;
        fuzz_clear_error();
        if (shard_file_read(f, c, e, b) != 0) return -1;
    }
    return 0;
}

static void check_batch(const ShardFile *f, const CellBatch *b) {
    FUZZ_REQUIRE(b->n == (size_t)f->n_cells, "read %zu cells of %lld", b->n, (long long)f->n_cells);
    FUZZ_REQUIRE(b->offset[0] == 0 && (size_t)b->offset[b->n] == b->nnz, "batch offsets inconsistent");
    for (size_t i = 0; i < b->n; i++) {
        FUZZ_REQUIRE(b->offset[i] <= b->offset[i + 1], "cell %zu: offsets decrease", i);
        FUZZ_REQUIRE(b->label[i] >= -1 && b->label[i] < (int32_t)f->n_labels, "cell %zu: label %d", i,
                     b->label[i]);
        for (int64_t k = b->offset[i]; k < b->offset[i + 1]; k++) {
            FUZZ_REQUIRE(b->gene[k] >= 0 && b->gene[k] < f->n_genes, "cell %zu: gene %d", i, b->gene[k]);
            FUZZ_REQUIRE(k == b->offset[i] || b->gene[k] > b->gene[k - 1], "cell %zu: genes not ascending", i);
            FUZZ_REQUIRE(b->count[k] > 0, "cell %zu: count %g", i, (double)b->count[k]);
        }
    }
}

static int same_batch(const CellBatch *a, const CellBatch *b) {
    if (a->n != b->n || a->nnz != b->nnz) return 0;
    return memcmp(a->offset, b->offset, (a->n + 1) * sizeof *a->offset) == 0 &&
           memcmp(a->cell_id, b->cell_id, a->n * sizeof *a->cell_id) == 0 &&
           memcmp(a->label, b->label, a->n * sizeof *a->label) == 0 &&
           memcmp(a->gene, b->gene, a->nnz * sizeof *a->gene) == 0 &&
           memcmp(a->count, b->count, a->nnz * sizeof *a->count) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char path[4200];
    if (!ready) {
        fuzz_h5_init();
        fuzz_path(path, sizeof path, "shard-00000.h5ad");
        ready = 1;
    }
    if (!fuzz_hdf5_input(data, size, path)) return 0;

    ShardFile f;
    CellBatch eager, lazy;
    cellbatch_init(&eager);
    cellbatch_init(&lazy);
    int ok_eager = 0;
    fuzz_clear_error();
    if (shard_file_open(&f, path, NULL, 0, 0) != 0) {
        fuzz_expect_message("shard_file_open");
    } else {
        uint32_t crc = 0;
        if (read_all(&f, &eager) == 0) {
            check_batch(&f, &eager);
            ok_eager = 1;
        } else {
            fuzz_expect_message("shard_file_read");
        }
        fuzz_clear_error();
        if (shard_file_content_crc(&f, &crc) != 0) fuzz_expect_message("shard_file_content_crc");
        shard_file_close(&f);
    }
    fuzz_h5_done("the eager shard read");

    fuzz_clear_error();
    if (shard_file_open(&f, path, NULL, 0, SHARD_LAZY) != 0) {
        // A lazy open checks less up front, so it may succeed where the eager
        // one failed, never the other way round.
        FUZZ_REQUIRE(!ok_eager, "the lazy open failed where the eager read succeeded: %s", error_last());
        fuzz_expect_message("shard_file_open(SHARD_LAZY)");
    } else {
        if (read_all(&f, &lazy) == 0) {
            check_batch(&f, &lazy);
            FUZZ_REQUIRE(!ok_eager || same_batch(&eager, &lazy), "eager and lazy reads disagree");
        } else {
            FUZZ_REQUIRE(!ok_eager, "the lazy read failed where the eager read succeeded: %s", error_last());
            fuzz_expect_message("shard_file_read(SHARD_LAZY)");
        }
        shard_file_close(&f);
    }
    fuzz_h5_done("the lazy shard read");
    cellbatch_free(&eager);
    cellbatch_free(&lazy);
    return 0;
}
