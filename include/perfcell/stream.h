// Deterministic streams of cells from a shard folder, for training.
//
// A global batch of G cells per optimizer step is k = G / b micro-batches of b
// cells, and an epoch is S = floor(T / G) steps over the T training cells.
//
// Each epoch has one order of its cells: the blocks (block_cells consecutive
// cells of one shard; a shard's last block may be shorter) are permuted by a
// function of (seed, epoch), and the cells of each block are shuffled, keyed
// by (seed, epoch, block). Validation cells are skipped inside the blocks.
// That order is cut into k contiguous segments of S b cells, one per logical
// stream: micro-batch j of step s is cells [j S b + s b, j S b + (s + 1) b) of
// the epoch's order. Rank r serves the streams j = r, r + N, r + 2N, ... (N
// ranks; N must divide k), so it accumulates k / N micro-batches per step. The
// global batches therefore depend on (seed, G, b, block_cells, the split) and
// never on the number of ranks.
//
// What an epoch covers: every training cell exactly once, except the epoch's
// remainder of R = T mod G cells (R < G), which is left out. The left-out
// cells are a window of R consecutive training cells (folder order, cyclic)
// starting at (epoch R) mod T, so the window moves on by R every epoch: no
// cell is left out of two consecutive epochs (R < T / 2), and every cell is
// left out of at most one epoch in floor(T / R). The number of steps per
// epoch does not depend on the seed, the shard layout or the block size.
//
// Reads: a stream reads the blocks of its segment in order and holds at most
// one partly used piece (k / N per rank), so its memory does not grow with
// the epoch. Where two segments meet inside a block, the block is cut into
// pieces at that cell (in folder order; each piece is shuffled on its own)
// and each stream reads only the cell range of its piece. So every cell is
// read by one rank, once per epoch; with block_cells <= the micro-batch a
// stream holds no piece between micro-batches, and a piece split over two
// micro-batches is read twice. (A resumed run reads the piece it resumes in
// once more, and stream_replay() reads a step's cells again.)
//
// The validation split is a stable hash of the cell id (RNG_SPLIT keyed by
// split_seed): the same cells are held out whatever the seed, the batch or the
// number of ranks.
//
// A prefetch thread reads and decompresses ahead; it is the only thread of the
// stream that calls HDF5, holding h5_lock() (h5util.h) around each call, so the
// main thread may write checkpoints with HDF5 meanwhile under the same lock.
//
// The cursor (epoch, step, and the batch geometry it belongs to) is small and
// is saved in checkpoints; restoring it continues the exact same sequence of
// global batches, on the same or on another number of ranks.
#ifndef PERFCELL_STREAM_H
#define PERFCELL_STREAM_H

#include "perfcell/manifest.h"

#include <stddef.h>
#include <stdint.h>

// Cells in the form the model consumes: sparse rows in vocabulary order.
typedef struct {
    size_t n;         // cells
    size_t nnz;       // stored (gene, count) pairs
    int64_t *cell_id; // (n) global cell id
    int32_t *label;   // (n) label code, -1 when unlabelled or no label key
    double *total;    // (n) total counts of the cell over vocabulary genes
    int64_t *offset;  // (n + 1) start of each cell in gene/count
    int32_t *gene;    // (nnz) vocabulary index, ascending within a cell
    float *count;     // (nnz) raw count (> 0)
    size_t cap_cells, cap_nnz;
} CellBatch;

void cellbatch_init(CellBatch *b);
void cellbatch_free(CellBatch *b);
// Make room for n cells and nnz pairs (grows, never shrinks).
void cellbatch_reserve(CellBatch *b, size_t n, size_t nnz);
void cellbatch_clear(CellBatch *b);
// Append cells [i0, i1) of src to dst.
void cellbatch_append(CellBatch *dst, const CellBatch *src, size_t i0, size_t i1);

typedef struct {
    uint64_t seed;       // shuffling (block permutation and in-block order)
    size_t global_batch; // G: cells per optimizer step
    size_t micro_batch;  // b: cells per micro-batch (G % b == 0)
    size_t block_cells;  // cells per block (default 256)
    double val_fraction; // share of cells held out for validation, [0, 1)
    uint64_t split_seed; // key of the validation hash (default 0)
    int prefetch;        // micro-batches decoded ahead (0: read synchronously)
    int skip_file_crc;   // 0: check each shard file's CRC-32 against the manifest
                         // the first time this rank opens it (one extra
                         // sequential read of each shard per rank); 1: only
                         // its size (for very large folders on slow storage)
} StreamConfig;

