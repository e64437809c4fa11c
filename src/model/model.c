// The Performer encoder: parameters, arena, forward and backward.
#include "perfcell/model.h"

#include "perfcell/error.h"
#include "perfcell/layers.h"
#include "perfcell/linalg.h"
#include "perfcell/rng.h"
#include "perfcell/util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *const PROF_NAMES[PROF_N] = {"embedding", "layernorm", "qkv projections", "favor+ attention",
                                        "attention output", "feed-forward", "dropout"};

// Section timers: cheap (two clock reads per section) and only when asked.
#define PROF_BEGIN(m) double prof_t0_ = (m)->profile ? time_now() : 0.0
#define PROF_RESTART(m) prof_t0_ = (m)->profile ? time_now() : 0.0
#define PROF_END(m, arr, part)                                                                     \
    do {                                                                                           \
        if ((m)->profile) {                                                                        \
            double prof_t1_ = time_now();                                                          \
            (m)->arr[part] += prof_t1_ - prof_t0_;                                                 \
            prof_t0_ = prof_t1_;                                                                   \
        }                                                                                          \
    } while (0)

// ---------------------------------------------------------------------------
// Token batches

void tokenbatch_init(TokenBatch *tb) { memset(tb, 0, sizeof *tb); }

void tokenbatch_free(TokenBatch *tb) {
    free(tb->offset);
    free(tb->token);
    free(tb->gene);
    free(tb->target);
    free(tb->cell_id);
    free(tb->label);
    memset(tb, 0, sizeof *tb);
}

void tokenbatch_reserve(TokenBatch *tb, size_t n_cells, size_t n_tokens) {
    // offset always has room for n_cells + 1 entries, also for an empty batch.
    if (n_cells > tb->cap_cells || !tb->offset) {
        tb->offset = xrealloc(tb->offset, (n_cells + 1) * sizeof *tb->offset);
        tb->cell_id = xrealloc(tb->cell_id, n_cells * sizeof *tb->cell_id);
        tb->label = xrealloc(tb->label, n_cells * sizeof *tb->label);
        tb->cap_cells = n_cells;
    }
    if (n_tokens > tb->cap_tokens) {
        tb->token = xrealloc(tb->token, n_tokens * sizeof *tb->token);
        tb->gene = xrealloc(tb->gene, n_tokens * sizeof *tb->gene);
        tb->target = xrealloc(tb->target, n_tokens * sizeof *tb->target);
        tb->cap_tokens = n_tokens;
    }
}

// ---------------------------------------------------------------------------
// Configuration and parameters

int model_config_check(const ModelConfig *c) {
    if (c->n_genes == 0) return error_set("model: n_genes must be positive");
    if (c->dim == 0 || c->depth == 0 || c->heads == 0 || c->dim_head == 0 || c->n_features == 0 ||
        c->ff_dim == 0)
        return error_set("model: dim, depth, heads, dim_head, nb_features and ff_dim must be positive");
    if (c->bins < 1 || c->bins > 1000) return error_set("model: bins must be in [1, 1000]");
    float d[3] = {c->dropout_emb, c->dropout_attn, c->dropout_ff};
    for (int i = 0; i < 3; i++)
        if (!(d[i] >= 0.0f && d[i] < 1.0f)) return error_set("model: dropout rates must be in [0, 1)");
    return 0;
}

