// CellLM divide-and-conquer contrastive learning (see contrastive.h).
#include "perfcell/contrastive.h"

#include "perfcell/error.h"
#include "perfcell/layers.h"
#include "perfcell/linalg.h"
#include "perfcell/log.h"
#include "perfcell/loss.h"
#include "perfcell/tokens.h"
#include "perfcell/train.h"
#include "perfcell/util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void contrastive_config(const Config *c, ContrastiveConfig *o) {
    memset(o, 0, sizeof *o);
    o->weight = config_float(c, "contrastive.weight");
    o->temperature = config_float(c, "contrastive.temperature");
    o->symmetric = config_bool(c, "contrastive.symmetric");
    o->pool_mean = strcmp(config_str(c, "contrastive.pooling"), "mean") == 0;
    o->proj_dim = (size_t)config_int(c, "contrastive.proj_dim");
    o->proj_hidden = (size_t)config_int(c, "contrastive.proj_hidden");
    o->sub_batch = (size_t)config_int(c, "contrastive.sub_batch");
    o->dropout = config_float(c, "contrastive.dropout");
    o->label_weight = config_float(c, "contrastive.label_weight");
}

void contrastive_head_add(ParamTable *t, const ModelConfig *mc, const ContrastiveConfig *cc) {
    const size_t C = mc->dim, Hh = cc->proj_hidden, D = cc->proj_dim;
    const float u0 = 1.0f / sqrtf((float)C), u2 = 1.0f / sqrtf((float)Hh);
    param_table_add(t, "contrastive.proj.0.weight", 2, Hh, C, 1, 1, INIT_UNIFORM, u0);
    param_table_add(t, "contrastive.proj.0.bias", 1, Hh, 0, 1, 0, INIT_UNIFORM, u0);
    param_table_add(t, "contrastive.proj.2.weight", 2, D, Hh, 1, 1, INIT_UNIFORM, u2);
    param_table_add(t, "contrastive.proj.2.bias", 1, D, 0, 1, 0, INIT_UNIFORM, u2);
    if (cc->label_weight > 0 && cc->n_labels > 0) {
        param_table_add(t, "contrastive.label_head.weight", 2, cc->n_labels, C, 1, 1, INIT_UNIFORM, u0);
        param_table_add(t, "contrastive.label_head.bias", 1, cc->n_labels, 0, 1, 0, INIT_UNIFORM, u0);
    }
}

// ---------------------------------------------------------------------------
// The loss on the coordinator

// One direction: rows of x against all of y. Adds the loss sum and, when
// given, gx += (P - I) y / (N tau) and gy += (P - I)ᵀ x / (N tau), scaled by
// `scale`. Rows are processed in blocks so memory is O(block x N).
static double infonce_dir(const float *x, const float *y, size_t N, size_t D, double tau, float *gx,
                          float *gy, float scale, double *pos, double *all) {
    // Blocks of rows bounded to 2^16 similarities (256 KiB): the coordinator's
    // extra memory stays below that of the gathered z for any N.
    size_t blk = (size_t)1 << 16;
    blk = N ? blk / N : 1;
    if (blk < 1) blk = 1;
    if (blk > N) blk = N;
    float *S = floats_alloc(blk * N);
    double loss = 0.0;
    const float g = (float)(scale / ((double)N * tau));
    for (size_t i0 = 0; i0 < N; i0 += blk) {
        size_t rows = N - i0 < blk ? N - i0 : blk;
        gemm(0, 1, rows, N, D, (float)(1.0 / tau), x + i0 * D, D, y, D, 0.0f, S, N);
        for (size_t r = 0; r < rows; r++) {
            float *s = S + r * N;
            size_t i = i0 + r;
            double mx = s[0];
            for (size_t j = 1; j < N; j++)
                if (s[j] > mx) mx = s[j];
            double sum = 0.0, tot = 0.0;
            for (size_t j = 0; j < N; j++) {
                sum += exp((double)s[j] - mx);
                tot += s[j];
            }
            double lse = mx + log(sum);
            loss += lse - (double)s[i];
            if (pos) *pos += (double)s[i] * tau;
            if (all) *all += tot * tau;
            // s becomes (P - I) scaled for the gradient products.
            for (size_t j = 0; j < N; j++) s[j] = (float)exp((double)s[j] - lse) * g;
            s[i] -= g;
        }
        if (gx) gemm(0, 0, rows, D, N, 1.0f, S, N, y, D, 1.0f, gx + i0 * D, D);
        if (gy) gemm(1, 0, N, D, rows, 1.0f, S, N, x + i0 * D, D, 1.0f, gy, D);
    }
    free(S);
    return loss / (double)N;
}