typedef struct Stream Stream;

// Open the training stream of this rank. Collective over nothing (pure local
// computation from the manifest); every rank calls it with the same config.
// Returns NULL with error_set() on a bad config (N does not divide k, ...) or
// an unreadable shard folder. The manifest is copied (it may be freed after).
// Opening hashes every cell id once (validation split) and reads no shard.
Stream *stream_open(const Manifest *m, const StreamConfig *cfg, int rank, int size);
// Stops the prefetch thread (also in the middle of an epoch) and frees all.
void stream_close(Stream *s);

// Micro-batches this rank contributes per optimizer step (k / N).
size_t stream_local_micro_batches(const Stream *s);
// Steps per epoch (S = T / G), training cells T, and the cells an epoch
// yields (S G = T less the remainder T mod G).
int64_t stream_steps_per_epoch(const Stream *s);
int64_t stream_train_cells(const Stream *s);
int64_t stream_epoch_cells(const Stream *s);

// The remainder rule, for any list of n cells cut into global batches of G
// (also fine-tuning's): epoch `epoch` leaves out the n mod G items i with
// (i - start) mod n < n mod G, start = stream_left_out_start(n, G, epoch).
int64_t stream_left_out_start(int64_t n, int64_t global_batch, int64_t epoch);
int stream_is_left_out(int64_t n, int64_t global_batch, int64_t epoch, int64_t i);

// The next micro-batch of this rank, in order: for each step, the streams
// j = rank, rank + N, ... . *stream_index (optional) receives j. Returns 0, or
// -1 with error_set() naming the shard file and the fault (file checksum
// mismatch, truncated file, corrupt chunk, invalid rows, ...).
int stream_next(Stream *s, CellBatch *out, size_t *stream_index);

// Micro-batch i (0 <= i < stream_local_micro_batches()) of the step of the
// micro-batch stream_next() returned last, again: the same cells in the same
// order, read anew from the shards on the calling thread (its own reader, so
// the prefetch thread goes on). Lets a step pass over its cells twice without
// holding them (contrastive divide and conquer). Returns 0, or -1 with
// error_set().
int stream_replay(Stream *s, size_t i, CellBatch *out);

// Cursor: {epoch, step within the epoch, a layout tag, G, b} as int64 values
// (length stream_cursor_len()) to store in a checkpoint. The cursor is the
// same on every rank. stream_cursor_set() may be called right after
// stream_open() on any number of ranks with the same G and b; a cursor of
// another G or b is refused, naming both. A cursor of an earlier perfcell
// ({epoch, step, k stream positions}) is accepted with a warning: the run
// continues at its epoch and step in today's order.
//
// The cursor counts whole steps: the step in progress (some but not all of
// this rank's k / N micro-batches returned) is not recorded, so take it at a
// step boundary.
size_t stream_cursor_len(const Stream *s);
void stream_cursor_get(const Stream *s, int64_t *out);
int stream_cursor_set(Stream *s, const int64_t *cur, size_t len);

// Validation cells of this rank: the held-out cells, split into N contiguous
// parts of the (id-ordered) validation list; read in order, `max_cells` at
// most (0: all). Calls cb for each batch of at most b cells.
//
// With max_cells, the first N x max_cells cells of the list are split over
// the N ranks (each reads at most max_cells), so a cap of C / N cells per rank
// evaluates the same C cells whatever N (N dividing C). `batch` 0 means the
// micro-batch. A non-zero return of cb stops the walk and is returned. Runs
// on the calling thread with its own reader (under h5_lock), while the
// prefetch thread goes on.
typedef int (*StreamBatchFn)(const CellBatch *b, void *ctx);
int stream_for_each_validation(Stream *s, size_t batch, size_t max_cells, StreamBatchFn cb,
                               void *ctx);
// Number of validation cells (all ranks).
int64_t stream_validation_cells(const Stream *s);

// Whether a cell id is in the validation split.
int stream_is_validation(uint64_t split_seed, double val_fraction, int64_t cell_id);

// Instrumentation (tests, statistics): called by the reading thread after each
// piece read, with the epoch, the stream j, the block (index in folder order:
// blocks of shard 0 first) and the cells read [first_cell, first_cell +
// n_cells). Set it before the first stream_next().
typedef void (*StreamReadHook)(void *ctx, int64_t epoch, size_t stream, uint32_t block,
                               int64_t first_cell, size_t n_cells);
void stream_set_read_hook(Stream *s, StreamReadHook fn, void *ctx);

#endif