void model_table_add_encoder(ParamTable *t, const ModelConfig *cfg) {
    const size_t C = cfg->dim, HE = cfg->heads * cfg->dim_head, F = cfg->ff_dim;
    const size_t V = (size_t)cfg->bins + 2, G = cfg->n_genes;
    // torch.nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    const float uc = 1.0f / sqrtf((float)C), uhe = 1.0f / sqrtf((float)HE), uf = 1.0f / sqrtf((float)F);
    param_table_add(t, "token_emb.weight", 2, V, C, 1, 0, INIT_NORMAL, 0.02f);
    param_table_add(t, "pos_emb.emb.weight", 2, G + 1, C, !cfg->gene_emb_frozen, 0, INIT_NORMAL,
                    0.02f);
    char name[PARAM_NAME_MAX];
    for (size_t l = 0; l < cfg->depth; l++) {
#define ADD(suffix, nd, d0, d1, decay, init, scale)                                                \
    do {                                                                                           \
        snprintf(name, sizeof name, "performer.net.layers.%zu.%s", l, suffix);                     \
        param_table_add(t, name, nd, d0, d1, 1, decay, init, scale);                               \
    } while (0)
        ADD("0.norm.weight", 1, C, 0, 0, INIT_ONES, 0);
        ADD("0.norm.bias", 1, C, 0, 0, INIT_ZEROS, 0);
        ADD("0.fn.to_q.weight", 2, HE, C, 1, INIT_UNIFORM, uc);
        ADD("0.fn.to_k.weight", 2, HE, C, 1, INIT_UNIFORM, uc);
        ADD("0.fn.to_v.weight", 2, HE, C, 1, INIT_UNIFORM, uc);
        ADD("0.fn.to_out.weight", 2, C, HE, 1, INIT_UNIFORM, uhe);
        ADD("0.fn.to_out.bias", 1, C, 0, 0, INIT_UNIFORM, uhe);
        ADD("1.norm.weight", 1, C, 0, 0, INIT_ONES, 0);
        ADD("1.norm.bias", 1, C, 0, 0, INIT_ZEROS, 0);
        ADD("1.fn.fn.w1.weight", 2, F, C, 1, INIT_UNIFORM, uc);
        ADD("1.fn.fn.w1.bias", 1, F, 0, 0, INIT_UNIFORM, uc);
        ADD("1.fn.fn.w2.weight", 2, C, F, 1, INIT_UNIFORM, uf);
        ADD("1.fn.fn.w2.bias", 1, C, 0, 0, INIT_UNIFORM, uf);
#undef ADD
    }
    param_table_add(t, "norm.weight", 1, C, 0, 1, 0, INIT_ONES, 0);
    param_table_add(t, "norm.bias", 1, C, 0, 1, 0, INIT_ZEROS, 0);
}

static float *param_ptr(const Model *m, float *base, const char *name) {
    const ParamEntry *e = param_table_find(&m->table, name);
    CHECK(e, "internal: parameter %s missing from the table", name);
    return base + e->offset;
}

static void bind_layer(const Model *m, float *base, size_t l, LayerWeights *w) {
    char n[PARAM_NAME_MAX];
#define P(field, suffix)                                                                           \
    do {                                                                                           \
        snprintf(n, sizeof n, "performer.net.layers.%zu.%s", l, suffix);                           \
        w->field = param_ptr(m, base, n);                                                          \
    } while (0)
    P(ln1_w, "0.norm.weight");
    P(ln1_b, "0.norm.bias");
    P(wq, "0.fn.to_q.weight");
    P(wk, "0.fn.to_k.weight");
    P(wv, "0.fn.to_v.weight");
    P(wo, "0.fn.to_out.weight");
    P(bo, "0.fn.to_out.bias");
    P(ln2_w, "1.norm.weight");
    P(ln2_b, "1.norm.bias");
    P(w1, "1.fn.fn.w1.weight");
    P(b1, "1.fn.fn.w1.bias");
    P(w2, "1.fn.fn.w2.weight");
    P(b2, "1.fn.fn.w2.bias");
#undef P
}

// ---------------------------------------------------------------------------
// Arena

typedef struct {
    size_t floats;
    size_t ibytes;
} ArenaPlan;

static size_t al16(size_t n) { return (n + 15) / 16 * 16; }

static FavorDims favor_dims(const ModelConfig *c) {
    FavorDims d = {c->heads, c->dim_head, c->n_features};
    return d;
}

static size_t layer_acts_floats(const ModelConfig *c, size_t T, size_t B) {
    const size_t C = c->dim, HE = c->heads * c->dim_head, F = c->ff_dim;
    FavorDims fd = favor_dims(c);
    return al16(T * C) * 3 + al16(T) * 4 + al16(T * HE) * 4 + al16(T * F) * 2 +
           al16(favor_cache_floats(&fd, T, B));
}

static ArenaPlan arena_plan(const ModelConfig *c, size_t T, size_t B, size_t n, int forward_only) {
    const size_t C = c->dim, HE = c->heads * c->dim_head, F = c->ff_dim, L = c->depth;
    FavorDims fd = favor_dims(c);
    size_t n_acts = c->recompute || forward_only ? 1 : L;
    ArenaPlan p;
    p.floats = (L + 1) * al16(T * C) + al16(T * C) + 2 * al16(T) + n_acts * layer_acts_floats(c, T, B);
    if (!forward_only)
        p.floats += 3 * al16(T * C) + 4 * al16(T * HE) + al16(T * F) + al16(favor_scratch_floats(&fd, n));
    p.ibytes = n_acts * ((favor_cache_ints_bytes(&fd, T, B) + 63) / 64 * 64);
    return p;
}

