// From cells (sparse counts in vocabulary order) to model tokens.
//
//   x = log2(1 + 1e4 · count / total), token = min(floor(x), bins)
// with total the cell's total over vocabulary genes. Sequence modes:
//   full:    all G vocabulary genes in order, then one last position (token 0,
//            gene-embedding row G, which is all zeros): scBERT exactly;
//   nonzero: only the cell's nonzero genes in vocabulary order, then the same
//            last position; at most max_tokens genes, a keyed random subset
//            (RNG_SUBSET by seed, cell id and step) when there are more.
#ifndef PERFCELL_TOKENS_H
#define PERFCELL_TOKENS_H

#include "perfcell/model.h"
#include "perfcell/stream.h"

// Expression bin of a count.
int token_of_count(double count, double total, int bins);
// Tokens of one cell's sequence in this mode (including the last position).
size_t tokens_cell_length(const ModelConfig *cfg, size_t nnz);
// Fill tb (targets set to -1, labels and cell ids copied) from cb.
void tokens_from_cells(TokenBatch *tb, const CellBatch *cb, const ModelConfig *cfg, uint64_t seed,
                       int64_t step);

#endif
