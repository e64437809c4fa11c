// Adam / AdamW over the flat parameter buffer, global-norm clipping, and the
// learning-rate schedules (warmup + cosine; scBERT's cosine annealing with
// warm restarts).
#ifndef PERFCELL_OPTIM_H
#define PERFCELL_OPTIM_H

#include "perfcell/params.h"

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int decoupled;      // 1: AdamW (decoupled weight decay), 0: Adam (L2 in the gradient)
    float beta1, beta2, eps;
    float weight_decay; // applied to tensors whose `decay` flag is set
} AdamConfig;

// One update of every trainable tensor, exactly as torch.optim.Adam / AdamW:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g²
//   p -= lr / (1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// `t` is the 1-based number of this update.
void adam_update(const ParamTable *table, float *params, const float *grads, float *exp_avg,
                 float *exp_avg_sq, int64_t t, float lr, const AdamConfig *cfg);

// L2 norm of the trainable gradients (double accumulation).
double grad_global_norm(const ParamTable *table, const float *grads);
// Scale trainable gradients by max_norm / (norm + 1e-6) when norm > max_norm
// (torch.nn.utils.clip_grad_norm_). Returns the scale applied (1 if none).
double grad_clip(const ParamTable *table, float *grads, double norm, double max_norm);
// Index of the first trainable tensor holding a NaN or Inf gradient, or -1.
long grad_first_nonfinite(const ParamTable *table, const float *grads);

typedef enum { SCHED_CONSTANT, SCHED_COSINE, SCHED_COSINE_RESTARTS } SchedKind;

typedef struct {
    SchedKind kind;
    double lr;           // peak learning rate
    double min_lr;       // floor of the cosine
    int64_t warmup;      // linear warmup steps
    int64_t total;       // SCHED_COSINE: steps from 0 to the end of the decay
    int64_t cycle_steps; // SCHED_COSINE_RESTARTS: first cycle length (warmup included)
    double cycle_mult;   // cycle length growth
    double gamma;        // peak decay per cycle
} SchedConfig;

// Learning rate of optimizer step `step` (0-based); a pure function of the
// step, so resuming needs no scheduler state beyond the step count.
double sched_lr(const SchedConfig *s, int64_t step);

#endif
