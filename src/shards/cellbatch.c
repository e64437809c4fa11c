// CellBatch: sparse rows of cells in vocabulary order.
#include "perfcell/error.h"
#include "perfcell/stream.h"

#include <stdlib.h>
#include <string.h>

void cellbatch_init(CellBatch *b) {
    memset(b, 0, sizeof *b);
    // offset always has its leading 0, so an empty batch is well formed.
    b->offset = xcalloc(1, sizeof *b->offset);
}

void cellbatch_free(CellBatch *b) {
    free(b->cell_id);
    free(b->label);
    free(b->total);
    free(b->offset);
    free(b->gene);
    free(b->count);
    memset(b, 0, sizeof *b);
}

void cellbatch_reserve(CellBatch *b, size_t n, size_t nnz) {
    if (n > b->cap_cells || !b->offset || !b->cell_id) {
        size_t cap = b->cap_cells ? b->cap_cells : 64;
        while (cap < n) cap *= 2;
        b->cell_id = xrealloc(b->cell_id, cap * sizeof *b->cell_id);
        b->label = xrealloc(b->label, cap * sizeof *b->label);
        b->total = xrealloc(b->total, cap * sizeof *b->total);
        int fresh = b->offset == NULL;
        b->offset = xrealloc(b->offset, (cap + 1) * sizeof *b->offset);
        if (fresh) b->offset[0] = 0;
        b->cap_cells = cap;
    }
    // Allocated even for nnz == 0: callers offset these pointers (gene + nnz)
    // before knowing whether any value follows, and a null base is undefined.
    if (nnz > b->cap_nnz || !b->gene) {
        size_t cap = b->cap_nnz ? b->cap_nnz : 4096;
        while (cap < nnz) cap *= 2;
        b->gene = xrealloc(b->gene, cap * sizeof *b->gene);
        b->count = xrealloc(b->count, cap * sizeof *b->count);
        b->cap_nnz = cap;
    }
}

void cellbatch_clear(CellBatch *b) {
    b->n = 0;
    b->nnz = 0;
    if (b->offset) b->offset[0] = 0;
}

void cellbatch_append(CellBatch *dst, const CellBatch *src, size_t i0, size_t i1) {
    size_t n = i1 - i0;
    size_t e0 = (size_t)src->offset[i0], e1 = (size_t)src->offset[i1];
    cellbatch_reserve(dst, dst->n + n, dst->nnz + (e1 - e0));
    memcpy(dst->cell_id + dst->n, src->cell_id + i0, n * sizeof *dst->cell_id);
    memcpy(dst->label + dst->n, src->label + i0, n * sizeof *dst->label);
    memcpy(dst->total + dst->n, src->total + i0, n * sizeof *dst->total);
    memcpy(dst->gene + dst->nnz, src->gene + e0, (e1 - e0) * sizeof *dst->gene);
    memcpy(dst->count + dst->nnz, src->count + e0, (e1 - e0) * sizeof *dst->count);
    int64_t shift = (int64_t)dst->nnz - (int64_t)e0;
    for (size_t i = 1; i <= n; i++) dst->offset[dst->n + i] = src->offset[i0 + i] + shift;
    dst->n += n;
    dst->nnz += e1 - e0;
}