double contrastive_loss(const float *a, const float *b, size_t N, size_t D, double tau,
                        int symmetric, float *ga, float *gb, double *pos_sim, double *neg_sim) {
    if (ga) memset(ga, 0, N * D * sizeof *ga);
    if (gb) memset(gb, 0, N * D * sizeof *gb);
    if (N == 0) return 0.0;
    double pos = 0.0, all = 0.0;
    float scale = symmetric ? 0.5f : 1.0f;
    double loss = infonce_dir(a, b, N, D, tau, ga, gb, scale, &pos, &all);
    if (symmetric) loss = 0.5 * (loss + infonce_dir(b, a, N, D, tau, gb, ga, scale, NULL, NULL));
    if (pos_sim) *pos_sim = pos / (double)N;
    if (neg_sim) *neg_sim = N > 1 ? (all - pos) / ((double)N * (double)(N - 1)) : 0.0;
    return loss;
}

// ---------------------------------------------------------------------------
// Pooling and projection of one sub-batch

typedef struct {
    const float *w0, *b0, *w2, *b2, *wl, *bl;
    float *dw0, *db0, *dw2, *db2, *dwl, *dbl;
} HeadParams;

static HeadParams head_params(Model *m) {
    HeadParams h;
    memset(&h, 0, sizeof h);
#define P(field, dfield, name)                                                                     \
    do {                                                                                           \
        const ParamEntry *e = param_table_find(&m->table, name);                                   \
        if (e) {                                                                                   \
            h.field = m->params + e->offset;                                                       \
            h.dfield = m->grads + e->offset;                                                       \
        }                                                                                          \
    } while (0)
    P(w0, dw0, "contrastive.proj.0.weight");
    P(b0, db0, "contrastive.proj.0.bias");
    P(w2, dw2, "contrastive.proj.2.weight");
    P(b2, db2, "contrastive.proj.2.bias");
    P(wl, dwl, "contrastive.label_head.weight");
    P(bl, dbl, "contrastive.label_head.bias");
#undef P
    CHECK(h.w0 && h.w2, "internal: contrastive head missing from the parameter table");
    return h;
}

static void pool_forward(float *pooled, const float *hidden, const TokenBatch *tb, size_t C, int mean) {
    for (size_t b = 0; b < tb->n_cells; b++) {
        size_t t0 = (size_t)tb->offset[b], t1 = (size_t)tb->offset[b + 1];
        float *p = pooled + b * C;
        if (!mean) {
            memcpy(p, hidden + (t1 - 1) * C, C * sizeof *p);
            continue;
        }
        memset(p, 0, C * sizeof *p);
        for (size_t t = t0; t < t1; t++)
            for (size_t c = 0; c < C; c++) p[c] += hidden[t * C + c];
        float inv = 1.0f / (float)(t1 - t0);
        for (size_t c = 0; c < C; c++) p[c] *= inv;
    }
}

// dhidden += the pooling's backward of dpooled.
static void pool_backward(float *dhidden, const float *dpooled, const TokenBatch *tb, size_t C, int mean) {
    for (size_t b = 0; b < tb->n_cells; b++) {
        size_t t0 = (size_t)tb->offset[b], t1 = (size_t)tb->offset[b + 1];
        const float *d = dpooled + b * C;
        if (!mean) {
            float *h = dhidden + (t1 - 1) * C;
            for (size_t c = 0; c < C; c++) h[c] += d[c];
            continue;
        }
        float inv = 1.0f / (float)(t1 - t0);
        for (size_t t = t0; t < t1; t++)
            for (size_t c = 0; c < C; c++) dhidden[t * C + c] += d[c] * inv;
    }
}

