// L-BFGS with a backtracking Armijo line search (include/perfcell/lbfgs.h).
#include "perfcell/lbfgs.h"

#include "perfcell/error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ARMIJO_C1 1e-4
#define BACKTRACK 0.5
#define MAX_TRIALS 40

static double dot(const double *a, const double *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static double max_abs(const double *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

typedef struct {
    size_t n;
    int m, k, newest; // capacity, pairs stored, index of the newest pair
    double *s, *y;    // (m, n)
    double *rho, *alpha;
} History;

// d = -H g by the two-loop recursion, H0 = (sᵀy / yᵀy) I of the newest pair.
static void direction(const History *h, const double *g, double *d) {
    const size_t n = h->n;
    for (size_t i = 0; i < n; i++) d[i] = -g[i];
    for (int j = 0; j < h->k; j++) {
        int p = (h->newest - j + h->m) % h->m;
        h->alpha[p] = h->rho[p] * dot(h->s + (size_t)p * n, d, n);
        const double *y = h->y + (size_t)p * n;
        for (size_t i = 0; i < n; i++) d[i] -= h->alpha[p] * y[i];
    }
    if (h->k > 0) {
        const double *y = h->y + (size_t)h->newest * n;
        double gamma = 1.0 / (h->rho[h->newest] * dot(y, y, n));
        for (size_t i = 0; i < n; i++) d[i] *= gamma;
    }
    for (int j = h->k - 1; j >= 0; j--) {
        int p = (h->newest - j + h->m) % h->m;
        const double *s = h->s + (size_t)p * n;
        double beta = h->rho[p] * dot(h->y + (size_t)p * n, d, n);
        for (size_t i = 0; i < n; i++) d[i] += (h->alpha[p] - beta) * s[i];
    }
}

// Keep the pair s = x1 - x0, y = g1 - g0 when its curvature sᵀy is positive
// enough (otherwise H would not stay positive definite).
static void push(History *h, const double *x0, const double *x1, const double *g0, const double *g1) {
    const size_t n = h->n;
    double sy = 0, yy = 0;
    for (size_t i = 0; i < n; i++) {
        double si = x1[i] - x0[i], yi = g1[i] - g0[i];
        sy += si * yi;
        yy += yi * yi;
    }
    if (!(sy > 1e-10 * yy) || yy == 0) return;
    int p = (h->newest + 1) % h->m; // the oldest pair's slot once the history is full
    double *s = h->s + (size_t)p * n, *y = h->y + (size_t)p * n;
    for (size_t i = 0; i < n; i++) {
        s[i] = x1[i] - x0[i];
        y[i] = g1[i] - g0[i];
    }
    h->rho[p] = 1.0 / sy;
    h->newest = p;
    if (h->k < h->m) h->k++;
}

const char *lbfgs_status_name(LbfgsStatus s) {
    switch (s) {
    case LBFGS_MAX_ITER: return "iteration limit";
    case LBFGS_CONVERGED: return "converged";
    case LBFGS_NO_PROGRESS: return "no further decrease";
    case LBFGS_STOPPED: return "stopped";
    }
    return "?";
}

void lbfgs_minimize(double *x, size_t n, LbfgsObjective f, void *ctx, LbfgsStop stop, void *stop_ctx,
                    const LbfgsConfig *cfg, LbfgsResult *r) {
    CHECK(cfg->history >= 1 && cfg->max_iter >= 0, "internal: bad L-BFGS configuration");
    History h = {n, cfg->history, 0, cfg->history - 1, NULL, NULL, NULL, NULL};
    const size_t nn = n ? n : 1;
    h.s = xmalloc((size_t)h.m * nn * sizeof *h.s);
    h.y = xmalloc((size_t)h.m * nn * sizeof *h.y);
    h.rho = xcalloc((size_t)h.m, sizeof *h.rho);
    h.alpha = xcalloc((size_t)h.m, sizeof *h.alpha);
    double *g = xmalloc(nn * sizeof *g), *d = xmalloc(nn * sizeof *d);
    double *x1 = xmalloc(nn * sizeof *x1), *g1 = xmalloc(nn * sizeof *g1);

    memset(r, 0, sizeof *r);
    double fx = f(x, g, ctx);
    r->evaluations = 1;
    r->status = LBFGS_MAX_ITER;
    if (max_abs(g, n) <= cfg->gtol) r->status = LBFGS_CONVERGED;
    while (r->status == LBFGS_MAX_ITER && r->iterations < cfg->max_iter) {
        direction(&h, g, d);
        double gd = dot(g, d, n);
        if (!(gd < 0)) { // not a descent direction: start the history again
            h.k = 0;
            for (size_t i = 0; i < n; i++) d[i] = -g[i];
            gd = dot(g, d, n);
        }
        // Without curvature information the step is scaled to the gradient
        // (at most a unit 1-norm move), as PyTorch's L-BFGS does.
        double step = 1.0;
        if (h.k == 0) {
            double g1n = 0;
            for (size_t i = 0; i < n; i++) g1n += fabs(g[i]);
            step = g1n > 1.0 ? 1.0 / g1n : 1.0;
        }
        int accepted = 0;
        double f1 = 0;
        for (int trial = 0; trial < MAX_TRIALS; trial++) {
            for (size_t i = 0; i < n; i++) x1[i] = x[i] + step * d[i];
            f1 = f(x1, g1, ctx);
            r->evaluations++;
            if (f1 <= fx + ARMIJO_C1 * step * gd) { // false for NaN: shorter step
                accepted = 1;
                break;
            }
            step *= BACKTRACK;
        }
        if (!accepted) {
            if (h.k == 0) {
                r->status = LBFGS_NO_PROGRESS;
                break;
            }
            h.k = 0; // retry along the steepest descent
            continue;
        }
        push(&h, x, x1, g, g1);
        double fprev = fx;
        memcpy(x, x1, n * sizeof *x);
        memcpy(g, g1, n * sizeof *g);
        fx = f1;
        r->iterations++;
        double scale = fmax(fmax(fabs(fprev), fabs(fx)), 1.0);
        if (max_abs(g, n) <= cfg->gtol || (cfg->ftol > 0 && fprev - fx <= cfg->ftol * scale))
            r->status = LBFGS_CONVERGED;
        else if (stop && stop(stop_ctx)) r->status = LBFGS_STOPPED;
    }
    r->f = fx;
    r->gmax = max_abs(g, n);
    free(h.s), free(h.y), free(h.rho), free(h.alpha), free(g), free(d), free(x1), free(g1);
}
