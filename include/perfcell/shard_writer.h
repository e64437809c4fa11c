// Writing shard folders (format: shards/README.md) from inputs, in parallel.
//
// The global cell order is the inputs in order, then the cells of each input
// in order; shard i holds cells [i S, (i + 1) S). Every shard is written by
// all ranks together: the shard's cells are taken in pieces of P cells per
// rank (P x N cells per piece), each piece split evenly among the N ranks,
// and each rank reads its cells, maps them to the vocabulary and writes them
// with collective parallel HDF5 calls (filtered datasets need collective
// writes in HDF5 1.10). The numbers go in this way; the strings (cell names,
// categories, genes, attributes) cannot be written through MPI-IO, so once a
// shard is closed one rank (shard index mod N) reopens it alone, adds them,
// and computes its checksums. Rank 0 writes vocab.tsv and the manifest last.
//
// The folder is built as <out>.partial and renamed to <out> at the end, so a
// build that fails leaves no folder at <out> (and an older folder replaced
// with `force` stays in place until the new one is complete).
//
// The cells, their order and every value do not depend on N or P; the HDF5
// file layout (and so file_crc32) may.
#ifndef PERFCELL_SHARD_WRITER_H
#define PERFCELL_SHARD_WRITER_H

#include "perfcell/input.h"
#include "perfcell/vocab.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>

#define SHARD_DEFAULT_CELLS 131072
// X/data and X/indices chunks, in values (int32): 256 KiB before compression.
#define SHARD_DEFAULT_CHUNK 65536
#define SHARD_DEFAULT_LEVEL 9
// Cells each rank reads and writes at a time (bounds the memory of a rank).
#define SHARD_DEFAULT_PIECE 8192

typedef struct {
    const char *out;                  // the shard folder to create
    size_t shard_cells;               // S: cells per shard
    size_t chunk_elems;               // HDF5 chunk of X/data and X/indices, in values
    int level;                        // Zstandard level (1..22)
    int force;                        // replace an existing shard folder
    size_t piece_cells;               // P: cells per rank and collective write
    const char *const *dataset_names; // (n_inputs) names of the inputs, NULL: from the paths
} ShardBuildOptions;

void shard_build_options_default(ShardBuildOptions *o);

typedef struct {
    char *name;            // dataset name
    int64_t n_cells;
    int64_t empty_cells;   // cells without counts in the vocabulary (kept)
    int64_t labelled;      // cells with a label (when the build has a label key)
    size_t matched, missing, dropped, duplicates; // genes (see vocab.h)
} ShardInputReport;

typedef struct {
    size_t n_inputs;
    ShardInputReport *inputs; // (n_inputs)
    char *label_key;          // NULL without labels
    size_t n_labels;
    size_t n_shards;
    int64_t n_cells, nnz;
    int64_t bytes;            // all shard files
    int64_t x_raw_bytes;      // X/data and X/indices as int32, before compression
    int64_t x_stored_bytes;   // the same as stored
    int64_t input_bytes;      // size of the inputs (files, or the files of a folder)
    double seconds;
    int n_ranks;
} ShardBuildReport;

// Whether `out` may be written: refuses an existing path unless `force` and it
// is a shard folder (a manifest, or only files a build writes). Not collective.
int shard_out_check(const char *out, int force);

// Build the shard folder from the inputs (opened with the same options on
// every rank) and the vocabulary. Collective over `comm`; every rank returns
// the same result, and on failure the same message (error_last(), with a hint
// where the user can fix it) and no folder at opt->out.
int shard_build(const ShardBuildOptions *opt, Input *const *inputs, size_t n_inputs,
                const Vocab *vocab, MPI_Comm comm, ShardBuildReport *rep);

// Collective: 0 when every rank passes rc == 0; else -1 on every rank, with
// the message and hint of the lowest failing rank as error_last(). A rank that
// received SIGTERM or SIGINT (see shard_signals_install) fails here with
// "stopped by SIGTERM", so every agreement is a point where a build stops.
int shard_agree(int rc, MPI_Comm comm);

// SIGTERM and SIGINT set a flag that shard_agree() turns into a failure on
// every rank (the failed build removes <out>.partial); SIGXFSZ is ignored, so
// a file size limit (ulimit -f) fails a write with EFBIG instead of killing.
void shard_signals_install(void);

// Write faults (a full disk, a size limit) end the job from the rank that meets
// them: parallel HDF5 calls are collective, so the other ranks may already wait
// inside one and no agreement could be reached. The error sink prints the shard
// and the OS error, removes <out>.partial and calls MPI_Abort.

void shard_build_report_print(const ShardBuildReport *rep, FILE *f);
void shard_build_report_free(ShardBuildReport *rep);

// Vocabulary from the union of the inputs' genes, in first-seen order (genes
// matched as in vocab.h, so the result has no duplicates). With min_cells > 0
// only genes with counts in at least that many cells (over all inputs) are
// kept, which reads every count. Collective over `comm` (ranks share the
// reading); every rank gets the vocabulary. `n_union` (optional) gets the
// number of genes of the union, before the min_cells filter.
int shard_vocab_build(Vocab *v, Input *const *inputs, size_t n_inputs, int64_t min_cells,
                      MPI_Comm comm, size_t *n_union);

#endif
