// Softmax cross-entropy of one row of logits.
#include "perfcell/loss.h"

#include <math.h>

double xent_row(float *dz, const float *z, size_t K, int y, double scale, size_t *argmax) {
    size_t am = 0;
    double mx = z[0];
    for (size_t j = 1; j < K; j++)
        if (z[j] > mx) {
            mx = z[j];
            am = j;
        }
    double s = 0.0;
    for (size_t j = 0; j < K; j++) s += exp((double)z[j] - mx);
    double lse = mx + log(s);
    if (dz)
        for (size_t j = 0; j < K; j++) dz[j] = (float)((exp((double)z[j] - lse) - (j == (size_t)y)) * scale);
    if (argmax) *argmax = am;
    return lse - (double)z[y];
}