// pooled -> pre -> relu -> zraw -> z (unit rows).
static void proj_forward(Contrastive *c, const HeadParams *h, size_t B, size_t C) {
    const size_t Hh = c->cfg.proj_hidden, D = c->cfg.proj_dim;
    linear_forward(c->pre, c->pooled, h->w0, h->b0, B, C, Hh);
    for (size_t i = 0; i < B * Hh; i++) c->hid[i] = c->pre[i] > 0.0f ? c->pre[i] : 0.0f;
    linear_forward(c->zraw, c->hid, h->w2, h->b2, B, Hh, D);
    for (size_t b = 0; b < B; b++) {
        double n = 0.0;
        for (size_t j = 0; j < D; j++) n += (double)c->zraw[b * D + j] * c->zraw[b * D + j];
        float inv = (float)(1.0 / (sqrt(n) + 1e-12));
        for (size_t j = 0; j < D; j++) c->z[b * D + j] = c->zraw[b * D + j] * inv;
    }
}

// From dz (B, D) to dpooled (B, C) (overwritten), accumulating head grads.
static void proj_backward(Contrastive *c, const HeadParams *h, size_t B, size_t C) {
    const size_t Hh = c->cfg.proj_hidden, D = c->cfg.proj_dim;
    // Through the normalisation: (g - z (z·g)) / |zraw|, in place in dz.
    for (size_t b = 0; b < B; b++) {
        float *g = c->dz + b * D;
        const float *z = c->z + b * D, *r = c->zraw + b * D;
        double zg = 0.0, n = 0.0;
        for (size_t j = 0; j < D; j++) {
            zg += (double)z[j] * g[j];
            n += (double)r[j] * r[j];
        }
        float inv = (float)(1.0 / (sqrt(n) + 1e-12));
        for (size_t j = 0; j < D; j++) g[j] = (g[j] - z[j] * (float)zg) * inv;
    }
    linear_backward(c->dpre, h->dw2, h->db2, c->dz, c->hid, h->w2, B, Hh, D);
    for (size_t i = 0; i < B * Hh; i++)
        if (c->pre[i] <= 0.0f) c->dpre[i] = 0.0f;
    linear_backward(c->dpooled, h->dw0, h->db0, c->dpre, c->pooled, h->w0, B, C, Hh);
}

// ---------------------------------------------------------------------------
// Set-up

void contrastive_init(Contrastive *c, const Model *m, const ContrastiveConfig *cfg, size_t cap_cells,
                      size_t cap_global, MPI_Comm comm) {
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    c->comm = comm;
    CHECK_MPI(MPI_Comm_rank(comm, &c->rank));
    CHECK_MPI(MPI_Comm_size(comm, &c->size));
    const size_t D = cfg->proj_dim, Hh = cfg->proj_hidden, C = m->cfg.dim;
    const size_t V = (size_t)m->cfg.bins + 2;
    c->cap_cells = cap_cells;
    c->cap_global = cap_global;
    c->za = floats_alloc(cap_cells * D);
    c->zb = floats_alloc(cap_cells * D);
    c->ga = floats_alloc(cap_cells * D);
    c->gb = floats_alloc(cap_cells * D);
    if (c->rank == 0) {
        c->all_a = floats_alloc(cap_global * D);
        c->all_b = floats_alloc(cap_global * D);
        c->all_ga = floats_alloc(cap_global * D);
        c->all_gb = floats_alloc(cap_global * D);
    }
    c->counts = xcalloc((size_t)c->size, sizeof *c->counts);
    c->displs = xcalloc((size_t)c->size, sizeof *c->displs);
    c->sub_cap_cells = m->max_cells;
    c->sub_cap_tokens = m->max_tokens;
    const size_t B = m->max_cells, T = m->max_tokens;
    size_t L = cfg->n_labels > 0 ? cfg->n_labels : 1;
    tokenbatch_init(&c->sub);
    tokenbatch_reserve(&c->sub, B, T);
    c->pooled = floats_alloc(B * C);
    c->pre = floats_alloc(B * Hh);
    c->hid = floats_alloc(B * Hh);
    c->zraw = floats_alloc(B * D);
    c->z = floats_alloc(B * D);
    c->dz = floats_alloc(B * D);
    c->dpooled = floats_alloc(B * C);
    c->dpre = floats_alloc(B * Hh);
    c->logits = floats_alloc(T * (V > L ? V : L));
    c->dlogits = floats_alloc(T * (V > L ? V : L));
    c->dhidden = floats_alloc(T * C);
}

