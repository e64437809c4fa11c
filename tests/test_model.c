// The encoder as a whole: tokenisation, masking rules, the MLM loss, packing
// and micro-batch independence, recomputation, dropout keys, and a directional
// finite-difference check of the full model.
#include "perfcell/classifier.h"
#include "perfcell/linalg.h"
#include "perfcell/mlm.h"
#include "perfcell/model.h"
#include "perfcell/rng.h"
#include "perfcell/tokens.h"
#include "testlib.h"

#include <string.h>

static ModelConfig tiny_config(SeqMode mode, int recompute) {
    ModelConfig c = {0};
    c.mode = mode;
    c.n_genes = 30;
    c.dim = 16;
    c.depth = 2;
    c.heads = 2;
    c.dim_head = 8;
    c.n_features = 12;
    c.ff_dim = 32;
    c.bins = 5;
    c.recompute = recompute;
    return c;
}

// Synthetic cells: cell i has i % 7 + 1 nonzero genes with counts 1..40.
static void make_cells(CellBatch *cb, size_t n, size_t G, uint64_t seed, int64_t first_id) {
    cellbatch_clear(cb);
    cellbatch_reserve(cb, n, n * G);
    Rng r = rng_init(seed, RNG_TEST, 1, 0, 0);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        cb->offset[i] = (int64_t)k;
        cb->cell_id[i] = first_id + (int64_t)i;
        cb->label[i] = -1;
        size_t nnz = i % 7 + 1;
        double total = 0;
        size_t g = rng_below(&r, 3);
        for (size_t j = 0; j < nnz && g < G; j++) {
            cb->gene[k] = (int32_t)g;
            cb->count[k] = (float)(1 + rng_below(&r, 40));
            total += cb->count[k];
            k++;
            g += 1 + rng_below(&r, 3);
        }
        cb->total[i] = total + 50; // genes outside this sketch count towards the total
    }
    cb->offset[n] = (int64_t)k;
    cb->n = n;
    cb->nnz = k;
}

static void test_tokens(void) {
    T_CHECK(token_of_count(0, 100, 5) == 0, "zero count");
    // log2(1 + 1e4 * 1/1e4) = 1 exactly -> token 1; 1e4*3/1e4 -> log2(4) = 2.
    T_CHECK(token_of_count(1, 1e4, 5) == 1 && token_of_count(3, 1e4, 5) == 2, "bins");
    T_CHECK(token_of_count(1000, 1000, 5) == 5, "cap at bins");
    T_CHECK(token_of_count(1, 2e4, 5) == 0, "below one bin");

    CellBatch cb;
    cellbatch_init(&cb);
    make_cells(&cb, 5, 30, 1, 100);
    TokenBatch tb;
    tokenbatch_init(&tb);
    ModelConfig full = tiny_config(SEQ_FULL, 0);
    tokens_from_cells(&tb, &cb, &full, 9, 0);
    T_CHECK(tb.n_tokens == 5 * 31 && tb.offset[1] == 31, "full mode lengths");
    T_CHECK(tb.gene[30] == 30 && tb.token[30] == 0 && tb.gene[29] == 29, "full mode last position");
    int ok = 1;
    for (size_t i = 0; i < (size_t)cb.offset[1]; i++)
        ok &= tb.token[cb.gene[i]] == token_of_count(cb.count[i], cb.total[0], 5);
    T_CHECK(ok, "full mode tokens");

    ModelConfig nz = tiny_config(SEQ_NONZERO, 0);
    tokens_from_cells(&tb, &cb, &nz, 9, 0);
    T_CHECK(tb.n_tokens == cb.nnz + 5, "nonzero mode length");
    T_CHECK(tb.gene[tb.offset[1] - 1] == 30, "nonzero mode last position");
    // A cap keeps a keyed subset in vocabulary order, the same for the same key.
    nz.max_tokens = 3;
    tokens_from_cells(&tb, &cb, &nz, 9, 4);
    size_t c6 = 4; // cell 4 has 5 genes > 3
    size_t t0 = (size_t)tb.offset[c6];
    T_CHECK(tb.offset[c6 + 1] - tb.offset[c6] == 4, "capped length");
    T_CHECK(tb.gene[t0] < tb.gene[t0 + 1] && tb.gene[t0 + 1] < tb.gene[t0 + 2], "subset order");
    int32_t first[4];
    memcpy(first, tb.gene + t0, sizeof first);
    tokens_from_cells(&tb, &cb, &nz, 9, 4);
    T_CHECK(memcmp(first, tb.gene + t0, sizeof first) == 0, "subset not keyed");
    tokenbatch_free(&tb);
    cellbatch_free(&cb);
}

