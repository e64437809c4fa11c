// Minimal test helpers: checks count failures, main returns the verdict.
#ifndef PERFCELL_TESTLIB_H
#define PERFCELL_TESTLIB_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int t_failures = 0;
static int t_checks = 0;

#define T_CHECK(cond, ...)                                                                         \
    do {                                                                                           \
        t_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            t_failures++;                                                                          \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);             \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

// Relative error ||a - b||_2 / max(||b||_2, floor) over n values.
static inline double t_rel_l2(const double *a, const double *b, size_t n, double floor_) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    den = sqrt(den);
    return sqrt(num) / (den > floor_ ? den : floor_);
}

static inline double t_rel_l2f(const float *a, const float *b, size_t n, double floor_) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    den = sqrt(den);
    return sqrt(num) / (den > floor_ ? den : floor_);
}

static inline int t_finish(const char *name) {
    if (t_failures)
        fprintf(stderr, "%s: %d of %d checks failed\n", name, t_failures, t_checks);
    else
        printf("%s: all %d checks passed\n", name, t_checks);
    return t_failures ? 1 : 0;
}

// Scratch folder for a test (TEST_TMP from tests/run.sh, else /tmp).
static inline const char *t_tmpdir(void) {
    const char *d = getenv("TEST_TMP");
    return d && *d ? d : "/tmp";
}

#endif
