// Double-precision builds of the layer and attention kernels (same source as
// the float kernels, see src/model/tmpl/), for finite-difference tests.
#ifndef PERFCELL_KERNELS_F64_H
#define PERFCELL_KERNELS_F64_H

#include "perfcell/favor.h"
#include "perfcell/rng.h"

#include <stddef.h>
#include <stdint.h>

void gemm_f64(int trans_a, int trans_b, size_t M, size_t N, size_t K, double alpha,
              const double *A, size_t lda, const double *B, size_t ldb, double beta, double *C,
              size_t ldc);

void embedding_forward_f64(double *out, const int32_t *token, const int32_t *gene,
                           const double *token_emb, const double *gene_emb, size_t T, size_t C);
void embedding_backward_f64(double *dtoken_emb, double *dgene_emb, const double *dout,
                            const int32_t *token, const int32_t *gene, size_t T, size_t C,
                            size_t zero_row);
void layernorm_forward_f64(double *out, double *mean, double *rstd, const double *inp,
                           const double *w, const double *b, size_t T, size_t C);
void layernorm_backward_f64(double *dinp, double *dw, double *db, const double *dout,
                            const double *inp, const double *w, const double *mean,
                            const double *rstd, size_t T, size_t C);
void linear_forward_f64(double *out, const double *inp, const double *w, const double *b, size_t T,
                        size_t C, size_t OC);
void linear_backward_f64(double *dinp, double *dw, double *db, const double *dout,
                         const double *inp, const double *w, size_t T, size_t C, size_t OC);
void gelu_forward_f64(double *out, const double *inp, size_t n);
void gelu_backward_f64(double *dinp, const double *dout, const double *inp, size_t n);
void dropout_apply_f64(double *x, size_t n, double rate, const Rng *key);

typedef struct {
    FAVOR_CACHE_FIELDS(double)
} FavorCacheF64;

void favor_cache_bind_f64(FavorCacheF64 *c, const FavorDims *d, size_t T, size_t n_cells,
                          double *mem, void *imem);
void favor_forward_f64(double *out, FavorCacheF64 *cache, const double *q, const double *k,
                       const double *v, const double *proj, const int64_t *offset, size_t n_cells,
                       const FavorDims *d);
void favor_backward_f64(double *dq, double *dk, double *dv, FavorCacheF64 *cache,
                        const double *dout, const double *out, const double *q, const double *k,
                        const double *v, const double *proj, const int64_t *offset, size_t n_cells,
                        const FavorDims *d, double *scratch);

#endif
