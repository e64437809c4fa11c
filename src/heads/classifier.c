// Classification heads (see classifier.h).
#include "perfcell/classifier.h"

#include "perfcell/error.h"
#include "perfcell/layers.h"
#include "perfcell/linalg.h"
#include "perfcell/loss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const SCBERT_NAMES[8] = {
    "to_out.conv1.weight", "to_out.conv1.bias", "to_out.fc1.weight", "to_out.fc1.bias",
    "to_out.fc2.weight",   "to_out.fc2.bias",   "to_out.fc3.weight", "to_out.fc3.bias"};
static const char *const POOLED_NAMES[4] = {"cls.fc1.weight", "cls.fc1.bias", "cls.fc2.weight",
                                            "cls.fc2.bias"};
static const char *const LINEAR_NAMES[4] = {"cls.slot.weight", "cls.slot.bias", "cls.fc.weight",
                                            "cls.fc.bias"};

static const char *tensor_name(ClsKind k, size_t i) {
    return k == CLS_SCBERT ? SCBERT_NAMES[i] : k == CLS_LINEAR ? LINEAR_NAMES[i] : POOLED_NAMES[i];
}

// Per-position projection at gene slots: x[b, gene_t] = w·h_t + bias; slots of
// absent genes (nonzero mode) are 0.
static float slot_value(const float *h, const float *w, float bias, size_t C) {
    float s = bias;
    for (size_t k = 0; k < C; k++) s += h[k] * w[k];
    return s;
}

static void slots_forward(float *x0, const float *w, float bias, const Model *m, const TokenBatch *tb,
                          size_t T, size_t C) {
    memset(x0, 0, tb->n_cells * T * sizeof *x0);
    for (size_t b = 0; b < tb->n_cells; b++) {
        size_t t0 = (size_t)tb->offset[b], n = (size_t)tb->offset[b + 1] - t0;
        const float *h = m->hidden + t0 * C;
        float *x = x0 + b * T;
        for (size_t t = 0; t < n; t++) x[tb->gene[t0 + t]] = slot_value(h + t * C, w, bias, C);
    }
}

void classifier_slot_values(const Classifier *c, const Model *m, const TokenBatch *tb, float *s) {
    CHECK(c->cfg.kind == CLS_LINEAR, "internal: slot values of a head without slots");
    for (size_t t = 0; t < tb->n_tokens; t++) {
        float v = slot_value(m->hidden + t * c->C, c->w[0], c->w[1][0], c->C);
        s[t] = v > 0.0f ? v : 0.0f;
    }
}

// From the gradient of the slots ds (B, T): the projection's gradients and
// dhidden (overwritten at every position).
static void slots_backward(float *dhidden, float *dw, float *db, const float *ds, const float *w,
                           const Model *m, const TokenBatch *tb, size_t T, size_t C) {
    for (size_t b = 0; b < tb->n_cells; b++) {
        size_t t0 = (size_t)tb->offset[b], n = (size_t)tb->offset[b + 1] - t0;
        const float *g = ds + b * T;
        const float *h = m->hidden + t0 * C;
        float *dh = dhidden + t0 * C;
        double sb = 0.0;
        for (size_t t = 0; t < n; t++) {
            float gt = g[tb->gene[t0 + t]];
            sb += gt;
            for (size_t k = 0; k < C; k++) {
                if (dw) dw[k] += gt * h[t * C + k];
                dh[t * C + k] = gt * w[k];
            }
        }
        if (db) db[0] += (float)sb;
    }
}

ClsKind cls_kind_of(const char *name, SeqMode mode) {
    if (strcmp(name, "scbert") == 0) return CLS_SCBERT;
    if (strcmp(name, "linear") == 0) return CLS_LINEAR;
    if (strcmp(name, "pooled") == 0) return CLS_POOLED;
    return mode == SEQ_FULL ? CLS_SCBERT : CLS_LINEAR;
}

size_t cls_tensor_count(ClsKind kind) { return kind == CLS_SCBERT ? 8 : 4; }