void contrastive_free(Contrastive *c) {
    free(c->za), free(c->zb), free(c->ga), free(c->gb);
    free(c->all_a), free(c->all_b), free(c->all_ga), free(c->all_gb);
    free(c->counts), free(c->displs);
    tokenbatch_free(&c->sub);
    free(c->pooled), free(c->pre), free(c->hid), free(c->zraw), free(c->z);
    free(c->dz), free(c->dpooled), free(c->dpre);
    free(c->logits), free(c->dlogits), free(c->dhidden);
    memset(c, 0, sizeof *c);
}

void contrastive_head_forward(Contrastive *c, Model *m, const TokenBatch *tb) {
    HeadParams h = head_params(m);
    pool_forward(c->pooled, m->hidden, tb, m->cfg.dim, c->cfg.pool_mean);
    proj_forward(c, &h, tb->n_cells, m->cfg.dim);
}

void contrastive_head_backward(Contrastive *c, Model *m, const TokenBatch *tb, const float *dz,
                               float *dhidden) {
    HeadParams h = head_params(m);
    memcpy(c->dz, dz, tb->n_cells * c->cfg.proj_dim * sizeof *dz);
    proj_backward(c, &h, tb->n_cells, m->cfg.dim);
    pool_backward(dhidden, c->dpooled, tb, m->cfg.dim, c->cfg.pool_mean);
}

void contrastive_encode(Contrastive *c, Model *m, const TokenBatch *tb, const PassCtx *ctx, float *z) {
    model_forward(m, tb, ctx);
    contrastive_head_forward(c, m, tb);
    if (z) memcpy(z, c->z, tb->n_cells * c->cfg.proj_dim * sizeof *z);
}

// ---------------------------------------------------------------------------
// Sub-batches over the cells of several micro-batches

// Reading a step's micro-batches in order, one at a time, in one pass.
typedef struct {
    const StepCells *cells;
    int pass;
    size_t next;            // the next micro-batch to fetch
    size_t cur_first;       // first local cell of the micro-batch in `tb`
    size_t next_first;      // first local cell of micro-batch `next`
    const TokenBatch *tb;   // the last micro-batch fetched (NULL before any)
    int64_t masked;         // masked positions seen
    int failed;
} Fetch;

static void fetch_start(Fetch *f, const StepCells *cells, int pass) {
    memset(f, 0, sizeof *f);
    f->cells = cells;
    f->pass = pass;
}

// Fetch micro-batch f->next; 0, or -1 (f->failed set) when it cannot be read.
static int fetch_next(Fetch *f) {
    const TokenBatch *tb = f->cells->get(f->cells->ctx, f->next, f->pass);
    if (tb && tb->n_cells != f->cells->n_cells[f->next]) {
        error_set("internal: micro-batch %zu holds %zu cells in pass %d, expected %zu", f->next,
                  tb->n_cells, f->pass, f->cells->n_cells[f->next]);
        tb = NULL;
    }
    if (!tb) {
        f->failed = 1;
        return -1;
    }
    for (size_t t = 0; t < tb->n_tokens; t++) f->masked += tb->target[t] >= 0;
    f->tb = tb;
    f->next++;
    f->cur_first = f->next_first;
    f->next_first += tb->n_cells;
    return 0;
}

// Fetch micro-batches up to and including the one holding local cell `cell`.
static const TokenBatch *fetch_upto(Fetch *f, size_t cell) {
    while (!f->failed && (!f->tb || cell >= f->next_first)) {
        if (f->next == f->cells->n_mb) {
            f->failed = 1;
            error_set("internal: local cell %zu is past the step's micro-batches", cell);
        } else {
            fetch_next(f);
        }
    }
    return f->failed ? NULL : f->tb;
}

// The rest of the pass's micro-batches (cells nobody asked for: a step of
// empty micro-batches), so that every source sees each one once per pass.
static void fetch_finish(Fetch *f) {
    while (!f->failed && f->next < f->cells->n_mb) fetch_next(f);
}

