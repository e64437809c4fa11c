// Masked-expression pretraining (scBERT rules) and the MLM head.
//
// Maskable positions: tokens 1..bins (nonzero bins), never a cell's last
// position. Per cell ceil(mask_prob · n_maskable) positions are drawn
// uniformly (RNG_MASK keyed by seed, cell id, step); replace_prob of them
// become MASK (bins + 1), the rest keep their token. The loss is the cross-
// entropy over the bins + 2 classes at the chosen positions, divided by the
// number of chosen positions in the *global* batch, so that summing gradients
// over micro-batches and ranks gives exactly the full-batch gradient.
#ifndef PERFCELL_MLM_H
#define PERFCELL_MLM_H

#include "perfcell/model.h"

typedef struct {
    double loss_sum; // Σ cross-entropy over chosen positions (not normalised)
    int64_t n;       // chosen positions
    int64_t correct; // chosen positions whose arg-max class is the target
} MlmStats;

// Adds to_out.weight (V, C) and to_out.bias (V): scBERT's MLM head.
void mlm_head_add(ParamTable *t, const ModelConfig *cfg);

// Choose and mask positions in place (tb->token, tb->target); returns the
// number of chosen positions.
size_t mlm_mask(TokenBatch *tb, const ModelConfig *cfg, double mask_prob, double replace_prob,
                uint64_t seed, int64_t step);

// logits (T, V) = hidden (T, C) · wᵀ + b.
void mlm_logits(float *logits, const float *hidden, const float *w, const float *b, size_t T,
                size_t C, size_t V);
// Cross-entropy at positions with target >= 0: adds to st, writes dlogits
// (T, V) = (softmax − onehot) / n_norm there and 0 elsewhere (dlogits may be
// NULL for evaluation). Returns Σ cross-entropy / n_norm.
double mlm_loss(float *dlogits, const float *logits, const int32_t *target, size_t T, size_t V,
                double n_norm, MlmStats *st);
// dhidden (T, C) = dlogits · w (overwritten); dw += dlogitsᵀ · hidden; db += Σ dlogits.
void mlm_backward(float *dhidden, float *dw, float *db, const float *dlogits, const float *hidden,
                  const float *w, size_t T, size_t C, size_t V);

#endif