void classifier_head_add(ParamTable *t, const ModelConfig *mc, const ClsConfig *cc) {
    const size_t C = mc->dim, K = cc->n_classes, Hh = cc->hidden;
    if (cc->kind == CLS_SCBERT) {
        const size_t T = mc->n_genes + 1, F1 = CLS_SCBERT_FC1;
        const float uc = 1.0f / sqrtf((float)C), ut = 1.0f / sqrtf((float)T);
        const float u1 = 1.0f / sqrtf((float)F1), u2 = 1.0f / sqrtf((float)Hh);
        param_table_add(t, SCBERT_NAMES[0], 2, 1, C, 1, 1, INIT_UNIFORM, uc);
        param_table_add(t, SCBERT_NAMES[1], 1, 1, 0, 1, 0, INIT_UNIFORM, uc);
        param_table_add(t, SCBERT_NAMES[2], 2, F1, T, 1, 1, INIT_UNIFORM, ut);
        param_table_add(t, SCBERT_NAMES[3], 1, F1, 0, 1, 0, INIT_UNIFORM, ut);
        param_table_add(t, SCBERT_NAMES[4], 2, Hh, F1, 1, 1, INIT_UNIFORM, u1);
        param_table_add(t, SCBERT_NAMES[5], 1, Hh, 0, 1, 0, INIT_UNIFORM, u1);
        param_table_add(t, SCBERT_NAMES[6], 2, K, Hh, 1, 1, INIT_UNIFORM, u2);
        param_table_add(t, SCBERT_NAMES[7], 1, K, 0, 1, 0, INIT_UNIFORM, u2);
    } else if (cc->kind == CLS_LINEAR) {
        const size_t T = mc->n_genes + 1;
        const float uc = 1.0f / sqrtf((float)C), ut = 1.0f / sqrtf((float)T);
        param_table_add(t, LINEAR_NAMES[0], 2, 1, C, 1, 1, INIT_UNIFORM, uc);
        param_table_add(t, LINEAR_NAMES[1], 1, 1, 0, 1, 0, INIT_UNIFORM, uc);
        param_table_add(t, LINEAR_NAMES[2], 2, K, T, 1, 1, INIT_UNIFORM, ut);
        param_table_add(t, LINEAR_NAMES[3], 1, K, 0, 1, 0, INIT_UNIFORM, ut);
    } else {
        const float uc = 1.0f / sqrtf((float)C), u2 = 1.0f / sqrtf((float)Hh);
        param_table_add(t, POOLED_NAMES[0], 2, Hh, C, 1, 1, INIT_UNIFORM, uc);
        param_table_add(t, POOLED_NAMES[1], 1, Hh, 0, 1, 0, INIT_UNIFORM, uc);
        param_table_add(t, POOLED_NAMES[2], 2, K, Hh, 1, 1, INIT_UNIFORM, u2);
        param_table_add(t, POOLED_NAMES[3], 1, K, 0, 1, 0, INIT_UNIFORM, u2);
    }
}

void classifier_init(Classifier *c, const Model *m, const ClsConfig *cfg) {
    memset(c, 0, sizeof *c);
    c->cfg = *cfg;
    c->C = m->cfg.dim;
    c->T_cell = m->cfg.n_genes + 1;
    c->max_cells = m->max_cells;
    size_t n = cls_tensor_count(cfg->kind);
    for (size_t i = 0; i < n; i++) {
        const char *name = tensor_name(cfg->kind, i);
        const ParamEntry *e = param_table_find(&m->table, name);
        CHECK(e, "internal: classifier tensor %s missing", name);
        c->w[i] = m->params + e->offset;
        c->dw[i] = m->grads ? m->grads + e->offset : NULL; // NULL: an inference model
    }
    const size_t B = m->max_cells;
    const size_t W0 = cfg->kind == CLS_POOLED ? c->C : c->T_cell;
    const size_t W1 = cfg->kind == CLS_SCBERT ? CLS_SCBERT_FC1 : cfg->hidden;
    const size_t W2 = cfg->kind == CLS_SCBERT ? cfg->hidden : 1;
    c->x0 = floats_alloc(B * W0);
    c->dx0 = floats_alloc(B * W0);
    c->a1 = floats_alloc(B * W1);
    c->h1 = floats_alloc(B * W1);
    c->d1 = floats_alloc(B * W1);
    c->a2 = floats_alloc(B * W2);
    c->h2 = floats_alloc(B * W2);
    c->d2 = floats_alloc(B * W2);
}

void classifier_free(Classifier *c) {
    free(c->x0), free(c->dx0), free(c->a1), free(c->h1), free(c->d1), free(c->a2), free(c->h2),
        free(c->d2);
    memset(c, 0, sizeof *c);
}

static void relu(float *out, const float *in, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = in[i] > 0.0f ? in[i] : 0.0f;
}

static void relu_backward(float *d, const float *pre, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (pre[i] <= 0.0f) d[i] = 0.0f;
}

void classifier_forward(Classifier *c, const Model *m, const TokenBatch *tb, float *logits) {
    const size_t B = tb->n_cells, C = c->C, K = c->cfg.n_classes, Hh = c->cfg.hidden;
    CHECK(B <= c->max_cells, "internal: classifier batch too large");
    if (c->cfg.kind == CLS_SCBERT) {
        const size_t T = c->T_cell, F1 = CLS_SCBERT_FC1;
        // Conv2d(1, 1, (1, C)): one dot product per position, placed at the
        // position's gene slot (the last position at slot G). In full mode
        // every slot is filled; in nonzero mode absent genes stay 0.
        slots_forward(c->x0, c->w[0], c->w[1][0], m, tb, T, C);
        relu(c->dx0, c->x0, B * T); // dx0 holds the ReLU output until backward
        linear_forward(c->a1, c->dx0, c->w[2], c->w[3], B, T, F1);
        relu(c->h1, c->a1, B * F1);
        linear_forward(c->a2, c->h1, c->w[4], c->w[5], B, F1, Hh);
        relu(c->h2, c->a2, B * Hh);
        linear_forward(logits, c->h2, c->w[6], c->w[7], B, Hh, K);
    } else if (c->cfg.kind == CLS_LINEAR) {
        const size_t T = c->T_cell;
        slots_forward(c->x0, c->w[0], c->w[1][0], m, tb, T, C);
        relu(c->dx0, c->x0, B * T); // dx0 holds the ReLU output until backward
        linear_forward(logits, c->dx0, c->w[2], c->w[3], B, T, K);
    } else {
        for (size_t b = 0; b < B; b++) {
            size_t t0 = (size_t)tb->offset[b], t1 = (size_t)tb->offset[b + 1];
            float *p = c->x0 + b * C;
            if (!c->cfg.pool_mean) {
                memcpy(p, m->hidden + (t1 - 1) * C, C * sizeof *p);
                continue;
            }
            memset(p, 0, C * sizeof *p);
            for (size_t t = t0; t < t1; t++)
                for (size_t k = 0; k < C; k++) p[k] += m->hidden[t * C + k];
            for (size_t k = 0; k < C; k++) p[k] /= (float)(t1 - t0);
        }
        linear_forward(c->a1, c->x0, c->w[0], c->w[1], B, C, Hh);
        relu(c->h1, c->a1, B * Hh);
        linear_forward(logits, c->h1, c->w[2], c->w[3], B, Hh, K);
    }
}

