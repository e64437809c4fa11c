// Bucketed gradient all-reduce.
#include "perfcell/allreduce.h"

#include "perfcell/error.h"
#include "perfcell/util.h"

#include <stdlib.h>
#include <string.h>

void gradsync_init(GradSync *g, const ParamTable *t, size_t bucket_floats, MPI_Comm comm) {
    memset(g, 0, sizeof *g);
    g->comm = comm;
    CHECK_MPI(MPI_Comm_size(comm, &g->size));
    if (bucket_floats == 0) bucket_floats = (size_t)1 << 22;
    // Contiguous runs of trainable tensors (alignment gaps between them are
    // zero and travel along), cut into buckets.
    size_t cap = 16;
    g->off = xmalloc(cap * sizeof *g->off);
    g->len = xmalloc(cap * sizeof *g->len);
    size_t i = 0;
    while (i < t->n) {
        if (!t->e[i].trainable) {
            i++;
            continue;
        }
        size_t start = t->e[i].offset, end = start + t->e[i].size;
        while (++i < t->n && t->e[i].trainable) end = t->e[i].offset + t->e[i].size;
        for (size_t o = start; o < end; o += bucket_floats) {
            if (g->n_buckets == cap) {
                cap *= 2;
                g->off = xrealloc(g->off, cap * sizeof *g->off);
                g->len = xrealloc(g->len, cap * sizeof *g->len);
            }
            g->off[g->n_buckets] = o;
            g->len[g->n_buckets] = end - o < bucket_floats ? end - o : bucket_floats;
            g->floats += (int64_t)g->len[g->n_buckets];
            g->n_buckets++;
        }
    }
    g->req = xcalloc(g->n_buckets ? g->n_buckets : 1, sizeof *g->req);
}

void gradsync_free(GradSync *g) {
    free(g->off);
    free(g->len);
    free(g->req);
    memset(g, 0, sizeof *g);
}

void gradsync_allreduce(GradSync *g, float *grads) {
    if (g->size == 1) return;
    double t0 = time_now();
    for (size_t b = 0; b < g->n_buckets; b++)
        CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, grads + g->off[b], (int)g->len[b], MPI_FLOAT, MPI_SUM,
                                g->comm));
    g->seconds += time_now() - t0;
}

void gradsync_start(GradSync *g, float *grads) {
    if (g->size == 1) return;
    double t0 = time_now();
    for (size_t b = 0; b < g->n_buckets; b++)
        CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, grads + g->off[b], (int)g->len[b], MPI_FLOAT,
                                 MPI_SUM, g->comm, &g->req[b]));
    g->seconds += time_now() - t0;
}

void gradsync_wait(GradSync *g) {
    if (g->size == 1) return;
    double t0 = time_now();
    CHECK_MPI(MPI_Waitall((int)g->n_buckets, g->req, MPI_STATUSES_IGNORE));
    g->seconds += time_now() - t0;
}
