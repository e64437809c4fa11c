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
// error below 3e-7 over the range where expf is finite and normal; returns 0
// below -87.3 and +inf above 88.7.
static inline float fast_expf(float x) {
    // exp(x) = 2^k * exp(r), x = k ln2 + r, |r| <= ln2/2; degree-6 polynomial.
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    // NaN is returned as it came (a select, so the loops still vectorise);
    // the arithmetic below only sees numbers, so the integer conversion and
    // the shift stay defined.
    const float in = x;
    if (x != x) x = 0.0f;
    if (x < -87.3f) x = -87.3f;
    if (x > 88.7f) x = 88.7f;
    // Round x·log2(e) to the nearest integer by adding and subtracting 1.5·2^23
    // (exact in float for |values| < 2^22): no call to floorf, so the loops vectorise.
    const float magic = 12582912.0f;
    float kf = (x * log2e + magic) - magic;
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
    s.i = (int32_t)((uint32_t)((int32_t)kf + 127) << 23);
    return in != in ? in : p * s.f;
}

// erf(x) for float, vectorisable: Abramowitz & Stegun 7.1.26 with the
// exponential above; absolute error below 5e-7 (1.5e-7 from the formula, the
// rest float rounding), i.e. GELU relative errors of a few float ulps.
static inline float fast_erff(float x) {
    float a = x < 0.0f ? -x : x;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    float y = 1.0f - p * t * fast_expf(-a * a);
    return x < 0.0f ? -y : y;
}

#endif