void classifier_backward(Classifier *c, Model *m, const TokenBatch *tb, const float *dlogits,
                         float *dhidden) {
    const size_t B = tb->n_cells, C = c->C, K = c->cfg.n_classes, Hh = c->cfg.hidden;
    memset(dhidden, 0, tb->n_tokens * C * sizeof *dhidden);
    if (c->cfg.kind == CLS_SCBERT) {
        const size_t T = c->T_cell, F1 = CLS_SCBERT_FC1;
        linear_backward(c->d2, c->dw[6], c->dw[7], dlogits, c->h2, c->w[6], B, Hh, K);
        relu_backward(c->d2, c->a2, B * Hh);
        linear_backward(c->d1, c->dw[4], c->dw[5], c->d2, c->h1, c->w[4], B, F1, Hh);
        relu_backward(c->d1, c->a1, B * F1);
        // dx0 holds relu(x0) from forward: the fc1 input.
        linear_backward(NULL, c->dw[2], c->dw[3], c->d1, c->dx0, c->w[2], B, T, F1);
        gemm(0, 0, B, T, F1, 1.0f, c->d1, F1, c->w[2], T, 0.0f, c->dx0, T);
        relu_backward(c->dx0, c->x0, B * T);
        slots_backward(dhidden, c->dw[0], c->dw[1], c->dx0, c->w[0], m, tb, T, C);
    } else if (c->cfg.kind == CLS_LINEAR) {
        const size_t T = c->T_cell;
        linear_backward(NULL, c->dw[2], c->dw[3], dlogits, c->dx0, c->w[2], B, T, K);
        gemm(0, 0, B, T, K, 1.0f, dlogits, K, c->w[2], T, 0.0f, c->dx0, T);
        relu_backward(c->dx0, c->x0, B * T);
        slots_backward(dhidden, c->dw[0], c->dw[1], c->dx0, c->w[0], m, tb, T, C);
    } else {
        linear_backward(c->d1, c->dw[2], c->dw[3], dlogits, c->h1, c->w[2], B, Hh, K);
        relu_backward(c->d1, c->a1, B * Hh);
        linear_backward(c->dx0, c->dw[0], c->dw[1], c->d1, c->x0, c->w[0], B, C, Hh);
        for (size_t b = 0; b < B; b++) {
            size_t t0 = (size_t)tb->offset[b], t1 = (size_t)tb->offset[b + 1];
            const float *d = c->dx0 + b * C;
            if (!c->cfg.pool_mean) {
                memcpy(dhidden + (t1 - 1) * C, d, C * sizeof *d);
                continue;
            }
            float inv = 1.0f / (float)(t1 - t0);
            for (size_t t = t0; t < t1; t++)
                for (size_t k = 0; k < C; k++) dhidden[t * C + k] = d[k] * inv;
        }
    }
}

double classifier_loss(float *dlogits, const float *logits, const int32_t *label, size_t B,
                       size_t K, const double *class_weight, double norm, int64_t *correct) {
    double total = 0.0;
    if (dlogits) memset(dlogits, 0, B * K * sizeof *dlogits);
    for (size_t b = 0; b < B; b++) {
        int y = label[b];
        if (y < 0 || (size_t)y >= K) continue;
        double w = class_weight ? class_weight[y] : 1.0;
        size_t am = 0;
        total += w * xent_row(dlogits ? dlogits + b * K : NULL, logits + b * K, K, y, w / norm, &am);
        if (correct) *correct += am == (size_t)y;
    }
    return total / norm;
}

void classifier_softmax(float *p, size_t B, size_t K) {
    for (size_t b = 0; b < B; b++) {
        float *z = p + b * K;
        double mx = z[0], s = 0.0;
        for (size_t j = 1; j < K; j++)
            if (z[j] > mx) mx = z[j];
        for (size_t j = 0; j < K; j++) s += exp((double)z[j] - mx);
        for (size_t j = 0; j < K; j++) z[j] = (float)(exp((double)z[j] - mx) / s);
    }
}