size_t model_arena_bytes(const ModelConfig *cfg, size_t max_tokens, size_t max_cells,
                         size_t max_cell_tokens) {
    ArenaPlan p = arena_plan(cfg, max_tokens, max_cells, max_cell_tokens, 0);
    return p.floats * sizeof(float) + p.ibytes;
}

static int alloc_model(Model *m, const ModelConfig *cfg, ParamTable *table, size_t max_tokens,
                       size_t max_cells, size_t max_cell_tokens, int forward_only) {
    memset(m, 0, sizeof *m);
    m->forward_only = forward_only;
    if (model_config_check(cfg) != 0) return -1;
    if (max_tokens == 0 || max_cells == 0 || max_cell_tokens == 0 || max_cell_tokens > max_tokens)
        return error_set("model: bad arena sizes (tokens %zu, cells %zu, tokens per cell %zu)",
                         max_tokens, max_cells, max_cell_tokens);
    m->cfg = *cfg;
    m->table = *table;
    memset(table, 0, sizeof *table);
    const size_t C = cfg->dim, HE = cfg->heads * cfg->dim_head, F = cfg->ff_dim, L = cfg->depth;
    const size_t T = max_tokens, B = max_cells;
    m->params = floats_alloc(m->table.total);
    m->token_emb = param_ptr(m, m->params, "token_emb.weight");
    m->gene_emb = param_ptr(m, m->params, "pos_emb.emb.weight");
    m->norm_w = param_ptr(m, m->params, "norm.weight");
    m->norm_b = param_ptr(m, m->params, "norm.bias");
    m->w = xcalloc(L, sizeof *m->w);
    m->dw = xcalloc(L, sizeof *m->dw);
    for (size_t l = 0; l < L; l++) bind_layer(m, m->params, l, &m->w[l]);
    if (!forward_only) {
        m->grads = floats_alloc(m->table.total);
        m->dtoken_emb = param_ptr(m, m->grads, "token_emb.weight");
        m->dgene_emb = param_ptr(m, m->grads, "pos_emb.emb.weight");
        m->dnorm_w = param_ptr(m, m->grads, "norm.weight");
        m->dnorm_b = param_ptr(m, m->grads, "norm.bias");
        for (size_t l = 0; l < L; l++) bind_layer(m, m->grads, l, &m->dw[l]);
    }
    m->proj = floats_alloc(L * cfg->n_features * cfg->dim_head);
    m->layer_trainable = xcalloc(L, sizeof *m->layer_trainable);
    for (size_t i = 0; i < m->table.n; i++) {
        const ParamEntry *e = &m->table.e[i];
        if (!e->trainable) continue;
        size_t l;
        if (sscanf(e->name, "performer.net.layers.%zu.", &l) == 1 && l < L) m->layer_trainable[l] = 1;
        else if (strcmp(e->name, "token_emb.weight") == 0 || strcmp(e->name, "pos_emb.emb.weight") == 0)
            m->emb_trainable = 1;
        else if (strncmp(e->name, "norm.", 5) == 0) m->norm_trainable = 1;
    }
    m->any_trainable = m->emb_trainable || m->norm_trainable;
    for (size_t l = 0; l < L; l++) m->any_trainable |= m->layer_trainable[l];

    m->max_tokens = T;
    m->max_cells = B;
    m->max_cell_tokens = max_cell_tokens;
    ArenaPlan plan = arena_plan(cfg, T, B, max_cell_tokens, forward_only);
    m->arena_bytes = plan.floats * sizeof(float) + plan.ibytes;
    m->arena = floats_alloc(plan.floats);
    m->iarena = xcalloc(1, plan.ibytes ? plan.ibytes : 1);
    float *p = m->arena;
#define TAKE(n) (p += al16(n), p - al16(n))
    m->x = xcalloc(L + 1, sizeof *m->x);
    for (size_t l = 0; l <= L; l++) m->x[l] = TAKE(T * C);
    m->hidden = TAKE(T * C);
    m->fin_mean = TAKE(T);
    m->fin_rstd = TAKE(T);
    size_t n_acts = cfg->recompute || forward_only ? 1 : L;
    m->acts = xcalloc(n_acts, sizeof *m->acts);
    FavorDims fd = favor_dims(cfg);
    char *ip = m->iarena;
    for (size_t i = 0; i < n_acts; i++) {
        LayerActs *a = &m->acts[i];
        a->ln1 = TAKE(T * C);
        a->ln1_mean = TAKE(T);
        a->ln1_rstd = TAKE(T);
        a->q = TAKE(T * HE);
        a->k = TAKE(T * HE);
        a->v = TAKE(T * HE);
        a->attn = TAKE(T * HE);
        a->res1 = TAKE(T * C);
        a->ln2 = TAKE(T * C);
        a->ln2_mean = TAKE(T);
        a->ln2_rstd = TAKE(T);
        a->ff_pre = TAKE(T * F);
        a->ff_act = TAKE(T * F);
        float *fc = TAKE(favor_cache_floats(&fd, T, B));
        favor_cache_bind(&a->favor, &fd, T, B, fc, ip);
        ip += (favor_cache_ints_bytes(&fd, T, B) + 63) / 64 * 64;
    }
    if (!forward_only) {
        m->dx = TAKE(T * C);
        m->dtmp = TAKE(T * C);
        m->dln = TAKE(T * C);
        m->dq = TAKE(T * HE);
        m->dk = TAKE(T * HE);
        m->dv = TAKE(T * HE);
        m->dattn = TAKE(T * HE);
        m->dff = TAKE(T * F);
        m->favor_scratch = TAKE(favor_scratch_floats(&fd, max_cell_tokens));
    }
#undef TAKE
    CHECK((size_t)(p - m->arena) == plan.floats, "internal: arena plan mismatch");
    return 0;
}