static void test_masking(void) {
    ModelConfig cfg = tiny_config(SEQ_NONZERO, 0);
    cfg.n_genes = 400;
    CellBatch cb;
    cellbatch_init(&cb);
    // Many cells with many genes for the replacement rate.
    size_t n = 300;
    cellbatch_reserve(&cb, n, n * 60);
    Rng r = rng_init(1, RNG_TEST, 2, 0, 0);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        cb.offset[i] = (int64_t)k;
        cb.cell_id[i] = (int64_t)i;
        cb.label[i] = -1;
        for (size_t g = 0; g < 60; g++) {
            cb.gene[k] = (int32_t)(g * 6 + rng_below(&r, 6));
            cb.count[k++] = (float)(1 + rng_below(&r, 30));
        }
        cb.total[i] = 3000;
    }
    cb.offset[n] = (int64_t)k;
    cb.n = n;
    TokenBatch tb, orig;
    tokenbatch_init(&tb);
    tokenbatch_init(&orig);
    tokens_from_cells(&tb, &cb, &cfg, 5, 0);
    tokens_from_cells(&orig, &cb, &cfg, 5, 0);
    size_t chosen = mlm_mask(&tb, &cfg, 0.15, 0.9, 5, 17);
    size_t replaced = 0, total = 0, bad = 0;
    for (size_t b = 0; b < n; b++) {
        size_t t0 = (size_t)tb.offset[b], len = (size_t)tb.offset[b + 1] - t0, maskable = 0, c = 0;
        for (size_t i = 0; i + 1 < len; i++) maskable += orig.token[t0 + i] >= 1 && orig.token[t0 + i] <= 5;
        for (size_t i = 0; i < len; i++) {
            size_t t = t0 + i;
            if (tb.target[t] >= 0) {
                c++;
                bad += i + 1 == len || tb.target[t] != orig.token[t] || orig.token[t] < 1;
                replaced += tb.token[t] == 6;
                bad += tb.token[t] != 6 && tb.token[t] != orig.token[t];
            } else {
                bad += tb.token[t] != orig.token[t];
            }
        }
        bad += c != (size_t)ceil(0.15 * (double)maskable - 1e-9);
        total += c;
    }
    T_CHECK(bad == 0, "%zu masking rule violations", bad);
    T_CHECK(total == chosen, "mlm_mask count");
    // Binomial(total, 0.9): 6 standard deviations.
    double p = (double)replaced / (double)total, sd = sqrt(0.09 / (double)total);
    T_CHECK(fabs(p - 0.9) < 6 * sd, "replacement rate %.4f over %zu", p, total);

    // A cell's mask does not depend on the other cells of its batch.
    CellBatch one;
    cellbatch_init(&one);
    cellbatch_reserve(&one, 1, 60);
    size_t c = 7, o0 = (size_t)cb.offset[c];
    one.n = 1;
    one.offset[0] = 0;
    one.offset[1] = 60;
    one.cell_id[0] = cb.cell_id[c];
    one.label[0] = -1;
    one.total[0] = cb.total[c];
    memcpy(one.gene, cb.gene + o0, 60 * 4);
    memcpy(one.count, cb.count + o0, 60 * 4);
    TokenBatch t1;
    tokenbatch_init(&t1);
    tokens_from_cells(&t1, &one, &cfg, 5, 0);
    mlm_mask(&t1, &cfg, 0.15, 0.9, 5, 17);
    T_CHECK(memcmp(t1.token, tb.token + tb.offset[c], 61 * 4) == 0 &&
                memcmp(t1.target, tb.target + tb.offset[c], 61 * 4) == 0,
            "mask depends on the batch");
    tokenbatch_free(&t1);
    cellbatch_free(&one);
    tokenbatch_free(&tb);
    tokenbatch_free(&orig);
    cellbatch_free(&cb);
}

