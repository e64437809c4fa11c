// The gene vocabulary: the model's gene order (V genes), its file format and
// hash (shards/README.md), and the matching of an input's genes to it.
//
// vocab.tsv holds one gene per line, `symbol` or `symbol<TAB>ensembl_id`; no
// header, no blank or '#' lines. A gene is identified by its Ensembl id when it
// has one, else by its symbol: two lines are the same gene (a duplicate, an
// error) when they share an id, or share a symbol and one of them has no id.
// Ensembl ids are compared without a version suffix ("ENSG00000141510.16" is
// "ENSG00000141510").
//
// Matching an input gene (symbol, id) to the vocabulary: by id when both the
// input gene and a vocabulary gene have one; else by symbol, with a vocabulary
// gene that has no id, or with any vocabulary gene of that symbol when the
// input gene has no id (the first one in vocabulary order). Vocabulary genes
// that no input gene matches are *missing* (zero in every cell); input genes
// that match nothing are *dropped*; input genes that match a vocabulary gene
// already matched by an earlier input gene are *duplicates*, and their counts
// are summed.
#ifndef PERFCELL_VOCAB_H
#define PERFCELL_VOCAB_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    size_t n;        // V: genes
    char **symbols;  // (V) gene symbols, never empty
    char **ids;      // (V) Ensembl ids, "" when none
    // Lookup tables (open addressing, indices into the arrays above).
    size_t cap;      // slots per table, a power of two
    int32_t *by_symbol; // (cap) first gene of each symbol, -1 empty slot
    int32_t *by_id;     // (cap) gene of each id, -1 empty slot
    size_t n_alloc;
} Vocab;

void vocab_init(Vocab *v);
void vocab_free(Vocab *v);

// Append a gene. Returns its index, or -1 with error_set() when the symbol is
// empty, a field holds a tab or a newline, or the gene is already present
// (the message names the earlier line).
int64_t vocab_add(Vocab *v, const char *symbol, const char *id);

// The vocabulary gene an input gene (symbol, id; id NULL or "" when none)
// matches under the rules above, or -1.
int64_t vocab_match(const Vocab *v, const char *symbol, const char *id);

// Read vocab.tsv (format above). Returns 0, or -1 with error_set() naming the
// file, the line and the fault (and a hint when the file is not a vocabulary
// at all).
int vocab_load(Vocab *v, const char *path);
// The canonical text (every gene: symbol, tab, id, newline); caller frees.
char *vocab_to_text(const Vocab *v, size_t *len);
// Write vocab.tsv atomically (`symbol` lines when a gene has no id).
int vocab_save(const Vocab *v, const char *path);
// 64-bit FNV-1a of the canonical text.
uint64_t vocab_hash(const Vocab *v);

// The mapping of one input's genes to a vocabulary.
typedef struct {
    size_t n_input;    // input genes
    size_t n_vocab;    // V
    int32_t *to_vocab; // (n_input) vocabulary index, -1 when dropped
    size_t matched;    // vocabulary genes matched by at least one input gene
    size_t missing;    // vocabulary genes matched by none (n_vocab - matched)
    size_t dropped;    // input genes outside the vocabulary
    size_t duplicates; // input genes mapping to an already matched vocabulary gene
    int monotone;      // mapped input genes keep vocabulary order (no sort needed)
    uint64_t *scratch; // (scratch_cap) sort keys of vocab_map_row, grown on demand
    size_t scratch_cap;
} VocabMap;

// Build the mapping; `ids` may be NULL (no ids) and its entries "" (none).
void vocab_map_build(VocabMap *m, const Vocab *v, char *const *symbols, char *const *ids,
                     size_t n_input);
void vocab_map_free(VocabMap *m);

// Map one cell: (gene, count) pairs in input gene indices, any order, to pairs
// in vocabulary order, ascending, zero counts removed, duplicates summed.
// `out_gene`/`out_count` need room for nnz pairs. Returns the number of pairs
// written, or -1 with error_set() when an input gene index is out of range or
// a summed count reaches 2^31.
int64_t vocab_map_row(VocabMap *m, const int32_t *gene, const int32_t *count, size_t nnz,
                      int32_t *out_gene, int32_t *out_count);

#endif
