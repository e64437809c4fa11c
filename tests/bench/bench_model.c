// Benchmark of the encoder: one training step per cell (forward + MLM loss +
// backward), single-threaded, its peak memory, the achieved GFLOP/s against
// single-thread cblas_sgemm, and where the time goes.
//
//   bench_model --mode full --genes 16906 [--dim 200 --depth 6 --heads 10 --dim-head 64
//               --features 266 --ff 800] [--steps 3] [--recompute] [--profile]
//   bench_model --mode nonzero --shards DIR [--cells 64] [--micro-batch 1] ...
//   bench_model --sgemm
//
// Prints one machine-readable line per measurement (key=value), then a profile.
#include "perfcell/error.h"
#include "perfcell/linalg.h"
#include "perfcell/manifest.h"
#include "perfcell/mlm.h"
#include "perfcell/model.h"
#include "perfcell/rng.h"
#include "perfcell/shard_reader.h"
#include "perfcell/tokens.h"
#include "perfcell/util.h"
#include "perfcell/zstd_filter.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double sgemm_rate(size_t M, size_t N, size_t K) {
    float *A = floats_alloc(M * K), *B = floats_alloc(K * N), *C = floats_alloc(M * N);
    Rng r = rng_init(1, RNG_TEST, 0, 0, 0);
    for (size_t i = 0; i < M * K; i++) A[i] = rng_uniform(&r);
    for (size_t i = 0; i < K * N; i++) B[i] = rng_uniform(&r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)N, (int)K, 1, A, (int)K, B,
                (int)N, 0, C, (int)N);
    int reps = 0;
    double t0 = time_now(), dt = 0;
    while (dt < 1.0 || reps < 3) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)N, (int)K, 1, A, (int)K,
                    B, (int)N, 0, C, (int)N);
        reps++;
        dt = time_now() - t0;
    }
    free(A), free(B), free(C);
    return 2.0 * (double)M * N * K * reps / dt / 1e9;
}

static long argl(int argc, char **argv, const char *key, long def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], key) == 0) return atol(argv[i + 1]);
    return def;
}

static const char *args(int argc, char **argv, const char *key, const char *def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], key) == 0) return argv[i + 1];
    return def;
}

static int flag(int argc, char **argv, const char *key) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], key) == 0) return 1;
    return 0;
}

// Synthetic cells with about `density` of the genes expressed, counts 1..40.
static void synthetic_cells(CellBatch *cb, size_t n, size_t G, double density, uint64_t seed) {
    cellbatch_clear(cb);
    cellbatch_reserve(cb, n, (size_t)((double)n * G * density * 1.5) + n);
    Rng r = rng_init(seed, RNG_TEST, 7, 0, 0);
    size_t k = 0;
    for (size_t c = 0; c < n; c++) {
        cb->offset[c] = (int64_t)k;
        cb->cell_id[c] = (int64_t)c;
        cb->label[c] = -1;
        double total = 0;
        for (size_t g = 0; g < G; g++) {
            if (rng_uniform(&r) >= density) continue;
            cb->gene[k] = (int32_t)g;
            cb->count[k] = (float)(1 + rng_below(&r, 40));
            total += cb->count[k];
            k++;
        }
        cb->total[c] = total;
    }
    cb->offset[n] = (int64_t)k;
    cb->n = n;
    cb->nnz = k;
}