static void test_mlm_loss_grad(void) {
    size_t T = 6, V = 7;
    float z[42];
    Rng r = rng_init(3, RNG_TEST, 3, 0, 0);
    for (int i = 0; i < 42; i++) z[i] = (float)rng_normal(&r);
    int32_t target[6] = {2, -1, 6, 0, -1, 3};
    float dz[42];
    MlmStats st = {0};
    double loss = mlm_loss(dz, z, target, T, V, 4.0, &st);
    T_CHECK(st.n == 4 && fabs(st.loss_sum / 4.0 - loss) < 1e-12, "stats");
    // Central differences on float logits with h = 1e-2 (loss evaluated in
    // double): error O(h²) ~ 1e-4 relative; tolerance 1e-3.
    double num[42], ana[42];
    for (int i = 0; i < 42; i++) {
        float keep = z[i];
        z[i] = keep + 0.01f;
        double lp = mlm_loss(NULL, z, target, T, V, 4.0, NULL);
        z[i] = keep - 0.01f;
        double lm = mlm_loss(NULL, z, target, T, V, 4.0, NULL);
        z[i] = keep;
        num[i] = (lp - lm) / ((double)(keep + 0.01f) - (double)(keep - 0.01f));
        ana[i] = dz[i];
    }
    double err = t_rel_l2(ana, num, 42, 1e-12);
    T_CHECK(err < 1e-3, "mlm loss gradient vs finite differences: %.2e", err);
}

// --- whole model helpers ----------------------------------------------------

typedef struct {
    Model m;
    TokenBatch tb;
    float *logits, *dlogits, *dhidden;
    size_t V;
} Rig;

static void rig_init(Rig *g, const ModelConfig *cfg, size_t max_tokens, size_t max_cells) {
    ParamTable t;
    param_table_init(&t);
    model_table_add_encoder(&t, cfg);
    mlm_head_add(&t, cfg);
    size_t per_cell = cfg->mode == SEQ_FULL ? cfg->n_genes + 1 : max_tokens;
    T_CHECK(model_alloc(&g->m, cfg, &t, max_tokens, max_cells, per_cell) == 0, "alloc");
    model_init_params(&g->m, 42);
    model_draw_features(&g->m, 42, 0);
    tokenbatch_init(&g->tb);
    g->V = (size_t)cfg->bins + 2;
    g->logits = floats_alloc(max_tokens * g->V);
    g->dlogits = floats_alloc(max_tokens * g->V);
    g->dhidden = floats_alloc(max_tokens * cfg->dim);
}

static void rig_free(Rig *g) {
    model_free(&g->m);
    tokenbatch_free(&g->tb);
    free(g->logits), free(g->dlogits), free(g->dhidden);
}

// Forward + loss (+ backward when grad): returns the loss.
static double rig_step(Rig *g, const TokenBatch *tb, const PassCtx *ctx, double n_norm, int grad) {
    Model *m = &g->m;
    const float *w = m->params + param_table_find(&m->table, "to_out.weight")->offset;
    const float *b = m->params + param_table_find(&m->table, "to_out.bias")->offset;
    model_forward(m, tb, ctx);
    mlm_logits(g->logits, m->hidden, w, b, tb->n_tokens, m->cfg.dim, g->V);
    double loss = mlm_loss(grad ? g->dlogits : NULL, g->logits, tb->target, tb->n_tokens, g->V, n_norm, NULL);
    if (grad) {
        float *dw = m->grads + param_table_find(&m->table, "to_out.weight")->offset;
        float *db = m->grads + param_table_find(&m->table, "to_out.bias")->offset;
        mlm_backward(g->dhidden, dw, db, g->dlogits, m->hidden, w, tb->n_tokens, m->cfg.dim, g->V);
        model_backward(m, tb, ctx, g->dhidden);
    }
    return loss;
}

