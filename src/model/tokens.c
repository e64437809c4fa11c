// Tokenisation of cells for the encoder.
#include "perfcell/tokens.h"

#include "perfcell/error.h"
#include "perfcell/rng.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int token_of_count(double count, double total, int bins) {
    if (!(count > 0.0) || !(total > 0.0)) return 0;
    double x = log2(1.0 + 1e4 * count / total);
    int t = (int)floor(x);
    return t > bins ? bins : t;
}

size_t tokens_cell_length(const ModelConfig *cfg, size_t nnz) {
    if (cfg->mode == SEQ_FULL) return cfg->n_genes + 1;
    if (cfg->max_tokens && nnz > cfg->max_tokens) nnz = cfg->max_tokens;
    return nnz + 1;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

void tokens_from_cells(TokenBatch *tb, const CellBatch *cb, const ModelConfig *cfg, uint64_t seed,
                       int64_t step) {
    size_t total_tokens = 0;
    for (size_t b = 0; b < cb->n; b++)
        total_tokens += tokens_cell_length(cfg, (size_t)(cb->offset[b + 1] - cb->offset[b]));
    tokenbatch_reserve(tb, cb->n, total_tokens);
    uint32_t *pick = NULL;
    size_t pick_cap = 0;
    size_t t = 0;
    for (size_t b = 0; b < cb->n; b++) {
        const size_t o0 = (size_t)cb->offset[b], nnz = (size_t)cb->offset[b + 1] - o0;
        const int32_t *genes = cb->gene + o0;
        const float *counts = cb->count + o0;
        const double total = cb->total[b];
        tb->offset[b] = (int64_t)t;
        tb->cell_id[b] = cb->cell_id[b];
        tb->label[b] = cb->label[b];
        if (cfg->mode == SEQ_FULL) {
            int32_t *tok = tb->token + t;
            memset(tok, 0, cfg->n_genes * sizeof *tok);
            for (size_t g = 0; g < cfg->n_genes; g++) tb->gene[t + g] = (int32_t)g;
            for (size_t i = 0; i < nnz; i++) {
                CHECK((size_t)genes[i] < cfg->n_genes, "internal: gene index %d out of range",
                      genes[i]);
                tok[genes[i]] = token_of_count(counts[i], total, cfg->bins);
            }
            t += cfg->n_genes;
        } else {
            size_t keep = nnz;
            if (cfg->max_tokens && nnz > cfg->max_tokens) {
                // A keyed uniform subset, kept in vocabulary order.
                keep = cfg->max_tokens;
                if (nnz > pick_cap) {
                    pick_cap = nnz;
                    pick = xrealloc(pick, pick_cap * sizeof *pick);
                }
                for (size_t i = 0; i < nnz; i++) pick[i] = (uint32_t)i;
                Rng r = rng_init(seed, RNG_SUBSET, 0, (uint64_t)cb->cell_id[b], (uint32_t)step);
                for (size_t i = 0; i < keep; i++) {
                    size_t j = i + (size_t)rng_below(&r, nnz - i);
                    uint32_t tmp = pick[i];
                    pick[i] = pick[j];
                    pick[j] = tmp;
                }
                qsort(pick, keep, sizeof *pick, cmp_u32);
            }
            for (size_t i = 0; i < keep; i++) {
                size_t src = keep == nnz ? i : pick[i];
                tb->token[t] = token_of_count(counts[src], total, cfg->bins);
                tb->gene[t] = genes[src];
                t++;
            }
        }
        // The last position: token 0 on the all-zero gene-embedding row.
        tb->token[t] = 0;
        tb->gene[t] = (int32_t)cfg->n_genes;
        t++;
    }
    tb->offset[cb->n] = (int64_t)t;
    tb->n_cells = cb->n;
    tb->n_tokens = t;
    for (size_t i = 0; i < t; i++) tb->target[i] = -1;
    free(pick);
}
