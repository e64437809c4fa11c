// L-BFGS: full-batch quasi-Newton minimisation of a smooth objective
// (Nocedal & Wright, Numerical Optimization, algorithms 7.4 and 7.5), with a
// backtracking Armijo line search. perfcell uses it to train a classifier
// head on a frozen encoder's cached hidden states, the problem scikit-learn's
// LogisticRegression solves with L-BFGS.
//
// The objective may be collective (an MPI all-reduce inside it): every rank
// then calls lbfgs_minimize with the same arguments, the objective returns
// the same value and gradient on every rank, and every decision below
// depends on those alone, so all ranks take the same steps.
#ifndef PERFCELL_LBFGS_H
#define PERFCELL_LBFGS_H

#include <stddef.h>

// f(x) returned, its gradient written to g (n); x is not modified.
typedef double (*LbfgsObjective)(const double *x, double *g, void *ctx);
// Called after every iteration; non-zero ends the minimisation (LBFGS_STOPPED).
typedef int (*LbfgsStop)(void *ctx);

typedef struct {
    int history;      // stored (s, y) pairs (scipy and PyTorch: 10 and 100; 10 here)
    int max_iter;     // iterations at most
    double gtol;      // converged when max |g_i| <= gtol
    double ftol;      // converged when (f_prev - f) <= ftol · max(|f_prev|, |f|, 1); 0: never
} LbfgsConfig;

typedef enum {
    LBFGS_MAX_ITER,   // max_iter iterations done
    LBFGS_CONVERGED,  // gtol or ftol met
    LBFGS_NO_PROGRESS,// the line search found no decrease along the steepest descent
    LBFGS_STOPPED,    // the stop callback asked to end
} LbfgsStatus;

typedef struct {
    LbfgsStatus status;
    int iterations;   // accepted steps
    int evaluations;  // objective evaluations (the first included)
    double f;         // objective at the returned x
    double gmax;      // max |g_i| there
} LbfgsResult;

// Minimise from x (n) in place, starting with an empty history. On return x
// holds the last accepted point and r describes the run.
void lbfgs_minimize(double *x, size_t n, LbfgsObjective f, void *ctx, LbfgsStop stop, void *stop_ctx,
                    const LbfgsConfig *cfg, LbfgsResult *r);

const char *lbfgs_status_name(LbfgsStatus s);

#endif
