// Summing gradients over ranks: the trainable part of the flat gradient
// buffer, in buckets of at most `bucket_floats` floats (frozen tensors are not
// sent). Collective over the communicator given at init.
#ifndef PERFCELL_ALLREDUCE_H
#define PERFCELL_ALLREDUCE_H

#include "perfcell/params.h"

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    MPI_Comm comm;
    int size;
    size_t n_buckets;
    size_t *off, *len; // (n_buckets) float ranges in the flat buffer
    MPI_Request *req;  // (n_buckets)
    double seconds;    // time spent in all-reduce calls, cumulative
    int64_t floats;    // floats reduced per call (the trainable part)
} GradSync;

// Not collective.
void gradsync_init(GradSync *g, const ParamTable *t, size_t bucket_floats, MPI_Comm comm);
void gradsync_free(GradSync *g);
// Sum grads over ranks, in place, bucket by bucket. Collective.
void gradsync_allreduce(GradSync *g, float *grads);
// Overlapped variant: start every bucket with MPI_Iallreduce, then wait.
// Collective; the buffer must not be touched between start and wait.
void gradsync_start(GradSync *g, float *grads);
void gradsync_wait(GradSync *g);

#endif
