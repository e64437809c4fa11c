// Unit tests of L-BFGS: minima of known problems (a quadratic against its
// Cholesky solution, Rosenbrock's valley, a class-weighted L2-regularised
// multinomial logistic regression by its optimality condition), the stop
// callback, and objectives that turn NaN away from the start.
#include "perfcell/error.h"
#include "perfcell/lbfgs.h"
#include "perfcell/rng.h"
#include "testlib.h"

#include <math.h>
#include <string.h>

// ½ xᵀAx − bᵀx with A = MᵀM + ½I (symmetric positive definite).
typedef struct {
    size_t n;
    double *A, *b;
    int evals;
} Quad;

static double quad_f(const double *x, double *g, void *ctx) {
    Quad *q = ctx;
    double f = 0;
    q->evals++;
    for (size_t i = 0; i < q->n; i++) {
        double ax = 0;
        for (size_t j = 0; j < q->n; j++) ax += q->A[i * q->n + j] * x[j];
        g[i] = ax - q->b[i];
        f += 0.5 * x[i] * ax - q->b[i] * x[i];
    }
    return f;
}

// Solve A z = b by Gaussian elimination with partial pivoting (test oracle).
static void solve(const double *A0, const double *b0, double *z, size_t n) {
    double *A = xmalloc(n * n * sizeof *A), *b = xmalloc(n * sizeof *b);
    memcpy(A, A0, n * n * sizeof *A);
    memcpy(b, b0, n * sizeof *b);
    for (size_t c = 0; c < n; c++) {
        size_t p = c;
        for (size_t r = c + 1; r < n; r++)
            if (fabs(A[r * n + c]) > fabs(A[p * n + c])) p = r;
        for (size_t k = 0; k < n; k++) {
            double t = A[c * n + k];
            A[c * n + k] = A[p * n + k];
            A[p * n + k] = t;
        }
        double t = b[c];
        b[c] = b[p];
        b[p] = t;
        for (size_t r = c + 1; r < n; r++) {
            double m = A[r * n + c] / A[c * n + c];
            for (size_t k = c; k < n; k++) A[r * n + k] -= m * A[c * n + k];
            b[r] -= m * b[c];
        }
    }
    for (size_t c = n; c-- > 0;) {
        double s = b[c];
        for (size_t k = c + 1; k < n; k++) s -= A[c * n + k] * z[k];
        z[c] = s / A[c * n + c];
    }
    free(A), free(b);
}

static void test_quadratic(void) {
    const size_t n = 40;
    Rng r = rng_init(7, 0, 0, 0, 0);
    double *M = xmalloc(n * n * sizeof *M);
    Quad q = {n, xcalloc(n * n, sizeof(double)), xmalloc(n * sizeof(double)), 0};
    for (size_t i = 0; i < n * n; i++) M[i] = rng_normal(&r);
    for (size_t i = 0; i < n; i++) {
        q.b[i] = rng_normal(&r);
        for (size_t j = 0; j < n; j++) {
            double s = i == j ? 0.5 : 0.0; // smallest eigenvalue above 0.5
            for (size_t k = 0; k < n; k++) s += M[k * n + i] * M[k * n + j];
            q.A[i * n + j] = s;
        }
    }
    double *want = xmalloc(n * sizeof *want), *x = xcalloc(n, sizeof *x);
    solve(q.A, q.b, want, n);
    LbfgsConfig cfg = {10, 1000, 1e-6, 0};
    LbfgsResult res;
    lbfgs_minimize(x, n, quad_f, &q, NULL, NULL, &cfg, &res);
    double e = t_rel_l2(x, want, n, 1e-12);
    printf("quadratic (n %zu): %s after %d iterations, %d evaluations, |g|max %.1e, rel L2 to A^-1 b %.1e\n", n,
           lbfgs_status_name(res.status), res.iterations, res.evaluations, res.gmax, e);
    T_CHECK(res.status == LBFGS_CONVERGED, "quadratic: %s", lbfgs_status_name(res.status));
    T_CHECK(e < 1e-6, "quadratic minimum rel L2 %.2e", e);
    T_CHECK(res.evaluations == q.evals, "evaluations counted %d, made %d", res.evaluations, q.evals);
    free(M), free(q.A), free(q.b), free(want), free(x);
}

