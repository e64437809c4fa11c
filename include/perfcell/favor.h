// FAVOR+ linear attention with the softmax kernel (Performer, as in scBERT),
// forward and backward, on packed cells.
//
// Per cell (n tokens) and head, x = q or k (n, E), P the layer's projection
// (M, E): c = E^-1/4, r = M^-1/2, u = c·x·Pᵀ, diag = |x|²·c²/2;
//   query: φ = r·(exp(u − diag − max over the M features of the row) + 1e-4)
//   key:   φ = r·(exp(u − diag − max of u over the cell's heads, tokens and
//               features) + 1e-4)
// S = Σₙ φ(k)ₙ, den = φ(q)·S, ctx = φ(k)ᵀ·v, out = (φ(q)·ctx) / den.
// Gradients flow through both maxima.
//
// Letters: T tokens (packed), H heads, E head width, M random features.
// q, k, v and out are (T, H·E) matrices: head h owns columns h·E .. h·E+E-1.
#ifndef PERFCELL_FAVOR_H
#define PERFCELL_FAVOR_H

#include <stddef.h>
#include <stdint.h>

#define FAVOR_EPS 1e-4f

typedef struct {
    size_t H, E, M;
} FavorDims;

// What the backward pass needs; sized for a micro-batch of at most T tokens
// and n_cells cells. favor_backward() consumes phi_q and phi_k (overwrites
// them), so one forward feeds one backward.
#define FAVOR_CACHE_FIELDS(real)                                                                   \
    real *phi_q;   /* (T, H, M) */                                                                 \
    real *phi_k;   /* (T, H, M) */                                                                 \
    real *den;     /* (T, H); in backward then the row sums of the query gradient */               \
    real *krow;    /* (T, H) backward: row sums of the key gradient */                            \
    real *ktot;    /* (n_cells) backward: sum of the key gradient over the cell */                \
    real *ksum;    /* (n_cells, H, M) S */                                                         \
    real *ctx;     /* (n_cells, H, M, E) */                                                        \
    int32_t *qmax; /* (T, H) feature index of each query row's maximum */                         \
    int64_t *kmax; /* (n_cells) flat index (t·H + h)·M + m of each cell's key maximum */

typedef struct {
    FAVOR_CACHE_FIELDS(float)
} FavorCache;

// Values of a cache for T tokens and n_cells cells: favor_cache_floats()
// reals, and favor_cache_ints_bytes() bytes of indices (8-byte aligned).
size_t favor_cache_floats(const FavorDims *d, size_t T, size_t n_cells);
size_t favor_cache_ints_bytes(const FavorDims *d, size_t T, size_t n_cells);
void favor_cache_bind(FavorCache *c, const FavorDims *d, size_t T, size_t n_cells, float *mem,
                      void *imem);

// Scratch floats needed by favor_backward for cells of at most n_max tokens.
size_t favor_scratch_floats(const FavorDims *d, size_t n_max);

void favor_forward(float *out,        // (T, H·E)
                   FavorCache *cache, //
                   const float *q, const float *k, const float *v, // (T, H·E)
                   const float *proj,                              // (M, E)
                   const int64_t *offset, size_t n_cells,          // (n_cells + 1)
                   const FavorDims *d);

// dq, dk, dv are overwritten. `out` is the forward output.
void favor_backward(float *dq, float *dk, float *dv, //
                    FavorCache *cache,               //
                    const float *dout, const float *out, const float *q, const float *k,
                    const float *v, const float *proj, const int64_t *offset, size_t n_cells,
                    const FavorDims *d, float *scratch);

#endif
