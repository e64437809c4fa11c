// Softmax cross-entropy of one row of logits, shared by the MLM and
// classification losses (and the supervised term of contrastive learning).
#ifndef PERFCELL_LOSS_H
#define PERFCELL_LOSS_H

#include <stddef.h>

// CE = logsumexp(z) - z[y] over K classes (in double, with the maximum
// subtracted). When dz is non-NULL it receives scale · (softmax(z) − onehot(y)).
// *argmax (optional) receives the arg-max class.
double xent_row(float *dz, const float *z, size_t K, int y, double scale, size_t *argmax);

#endif