// Copy cells [c0, c1) of src into dst.
static void sub_batch(TokenBatch *dst, const TokenBatch *src, size_t c0, size_t c1) {
    size_t t0 = (size_t)src->offset[c0], t1 = (size_t)src->offset[c1];
    tokenbatch_reserve(dst, c1 - c0, t1 - t0);
    for (size_t b = c0; b <= c1; b++) dst->offset[b - c0] = src->offset[b] - (int64_t)t0;
    memcpy(dst->token, src->token + t0, (t1 - t0) * 4);
    memcpy(dst->gene, src->gene + t0, (t1 - t0) * 4);
    memcpy(dst->target, src->target + t0, (t1 - t0) * 4);
    memcpy(dst->cell_id, src->cell_id + c0, (c1 - c0) * 8);
    memcpy(dst->label, src->label + c0, (c1 - c0) * 4);
    dst->n_cells = c1 - c0;
    dst->n_tokens = t1 - t0;
}

static void test_packing(SeqMode mode, float dropout) {
    ModelConfig cfg = tiny_config(mode, 0);
    cfg.dropout_emb = cfg.dropout_attn = cfg.dropout_ff = dropout;
    CellBatch cb;
    cellbatch_init(&cb);
    make_cells(&cb, 6, cfg.n_genes, 7, 1000);
    Rig g;
    rig_init(&g, &cfg, 6 * (cfg.n_genes + 1), 6);
    tokens_from_cells(&g.tb, &cb, &cfg, 1, 0);
    size_t n_norm = mlm_mask(&g.tb, &cfg, 0.15, 0.9, 1, 3);
    T_CHECK(n_norm > 0, "nothing masked");
    PassCtx ctx = {77, 3, 0, 1};
    size_t P = g.m.table.total;

    // All cells packed in one micro-batch.
    model_zero_grad(&g.m);
    double loss_all = rig_step(&g, &g.tb, &ctx, (double)n_norm, 1);
    float *grad_all = malloc(P * 4), *hid_all = malloc(g.tb.n_tokens * cfg.dim * 4);
    memcpy(grad_all, g.m.grads, P * 4);
    memcpy(hid_all, g.m.hidden, g.tb.n_tokens * cfg.dim * 4);

    // Each cell alone, and a 2 + 4 split: same hidden states, same summed
    // gradients. Different matrix shapes change the summation order inside
    // sgemm, so agreement is to float rounding: 1e-5 relative (L2).
    TokenBatch sub;
    tokenbatch_init(&sub);
    size_t splits[2][7] = {{0, 1, 2, 3, 4, 5, 6}, {0, 2, 6, 0, 0, 0, 0}};
    size_t nsplit[2] = {6, 2};
    for (int s = 0; s < 2; s++) {
        model_zero_grad(&g.m);
        double loss = 0, herr = 0;
        for (size_t i = 0; i < nsplit[s]; i++) {
            sub_batch(&sub, &g.tb, splits[s][i], splits[s][i + 1]);
            loss += rig_step(&g, &sub, &ctx, (double)n_norm, 1);
            size_t t0 = (size_t)g.tb.offset[splits[s][i]];
            double e = t_rel_l2f(g.m.hidden, hid_all + t0 * cfg.dim, sub.n_tokens * cfg.dim, 1e-12);
            if (e > herr) herr = e;
        }
        double gerr = t_rel_l2f(g.m.grads, grad_all, P, 1e-12);
        T_CHECK(herr < 1e-5, "mode %d dropout %.1f split %d: hidden differs (%.2e)", mode, dropout, s, herr);
        T_CHECK(gerr < 1e-5, "mode %d dropout %.1f split %d: gradients differ (%.2e)", mode, dropout, s, gerr);
        T_CHECK(fabs(loss - loss_all) < 1e-5 * fabs(loss_all), "loss differs %g %g", loss, loss_all);
        printf("  packing mode=%s dropout=%.1f split=%d: hidden %.1e grads %.1e\n",
               mode == SEQ_FULL ? "full" : "nonzero", dropout, s, herr, gerr);
    }
    tokenbatch_free(&sub);
    free(grad_all), free(hid_all);
    rig_free(&g);
    cellbatch_free(&cb);
}