// Local cells [c0, c1) of the step, copied into c->sub; 0, or -1 when a
// micro-batch could not be read.
static int build_sub(Contrastive *c, Fetch *f, size_t c0, size_t c1) {
    TokenBatch *s = &c->sub;
    size_t out = 0, t = 0;
    for (size_t cell = c0; cell < c1;) {
        const TokenBatch *tb = fetch_upto(f, cell);
        if (!tb) return -1;
        size_t b0 = cell - f->cur_first, b1 = c1 - f->cur_first < tb->n_cells ? c1 - f->cur_first : tb->n_cells;
        size_t a0 = (size_t)tb->offset[b0], a1 = (size_t)tb->offset[b1];
        CHECK(out + (b1 - b0) <= c->sub_cap_cells && t + (a1 - a0) <= c->sub_cap_tokens,
              "internal: contrastive sub-batch of %zu cells / %zu tokens exceeds the arena", out + (b1 - b0),
              t + (a1 - a0));
        for (size_t b = b0; b < b1; b++, out++) {
            s->offset[out] = (int64_t)t + (tb->offset[b] - (int64_t)a0);
            s->cell_id[out] = tb->cell_id[b];
            s->label[out] = tb->label[b];
        }
        memcpy(s->token + t, tb->token + a0, (a1 - a0) * sizeof *s->token);
        memcpy(s->gene + t, tb->gene + a0, (a1 - a0) * sizeof *s->gene);
        memcpy(s->target + t, tb->target + a0, (a1 - a0) * sizeof *s->target);
        t += a1 - a0;
        cell += b1 - b0;
    }
    s->offset[out] = (int64_t)t;
    s->n_cells = out;
    s->n_tokens = t;
    return 0;
}

// Whether every rank got through its reads; collective. 0, -1 where this
// rank failed (its error_set() stands), -2 where another rank failed.
static int all_read(Contrastive *c, int failed, int pass) {
    int any = 0;
    CHECK_MPI(MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, c->comm));
    if (!any) return 0;
    if (failed) return -1;
    error_set("another rank could not read its cells in pass %d of the step", pass);
    return -2;
}

// Pass 2 of one view of the sub-batch in c->sub (local cells from c0):
// encode it again (unless its activations are still those of pass 1), then
// back-propagate <z, G>, plus the MLM loss and the label loss on view 0.
typedef struct {
    Contrastive *c;
    Model *m;
    const HeadParams *h;
    uint64_t seed;
    int64_t step;
    double mlm_weight, n_norm;
    MlmStats *st;
    int use_labels;
    int64_t lab_global;
    double label_loss;
} Pass2;

static void pass2_view(Pass2 *p, size_t c0, int view, int encode) {
    Contrastive *c = p->c;
    Model *m = p->m;
    const HeadParams *hp = p->h;
    const size_t D = c->cfg.proj_dim, C = m->cfg.dim, V = (size_t)m->cfg.bins + 2;
    const TokenBatch *tb = &c->sub;
    const size_t B = tb->n_cells, T = tb->n_tokens;
    PassCtx ctx = {p->seed, p->step, view, 1};
    if (encode) {
        contrastive_encode(c, m, tb, &ctx, NULL);
        const float *z1 = (view ? c->zb : c->za) + c0 * D;
        if (memcmp(z1, c->z, B * D * sizeof(float)) != 0) c->z_mismatch++;
    }
    memset(c->dhidden, 0, T * C * sizeof(float));
    if (view == 0 && p->mlm_weight > 0) {
        const ParamEntry *ew = param_table_find(&m->table, "to_out.weight");
        const ParamEntry *eb = param_table_find(&m->table, "to_out.bias");
        mlm_logits(c->logits, m->hidden, m->params + ew->offset, m->params + eb->offset, T, C, V);
        mlm_loss(c->dlogits, c->logits, tb->target, T, V, p->n_norm, p->st);
        if (p->mlm_weight != 1.0)
            for (size_t j = 0; j < T * V; j++) c->dlogits[j] *= (float)p->mlm_weight;
        mlm_backward(c->dhidden, m->grads + ew->offset, m->grads + eb->offset, c->dlogits, m->hidden,
                     m->params + ew->offset, T, C, V);
    }
    memcpy(c->dz, (view ? c->gb : c->ga) + c0 * D, B * D * sizeof(float));
    proj_backward(c, hp, B, C);
    if (view == 0 && p->use_labels && p->lab_global > 0) {
        // Linear head on the pooled state; dpooled gets its gradient too.
        size_t L = c->cfg.n_labels;
        linear_forward(c->logits, c->pooled, hp->wl, hp->bl, B, C, L);
        memset(c->dlogits, 0, B * L * sizeof(float));
        double lw = c->cfg.label_weight / (double)p->lab_global;
        for (size_t b = 0; b < B; b++) {
            int y = tb->label[b];
            if (y < 0 || (size_t)y >= L) continue;
            p->label_loss += xent_row(c->dlogits + b * L, c->logits + b * L, L, y, lw, NULL) /
                             (double)p->lab_global;
        }
        linear_backward(NULL, hp->dwl, hp->dbl, c->dlogits, c->pooled, hp->wl, B, C, L);
        gemm(0, 0, B, C, L, 1.0f, c->dlogits, L, hp->wl, C, 1.0f, c->dpooled, C);
    }
    pool_backward(c->dhidden, c->dpooled, tb, C, c->cfg.pool_mean);
    model_backward(m, tb, &ctx, c->dhidden);
}

