// scBERT masking and the MLM head.
#include "perfcell/mlm.h"

#include "perfcell/error.h"
#include "perfcell/layers.h"
#include "perfcell/loss.h"
#include "perfcell/rng.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void mlm_head_add(ParamTable *t, const ModelConfig *cfg) {
    const size_t V = (size_t)cfg->bins + 2, C = cfg->dim;
    const float u = 1.0f / sqrtf((float)C);
    param_table_add(t, "to_out.weight", 2, V, C, 1, 1, INIT_UNIFORM, u);
    param_table_add(t, "to_out.bias", 1, V, 0, 1, 0, INIT_UNIFORM, u);
}

size_t mlm_mask(TokenBatch *tb, const ModelConfig *cfg, double mask_prob, double replace_prob,
                uint64_t seed, int64_t step) {
    const int mask_token = cfg->bins + 1;
    size_t chosen = 0, cap = 0;
    uint32_t *pos = NULL;
    for (size_t b = 0; b < tb->n_cells; b++) {
        const size_t t0 = (size_t)tb->offset[b], n = (size_t)tb->offset[b + 1] - t0;
        if (n > cap) {
            cap = n;
            pos = xrealloc(pos, cap * sizeof *pos);
        }
        size_t k = 0;
        for (size_t i = 0; i + 1 < n; i++) {
            int tok = tb->token[t0 + i];
            if (tok >= 1 && tok <= cfg->bins) pos[k++] = (uint32_t)i;
        }
        size_t want = (size_t)ceil(mask_prob * (double)k - 1e-9);
        if (want > k) want = k;
        Rng r = rng_init(seed, RNG_MASK, 0, (uint64_t)tb->cell_id[b], (uint32_t)step);
        // Partial Fisher-Yates: the first `want` entries are a uniform subset.
        for (size_t i = 0; i < want; i++) {
            size_t j = i + (size_t)rng_below(&r, k - i);
            uint32_t tmp = pos[i];
            pos[i] = pos[j];
            pos[j] = tmp;
            size_t t = t0 + pos[i];
            tb->target[t] = tb->token[t];
            if (rng_uniform_double(&r) < replace_prob) tb->token[t] = mask_token;
        }
        chosen += want;
    }
    free(pos);
    return chosen;
}

void mlm_logits(float *logits, const float *hidden, const float *w, const float *b, size_t T,
                size_t C, size_t V) {
    linear_forward(logits, hidden, w, b, T, C, V);
}

double mlm_loss(float *dlogits, const float *logits, const int32_t *target, size_t T, size_t V,
                double n_norm, MlmStats *st) {
    double total = 0.0;
    if (dlogits) memset(dlogits, 0, T * V * sizeof *dlogits);
    for (size_t t = 0; t < T; t++) {
        int y = target[t];
        if (y < 0) continue;
        size_t am = 0;
        double ce = xent_row(dlogits ? dlogits + t * V : NULL, logits + t * V, V, y, 1.0 / n_norm, &am);
        total += ce;
        if (st) {
            st->loss_sum += ce;
            st->n++;
            st->correct += am == (size_t)y;
        }
    }
    return total / n_norm;
}

void mlm_backward(float *dhidden, float *dw, float *db, const float *dlogits, const float *hidden,
                  const float *w, size_t T, size_t C, size_t V) {
    linear_backward(dhidden, dw, db, dlogits, hidden, w, T, C, V);
}
