// Learning-rate schedules as pure functions of the optimizer step.
#include "perfcell/optim.h"

#include <math.h>

static double cosine(double lo, double hi, double frac) {
    return lo + (hi - lo) * 0.5 * (1.0 + cos(M_PI * frac));
}

double sched_lr(const SchedConfig *s, int64_t step) {
    switch (s->kind) {
    case SCHED_CONSTANT:
        if (s->warmup > 0 && step < s->warmup) return s->lr * (double)(step + 1) / (double)s->warmup;
        return s->lr;
    case SCHED_COSINE: {
        if (s->warmup > 0 && step < s->warmup) return s->lr * (double)(step + 1) / (double)s->warmup;
        int64_t span = s->total - s->warmup;
        if (span <= 0) return s->lr;
        double frac = (double)(step - s->warmup) / (double)span;
        if (frac > 1.0) frac = 1.0;
        return cosine(s->min_lr, s->lr, frac);
    }
    case SCHED_COSINE_RESTARTS: {
        // scBERT's CosineAnnealingWarmupRestarts: cycles of growing length; in
        // each, a linear warmup from min_lr to the cycle's peak, then a cosine
        // back to min_lr; the peak decays by gamma per cycle.
        int64_t cycle_len = s->cycle_steps > s->warmup ? s->cycle_steps : s->warmup + 1;
        int64_t in_cycle = step;
        int cycle = 0;
        while (in_cycle >= cycle_len) {
            in_cycle -= cycle_len;
            cycle++;
            cycle_len = (int64_t)((double)(cycle_len - s->warmup) * s->cycle_mult) + s->warmup;
            if (cycle_len <= s->warmup) cycle_len = s->warmup + 1;
        }
        double peak = s->lr * pow(s->gamma, cycle);
        if (in_cycle < s->warmup)
            return (peak - s->min_lr) * (double)in_cycle / (double)s->warmup + s->min_lr;
        double frac = (double)(in_cycle - s->warmup) / (double)(cycle_len - s->warmup);
        return cosine(s->min_lr, peak, frac);
    }
    }
    return s->lr;
}