int contrastive_step_cells(Contrastive *c, Model *m, const StepCells *cells, uint64_t seed,
                           int64_t step, double mlm_weight, double n_norm, MlmStats *st,
                           double *loss_out) {
    const size_t D = c->cfg.proj_dim;
    HeadParams h = head_params(m);
    size_t n_local = 0;
    for (size_t i = 0; i < cells->n_mb; i++) n_local += cells->n_cells[i];
    CHECK(n_local <= c->cap_cells, "internal: %zu local cells exceed the contrastive buffers (%zu)",
          n_local, c->cap_cells);
    size_t sub = c->cfg.sub_batch ? c->cfg.sub_batch : (cells->n_mb ? cells->n_cells[0] : 1);
    if (sub == 0) sub = 1;
    if (sub > c->sub_cap_cells) sub = c->sub_cap_cells;

    // Pass 1: z of both views, no activations kept; labelled cells and masked
    // positions counted on the way.
    Fetch f;
    fetch_start(&f, cells, 1);
    size_t labelled = 0;
    for (size_t c0 = 0; c0 < n_local && !f.failed; c0 += sub) {
        size_t c1 = c0 + sub < n_local ? c0 + sub : n_local;
        if (build_sub(c, &f, c0, c1) != 0) break;
        for (size_t b = 0; b < c->sub.n_cells; b++) labelled += c->sub.label[b] >= 0;
        for (int view = 0; view < 2; view++) {
            PassCtx ctx = {seed, step, view, 1};
            contrastive_encode(c, m, &c->sub, &ctx, (view ? c->zb : c->za) + c0 * D);
        }
    }
    fetch_finish(&f);
    int rc = all_read(c, f.failed, 1);
    if (rc != 0) return rc;
    if (!(n_norm > 0)) {
        int64_t g = 0;
        CHECK_MPI(MPI_Allreduce(&f.masked, &g, 1, MPI_INT64_T, MPI_SUM, c->comm));
        n_norm = g > 0 ? (double)g : 1.0;
    }

    // The coordinator's loss over the global batch.
    double t_coord = time_now();
    int n_me = (int)(n_local * D);
    CHECK_MPI(MPI_Allgather(&n_me, 1, MPI_INT, c->counts, 1, MPI_INT, c->comm));
    int64_t total = 0;
    for (int r = 0; r < c->size; r++) {
        c->displs[r] = (int)total;
        total += c->counts[r];
    }
    size_t N = (size_t)total / D;
    CHECK(N <= c->cap_global, "internal: %zu cells in the global batch exceed the pool (%zu)", N,
          c->cap_global);
    CHECK_MPI(MPI_Gatherv(c->za, n_me, MPI_FLOAT, c->all_a, c->counts, c->displs, MPI_FLOAT, 0, c->comm));
    CHECK_MPI(MPI_Gatherv(c->zb, n_me, MPI_FLOAT, c->all_b, c->counts, c->displs, MPI_FLOAT, 0, c->comm));
    double stats[3] = {0, 0, 0};
    if (c->rank == 0) {
        stats[0] = contrastive_loss(c->all_a, c->all_b, N, D, c->cfg.temperature, c->cfg.symmetric,
                                    c->all_ga, c->all_gb, &stats[1], &stats[2]);
        float w = (float)c->cfg.weight;
        for (size_t i = 0; i < N * D; i++) {
            c->all_ga[i] *= w;
            c->all_gb[i] *= w;
        }
    }
    CHECK_MPI(MPI_Scatterv(c->all_ga, c->counts, c->displs, MPI_FLOAT, c->ga, n_me, MPI_FLOAT, 0, c->comm));
    CHECK_MPI(MPI_Scatterv(c->all_gb, c->counts, c->displs, MPI_FLOAT, c->gb, n_me, MPI_FLOAT, 0, c->comm));
    CHECK_MPI(MPI_Bcast(stats, 3, MPI_DOUBLE, 0, c->comm));
    c->coord_seconds += time_now() - t_coord;
    c->loss = stats[0];
    c->pos_sim = stats[1];
    c->neg_sim = stats[2];

    // Supervised discrimination: normalised by the global labelled count.
    int64_t lab_local = (int64_t)labelled, lab_global = 0;
    int use_labels = c->cfg.label_weight > 0 && h.wl;
    if (use_labels)
        CHECK_MPI(MPI_Allreduce(&lab_local, &lab_global, 1, MPI_INT64_T, MPI_SUM, c->comm));

    // Pass 2: the same cells again (the source reads them anew), re-encoded
    // with activations, and back-propagated. The sub-batch encoded last in
    // pass 1 still has its cells (c->sub) and the activations of its second
    // view: it goes first, that view without encoding it again.
    Pass2 p2 = {c, m, &h, seed, step, mlm_weight, n_norm, st, use_labels, lab_global, 0.0};
    size_t last0 = n_local ? (n_local - 1) / sub * sub : 0; // first cell of the last sub-batch
    if (n_local > 0) {
        pass2_view(&p2, last0, 1, 0);
        pass2_view(&p2, last0, 0, 1);
    }
    fetch_start(&f, cells, 2);
    for (size_t c0 = 0; c0 < last0 && !f.failed; c0 += sub) {
        size_t c1 = c0 + sub < n_local ? c0 + sub : n_local;
        if (build_sub(c, &f, c0, c1) != 0) break;
        for (int view = 0; view < 2; view++) pass2_view(&p2, c0, view, 1);
    }
    fetch_finish(&f);
    if ((rc = all_read(c, f.failed, 2)) != 0) return rc;
    if (use_labels) {
        double g = 0;
        CHECK_MPI(MPI_Allreduce(&p2.label_loss, &g, 1, MPI_DOUBLE, MPI_SUM, c->comm));
        c->label_loss = g;
    }
    *loss_out = c->loss;
    return 0;
}

