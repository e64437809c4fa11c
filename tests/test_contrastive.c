// CellLM divide-and-conquer contrastive learning (run under mpirun with 1, 2
// and 3 ranks):
//   1. the InfoNCE loss's analytic gradient against central finite differences
//      of an independent double-precision implementation;
//   2. the parameter gradient of divide and conquer (pass 1 without
//      activations, the coordinator's loss, pass 2 with activations, summed
//      over ranks) against the naive full-batch gradient (all cells of both
//      views in one pass each, activations kept), for sub-batches of 1, 3 and
//      all cells, uneven cells per rank (one rank with none at 3 ranks), the
//      one-directional and the symmetric loss, with the MLM loss on top;
//   3. z bitwise equal between the two passes.
// The verdict is reduced over ranks, so every rank exits with the same code.
#include "perfcell/contrastive.h"
#include "perfcell/error.h"
#include "perfcell/mlm.h"
#include "perfcell/model.h"
#include "perfcell/rng.h"
#include "perfcell/tokens.h"
#include "testlib.h"

#include <mpi.h>
#include <string.h>

static int g_rank, g_size;

// ---------------------------------------------------------------------------
// 1. The loss against finite differences of a double implementation

static double loss_ref(const double *a, const double *b, size_t N, size_t D, double tau, int sym) {
    double l = 0;
    for (int dir = 0; dir < (sym ? 2 : 1); dir++) {
        const double *x = dir ? b : a, *y = dir ? a : b;
        double s = 0;
        for (size_t i = 0; i < N; i++) {
            double mx = -1e300, sum = 0, sii = 0;
            double row[64];
            for (size_t j = 0; j < N; j++) {
                double d = 0;
                for (size_t k = 0; k < D; k++) d += x[i * D + k] * y[j * D + k];
                row[j] = d / tau;
                if (row[j] > mx) mx = row[j];
                if (i == j) sii = row[j];
            }
            for (size_t j = 0; j < N; j++) sum += exp(row[j] - mx);
            s += mx + log(sum) - sii;
        }
        l += s / (double)N;
    }
    return sym ? l / 2 : l;
}

static void test_loss_fd(void) {
    const size_t N = 7, D = 5;
    const double tau = 0.3;
    Rng r = rng_init(3, RNG_TEST, 11, 0, 0);
    float a[35], b[35], ga[35], gb[35];
    double ad[35], bd[35];
    for (size_t i = 0; i < N * D; i++) a[i] = (float)rng_normal(&r), b[i] = (float)rng_normal(&r);
    for (size_t i = 0; i < N * D; i++) ad[i] = a[i], bd[i] = b[i];
    for (int sym = 0; sym < 2; sym++) {
        double pos = 0, neg = 0;
        double l = contrastive_loss(a, b, N, D, tau, sym, ga, gb, &pos, &neg);
        double lr = loss_ref(ad, bd, N, D, tau, sym);
        T_CHECK(fabs(l - lr) < 1e-5 * fabs(lr), "loss %.8f vs reference %.8f", l, lr);
        // Central differences in double (h = 1e-6: truncation 1e-12, rounding
        // 1e-10 relative); the analytic gradient is float (1e-7 relative), so
        // agreement to 1e-5 relative (L2) leaves a wide margin.
        double num[70], ana[70];
        for (size_t i = 0; i < 2 * N * D; i++) {
            double *v = i < N * D ? &ad[i] : &bd[i - N * D];
            double keep = *v, h = 1e-6;
            *v = keep + h;
            double lp = loss_ref(ad, bd, N, D, tau, sym);
            *v = keep - h;
            double lm = loss_ref(ad, bd, N, D, tau, sym);
            *v = keep;
            num[i] = (lp - lm) / (2 * h);
            ana[i] = i < N * D ? ga[i] : gb[i - N * D];
        }
        double err = t_rel_l2(ana, num, 2 * N * D, 1e-12);
        T_CHECK(err < 1e-5, "%s loss gradient vs finite differences: %.2e", sym ? "symmetric" : "one-way", err);
        if (g_rank == 0) printf("  loss gradient vs finite differences (%s): %.2e\n", sym ? "symmetric" : "one-way", err);
    }
}

// ---------------------------------------------------------------------------
// 2. Divide and conquer against the naive full-batch gradient

#define N_CELLS 11

