// Adam / AdamW, gradient norms and clipping.
#include "perfcell/optim.h"

#include <math.h>

void adam_update(const ParamTable *table, float *params, const float *grads, float *exp_avg,
                 float *exp_avg_sq, int64_t t, float lr, const AdamConfig *cfg) {
    const float b1 = cfg->beta1, b2 = cfg->beta2, eps = cfg->eps;
    const double bc1 = 1.0 - pow((double)b1, (double)t);
    const double bc2 = 1.0 - pow((double)b2, (double)t);
    const float step_size = (float)((double)lr / bc1);
    const float inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    for (size_t i = 0; i < table->n; i++) {
        const ParamEntry *e = &table->e[i];
        if (!e->trainable) continue;
        float *p = params + e->offset, *m = exp_avg + e->offset, *v = exp_avg_sq + e->offset;
        const float *g = grads + e->offset;
        const float wd = e->decay ? cfg->weight_decay : 0.0f;
        const float decay_mult = cfg->decoupled ? 1.0f - lr * wd : 1.0f;
        const float l2 = cfg->decoupled ? 0.0f : wd;
        for (size_t j = 0; j < e->size; j++) {
            float gj = g[j] + l2 * p[j];
            m[j] = b1 * m[j] + (1.0f - b1) * gj;
            v[j] = b2 * v[j] + (1.0f - b2) * gj * gj;
            float denom = sqrtf(v[j]) * inv_sqrt_bc2 + eps;
            p[j] = p[j] * decay_mult - step_size * m[j] / denom;
        }
    }
}

double grad_global_norm(const ParamTable *table, const float *grads) {
    double s = 0.0;
    for (size_t i = 0; i < table->n; i++) {
        const ParamEntry *e = &table->e[i];
        if (!e->trainable) continue;
        const float *g = grads + e->offset;
        for (size_t j = 0; j < e->size; j++) s += (double)g[j] * g[j];
    }
    return sqrt(s);
}

double grad_clip(const ParamTable *table, float *grads, double norm, double max_norm) {
    if (max_norm <= 0.0) return 1.0;
    double coef = max_norm / (norm + 1e-6);
    if (coef >= 1.0) return 1.0;
    float c = (float)coef;
    for (size_t i = 0; i < table->n; i++) {
        const ParamEntry *e = &table->e[i];
        if (!e->trainable) continue;
        float *g = grads + e->offset;
        for (size_t j = 0; j < e->size; j++) g[j] *= c;
    }
    return coef;
}

long grad_first_nonfinite(const ParamTable *table, const float *grads) {
    for (size_t i = 0; i < table->n; i++) {
        const ParamEntry *e = &table->e[i];
        if (!e->trainable) continue;
        const float *g = grads + e->offset;
        // Summing is branch-free and vectorises; a NaN or Inf anywhere makes the
        // sum non-finite (finite values of a gradient cannot overflow float
        // range when summed in double).
        double s = 0.0;
        for (size_t j = 0; j < e->size; j++) s += (double)g[j] * 0.0;
        if (!isfinite(s)) return (long)i;
    }
    return -1;
}