// The array source of contrastive_step_keys: both passes see the same batches.
typedef struct {
    const TokenBatch *mbs;
} ArrayCells;

static const TokenBatch *array_get(void *ctx, size_t i, int pass) {
    (void)pass;
    return &((ArrayCells *)ctx)->mbs[i];
}

double contrastive_step_keys(Contrastive *c, Model *m, const TokenBatch *mbs, size_t n_mb,
                             uint64_t seed, int64_t step, double mlm_weight, double n_norm,
                             MlmStats *st) {
    ArrayCells a = {mbs};
    size_t *n_cells = xcalloc(n_mb ? n_mb : 1, sizeof *n_cells);
    for (size_t i = 0; i < n_mb; i++) n_cells[i] = mbs[i].n_cells;
    StepCells cells = {array_get, &a, n_mb, n_cells};
    double loss = NAN;
    CHECK(contrastive_step_cells(c, m, &cells, seed, step, mlm_weight, n_norm, st, &loss) == 0,
          "internal: contrastive step over cells in memory: %s", error_last());
    free(n_cells);
    return loss;
}

// ---------------------------------------------------------------------------
// Validation

typedef struct {
    Contrastive *c;
    Model *m;
    const ModelConfig *mc;
    TokenBatch *tb;
    uint64_t seed;
    size_t n, cap;
    float *za, *zb;
} ValZ;

