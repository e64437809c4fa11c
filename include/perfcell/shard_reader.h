// Reading perfcell shards (format: shards/README.md).
//
// Two levels:
//   ShardFile    one shard .h5ad: structure checks, the per-cell metadata held
//                in memory (indptr, cell ids, labels, input totals), cell ranges
//                decoded into a CellBatch, the content and file checksums.
//   ShardReader  a shard folder: the manifest, the vocabulary hash check, a few
//                open shard files, cells read by global cell id (ranges that
//                cross shards, or any list of ids).
//
// Everything read from a file is checked before it is used (shapes against
// the manifest, indptr monotonic and within nnz, gene indices inside the
// vocabulary and ascending, counts > 0) and allocations are bounded, so bad
// or hostile files give an error, never a crash. Functions return 0 (or a
// pointer), or -1 (NULL) with error_set() naming the file and the fault.
//
// Threads: every function takes h5_lock() around its own HDF5 calls, so a
// reader may be used from any thread while other threads use HDF5; never call
// these functions with h5_lock() held. One ShardFile or ShardReader is used by
// one thread at a time.
#ifndef PERFCELL_SHARD_READER_H
#define PERFCELL_SHARD_READER_H

#include "perfcell/manifest.h"
#include "perfcell/stream.h"

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

// Flags of shard_file_open() and shard_reader_open*().
#define SHARD_CHECK_CRC 1u // checksum the file's bytes against the manifest before HDF5 parses them
#define SHARD_LAZY                                                                                 \
    2u // hold no per-cell arrays (indptr, ids, labels, ...): read and check
       // them range by range (the stream: cheap opens, little memory)

// Limits that bound what a (possibly corrupt) file can make us allocate.
#define SHARD_MAX_CELLS ((int64_t)1 << 28)  // cells per shard file
#define SHARD_MAX_GENES ((int64_t)1 << 21)  // vocabulary size
#define SHARD_MAX_LABELS ((int64_t)1 << 16) // label or dataset categories
#define SHARD_MAX_READ ((int64_t)1 << 28)   // stored values in one read call

// ---------------------------------------------------------------------------
// One shard file

typedef struct {
    char *path;
    unsigned flags;
    hid_t file, data, indices; // open while the ShardFile is open
    int64_t bytes;             // file size
    int64_t n_cells, n_genes, nnz;
    int64_t first_cell;  // global cell id of local cell 0
    int64_t shard_index; // uns/perfcell/shard_index
    uint64_t vocab_hash; // uns/perfcell/vocab_hash
    char *label_key;     // "" when the shard has no labels
    size_t n_labels;
    char **labels; // (n_labels) label category names
    size_t n_datasets;
    char **datasets; // (n_datasets) obs/dataset category names
    // Per-cell arrays, checked at open (NULL with SHARD_LAZY):
    int64_t *indptr;       // (n_cells + 1) row starts in X/data, X/indices
    int64_t *cell_id;      // (n_cells) obs/cell_id = first_cell + i
    int32_t *label;        // (n_cells) label code, -1 when unlabelled
    int32_t *dataset;      // (n_cells) obs/dataset code
    int64_t *total_counts; // (n_cells) obs/total_counts (over all input genes)
    // SHARD_LAZY: datasets read range by range, and the range read last.
    hid_t indptr_d, cell_id_d, label_d;
    int64_t *range_indptr, *range_id; // (range_cap)
    int32_t *range_label;             // (range_cap)
    size_t range_cap;
    int32_t *scratch; // decode buffer for X/data
    size_t scratch_cap;
} ShardFile;

// Open `path` and check that it is a perfcell shard. With a manifest, also
// check it against shard `index` of the manifest (file size, shape, nnz, first
// cell, vocabulary hash, label categories); m may be NULL for a lone file.
// With SHARD_CHECK_CRC (and a manifest), the file's bytes are checksummed
// against the manifest before HDF5 parses them (catches corruption anywhere).
int shard_file_open(ShardFile *f, const char *path, const Manifest *m, size_t index,
                    unsigned flags);
void shard_file_close(ShardFile *f);

// Append local cells [c0, c1) to `out`: genes ascending, float counts, totals
// over the vocabulary genes computed from the row. A range of more than
// SHARD_MAX_READ stored values is refused (read fewer cells at a time).
int shard_file_read(ShardFile *f, int64_t c0, int64_t c1, CellBatch *out);

// Decode every cell (checking it) and compute the content CRC-32 exactly as
// shards/README.md defines it (not with SHARD_LAZY).
int shard_file_content_crc(ShardFile *f, uint32_t *crc);

// A 1-D string dataset of the shard with `expect_n` values ("obs/cell",
// "var/gene", "var/gene_ids"); caller frees with h5_free_strings().
int shard_file_strings(ShardFile *f, const char *name, size_t expect_n, char ***out);

// Size and CRC-32 of a file's bytes (no HDF5).
int shard_file_crc(const char *path, uint32_t *crc, int64_t *bytes);

// ---------------------------------------------------------------------------
// A shard folder

typedef struct ShardReader ShardReader;

// Load `folder`/manifest.tsv; with expect_vocab_hash != 0, refuse a folder
// built with another vocabulary. Flags as for shard_file_open(); with
// SHARD_CHECK_CRC each file is checksummed the first time it is opened.
ShardReader *shard_reader_open(const char *folder, uint64_t expect_vocab_hash, unsigned flags);
// The same from a manifest already loaded (copied; m may be freed after).
ShardReader *shard_reader_open_manifest(const Manifest *m, unsigned flags);
void shard_reader_close(ShardReader *r);
const Manifest *shard_reader_manifest(const ShardReader *r);

// Append cells [cell0, cell1) (global ids, may cross shards) to `out`.
int shard_reader_read(ShardReader *r, int64_t cell0, int64_t cell1, CellBatch *out);
// Append the cells `ids` (any order, repeats allowed) to `out`, in that order.
// Nearby ascending ids are read with one range read.
int shard_reader_read_ids(ShardReader *r, const int64_t *ids, size_t n, CellBatch *out);
// The open ShardFile of shard i (opened on demand); valid until the next call
// of a shard_reader function.
ShardFile *shard_reader_file(ShardReader *r, size_t i);

#endif