int model_alloc(Model *m, const ModelConfig *cfg, ParamTable *table, size_t max_tokens,
                size_t max_cells, size_t max_cell_tokens) {
    return alloc_model(m, cfg, table, max_tokens, max_cells, max_cell_tokens, 0);
}

int model_alloc_inference(Model *m, const ModelConfig *cfg, ParamTable *table, size_t max_tokens,
                          size_t max_cells, size_t max_cell_tokens) {
    return alloc_model(m, cfg, table, max_tokens, max_cells, max_cell_tokens, 1);
}

void model_free(Model *m) {
    free(m->params);
    free(m->grads);
    free(m->w);
    free(m->dw);
    free(m->proj);
    free(m->layer_trainable);
    free(m->arena);
    free(m->iarena);
    free(m->x);
    free(m->acts);
    param_table_free(&m->table);
    memset(m, 0, sizeof *m);
}

void model_init_params(Model *m, uint64_t seed) {
    param_table_init_values(&m->table, m->params, seed);
    // The last position's gene-embedding row is zero (scBERT appends a zero row).
    memset(m->gene_emb + m->cfg.n_genes * m->cfg.dim, 0, m->cfg.dim * sizeof(float));
}

void model_zero_grad(Model *m) {
    if (m->grads) memset(m->grads, 0, m->table.total * sizeof(float));
}

// ---------------------------------------------------------------------------
// Random features

void favor_features_draw(float *proj, size_t M, size_t E, uint64_t seed, uint32_t layer,
                         int64_t index) {
    double *g = xmalloc(E * E * sizeof *g);
    size_t rows = 0;
    for (uint32_t blk = 0; rows < M; blk++) {
        // Gaussian E×E, then modified Gram-Schmidt on its columns: the columns of
        // Q are the rows of Qᵀ.
        Rng r = rng_init(seed, RNG_FEATURES, layer, (uint64_t)index, blk);
        for (size_t i = 0; i < E * E; i++) g[i] = rng_normal(&r);
        for (size_t j = 0; j < E; j++) {
            for (size_t i = 0; i < j; i++) {
                double dot = 0.0;
                for (size_t k = 0; k < E; k++) dot += g[k * E + i] * g[k * E + j];
                for (size_t k = 0; k < E; k++) g[k * E + j] -= dot * g[k * E + i];
            }
            double nrm = 0.0;
            for (size_t k = 0; k < E; k++) nrm += g[k * E + j] * g[k * E + j];
            nrm = sqrt(nrm);
            for (size_t k = 0; k < E; k++) g[k * E + j] /= nrm;
        }
        for (size_t j = 0; j < E && rows < M; j++, rows++)
            for (size_t k = 0; k < E; k++) proj[rows * E + k] = (float)g[k * E + j];
    }
    // Row norms as those of Gaussian rows (chi distribution with E degrees).
    Rng r = rng_init(seed, RNG_FEATURES, layer, (uint64_t)index, 0xFFFFFFFFu);
    for (size_t i = 0; i < M; i++) {
        double s = 0.0;
        for (size_t k = 0; k < E; k++) {
            double z = rng_normal(&r);
            s += z * z;
        }
        float scale = (float)sqrt(s);
        for (size_t k = 0; k < E; k++) proj[i * E + k] *= scale;
    }
    free(g);
}

