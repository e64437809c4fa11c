// Every layer's backward against central finite differences in double, and
// the float kernels (the production build of the same source) against the
// double ones.
//
// Method: for a layer y = f(x, w), take the scalar loss L = Σ R ⊙ y with a fixed
// random R; the analytic gradient is the layer's backward with dy = R. Each
// coordinate's central difference (L(x + h) − L(x − h)) / 2h with h = 1e-6 has
// truncation error O(h²) and rounding error about 1e-16 / h = 1e-10 relative to
// L, so analytic and numeric gradients agree to ~1e-8 relative; we require 1e-6
// (relative L2 over all checked coordinates), far below any real mistake.
#include "perfcell/favor.h"
#include "perfcell/kernels_f64.h"
#include "perfcell/layers.h"
#include "perfcell/linalg.h"
#include "perfcell/model.h"
#include "perfcell/rng.h"
#include "testlib.h"

#include <string.h>

static Rng g_rng;

static double *rnd(size_t n, double scale) {
    double *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = rng_normal(&g_rng) * scale;
    return x;
}

static double dot(const double *a, const double *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// Finite differences of loss(ctx) with respect to x[0..n): compares with g.
typedef double (*LossFn)(void *ctx);
static double fd_check(const char *what, double *x, size_t n, const double *g, LossFn f, void *ctx) {
    const double h = 1e-6;
    double *num = malloc(n * sizeof *num);
    for (size_t i = 0; i < n; i++) {
        double keep = x[i];
        x[i] = keep + h;
        double lp = f(ctx);
        x[i] = keep - h;
        double lm = f(ctx);
        x[i] = keep;
        num[i] = (lp - lm) / (2 * h);
    }
    double err = t_rel_l2(g, num, n, 1e-12);
    T_CHECK(err < 1e-6, "%s: finite differences disagree, relative L2 error %.3g", what, err);
    printf("  %-28s n=%-5zu rel.err %.2e\n", what, n, err);
    free(num);
    return err;
}

// ---------------------------------------------------------------------------
// LayerNorm

typedef struct {
    double *out, *mean, *rstd, *inp, *w, *b, *R;
    size_t T, C;
} LnCtx;

static double ln_loss(void *p) {
    LnCtx *c = p;
    layernorm_forward_f64(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->T, c->C);
    return dot(c->out, c->R, c->T * c->C);
}

static void test_layernorm(void) {
    size_t T = 5, C = 7;
    LnCtx c = {calloc(T * C, 8), calloc(T, 8), calloc(T, 8), rnd(T * C, 2.0), rnd(C, 1.0),
               rnd(C, 1.0), rnd(T * C, 1.0), T, C};
    for (size_t i = 0; i < T * C; i++) c.inp[i] += 0.5;
    double *dinp = calloc(T * C, 8), *dw = calloc(C, 8), *db = calloc(C, 8);
    ln_loss(&c);
    layernorm_backward_f64(dinp, dw, db, c.R, c.inp, c.w, c.mean, c.rstd, T, C);
    fd_check("layernorm d(input)", c.inp, T * C, dinp, ln_loss, &c);
    fd_check("layernorm d(weight)", c.w, C, dw, ln_loss, &c);
    fd_check("layernorm d(bias)", c.b, C, db, ln_loss, &c);
    free(dinp), free(dw), free(db), free(c.out), free(c.mean), free(c.rstd), free(c.inp);
    free(c.w), free(c.b), free(c.R);
}

// ---------------------------------------------------------------------------
// Linear and GELU

typedef struct {
    double *out, *inp, *w, *b, *R;
    size_t T, C, OC;
} LinCtx;

static double lin_loss(void *p) {
    LinCtx *c = p;
    linear_forward_f64(c->out, c->inp, c->w, c->b, c->T, c->C, c->OC);
    return dot(c->out, c->R, c->T * c->OC);
}

static void test_linear(void) {
    size_t T = 6, C = 5, OC = 4;
    LinCtx c = {calloc(T * OC, 8), rnd(T * C, 1), rnd(OC * C, 1), rnd(OC, 1), rnd(T * OC, 1), T, C, OC};
    double *dinp = calloc(T * C, 8), *dw = calloc(OC * C, 8), *db = calloc(OC, 8);
    linear_backward_f64(dinp, dw, db, c.R, c.inp, c.w, T, C, OC);
    fd_check("linear d(input)", c.inp, T * C, dinp, lin_loss, &c);
    fd_check("linear d(weight)", c.w, OC * C, dw, lin_loss, &c);
    fd_check("linear d(bias)", c.b, OC, db, lin_loss, &c);
    free(dinp), free(dw), free(db), free(c.out), free(c.inp), free(c.w), free(c.b), free(c.R);
}

typedef struct {
    double *out, *inp, *R;
    size_t n;
} GeluCtx;

static double gelu_loss(void *p) {
    GeluCtx *c = p;
    gelu_forward_f64(c->out, c->inp, c->n);
    return dot(c->out, c->R, c->n);
}

static void test_gelu(void) {
    size_t n = 40;
    GeluCtx c = {calloc(n, 8), rnd(n, 2.0), rnd(n, 1.0), n};
    double *dinp = calloc(n, 8);
    gelu_backward_f64(dinp, c.R, c.inp, n);
    fd_check("gelu d(input)", c.inp, n, dinp, gelu_loss, &c);
    // GELU(x) = x Φ(x): spot values against the closed form.
    double x[3] = {-1.0, 0.0, 2.0}, y[3];
    gelu_forward_f64(y, x, 3);
    T_CHECK(fabs(y[0] - (-0.15865525393145707)) < 1e-12 && y[1] == 0.0 &&
                fabs(y[2] - 1.9544997361036416) < 1e-12,
            "gelu values %.17g %.17g %.17g", y[0], y[1], y[2]);
    free(dinp), free(c.out), free(c.inp), free(c.R);
}

// ---------------------------------------------------------------------------
// Embedding (linear in the tables: exact check) and dropout

static void test_embedding_dropout(void) {
    size_t T = 6, C = 3, V = 4, G = 5;
    int32_t tok[6] = {0, 3, 3, 1, 2, 0}, gene[6] = {0, 1, 4, 5, 2, 5}; // row G = 5 is the zero row
    double *te = rnd(V * C, 1), *ge = rnd((G + 1) * C, 1), *out = calloc(T * C, 8);
    memset(ge + G * C, 0, C * 8);
    embedding_forward_f64(out, tok, gene, te, ge, T, C);
    T_CHECK(out[1 * C + 2] == te[3 * C + 2] + ge[1 * C + 2], "embedding sum");
    double *R = rnd(T * C, 1), *dte = calloc(V * C, 8), *dge = calloc((G + 1) * C, 8);
    embedding_backward_f64(dte, dge, R, tok, gene, T, C, G);
    // d token_emb[3] = R[1] + R[2]; the zero row gets nothing.
    T_CHECK(fabs(dte[3 * C] - (R[1 * C] + R[2 * C])) < 1e-15, "embedding token grad");
    double zsum = 0;
    for (size_t c = 0; c < C; c++) zsum += fabs(dge[G * C + c]);
    T_CHECK(zsum == 0.0, "the zero gene row received a gradient");
    T_CHECK(fabs(dge[4 * C + 1] - R[2 * C + 1]) < 1e-15, "embedding gene grad");

    // Dropout: keep rate, scale, and the backward is the same mask.
    size_t n = 100000;
    double *x = malloc(n * 8);
    for (size_t i = 0; i < n; i++) x[i] = 1.0;
    Rng key = rng_init(3, RNG_DROPOUT, 1, 77, 5);
    dropout_apply_f64(x, n, 0.25, &key);
    size_t kept = 0;
    int scaled = 1;
    for (size_t i = 0; i < n; i++) {
        if (x[i] != 0.0) {
            kept++;
            scaled &= fabs(x[i] - 1.0 / 0.75) < 1e-15;
        }
    }
    // Binomial(1e5, 0.75): sd 137, so 6 sd = 822.
    T_CHECK(labs((long)kept - 75000) < 822 && scaled, "dropout kept %zu", kept);
    float xf[37];
    for (int i = 0; i < 37; i++) xf[i] = 1.0f;
    dropout_apply(xf, 37, 0.25f, &key);
    int same = 1;
    for (int i = 0; i < 37; i++) same &= (xf[i] != 0.0f) == (x[i] != 0.0);
    T_CHECK(same, "float and double dropout masks differ");
    free(te), free(ge), free(out), free(R), free(dte), free(dge), free(x);
}

// ---------------------------------------------------------------------------
// FAVOR+

typedef struct {
    FavorDims d;
    size_t T, n_cells;
    int64_t *offset;
    double *q, *k, *v, *proj, *out, *R, *cmem;
    void *imem;
    FavorCacheF64 cache;
} FavCtx;

static double fav_loss(void *p) {
    FavCtx *c = p;
    favor_forward_f64(c->out, &c->cache, c->q, c->k, c->v, c->proj, c->offset, c->n_cells, &c->d);
    return dot(c->out, c->R, c->T * c->d.H * c->d.E);
}

static void test_favor(void) {
    FavCtx c;
    c.d = (FavorDims){3, 4, 10};
    int64_t off[4] = {0, 1, 6, 15};
    c.offset = off;
    c.n_cells = 3;
    c.T = 15;
    size_t HE = c.d.H * c.d.E, n = c.T * HE;
    // Inputs of realistic scale (unit-variance features after LayerNorm and a
    // projection): the maxima are then well separated and not flipped by ±h.
    c.q = rnd(n, 0.8), c.k = rnd(n, 0.8), c.v = rnd(n, 1.0), c.R = rnd(n, 1.0);
    c.out = calloc(n, 8);
    float *pf = malloc(c.d.M * c.d.E * sizeof *pf);
    favor_features_draw(pf, c.d.M, c.d.E, 11, 0, 0);
    c.proj = malloc(c.d.M * c.d.E * 8);
    for (size_t i = 0; i < c.d.M * c.d.E; i++) c.proj[i] = pf[i];
    c.cmem = calloc(favor_cache_floats(&c.d, c.T, c.n_cells), 8);
    c.imem = calloc(1, favor_cache_ints_bytes(&c.d, c.T, c.n_cells));
    favor_cache_bind_f64(&c.cache, &c.d, c.T, c.n_cells, c.cmem, c.imem);

    fav_loss(&c);
    double *dq = calloc(n, 8), *dk = calloc(n, 8), *dv = calloc(n, 8);
    double *scratch = calloc(favor_scratch_floats(&c.d, 9), 8);
    favor_backward_f64(dq, dk, dv, &c.cache, c.R, c.out, c.q, c.k, c.v, c.proj, c.offset,
                       c.n_cells, &c.d, scratch);
    fd_check("favor d(q)", c.q, n, dq, fav_loss, &c);
    fd_check("favor d(k)", c.k, n, dk, fav_loss, &c);
    fd_check("favor d(v)", c.v, n, dv, fav_loss, &c);

    // The float kernels on the same input agree with the double ones. fp32 has
    // 6e-8 unit roundoff and the computation is a few dozen operations deep, so
    // 1e-5 relative (L2) leaves a wide margin while catching real differences.
    float *qf = malloc(n * 4), *kf = malloc(n * 4), *vf = malloc(n * 4), *Rf = malloc(n * 4);
    float *of = malloc(n * 4), *dqf = malloc(n * 4), *dkf = malloc(n * 4), *dvf = malloc(n * 4);
    for (size_t i = 0; i < n; i++) qf[i] = (float)c.q[i], kf[i] = (float)c.k[i], vf[i] = (float)c.v[i], Rf[i] = (float)c.R[i];
    float *cm = floats_alloc(favor_cache_floats(&c.d, c.T, c.n_cells));
    void *im = calloc(1, favor_cache_ints_bytes(&c.d, c.T, c.n_cells));
    FavorCache fc;
    favor_cache_bind(&fc, &c.d, c.T, c.n_cells, cm, im);
    favor_forward(of, &fc, qf, kf, vf, pf, c.offset, c.n_cells, &c.d);
    float *sf = floats_alloc(favor_scratch_floats(&c.d, 9));
    favor_backward(dqf, dkf, dvf, &fc, Rf, of, qf, kf, vf, pf, c.offset, c.n_cells, &c.d, sf);
    fav_loss(&c);
    double *o64 = c.out;
    float *o64f = malloc(n * 4), *dq64f = malloc(n * 4), *dk64f = malloc(n * 4), *dv64f = malloc(n * 4);
    for (size_t i = 0; i < n; i++) o64f[i] = (float)o64[i], dq64f[i] = (float)dq[i], dk64f[i] = (float)dk[i], dv64f[i] = (float)dv[i];
    double e1 = t_rel_l2f(of, o64f, n, 1e-12), e2 = t_rel_l2f(dqf, dq64f, n, 1e-12);
    double e3 = t_rel_l2f(dkf, dk64f, n, 1e-12), e4 = t_rel_l2f(dvf, dv64f, n, 1e-12);
    T_CHECK(e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5 && e4 < 1e-5,
            "float vs double favor: out %.2e dq %.2e dk %.2e dv %.2e", e1, e2, e3, e4);
    printf("  favor float vs double        out %.1e dq %.1e dk %.1e dv %.1e\n", e1, e2, e3, e4);

    free(qf), free(kf), free(vf), free(Rf), free(of), free(dqf), free(dkf), free(dvf), free(cm);
    free(im), free(sf), free(o64f), free(dq64f), free(dk64f), free(dv64f);
    free(c.q), free(c.k), free(c.v), free(c.R), free(c.out), free(pf), free(c.proj), free(c.cmem);
    free(c.imem), free(dq), free(dk), free(dv), free(scratch);
}

// Orthogonal random features: rows within a block orthogonal, norms chi-like.
static void test_features(void) {
    size_t M = 20, E = 8;
    float *P = malloc(M * E * sizeof *P), *P2 = malloc(M * E * sizeof *P2);
    favor_features_draw(P, M, E, 5, 2, 3);
    favor_features_draw(P2, M, E, 5, 2, 3);
    T_CHECK(memcmp(P, P2, M * E * sizeof *P) == 0, "features not deterministic");
    favor_features_draw(P2, M, E, 5, 2, 4);
    T_CHECK(memcmp(P, P2, M * E * sizeof *P) != 0, "redraw index does not change features");
    double worst = 0;
    for (size_t blk = 0; blk * E < M; blk++) {
        for (size_t i = blk * E; i < M && i < blk * E + E; i++) {
            for (size_t j = blk * E; j < i; j++) {
                double d = 0, ni = 0, nj = 0;
                for (size_t e = 0; e < E; e++) {
                    d += (double)P[i * E + e] * P[j * E + e];
                    ni += (double)P[i * E + e] * P[i * E + e];
                    nj += (double)P[j * E + e] * P[j * E + e];
                }
                double cosv = fabs(d) / sqrt(ni * nj);
                if (cosv > worst) worst = cosv;
            }
        }
    }
    T_CHECK(worst < 1e-5, "feature rows in a block are not orthogonal (|cos| %.2e)", worst);
    free(P), free(P2);
}

// fast_expf against libm's expf.
static void test_fast_exp(void) {
    double worst = 0;
    for (float x = -87.0f; x < 88.0f; x += 0.01173f) {
        double rel = fabs((double)fast_expf(x) - exp((double)x)) / exp((double)x);
        if (rel > worst) worst = rel;
    }
    T_CHECK(worst < 3e-7, "fast_expf relative error %.2e", worst);
    T_CHECK(fast_expf(-200.0f) < 1e-37f, "fast_expf underflow");
    double werf = 0;
    for (float x = -6.0f; x < 6.0f; x += 0.00731f) {
        double e = fabs((double)fast_erff(x) - erf((double)x));
        if (e > werf) werf = e;
    }
    // Abramowitz & Stegun 7.1.26 is within 1.5e-7; float rounding of the
    // polynomial and of fast_expf adds up to ~2e-7.
    T_CHECK(werf < 5e-7, "fast_erff absolute error %.2e", werf);
}

int main(void) {
    g_rng = rng_init(2024, RNG_TEST, 0, 0, 0);
    test_layernorm();
    test_linear();
    test_gelu();
    test_embedding_dropout();
    test_favor();
    test_features();
    test_fast_exp();
    return t_finish("test_layers");
}
