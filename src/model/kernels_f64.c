// Double-precision builds of the layer and attention kernels, for tests.
#include "perfcell/kernels_f64.h"

#include "perfcell/layers.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

void gemm_f64(int trans_a, int trans_b, size_t M, size_t N, size_t K, double alpha,
              const double *A, size_t lda, const double *B, size_t ldb, double beta, double *C,
              size_t ldc) {
    if (M == 0 || N == 0) return;
    cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, (blasint)M, (blasint)N, (blasint)K, alpha, A,
                (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
}

#define real double
#define FN(name) name##_f64
#define GEMM gemm_f64
#define EXP exp
#define ERF erf
#define POW pow
#define SQRT sqrt
#define FAVOR_CACHE FavorCacheF64
#include "tmpl/layers_impl.h"
#include "tmpl/favor_impl.h"