void model_draw_features(Model *m, uint64_t seed, int64_t index) {
    const size_t M = m->cfg.n_features, E = m->cfg.dim_head;
    for (size_t l = 0; l < m->cfg.depth; l++)
        favor_features_draw(m->proj + l * M * E, M, E, seed, (uint32_t)l, index);
    m->feature_seed = seed;
    m->redraw_index = index;
}

// ---------------------------------------------------------------------------
// Dropout over packed cells: each cell's block gets its own keyed mask.

enum { SITE_EMB = 0, SITE_ATTN = 1, SITE_FF = 2 };

static void dropout_cells(float *x, size_t width, float rate, const TokenBatch *tb,
                          const PassCtx *ctx, size_t layer, int site) {
    if (!ctx->train || rate <= 0.0f) return;
    uint32_t sub = (uint32_t)(layer << 8 | (size_t)site << 4 | (size_t)(ctx->view & 15));
    for (size_t b = 0; b < tb->n_cells; b++) {
        size_t t0 = (size_t)tb->offset[b], n = (size_t)tb->offset[b + 1] - t0;
        Rng key = rng_init(ctx->seed, RNG_DROPOUT, sub, (uint64_t)tb->cell_id[b], (uint32_t)ctx->step);
        dropout_apply(x + t0 * width, n * width, rate, &key);
    }
}

// ---------------------------------------------------------------------------
// One block

static void block_forward(Model *m, size_t l, LayerActs *a, const TokenBatch *tb,
                          const PassCtx *ctx) {
    const ModelConfig *c = &m->cfg;
    const size_t T = tb->n_tokens, C = c->dim, HE = c->heads * c->dim_head, F = c->ff_dim;
    const LayerWeights *w = &m->w[l];
    const float *x = m->x[l];
    float *y = m->x[l + 1];
    FavorDims fd = favor_dims(c);

    PROF_BEGIN(m);
    layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, w->ln1_w, w->ln1_b, T, C);
    PROF_END(m, prof_fwd, PROF_NORM);
    linear_forward(a->q, a->ln1, w->wq, NULL, T, C, HE);
    linear_forward(a->k, a->ln1, w->wk, NULL, T, C, HE);
    linear_forward(a->v, a->ln1, w->wv, NULL, T, C, HE);
    PROF_END(m, prof_fwd, PROF_QKV);
    favor_forward(a->attn, &a->favor, a->q, a->k, a->v, m->proj + l * c->n_features * c->dim_head,
                  tb->offset, tb->n_cells, &fd);
    PROF_END(m, prof_fwd, PROF_FAVOR);
    linear_forward(a->res1, a->attn, w->wo, w->bo, T, HE, C);
    PROF_END(m, prof_fwd, PROF_OUT);
    dropout_cells(a->res1, C, c->dropout_attn, tb, ctx, l, SITE_ATTN);
    PROF_END(m, prof_fwd, PROF_DROPOUT);
    for (size_t i = 0; i < T * C; i++) a->res1[i] += x[i];

    layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->res1, w->ln2_w, w->ln2_b, T, C);
    PROF_END(m, prof_fwd, PROF_NORM);
    linear_forward(a->ff_pre, a->ln2, w->w1, w->b1, T, C, F);
    gelu_forward(a->ff_act, a->ff_pre, T * F);
    PROF_END(m, prof_fwd, PROF_FFN);
    dropout_cells(a->ff_act, F, c->dropout_ff, tb, ctx, l, SITE_FF);
    PROF_END(m, prof_fwd, PROF_DROPOUT);
    linear_forward(y, a->ff_act, w->w2, w->b2, T, F, C);
    for (size_t i = 0; i < T * C; i++) y[i] += a->res1[i];
    PROF_END(m, prof_fwd, PROF_FFN);
}