static double rosenbrock(const double *x, double *g, void *ctx) {
    size_t n = *(const size_t *)ctx;
    double f = 0;
    memset(g, 0, n * sizeof *g);
    for (size_t i = 0; i + 1 < n; i++) {
        double a = x[i + 1] - x[i] * x[i], b = 1 - x[i];
        f += 100 * a * a + b * b;
        g[i] += -400 * a * x[i] - 2 * b;
        g[i + 1] += 200 * a;
    }
    return f;
}

static void test_rosenbrock(void) {
    size_t n = 10;
    double x[10], ones[10];
    for (size_t i = 0; i < n; i++) {
        x[i] = i % 2 ? 1.0 : -1.2;
        ones[i] = 1.0;
    }
    LbfgsConfig cfg = {10, 2000, 1e-9, 0};
    LbfgsResult res;
    lbfgs_minimize(x, n, rosenbrock, &n, NULL, NULL, &cfg, &res);
    double e = t_rel_l2(x, ones, n, 1e-12);
    printf("Rosenbrock (n %zu): %s after %d iterations, f %.2e, rel L2 to the minimum %.1e\n", n,
           lbfgs_status_name(res.status), res.iterations, res.f, e);
    T_CHECK(res.status == LBFGS_CONVERGED && e < 1e-6, "Rosenbrock: %s, rel L2 %.2e",
            lbfgs_status_name(res.status), e);
}

// Class-weighted multinomial logistic regression with ½λ|W|² (bias free of
// the penalty): the objective perfcell's L-BFGS fine-tuning minimises.
typedef struct {
    size_t n, d, k;
    const double *X, *w;
    const int *y;
    double lambda, wsum;
} Logreg;

static double logreg_f(const double *p, double *g, void *ctx) {
    const Logreg *L = ctx;
    const size_t d = L->d, k = L->k;
    const double *W = p, *bias = p + d * k;
    memset(g, 0, (d + 1) * k * sizeof *g);
    double f = 0, z[8];
    for (size_t i = 0; i < L->n; i++) {
        const double *xi = L->X + i * d;
        double m = -INFINITY, s = 0;
        for (size_t c = 0; c < k; c++) {
            z[c] = bias[c];
            for (size_t j = 0; j < d; j++) z[c] += W[c * d + j] * xi[j];
            m = z[c] > m ? z[c] : m;
        }
        for (size_t c = 0; c < k; c++) s += exp(z[c] - m);
        double wi = L->w[L->y[i]] / L->wsum;
        f += wi * (m + log(s) - z[L->y[i]]);
        for (size_t c = 0; c < k; c++) {
            double dz = wi * (exp(z[c] - m) / s - (c == (size_t)L->y[i]));
            for (size_t j = 0; j < d; j++) g[c * d + j] += dz * xi[j];
            g[d * k + c] += dz;
        }
    }
    for (size_t i = 0; i < d * k; i++) {
        f += 0.5 * L->lambda * W[i] * W[i];
        g[i] += L->lambda * W[i];
    }
    return f;
}

static void test_logreg(void) {
    enum { N = 300, D = 12, K = 4 };
    static double X[N * D], p[(D + 1) * K], g[(D + 1) * K];
    static int y[N];
    double w[K] = {0}, cnt[K] = {0};
    Rng r = rng_init(11, 0, 0, 0, 0);
    for (size_t i = 0; i < N; i++) {
        y[i] = i % 10 == 0 ? 3 : (int)(i % 3); // class 3 rare
        for (size_t j = 0; j < D; j++) X[i * D + j] = rng_normal(&r) + (j == (size_t)y[i] * 3 ? 1.5 : 0.0);
        cnt[y[i]]++;
    }
    double wsum = 0;
    for (size_t c = 0; c < K; c++) w[c] = N / (K * cnt[c]);
    for (size_t i = 0; i < N; i++) wsum += w[y[i]];
    Logreg L = {N, D, K, X, w, y, 1e-2, wsum};
    LbfgsConfig cfg = {10, 500, 1e-8, 0};
    LbfgsResult res;
    lbfgs_minimize(p, (D + 1) * K, logreg_f, &L, NULL, NULL, &cfg, &res);
    double f = logreg_f(p, g, &L), gmax = 0;
    for (size_t i = 0; i < (D + 1) * K; i++) gmax = fmax(gmax, fabs(g[i]));
    printf("logistic regression (%d cells, %d features, %d classes): %s after %d iterations, loss %.6f, "
           "|g|max %.1e\n", N, D, K, lbfgs_status_name(res.status), res.iterations, f, gmax);
    T_CHECK(res.status == LBFGS_CONVERGED && gmax <= 1e-8, "logistic regression: %s, |g|max %.2e",
            lbfgs_status_name(res.status), gmax);
    T_CHECK(f == res.f, "reported objective %.17g, recomputed %.17g", res.f, f);
    // The same problem with a loose ftol stops earlier, at a worse point.
    double p2[(D + 1) * K] = {0};
    LbfgsConfig loose = {10, 500, 0, 1e-3};
    LbfgsResult r2;
    lbfgs_minimize(p2, (D + 1) * K, logreg_f, &L, NULL, NULL, &loose, &r2);
    T_CHECK(r2.status == LBFGS_CONVERGED && r2.iterations < res.iterations && r2.f >= res.f,
            "ftol: %s after %d iterations, f %.6f", lbfgs_status_name(r2.status), r2.iterations, r2.f);
}

