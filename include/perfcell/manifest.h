// The shard folder manifest (format: shards/README.md).
#ifndef PERFCELL_MANIFEST_H
#define PERFCELL_MANIFEST_H

#include <stddef.h>
#include <stdint.h>

#define SHARD_FORMAT_NAME "perfcell-shards"
#define SHARD_FORMAT_VERSION 1
#define SHARD_MANIFEST_FILE "manifest.tsv"
#define SHARD_VOCAB_FILE "vocab.tsv"

typedef struct {
    char *file;           // file name inside the folder
    int64_t n_cells;
    int64_t first_cell;   // global cell id of the shard's first cell
    int64_t nnz;
    uint32_t content_crc; // CRC-32 of the content (shards/README.md)
    int64_t bytes;        // file size
    uint32_t file_crc;    // CRC-32 of the file's bytes
} ShardEntry;

typedef struct {
    char *folder;
    int version;
    uint64_t vocab_hash;
    int64_t n_genes, n_cells, nnz;
    char *label_key;       // "" when the shards carry no labels
    size_t n_labels;
    char **labels;         // (n_labels) category names, code = index
    int64_t *label_counts; // (n_labels)
    size_t n_datasets;
    char **datasets;       // (n_datasets) names
    char **dataset_paths;  // (n_datasets) input paths
    int64_t *dataset_cells;
    size_t n_shards;
    ShardEntry *shards;    // (n_shards)
} Manifest;

// Read and check `folder`/manifest.tsv: structure, shard ranges contiguous
// from 0, totals consistent. Returns 0, or -1 with error_set() naming the file,
// the line and the fault.
int manifest_load(Manifest *m, const char *folder);
// Write `folder`/manifest.tsv atomically (temp file, fsync, rename).
int manifest_write(const Manifest *m, const char *folder);
void manifest_free(Manifest *m);

// Path of shard i (caller frees).
char *manifest_shard_path(const Manifest *m, size_t i);
// Index of the shard holding global cell id `cell` (binary search).
size_t manifest_shard_of(const Manifest *m, int64_t cell);

// Vocabulary hash as 16 lowercase hex digits, and back.
void vocab_hash_format(uint64_t h, char out[17]);
int vocab_hash_parse(const char *s, uint64_t *h);

#endif