// m->dx holds dL/dx[l + 1] on entry and dL/dx[l] on return. Without
// weight gradients (a frozen block) only dx is propagated.
static void block_backward(Model *m, size_t l, LayerActs *a, const TokenBatch *tb,
                           const PassCtx *ctx) {
    const ModelConfig *c = &m->cfg;
    const size_t T = tb->n_tokens, C = c->dim, HE = c->heads * c->dim_head, F = c->ff_dim;
    const LayerWeights *w = &m->w[l];
    const int g = m->layer_trainable[l];
    LayerWeights none;
    memset(&none, 0, sizeof none);
    const LayerWeights *dw = g ? &m->dw[l] : &none;
    FavorDims fd = favor_dims(c);

    // Feed-forward half: x[l+1] = res1 + w2(drop(gelu(w1(ln2(res1))))).
    PROF_BEGIN(m);
    linear_backward(m->dff, dw->w2, dw->b2, m->dx, a->ff_act, w->w2, T, F, C);
    PROF_END(m, prof_bwd, PROF_FFN);
    dropout_cells(m->dff, F, c->dropout_ff, tb, ctx, l, SITE_FF);
    PROF_END(m, prof_bwd, PROF_DROPOUT);
    gelu_backward(m->dff, m->dff, a->ff_pre, T * F);
    linear_backward(m->dln, dw->w1, dw->b1, m->dff, a->ln2, w->w1, T, C, F);
    PROF_END(m, prof_bwd, PROF_FFN);
    layernorm_backward(m->dx, dw->ln2_w, dw->ln2_b, m->dln, a->res1, w->ln2_w, a->ln2_mean,
                       a->ln2_rstd, T, C);
    PROF_END(m, prof_bwd, PROF_NORM);

    // Attention half: res1 = x[l] + drop(to_out(favor(q, k, v))).
    memcpy(m->dtmp, m->dx, T * C * sizeof(float));
    dropout_cells(m->dtmp, C, c->dropout_attn, tb, ctx, l, SITE_ATTN);
    PROF_END(m, prof_bwd, PROF_DROPOUT);
    linear_backward(m->dattn, dw->wo, dw->bo, m->dtmp, a->attn, w->wo, T, HE, C);
    PROF_END(m, prof_bwd, PROF_OUT);
    favor_backward(m->dq, m->dk, m->dv, &a->favor, m->dattn, a->attn, a->q, a->k, a->v,
                   m->proj + l * c->n_features * c->dim_head, tb->offset, tb->n_cells, &fd,
                   m->favor_scratch);
    PROF_END(m, prof_bwd, PROF_FAVOR);
    gemm(0, 0, T, C, HE, 1.0f, m->dq, HE, w->wq, C, 0.0f, m->dln, C);
    gemm(0, 0, T, C, HE, 1.0f, m->dk, HE, w->wk, C, 1.0f, m->dln, C);
    gemm(0, 0, T, C, HE, 1.0f, m->dv, HE, w->wv, C, 1.0f, m->dln, C);
    if (g) {
        gemm(1, 0, HE, C, T, 1.0f, m->dq, HE, a->ln1, C, 1.0f, dw->wq, C);
        gemm(1, 0, HE, C, T, 1.0f, m->dk, HE, a->ln1, C, 1.0f, dw->wk, C);
        gemm(1, 0, HE, C, T, 1.0f, m->dv, HE, a->ln1, C, 1.0f, dw->wv, C);
    }
    PROF_END(m, prof_bwd, PROF_QKV);
    layernorm_backward(m->dx, dw->ln1_w, dw->ln1_b, m->dln, m->x[l], w->ln1_w, a->ln1_mean,
                       a->ln1_rstd, T, C);
    PROF_END(m, prof_bwd, PROF_NORM);
}

// ---------------------------------------------------------------------------
// Whole encoder

