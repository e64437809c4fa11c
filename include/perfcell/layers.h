// Forward and backward passes of the model's layers on packed token matrices.
//
// Dimension letters: T tokens (packed over the cells of a micro-batch), C model
// width, OC output channels, F feed-forward width, V token classes, G genes.
// Forward/backward pairs take the same arguments in the same order (outputs,
// caches, inputs, weights, sizes); backward *accumulates* into parameter
// gradients (dw, db, ...) and *overwrites* input gradients (dinp) unless the
// comment says otherwise.
#ifndef PERFCELL_LAYERS_H
#define PERFCELL_LAYERS_H

#include "perfcell/rng.h"

#include <stddef.h>
#include <stdint.h>

// h0[t] = token_emb[token[t]] + gene_emb[gene[t]]
void embedding_forward(float *out, // (T, C)
                       const int32_t *token, const int32_t *gene, // (T)
                       const float *token_emb,                    // (V, C)
                       const float *gene_emb,                     // (G + 1, C)
                       size_t T, size_t C);
// dtoken_emb and dgene_emb may be NULL (frozen); row `zero_row` of the gene embedding (the
// last position's all-zero row) receives no gradient.
void embedding_backward(float *dtoken_emb, float *dgene_emb, const float *dout,
                        const int32_t *token, const int32_t *gene, size_t T, size_t C,
                        size_t zero_row);

#define LAYERNORM_EPS 1e-5
void layernorm_forward(float *out,               // (T, C)
                       float *mean, float *rstd, // (T) cache
                       const float *inp,         // (T, C)
                       const float *w, const float *b, // (C)
                       size_t T, size_t C);
// dinp is accumulated into (+=), as in a residual stream; dw, db may be NULL
// (frozen weights).
void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                        const float *w, const float *mean, const float *rstd, size_t T, size_t C);

// out = inp · wᵀ + b (b may be NULL); w is (OC, C) as in torch.nn.Linear.
void linear_forward(float *out, const float *inp, const float *w, const float *b, size_t T,
                    size_t C, size_t OC);
// dinp = dout · w (overwritten; may be NULL), dw += doutᵀ · inp, db += Σ dout.
void linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                     const float *w, size_t T, size_t C, size_t OC);

// GELU with the exact erf form: x · Φ(x).
void gelu_forward(float *out, const float *inp, size_t n);
// dinp = dout · GELU'(inp) (overwritten).
void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);

// Inverted dropout with a keyed mask: element i of a cell's block is kept with
// probability 1 - rate and scaled by 1 / (1 - rate). The mask depends on the
// RNG key and the element's index within the cell only, never on packing.
// The same call with the same key applied to a gradient gives the backward.
void dropout_apply(float *x, size_t n, float rate, const Rng *key);

#endif
