// Matrix products and vector math. Every matrix product of perfcell goes
// through gemm() (one cblas_sgemm wrapper); gemm_naive() exists for tests.
//
// Row-major: C (M, N) = alpha * op(A) * op(B) + beta * C, op(X) = X or Xᵀ.
#ifndef PERFCELL_LINALG_H
#define PERFCELL_LINALG_H

#include <stddef.h>
#include <stdint.h>

void gemm(int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha, const float *A,
          size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc);
void gemm_naive(int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha,
                const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                size_t ldc);

// Floating-point operations counted by gemm() since the last reset (for the
// achieved GFLOP/s of benchmarks).
double gemm_flops(void);
void gemm_flops_reset(void);

// exp(x) for float, vectorisable (GCC turns the loops into AVX code), relative
// error below 2 ulp over the range where expf is finite and normal; returns 0
// below -87.3 and +inf above 88.7.
static inline float fast_expf(float x) {
    // exp(x) = 2^k * exp(r), x = k ln2 + r, |r| <= ln2/2; degree-6 polynomial.
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    if (x < -87.3f) x = -87.3f;
    if (x > 88.7f) x = 88.7f;
    float kf = __builtin_floorf(x * log2e + 0.5f);
    float r = x - kf * ln2_hi;
    r = r - kf * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } s;
    s.i = ((int32_t)kf + 127) << 23;
    return p * s.f;
}

#endif