int main(int argc, char **argv) {
    if (flag(argc, argv, "--sgemm")) {
        printf("sgemm M=2048 N=2048 K=2048 gflops=%.1f\n", sgemm_rate(2048, 2048, 2048));
        printf("sgemm M=16907 N=640 K=200 gflops=%.1f\n", sgemm_rate(16907, 640, 200));
        printf("sgemm M=169070 N=266 K=64 gflops=%.1f\n", sgemm_rate(169070, 266, 64));
        return 0;
    }
    ModelConfig mc = {0};
    mc.mode = strcmp(args(argc, argv, "--mode", "full"), "nonzero") == 0 ? SEQ_NONZERO : SEQ_FULL;
    mc.dim = (size_t)argl(argc, argv, "--dim", 200);
    mc.depth = (size_t)argl(argc, argv, "--depth", 6);
    mc.heads = (size_t)argl(argc, argv, "--heads", 10);
    mc.dim_head = (size_t)argl(argc, argv, "--dim-head", 64);
    mc.n_features = (size_t)argl(argc, argv, "--features", 266);
    mc.ff_dim = (size_t)argl(argc, argv, "--ff", 800);
    mc.bins = (int)argl(argc, argv, "--bins", 5);
    mc.recompute = flag(argc, argv, "--recompute");
    mc.max_tokens = (size_t)argl(argc, argv, "--max-tokens", 0);
    const size_t steps = (size_t)argl(argc, argv, "--steps", 3);
    const size_t b = (size_t)argl(argc, argv, "--micro-batch", 1);
    const char *shards = args(argc, argv, "--shards", NULL);

    // Cells: real ones from a shard folder, or synthetic.
    CellBatch all;
    cellbatch_init(&all);
    size_t n_cells = (size_t)argl(argc, argv, "--cells", (long)(b * (steps + 1)));
    if (shards) {
        error_h5_quiet();
        if (zstd_filter_register() != 0) {
            fprintf(stderr, "%s\n", error_last());
            return 1;
        }
        ShardReader *r = shard_reader_open(shards, 0, 0);
        if (!r) {
            fprintf(stderr, "%s\n", error_last());
            return 1;
        }
        mc.n_genes = (size_t)shard_reader_manifest(r)->n_genes;
        if (shard_reader_read(r, 0, (int64_t)n_cells, &all) != 0) {
            fprintf(stderr, "%s\n", error_last());
            return 1;
        }
        shard_reader_close(r);
    } else {
        mc.n_genes = (size_t)argl(argc, argv, "--genes", 16906);
        synthetic_cells(&all, n_cells, mc.n_genes, 0.1, 5);
    }
    size_t max_nnz = 0;
    for (size_t c = 0; c < all.n; c++) {
        size_t n = (size_t)(all.offset[c + 1] - all.offset[c]);
        if (n > max_nnz) max_nnz = n;
    }
    size_t per_cell = tokens_cell_length(&mc, max_nnz);

    ParamTable t;
    param_table_init(&t);
    model_table_add_encoder(&t, &mc);
    mlm_head_add(&t, &mc);
    Model m;
    if (model_alloc(&m, &mc, &t, b * per_cell, b, per_cell) != 0) {
        fprintf(stderr, "%s\n", error_last());
        return 1;
    }
    model_init_params(&m, 1);
    model_draw_features(&m, 1, 0);
    m.profile = flag(argc, argv, "--profile");
    const size_t V = (size_t)mc.bins + 2, C = mc.dim;
    float *logits = floats_alloc(b * per_cell * V), *dlogits = floats_alloc(b * per_cell * V);
    float *dhidden = floats_alloc(b * per_cell * C);
    const ParamEntry *ew = param_table_find(&m.table, "to_out.weight");
    const ParamEntry *eb = param_table_find(&m.table, "to_out.bias");

    CellBatch cb;
    TokenBatch tb;
    cellbatch_init(&cb);
    tokenbatch_init(&tb);
    size_t n_batches = all.n / b, done = 0, tokens = 0;
    size_t warm = n_batches > steps ? 1 : 0;
    double t_meas = 0;
    for (size_t s = 0; s < n_batches && done < steps; s++) {
        // Micro-batch s: cells [s b, s b + b).
        cellbatch_clear(&cb);
        size_t o0 = (size_t)all.offset[s * b], o1 = (size_t)all.offset[s * b + b];
        cellbatch_reserve(&cb, b, o1 - o0);
        for (size_t c = 0; c <= b; c++) cb.offset[c] = all.offset[s * b + c] - (int64_t)o0;
        memcpy(cb.gene, all.gene + o0, (o1 - o0) * sizeof *cb.gene);
        memcpy(cb.count, all.count + o0, (o1 - o0) * sizeof *cb.count);
        memcpy(cb.total, all.total + s * b, b * sizeof *cb.total);
        memcpy(cb.cell_id, all.cell_id + s * b, b * sizeof *cb.cell_id);
        memcpy(cb.label, all.label + s * b, b * sizeof *cb.label);
        cb.n = b;
        cb.nnz = o1 - o0;
        tokens_from_cells(&tb, &cb, &mc, 1, (int64_t)s);
        size_t nm = mlm_mask(&tb, &mc, 0.15, 0.9, 1, (int64_t)s);
        int measured = s >= warm;
        if (measured && done == 0) {
            gemm_flops_reset();
            memset(m.prof_fwd, 0, sizeof m.prof_fwd);
            memset(m.prof_bwd, 0, sizeof m.prof_bwd);
        }
        double t0 = time_now();
        model_zero_grad(&m);
        PassCtx ctx = {1, (int64_t)s, 0, 1};
        model_forward(&m, &tb, &ctx);
        mlm_logits(logits, m.hidden, m.params + ew->offset, m.params + eb->offset, tb.n_tokens, C, V);
        mlm_loss(dlogits, logits, tb.target, tb.n_tokens, V, nm ? (double)nm : 1.0, NULL);
        mlm_backward(dhidden, m.grads + ew->offset, m.grads + eb->offset, dlogits, m.hidden,
                     m.params + ew->offset, tb.n_tokens, C, V);
        model_backward(&m, &tb, &ctx, dhidden);
        double dt = time_now() - t0;
        if (measured) {
            t_meas += dt;
            tokens += tb.n_tokens;
            done++;
        }
    }
    double step = t_meas / (double)done, gflops = gemm_flops() / t_meas / 1e9;
    printf("perfcell mode=%s genes=%zu dim=%zu depth=%zu micro_batch=%zu recompute=%d step_s=%.4f "
           "cell_s=%.4f cells_per_s=%.2f tokens_per_cell=%.1f tokens_per_s=%.0f peak_rss_mb=%.1f "
           "arena_mb=%.1f gflops=%.2f\n",
           mc.mode == SEQ_FULL ? "full" : "nonzero", mc.n_genes, mc.dim, mc.depth, b, mc.recompute,
           step, step / (double)b, (double)(done * b) / t_meas, (double)tokens / (double)(done * b),
           (double)tokens / t_meas, (double)mem_peak_rss() / 1048576.0,
           (double)m.arena_bytes / 1048576.0, gflops);
    if (m.profile) {
        double tf = 0, tbw = 0;
        for (int p = 0; p < PROF_N; p++) tf += m.prof_fwd[p], tbw += m.prof_bwd[p];
        printf("profile (per step; forward | backward, share of the whole step %.3fs):\n", step);
        for (int p = 0; p < PROF_N; p++)
            printf("  %-18s %8.4fs %5.1f%% | %8.4fs %5.1f%%\n", PROF_NAMES[p], m.prof_fwd[p] / done,
                   100 * m.prof_fwd[p] / t_meas, m.prof_bwd[p] / done, 100 * m.prof_bwd[p] / t_meas);
        printf("  %-18s %8.4fs %5.1f%% | %8.4fs %5.1f%%   (rest: head, loss, final norm %.1f%%)\n",
               "total", tf / done, 100 * tf / t_meas, tbw / done, 100 * tbw / t_meas,
               100 * (t_meas - tf - tbw) / t_meas);
    }
    free(logits), free(dlogits), free(dhidden);
    cellbatch_free(&cb);
    cellbatch_free(&all);
    tokenbatch_free(&tb);
    model_free(&m);
    return 0;
}