static void test_recompute_and_dropout(void) {
    CellBatch cb;
    cellbatch_init(&cb);
    ModelConfig a = tiny_config(SEQ_NONZERO, 0), b = tiny_config(SEQ_NONZERO, 1);
    a.dropout_emb = a.dropout_attn = a.dropout_ff = 0.1f;
    b.dropout_emb = b.dropout_attn = b.dropout_ff = 0.1f;
    make_cells(&cb, 5, a.n_genes, 8, 50);
    Rig ga, gb;
    rig_init(&ga, &a, 5 * 31, 5);
    rig_init(&gb, &b, 5 * 31, 5);
    tokens_from_cells(&ga.tb, &cb, &a, 1, 0);
    size_t nn = mlm_mask(&ga.tb, &a, 0.5, 0.9, 1, 1);
    PassCtx ctx = {5, 1, 0, 1};
    model_zero_grad(&ga.m);
    model_zero_grad(&gb.m);
    double la = rig_step(&ga, &ga.tb, &ctx, (double)nn, 1);
    double lb = rig_step(&gb, &ga.tb, &ctx, (double)nn, 1);
    T_CHECK(la == lb, "recompute changes the loss");
    T_CHECK(memcmp(ga.m.grads, gb.m.grads, ga.m.table.total * 4) == 0,
            "recompute changes the gradients (must be bitwise equal)");
    T_CHECK(gb.m.arena_bytes < ga.m.arena_bytes, "recompute does not save memory");
    // Same keys: the same forward; another view: another dropout mask.
    model_forward(&ga.m, &ga.tb, &ctx);
    float *h1 = malloc(ga.tb.n_tokens * a.dim * 4);
    memcpy(h1, ga.m.hidden, ga.tb.n_tokens * a.dim * 4);
    model_forward(&ga.m, &ga.tb, &ctx);
    T_CHECK(memcmp(h1, ga.m.hidden, ga.tb.n_tokens * a.dim * 4) == 0, "dropout not keyed");
    PassCtx v1 = ctx;
    v1.view = 1;
    model_forward(&ga.m, &ga.tb, &v1);
    T_CHECK(memcmp(h1, ga.m.hidden, ga.tb.n_tokens * a.dim * 4) != 0, "views share dropout masks");
    PassCtx ev = ctx;
    ev.train = 0;
    model_forward(&ga.m, &ga.tb, &ev);
    T_CHECK(memcmp(h1, ga.m.hidden, ga.tb.n_tokens * a.dim * 4) != 0, "evaluation applies dropout");
    free(h1);
    rig_free(&ga);
    rig_free(&gb);
    cellbatch_free(&cb);
}

