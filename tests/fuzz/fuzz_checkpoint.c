// Fuzz the checkpoint loader: the input is one checkpoint file, read with
// ckpt_read (structure, shapes, CRCs), ckpt_verify and ckpt_summary. A read
// that succeeds must give a consistent state, and ckpt_verify must agree with
// ckpt_read.
//
// The checkpoint reader reads its strings from the global heap itself, so
// the heap is fuzzed here (FUZZ_OWN_HEAP) and no input is filtered out.
//
// Seeds: tests/fuzz/corpus/checkpoint/ (a 2-step pretraining checkpoint and a
// fine-tuned one of a tiny model on pbmc3k shards).
#define FUZZ_HDF5
#define FUZZ_OWN_HEAP // the reader takes strings from the global heap itself
#include "fuzz_common.h"

#include "perfcell/checkpoint.h"

#include <math.h>

static void all_finite(const float *x, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++) FUZZ_REQUIRE(isfinite(x[i]), "%s value %zu of a read checkpoint is not finite", what, i);
}

static void check_state(const CkptState *s) {
    FUZZ_REQUIRE(s->table.n > 0 && s->params, "a read state without parameters");
    size_t end = 0;
    for (size_t i = 0; i < s->table.n; i++) {
        const ParamEntry *e = &s->table.e[i];
        size_t want = e->ndim == 1 ? e->shape[0] : e->shape[0] * e->shape[1];
        FUZZ_REQUIRE((e->ndim == 1 || e->ndim == 2) && e->size == want && e->size > 0, "tensor %zu: bad shape", i);
        FUZZ_REQUIRE(e->offset >= end, "tensor %zu at offset %zu overlaps the one before (ends %zu)", i, e->offset,
                     end);
        end = e->offset + e->size;
    }
    FUZZ_REQUIRE(end <= s->table.total, "tensors end at %zu, past the total %zu", end, s->table.total);
    FUZZ_REQUIRE(!s->exp_avg == !s->exp_avg_sq, "only one Adam moment");
    FUZZ_REQUIRE(s->depth == 0 || s->proj, "projection matrices missing");
    FUZZ_REQUIRE(s->cursor_len == 0 || s->cursor, "cursor missing");
    FUZZ_REQUIRE(s->n_labels == 0 || s->labels, "labels missing");
    for (size_t i = 0; i < s->n_labels; i++) FUZZ_REQUIRE(s->labels[i], "label %zu is NULL", i);
    FUZZ_REQUIRE(s->config_ini && s->vocab_tsv, "config or vocabulary text missing");
    for (size_t i = 0; i < s->n_scalars; i++) FUZZ_REQUIRE(s->scalars[i].key, "scalar %zu without a key", i);
    // Touch every value (a short allocation shows up under ASan): a read
    // checkpoint holds finite numbers only.
    all_finite(s->params, s->table.total, "parameter");
    if (s->exp_avg) {
        all_finite(s->exp_avg, s->table.total, "exp_avg");
        all_finite(s->exp_avg_sq, s->table.total, "exp_avg_sq");
    }
    all_finite(s->proj, s->depth * s->n_features * s->dim_head, "projection");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    static char path[4200];
    static FILE *devnull;
    if (!ready) {
        fuzz_h5_init();
        fuzz_path(path, sizeof path, "ckpt-00000002.h5");
        devnull = fopen("/dev/null", "w");
        FUZZ_REQUIRE(devnull, "cannot open /dev/null");
        ready = 1;
    }
    uint8_t *file = fuzz_hdf5_file(data, size);
    if (!file) return 0;
    fuzz_write(path, file, size);
    free(file);

    CkptState s;
    fuzz_clear_error();
    int read_ok = ckpt_read(path, &s) == 0;
    if (read_ok) {
        check_state(&s);
        ckpt_state_free(&s);
    } else {
        fuzz_expect_message("ckpt_read");
    }
    fuzz_h5_done("ckpt_read");

    fuzz_clear_error();
    int verify_ok = ckpt_verify(path) == 0;
    if (!verify_ok) fuzz_expect_message("ckpt_verify");
    FUZZ_REQUIRE(verify_ok == read_ok, "ckpt_read %s but ckpt_verify %s", read_ok ? "succeeded" : "failed",
                 verify_ok ? "succeeded" : "failed");
    fuzz_h5_done("ckpt_verify");

    fuzz_clear_error();
    if (ckpt_summary(path, devnull) != 0) {
        fuzz_expect_message("ckpt_summary");
        // The summary checks less than a read: it may only fail where the read failed.
        FUZZ_REQUIRE(!read_ok, "ckpt_summary failed on a file ckpt_read accepts: %s", error_last());
    }
    fuzz_h5_done("ckpt_summary");
    return 0;
}