static ModelConfig tiny(void) {
    ModelConfig c = {0};
    c.mode = SEQ_NONZERO;
    c.n_genes = 40;
    c.dim = 16;
    c.depth = 2;
    c.heads = 2;
    c.dim_head = 8;
    c.n_features = 12;
    c.ff_dim = 32;
    c.bins = 5;
    c.dropout_emb = c.dropout_attn = c.dropout_ff = 0.1f;
    return c;
}

// Cells [c0, c1) of a fixed synthetic set (ids are global: 100 + index).
static void cells(CellBatch *cb, size_t c0, size_t c1, size_t G) {
    cellbatch_clear(cb);
    cellbatch_reserve(cb, c1 - c0 + 1, (c1 - c0 + 1) * G);
    size_t k = 0;
    for (size_t c = c0; c < c1; c++) {
        Rng r = rng_init(9, RNG_TEST, 12, c, 0);
        size_t i = c - c0;
        cb->offset[i] = (int64_t)k;
        cb->cell_id[i] = 100 + (int64_t)c;
        cb->label[i] = -1;
        double total = 0;
        for (size_t g = 0; g < G; g++) {
            if (rng_uniform(&r) > 0.3f) continue;
            cb->gene[k] = (int32_t)g;
            cb->count[k] = (float)(1 + rng_below(&r, 30));
            total += cb->count[k++];
        }
        cb->total[i] = total + 100;
    }
    cb->offset[c1 - c0] = (int64_t)k;
    cb->n = c1 - c0;
    cb->nnz = k;
}

static void build(Model *m, const ModelConfig *mc, const ContrastiveConfig *cc, size_t cells_max) {
    ParamTable t;
    param_table_init(&t);
    model_table_add_encoder(&t, mc);
    mlm_head_add(&t, mc);
    contrastive_head_add(&t, mc, cc);
    CHECK(model_alloc(m, mc, &t, cells_max * (mc->n_genes + 1), cells_max, mc->n_genes + 1) == 0, "%s",
          error_last());
    model_init_params(m, 5);
    model_draw_features(m, 5, 0);
}