// d/dε L(θ + ε·u) at 0 by central differences, against ⟨∇L, u⟩, over all
// trainable parameters. In float the loss carries about 1e-7 relative noise,
// so the direction mixes the gradient (for signal) with an equal-norm random
// part (so that errors orthogonal to the gradient show too), and ε is chosen
// so that the two evaluations differ by about 2e-3 of the loss: noise then
// contributes ~1e-4 relative and truncation (ε² terms) less; we require 2e-3.
static void test_directional_fd(SeqMode mode) {
    ModelConfig cfg = tiny_config(mode, 0);
    CellBatch cb;
    cellbatch_init(&cb);
    make_cells(&cb, 3, cfg.n_genes, 9, 0);
    Rig g;
    rig_init(&g, &cfg, 3 * 31, 3);
    tokens_from_cells(&g.tb, &cb, &cfg, 1, 0);
    size_t nn = mlm_mask(&g.tb, &cfg, 0.5, 0.9, 1, 0);
    PassCtx ctx = {1, 0, 0, 0};
    model_zero_grad(&g.m);
    rig_step(&g, &g.tb, &ctx, (double)nn, 1);
    size_t P = g.m.table.total;
    float *u = calloc(P, 4), *theta = malloc(P * 4);
    memcpy(theta, g.m.params, P * 4);
    Rng r = rng_init(4, RNG_TEST, 4, 0, 0);
    double gnorm2 = 0, loss0 = rig_step(&g, &g.tb, &ctx, (double)nn, 0);
    size_t count = 0;
    for (size_t i = 0; i < P; i++) gnorm2 += (double)g.m.grads[i] * g.m.grads[i];
    for (size_t i = 0; i < g.m.table.n; i++)
        if (g.m.table.e[i].trainable) count += g.m.table.e[i].size;
    double noise = sqrt(gnorm2 / (double)count), gu = 0;
    for (size_t i = 0; i < g.m.table.n; i++) {
        const ParamEntry *e = &g.m.table.e[i];
        if (!e->trainable) continue;
        for (size_t j = 0; j < e->size; j++) {
            if (strcmp(e->name, "pos_emb.emb.weight") == 0 && j >= cfg.n_genes * cfg.dim) continue;
            float gi = g.m.grads[e->offset + j];
            u[e->offset + j] = gi + (float)(rng_normal(&r) * noise);
            gu += (double)u[e->offset + j] * gi;
        }
    }
    const double eps = 1e-3 * fabs(loss0) / fabs(gu);
    double l[2];
    for (int s = 0; s < 2; s++) {
        for (size_t i = 0; i < P; i++) g.m.params[i] = theta[i] + (float)((s ? -eps : eps)) * u[i];
        l[s] = rig_step(&g, &g.tb, &ctx, (double)nn, 0);
    }
    memcpy(g.m.params, theta, P * 4);
    double num = (l[0] - l[1]) / (2 * eps);
    double rel = fabs(num - gu) / fabs(gu);
    T_CHECK(rel < 2e-3, "%s: directional derivative %.6g vs gradient %.6g (rel %.2e)",
            mode == SEQ_FULL ? "full" : "nonzero", num, gu, rel);
    printf("  directional FD %-7s num %.6g analytic %.6g rel %.1e\n",
           mode == SEQ_FULL ? "full" : "nonzero", num, gu, rel);
    free(u), free(theta);
    rig_free(&g);
    cellbatch_free(&cb);
}

// The classification heads against central differences (h = 1e-6) of an
// independent double-precision implementation of the head and its
// cross-entropy, for every head parameter and for the gradient the head hands
// to the hidden states: scBERT's head (full mode, and nonzero mode with
// positions at their gene slots) and the pooled head (mean and last). The
// analytic side is float, so agreement is to ~1e-6; we require 1e-5 (L2).

typedef struct {
    ClsConfig cc;
    size_t C, T_cell, B;
    const TokenBatch *tb;
    double *w[8];   // head parameters in table order
    size_t n[8];
    double *H;      // (T, C) hidden states
} HeadRef;

static double relu_d(double x) { return x > 0 ? x : 0; }