typedef struct {
    int calls, after;
} StopAfter;

static int stop_after(void *ctx) {
    StopAfter *s = ctx;
    return ++s->calls >= s->after;
}

static void test_stop(void) {
    size_t n = 10;
    double x[10];
    for (size_t i = 0; i < n; i++) x[i] = -1.2;
    StopAfter s = {0, 3};
    LbfgsConfig cfg = {5, 100, 1e-12, 0};
    LbfgsResult res;
    lbfgs_minimize(x, n, rosenbrock, &n, stop_after, &s, &cfg, &res);
    T_CHECK(res.status == LBFGS_STOPPED && res.iterations == 3 && s.calls == 3,
            "stop after 3: %s after %d iterations, %d calls", lbfgs_status_name(res.status), res.iterations,
            s.calls);
    // max_iter = 0: the objective once, x unchanged.
    double y[2] = {-1.2, 1.0};
    size_t two = 2;
    LbfgsConfig none = {5, 0, 1e-12, 0};
    lbfgs_minimize(y, 2, rosenbrock, &two, NULL, NULL, &none, &res);
    T_CHECK(res.status == LBFGS_MAX_ITER && res.iterations == 0 && res.evaluations == 1 && y[0] == -1.2,
            "max_iter 0: %s, %d iterations", lbfgs_status_name(res.status), res.iterations);
}

// f = x - 2 log x (minimum at 2), NaN for x <= 0: steps into the NaN region
// are shortened.
static double log_barrier(const double *x, double *g, void *ctx) {
    int *nan_hits = ctx;
    if (x[0] <= 0) {
        (*nan_hits)++;
        g[0] = NAN;
        return NAN;
    }
    g[0] = 1 - 2 / x[0];
    return x[0] - 2 * log(x[0]);
}

// Finite only at the start.
static double nan_away(const double *x, double *g, void *ctx) {
    (void)ctx;
    g[0] = 1.0;
    return x[0] == 5.0 ? 0.0 : NAN;
}

static void test_nan(void) {
    int hits = 0;
    double x = 30.0;
    LbfgsConfig cfg = {10, 200, 1e-10, 0};
    LbfgsResult res;
    lbfgs_minimize(&x, 1, log_barrier, &hits, NULL, NULL, &cfg, &res);
    printf("x - 2 log x from 30: %s at %.12f after %d iterations (%d steps into NaN shortened)\n",
           lbfgs_status_name(res.status), x, res.iterations, hits);
    T_CHECK(res.status == LBFGS_CONVERGED && fabs(x - 2.0) < 1e-8, "log barrier: %s at %.12f",
            lbfgs_status_name(res.status), x);
    double y = 5.0;
    lbfgs_minimize(&y, 1, nan_away, NULL, NULL, NULL, &cfg, &res);
    T_CHECK(res.status == LBFGS_NO_PROGRESS && res.iterations == 0 && y == 5.0,
            "NaN everywhere but the start: %s, %d iterations, x %g", lbfgs_status_name(res.status),
            res.iterations, y);
}

int main(void) {
    test_quadratic();
    test_rosenbrock();
    test_logreg();
    test_stop();
    test_nan();
    return t_finish("test_optim");
}