static void test_divide_and_conquer(size_t sub, int sym) {
    const ModelConfig mc = tiny();
    ContrastiveConfig cc = {0};
    cc.weight = 0.7;
    cc.temperature = 0.2;
    cc.symmetric = sym;
    cc.pool_mean = sub == 3; // exercise both poolings
    cc.proj_dim = 6;
    cc.proj_hidden = 10;
    cc.sub_batch = sub;
    const uint64_t seed = 21;
    const int64_t step = 4;
    const size_t D = cc.proj_dim, C = mc.dim, V = (size_t)mc.bins + 2;

    // Uneven cells per rank; at 3 ranks the middle rank has none.
    static const size_t split[4][3] = {{0}, {11, 0, 0}, {4, 7, 0}, {5, 0, 6}};
    size_t mine = split[g_size][g_rank], first = 0;
    for (int r = 0; r < g_rank; r++) first += split[g_size][r];
    CellBatch cb;
    cellbatch_init(&cb);
    TokenBatch tb;
    tokenbatch_init(&tb);
    cells(&cb, first, first + mine, mc.n_genes);
    tokens_from_cells(&tb, &cb, &mc, seed, step);
    int64_t masked = (int64_t)mlm_mask(&tb, &mc, 0.3, 0.9, seed, step), masked_all = 0;
    MPI_Allreduce(&masked, &masked_all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);

    // Divide and conquer on every rank.
    Model md;
    size_t arena = sub ? sub : (mine ? mine : 1);
    build(&md, &mc, &cc, arena);
    Contrastive c;
    contrastive_init(&c, &md, &cc, mine ? mine : 1, N_CELLS, MPI_COMM_WORLD);
    model_zero_grad(&md);
    MlmStats st = {0};
    double loss = contrastive_step_keys(&c, &md, &tb, 1, seed, step, 1.0, (double)masked_all, &st);
    const size_t P = md.table.total;
    float *g_dc = floats_alloc(P);
    MPI_Allreduce(md.grads, g_dc, (int)P, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    T_CHECK(c.z_mismatch == 0, "z of pass 2 differs from pass 1 in %lld sub-batches", (long long)c.z_mismatch);

    // The naive computation: all cells, each view in one pass, activations kept.
    Model ma, mb;
    build(&ma, &mc, &cc, N_CELLS);
    build(&mb, &mc, &cc, N_CELLS);
    CellBatch all;
    cellbatch_init(&all);
    cells(&all, 0, N_CELLS, mc.n_genes);
    TokenBatch ta;
    tokenbatch_init(&ta);
    tokens_from_cells(&ta, &all, &mc, seed, step);
    mlm_mask(&ta, &mc, 0.3, 0.9, seed, step);
    Contrastive cn;
    contrastive_init(&cn, &ma, &cc, N_CELLS, N_CELLS, MPI_COMM_SELF);
    float *za = floats_alloc(N_CELLS * D), *zb = floats_alloc(N_CELLS * D);
    float *ga = floats_alloc(N_CELLS * D), *gb = floats_alloc(N_CELLS * D);
    PassCtx v0 = {seed, step, 0, 1}, v1 = {seed, step, 1, 1};
    model_forward(&ma, &ta, &v0);
    contrastive_head_forward(&cn, &ma, &ta);
    memcpy(za, cn.z, N_CELLS * D * sizeof *za);
    model_forward(&mb, &ta, &v1);
    contrastive_head_forward(&cn, &mb, &ta);
    memcpy(zb, cn.z, N_CELLS * D * sizeof *zb);
    double lnaive = contrastive_loss(za, zb, N_CELLS, D, cc.temperature, sym, ga, gb, NULL, NULL);
    for (size_t i = 0; i < N_CELLS * D; i++) ga[i] *= (float)cc.weight, gb[i] *= (float)cc.weight;
    model_zero_grad(&ma);
    model_zero_grad(&mb);
    size_t T = ta.n_tokens;
    float *logits = floats_alloc(T * V), *dlogits = floats_alloc(T * V), *dh = floats_alloc(T * C);
    const ParamEntry *ew = param_table_find(&ma.table, "to_out.weight");
    const ParamEntry *eb = param_table_find(&ma.table, "to_out.bias");
    mlm_logits(logits, ma.hidden, ma.params + ew->offset, ma.params + eb->offset, T, C, V);
    mlm_loss(dlogits, logits, ta.target, T, V, (double)masked_all, NULL);
    mlm_backward(dh, ma.grads + ew->offset, ma.grads + eb->offset, dlogits, ma.hidden,
                 ma.params + ew->offset, T, C, V);
    contrastive_head_forward(&cn, &ma, &ta);
    contrastive_head_backward(&cn, &ma, &ta, ga, dh);
    model_backward(&ma, &ta, &v0, dh);
    memset(dh, 0, T * C * sizeof *dh);
    contrastive_head_forward(&cn, &mb, &ta);
    contrastive_head_backward(&cn, &mb, &ta, gb, dh);
    model_backward(&mb, &ta, &v1, dh);
    float *g_naive = floats_alloc(P);
    for (size_t i = 0; i < P; i++) g_naive[i] = ma.grads[i] + mb.grads[i];

    // Different summation orders (sub-batches, ranks): float rounding only.
    double err = t_rel_l2f(g_dc, g_naive, P, 1e-12);
    T_CHECK(err < 1e-5, "sub-batch %zu, %s: divide-and-conquer gradient differs from the full batch "
            "(rel L2 %.2e)", sub, sym ? "symmetric" : "one-way", err);
    T_CHECK(fabs(loss - lnaive) < 1e-5 * fabs(lnaive), "loss %.8f vs naive %.8f", loss, lnaive);
    if (g_rank == 0)
        printf("  %d rank(s), sub-batch %-3s %-9s: gradient rel L2 %.2e, loss %.6f vs %.6f\n", g_size,
               sub ? (sub == 1 ? "1" : "3") : "all", sym ? "symmetric" : "one-way", err, loss, lnaive);

    free(za), free(zb), free(ga), free(gb), free(logits), free(dlogits), free(dh), free(g_naive), free(g_dc);
    contrastive_free(&cn);
    contrastive_free(&c);
    model_free(&ma), model_free(&mb), model_free(&md);
    tokenbatch_free(&ta), tokenbatch_free(&tb);
    cellbatch_free(&all), cellbatch_free(&cb);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    error_set_rank(g_rank);
    if (g_size > 3) {
        if (g_rank == 0) fprintf(stderr, "run with 1, 2 or 3 ranks\n");
        MPI_Finalize();
        return 2;
    }
    test_loss_fd();
    size_t subs[3] = {1, 3, 0};
    for (int i = 0; i < 3; i++)
        for (int sym = 0; sym < 2; sym++) test_divide_and_conquer(subs[i], sym);
    int bad = t_failures, any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    int rc = t_finish("test_contrastive");
    MPI_Finalize();
    return any ? 1 : rc;
}