static double head_ref_loss(const HeadRef *r) {
    const size_t C = r->C, K = r->cc.n_classes, Hh = r->cc.hidden;
    double loss = 0;
    for (size_t b = 0; b < r->B; b++) {
        size_t t0 = (size_t)r->tb->offset[b], t1 = (size_t)r->tb->offset[b + 1];
        double z[8] = {0};
        if (r->cc.kind == CLS_SCBERT) {
            const size_t T = r->T_cell, F1 = CLS_SCBERT_FC1;
            double *x = calloc(T, sizeof *x), *a1 = malloc(F1 * sizeof *a1), a2[64];
            for (size_t t = t0; t < t1; t++) {
                double s = r->w[1][0];
                for (size_t k = 0; k < C; k++) s += r->H[t * C + k] * r->w[0][k];
                x[r->tb->gene[t]] = relu_d(s);
            }
            for (size_t o = 0; o < F1; o++) {
                double s = r->w[3][o];
                for (size_t i = 0; i < T; i++) s += r->w[2][o * T + i] * x[i];
                a1[o] = relu_d(s);
            }
            for (size_t o = 0; o < Hh; o++) {
                double s = r->w[5][o];
                for (size_t i = 0; i < F1; i++) s += r->w[4][o * F1 + i] * a1[i];
                a2[o] = relu_d(s);
            }
            for (size_t o = 0; o < K; o++) {
                z[o] = r->w[7][o];
                for (size_t i = 0; i < Hh; i++) z[o] += r->w[6][o * Hh + i] * a2[i];
            }
            free(x), free(a1);
        } else if (r->cc.kind == CLS_LINEAR) {
            const size_t T = r->T_cell;
            double *x = calloc(T, sizeof *x);
            for (size_t t = t0; t < t1; t++) {
                double s = r->w[1][0];
                for (size_t k = 0; k < C; k++) s += r->H[t * C + k] * r->w[0][k];
                x[r->tb->gene[t]] = relu_d(s);
            }
            for (size_t o = 0; o < K; o++) {
                z[o] = r->w[3][o];
                for (size_t i = 0; i < T; i++) z[o] += r->w[2][o * T + i] * x[i];
            }
            free(x);
        } else {
            double p[64] = {0}, a1[64];
            for (size_t k = 0; k < C; k++) {
                if (r->cc.pool_mean) {
                    for (size_t t = t0; t < t1; t++) p[k] += r->H[t * C + k];
                    p[k] /= (double)(t1 - t0);
                } else {
                    p[k] = r->H[(t1 - 1) * C + k];
                }
            }
            for (size_t o = 0; o < Hh; o++) {
                double s = r->w[1][o];
                for (size_t i = 0; i < C; i++) s += r->w[0][o * C + i] * p[i];
                a1[o] = relu_d(s);
            }
            for (size_t o = 0; o < K; o++) {
                z[o] = r->w[3][o];
                for (size_t i = 0; i < Hh; i++) z[o] += r->w[2][o * Hh + i] * a1[i];
            }
        }
        double mx = z[0], sum = 0;
        for (size_t o = 1; o < K; o++) mx = z[o] > mx ? z[o] : mx;
        for (size_t o = 0; o < K; o++) sum += exp(z[o] - mx);
        loss += mx + log(sum) - z[r->tb->label[b]];
    }
    return loss / (double)r->B;
}

static double fd_vs(HeadRef *r, double *x, size_t n, const float *analytic) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double keep = x[i], h = 1e-6;
        x[i] = keep + h;
        double lp = head_ref_loss(r);
        x[i] = keep - h;
        double lm = head_ref_loss(r);
        x[i] = keep;
        double g = (lp - lm) / (2 * h), d = g - (double)analytic[i];
        num += d * d;
        den += g * g;
    }
    return sqrt(num / (den > 1e-30 ? den : 1e-30));
}