static int val_collect(const CellBatch *cb, void *p) {
    ValZ *v = p;
    tokens_from_cells(v->tb, cb, v->mc, v->seed, 0x7fffffff);
    size_t B = v->tb->n_cells, D = v->c->cfg.proj_dim;
    if (v->n + B > v->cap) {
        v->cap = (v->n + B) * 2;
        v->za = xrealloc(v->za, v->cap * D * sizeof(float));
        v->zb = xrealloc(v->zb, v->cap * D * sizeof(float));
    }
    for (int view = 0; view < 2; view++) {
        PassCtx ctx = {v->seed, 0x7fffffff, view, 1};
        contrastive_encode(v->c, v->m, v->tb, &ctx, (view ? v->zb : v->za) + v->n * D);
    }
    v->n += B;
    return 0;
}

void contrastive_validate(Contrastive *c, struct Trainer_ *t, const ModelConfig *mc, TokenBatch *tb) {
    const size_t D = c->cfg.proj_dim;
    size_t want = (size_t)config_int(t->cfg, "run.val_cells");
    if (want == 0 || want > 1024) want = 1024; // the pool statistics need no more
    size_t per_rank = (want + (size_t)t->size - 1) / (size_t)t->size;
    ValZ v = {c, &t->model, mc, tb, t->seed, 0, 0, NULL, NULL};
    int ok = stream_for_each_validation(t->stream, c->sub_cap_cells, per_rank, val_collect, &v) == 0;
    int all_ok = 0;
    CHECK_MPI(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, c->comm));
    if (!all_ok) DIE("contrastive validation failed: %s", ok ? "on another rank" : error_last());
    int n_me = (int)(v.n * D);
    int *counts = xcalloc((size_t)c->size, sizeof *counts), *displs = xcalloc((size_t)c->size, sizeof *displs);
    CHECK_MPI(MPI_Allgather(&n_me, 1, MPI_INT, counts, 1, MPI_INT, c->comm));
    int64_t total = 0;
    for (int r = 0; r < c->size; r++) {
        displs[r] = (int)total;
        total += counts[r];
    }
    size_t N = (size_t)total / D;
    float *A = NULL, *B = NULL;
    if (c->rank == 0) {
        A = floats_alloc((size_t)total ? (size_t)total : 1);
        B = floats_alloc((size_t)total ? (size_t)total : 1);
    }
    CHECK_MPI(MPI_Gatherv(v.za, n_me, MPI_FLOAT, A, counts, displs, MPI_FLOAT, 0, c->comm));
    CHECK_MPI(MPI_Gatherv(v.zb, n_me, MPI_FLOAT, B, counts, displs, MPI_FLOAT, 0, c->comm));
    if (c->rank == 0 && N > 1) {
        double pos = 0, neg = 0;
        double loss = contrastive_loss(A, B, N, D, c->cfg.temperature, c->cfg.symmetric, NULL, NULL,
                                       &pos, &neg);
        // Alignment E|a - b|² = 2 - 2 E a·b for unit vectors; uniformity
        // log E_{i<j} exp(-2 |a_i - a_j|²) over view a.
        double align = 2.0 - 2.0 * pos, u = 0.0;
        float *gram = floats_alloc(N * N);
        gemm(0, 1, N, N, D, 1.0f, A, D, A, D, 0.0f, gram, N);
        for (size_t i = 0; i < N; i++)
            for (size_t j = i + 1; j < N; j++) u += exp(-2.0 * (2.0 - 2.0 * (double)gram[i * N + j]));
        free(gram);
        double unif = log(u / ((double)N * (double)(N - 1) / 2.0));
        log_info("contrastive validation (%zu cells): loss %.4f, positive sim %.4f, negative sim %.4f, "
                 "alignment %.4f, uniformity %.4f",
                 N, loss, pos, neg, align, unif);
        char js[256];
        snprintf(js, sizeof js,
                 "\"val_contrastive_loss\":%.6f,\"val_pos_sim\":%.6f,\"val_neg_sim\":%.6f,"
                 "\"val_alignment\":%.6f,\"val_uniformity\":%.6f",
                 loss, pos, neg, align, unif);
        trainer_metrics_write(t, js);
    }
    free(A), free(B), free(counts), free(displs), free(v.za), free(v.zb);
}