static void check_batch(const Model *m, const TokenBatch *tb) {
    CHECK(tb->n_tokens <= m->max_tokens && tb->n_cells <= m->max_cells,
          "internal: micro-batch of %zu tokens in %zu cells exceeds the arena (%zu, %zu)",
          tb->n_tokens, tb->n_cells, m->max_tokens, m->max_cells);
    CHECK((size_t)tb->offset[tb->n_cells] == tb->n_tokens, "internal: bad batch offsets");
    for (size_t b = 0; b < tb->n_cells; b++) {
        size_t n = (size_t)(tb->offset[b + 1] - tb->offset[b]);
        CHECK(n >= 1 && n <= m->max_cell_tokens,
              "internal: cell of %zu tokens (arena holds %zu per cell)", n, m->max_cell_tokens);
    }
}

void model_forward(Model *m, const TokenBatch *tb, const PassCtx *ctx) {
    const ModelConfig *c = &m->cfg;
    const size_t T = tb->n_tokens, C = c->dim;
    check_batch(m, tb);
    const int one_set = c->recompute || m->forward_only;
    PROF_BEGIN(m);
    embedding_forward(m->x[0], tb->token, tb->gene, m->token_emb, m->gene_emb, T, C);
    dropout_cells(m->x[0], C, c->dropout_emb, tb, ctx, 0, SITE_EMB);
    PROF_END(m, prof_fwd, PROF_EMBED);
    for (size_t l = 0; l < c->depth; l++) block_forward(m, l, &m->acts[one_set ? 0 : l], tb, ctx);
    PROF_RESTART(m);
    layernorm_forward(m->hidden, m->fin_mean, m->fin_rstd, m->x[c->depth], m->norm_w, m->norm_b, T,
                      C);
    PROF_END(m, prof_fwd, PROF_NORM);
}

void model_backward(Model *m, const TokenBatch *tb, const PassCtx *ctx, float *dhidden) {
    const ModelConfig *c = &m->cfg;
    const size_t T = tb->n_tokens, C = c->dim, L = c->depth;
    CHECK(!m->forward_only, "internal: backward on a model allocated for inference");
    if (!m->any_trainable) return;
    // The lowest block backward must reach: all of them when the embeddings
    // learn, else the lowest block with trainable weights.
    size_t lowest = 0;
    if (!m->emb_trainable) {
        lowest = L;
        for (size_t l = 0; l < L; l++)
            if (m->layer_trainable[l]) {
                lowest = l;
                break;
            }
    }
    memset(m->dx, 0, T * C * sizeof(float));
    layernorm_backward(m->dx, m->norm_trainable ? m->dnorm_w : NULL,
                       m->norm_trainable ? m->dnorm_b : NULL, dhidden, m->x[L], m->norm_w,
                       m->fin_mean, m->fin_rstd, T, C);
    for (size_t l = L; l-- > lowest;) {
        LayerActs *a = &m->acts[c->recompute ? 0 : l];
        // With recomputation the single activation set holds the last block
        // after the forward pass; earlier blocks are recomputed from x[l].
        if (c->recompute && l != L - 1) block_forward(m, l, a, tb, ctx);
        block_backward(m, l, a, tb, ctx);
    }
    if (!m->emb_trainable) return;
    PROF_BEGIN(m);
    dropout_cells(m->dx, C, c->dropout_emb, tb, ctx, 0, SITE_EMB);
    const ParamEntry *te = param_table_find(&m->table, "token_emb.weight");
    const ParamEntry *ge = param_table_find(&m->table, "pos_emb.emb.weight");
    embedding_backward(te->trainable ? m->dtoken_emb : NULL, ge->trainable ? m->dgene_emb : NULL,
                       m->dx, tb->token, tb->gene, T, C, c->n_genes);
    PROF_END(m, prof_bwd, PROF_EMBED);
}

double model_forward_flops_cell(const ModelConfig *c, size_t n) {
    const double C = (double)c->dim, HE = (double)(c->heads * c->dim_head), F = (double)c->ff_dim;
    const double M = (double)c->n_features, E = (double)c->dim_head, H = (double)c->heads;
    double per_layer = 2.0 * n * C * HE * 4   // q, k, v, to_out
                       + 2.0 * n * C * F * 2  // w1, w2
                       + 2.0 * n * E * M * H * 4; // features of q and k, ctx, numerator
    return per_layer * (double)c->depth + 2.0 * n * C * ((double)c->bins + 2);
}