static void test_classifier_heads(SeqMode mode, ClsKind kind, int pool_mean) {
    ModelConfig cfg = tiny_config(mode, 0);
    CellBatch cb;
    cellbatch_init(&cb);
    make_cells(&cb, 4, cfg.n_genes, 13, 0);
    for (size_t i = 0; i < 4; i++) cb.label[i] = (int32_t)(i % 3);
    ClsConfig cc = {kind, 3, 8, pool_mean};
    ParamTable t;
    param_table_init(&t);
    model_table_add_encoder(&t, &cfg);
    classifier_head_add(&t, &cfg, &cc);
    Model m;
    T_CHECK(model_alloc(&m, &cfg, &t, 4 * 31, 4, 31) == 0, "alloc");
    model_init_params(&m, 8);
    model_draw_features(&m, 8, 0);
    Classifier cls;
    classifier_init(&cls, &m, &cc);
    TokenBatch tb;
    tokenbatch_init(&tb);
    tokens_from_cells(&tb, &cb, &cfg, 1, 0);
    float logits[12], dlogits[12];
    float *dh = floats_alloc(tb.n_tokens * cfg.dim);
    PassCtx ctx = {1, 0, 0, 0};
    model_zero_grad(&m);
    model_forward(&m, &tb, &ctx);
    classifier_forward(&cls, &m, &tb, logits);
    double lf = classifier_loss(dlogits, logits, tb.label, 4, 3, NULL, 4.0, NULL);
    classifier_backward(&cls, &m, &tb, dlogits, dh);

    HeadRef r = {cc, cfg.dim, cfg.n_genes + 1, 4, &tb, {0}, {0}, NULL};
    size_t nt = cls_tensor_count(kind), first = m.table.n - nt;
    for (size_t i = 0; i < nt; i++) {
        const ParamEntry *e = &m.table.e[first + i];
        r.n[i] = e->size;
        r.w[i] = malloc(e->size * sizeof(double));
        for (size_t j = 0; j < e->size; j++) r.w[i][j] = m.params[e->offset + j];
    }
    r.H = malloc(tb.n_tokens * cfg.dim * sizeof(double));
    for (size_t j = 0; j < tb.n_tokens * cfg.dim; j++) r.H[j] = m.hidden[j];
    const char *name = kind == CLS_SCBERT   ? (mode == SEQ_FULL ? "scbert/full" : "scbert/nonzero")
                       : kind == CLS_LINEAR ? (mode == SEQ_FULL ? "linear/full" : "linear/nonzero")
                                            : (pool_mean ? "pooled/mean" : "pooled/last");
    double lr = head_ref_loss(&r);
    T_CHECK(fabs(lr - lf) < 1e-5 * fabs(lr), "classifier %s: loss %.8f vs double reference %.8f", name, lf, lr);
    double worst = 0;
    const char *worst_t = "";
    for (size_t i = 0; i < nt; i++) {
        const ParamEntry *e = &m.table.e[first + i];
        double err = fd_vs(&r, r.w[i], r.n[i], m.grads + e->offset);
        T_CHECK(err < 1e-5, "classifier %s: gradient of %s vs finite differences: %.2e", name, e->name, err);
        if (err > worst) worst = err, worst_t = e->name;
    }
    double eh = fd_vs(&r, r.H, tb.n_tokens * cfg.dim, dh);
    T_CHECK(eh < 1e-5, "classifier %s: gradient of the hidden states vs finite differences: %.2e", name, eh);
    printf("  classifier %-15s head tensors worst %.1e (%s), hidden states %.1e\n", name, worst, worst_t, eh);
    for (size_t i = 0; i < nt; i++) free(r.w[i]);
    free(r.H), free(dh);
    classifier_free(&cls);
    model_free(&m);
    tokenbatch_free(&tb);
    cellbatch_free(&cb);
}

int main(void) {
    test_tokens();
    test_masking();
    test_mlm_loss_grad();
    test_packing(SEQ_NONZERO, 0.0f);
    test_packing(SEQ_NONZERO, 0.1f);
    test_packing(SEQ_FULL, 0.0f);
    test_recompute_and_dropout();
    test_directional_fd(SEQ_NONZERO);
    test_directional_fd(SEQ_FULL);
    test_classifier_heads(SEQ_FULL, CLS_SCBERT, 0);
    test_classifier_heads(SEQ_NONZERO, CLS_SCBERT, 0);
    test_classifier_heads(SEQ_NONZERO, CLS_POOLED, 1);
    test_classifier_heads(SEQ_NONZERO, CLS_POOLED, 0);
    test_classifier_heads(SEQ_FULL, CLS_LINEAR, 0);
    test_classifier_heads(SEQ_NONZERO, CLS_LINEAR, 0);
    return t_finish("test_model");
}
