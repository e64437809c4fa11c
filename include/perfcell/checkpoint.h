// Checkpoints: HDF5 files readable with h5py, written by the coordinator rank
// (rank 0) only, atomically (built in memory, temporary name, fsync, rename), the last K
// kept, and a `latest` pointer updated last.
//
// Layout of ckpt-<step:08d>.h5 (format version 1; HDF5 1.8 file format, whose
// metadata carries checksums):
//   /                attrs: format = "perfcell-checkpoint", format_version = 1,
//                    kind ("pretrain" | "finetune"), step, epoch, seed,
//                    vocab_hash (16 hex digits), created (ISO time, UTC)
//   /model/<name>    every tensor under its scBERT state_dict name, float32,
//                    torch shape; attrs: crc32, shape, index (position in the
//                    parameter table), trainable, decay
//   /buffers/<name>  non-trainable state: the random-feature matrices under
//                    performer.net.layers.{i}.0.fn.fast_attention.projection_matrix
//                    (M, E); attrs crc32, shape
//   /optim/exp_avg/<name>, /optim/exp_avg_sq/<name>   Adam moments (trainable
//                    tensors only, all of them); attrs crc32, shape
//   /state           attrs: redraw_index, feature_seed and every entry of
//                    CkptState.scalars (float64; scheduler and optimizer
//                    counters, early stopping, ...); dataset `cursor` (int64,
//                    the data stream cursor; attr crc32)
//   /config          a scalar string dataset: the resolved configuration (INI text)
//   /vocab           a scalar string dataset: the vocabulary TSV text
//   /labels          (optional) 1-D string dataset: label names of a classifier
//   / attr crc32     the root checksum: CRC-32 of the text of these lines, each
//                    ended by '\n' (%08x: a CRC-32 in lower-case hex; shapes
//                    "A" or "AxB"; tensors in index order, moments in table
//                    order, scalars in name order by their IEEE-754 bits):
//                      format=perfcell-checkpoint format_version=1
//                      kind=K step=S epoch=E seed=N vocab_hash=H created=C
//                      /model/NAME index=I trainable=0|1 decay=0|1 shape=A[xB] crc32=%08x
//                      /optim 0|1
//                      /optim/exp_avg/NAME crc32=%08x    (then every exp_avg_sq)
//                      /buffers depth=D shape=MxE
//                      /buffers/L crc32=%08x
//                      /state redraw_index=R feature_seed=F
//                      /state KEY=%016x
//                      /state/cursor n=N crc32=%08x
//                      /config crc32=%08x
//                      /vocab crc32=%08x
//                      /labels n=N crc32=%08x            (when there are labels)
//                    It covers every value a resume reads, the ones without a
//                    CRC of their own included (tools/scbert_interop.py
//                    writes it too). Files written before it lack it: they
//                    are read, and CkptState.sealed says so.
//
// String datasets are variable-length UTF-8 (h5py: .asstr()); the string
// attributes of / are fixed-length UTF-8, so that they sit in the checksummed
// object header (h5py returns them as bytes). Every tensor's crc32 is the
// CRC-32 (zlib) of its little-endian float32 bytes; the cursor's of its
// little-endian int64 bytes; a string dataset's of its UTF-8 bytes, each
// string followed by a NUL.
//
// The reader treats the file as untrusted (it is fuzzed): it accepts the 1.8
// format only (superblock version >= 2, whose metadata HDF5 verifies by
// checksum before parsing it), arrays whose sizes add up to no more than the
// file's size (uncompressed, as written), string datasets stored contiguously
// (it reads them from the global heap itself, checking every size: HDF5 1.10
// does not check that heap), and fixed-length string attributes.
//
// Every function here is called on rank 0 only unless it says "collective";
// none is collective. All take the process-wide HDF5 lock (h5_lock()) around
// their HDF5 calls, so another thread may read shards meanwhile.
#ifndef PERFCELL_CHECKPOINT_H
#define PERFCELL_CHECKPOINT_H

#include "perfcell/params.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CKPT_FORMAT "perfcell-checkpoint"
#define CKPT_FORMAT_VERSION 1
#define CKPT_LATEST "latest"

typedef struct {
    const char *key;
    double value;
} CkptScalar;

// Everything a checkpoint holds. For writing, the caller points the fields at
// its live buffers; for reading, ckpt_read() allocates what it returns (free
// with ckpt_state_free()).
typedef struct {
    char kind[16];             // "pretrain" or "finetune"
    int64_t step, epoch;
    uint64_t seed;
    uint64_t vocab_hash;
    ParamTable table;          // names, shapes, offsets of the tensors
    float *params;             // (table.total)
    float *exp_avg, *exp_avg_sq; // (table.total) each, or NULL (no optimizer state)
    size_t depth, n_features, dim_head;
    float *proj;               // (depth, n_features, dim_head)
    int64_t redraw_index;
    uint64_t feature_seed;
    int64_t *cursor;
    size_t cursor_len;
    char *config_ini;          // resolved configuration text
    char *vocab_tsv;           // vocabulary text
    char **labels;             // (n_labels) or NULL
    size_t n_labels;
    CkptScalar *scalars;       // extra named numbers (scheduler, early stopping, ...);
                               // keys: printable ASCII without spaces or '/', < 64
                               // bytes, unique, not "redraw_index" or "feature_seed"
    size_t n_scalars;
    int sealed;                // ckpt_read: 1 when the file had a root checksum (it
                               // matched), 0 for a file written before root checksums
} CkptState;

// Write `dir`/ckpt-<step:08d>.h5 atomically (created as
// `dir`/.ckpt-<step>.h5.tmp-<pid>, flushed, fsync'd, renamed, folder fsync'd),
// then update `dir`/latest, then delete all but the newest `keep` checkpoints
// (keep 0: keep all; checkpoints of a later step than this one, left by an
// abandoned run, are not touched). Creates `dir` if needed and removes the
// temporary files of writers that died (killed while writing). Returns 0, or
// -1 with error_set() naming the file and the fault (e.g. no space left on the
// device); on failure the temporary file is removed and the previous
// checkpoints and `latest` are untouched. Moments are written when exp_avg is
// set (exp_avg_sq must be too), labels when n_labels > 0; NULL config_ini or
// vocab_tsv are written as empty text. A malformed state (no tensors, a bad
// name, kind or scalar key, counts without data) is a programming error: DIE.
int ckpt_write(const char *dir, const CkptState *s, int keep);

// Read a checkpoint file: checks the format, every tensor's shape against its
// table entry, its CRC and that it holds finite numbers only, and the root
// checksum (when the file has one). Returns 0 or -1 with error_set() naming the file
// and the fault (then *s is left zeroed). s->table is rebuilt in the file's
// order (same offsets as the writer's table; init fields are INIT_ZEROS);
// exp_avg/exp_avg_sq are NULL when the file has no optimizer state, else zero
// for frozen tensors; scalars come in name order.
int ckpt_read(const char *path, CkptState *s);
// Free what ckpt_read() allocated (not for states that point at live buffers).
void ckpt_state_free(CkptState *s);

// Full read of `path` with every CRC checked, the result discarded. Faults in
// the file are reported as "corrupt checkpoint 'PATH': what failed".
// Returns 0 or -1 with error_set().
int ckpt_verify(const char *path);

// Print what a checkpoint holds (kind, step, epoch, vocabulary hash, tensors
// and parameters, optimizer state, projection matrices, cursor, config,
// vocabulary, labels, scalars) to `out`. Checks the structure and the sizes,
// not the CRCs (ckpt_verify() does). Returns 0 or -1 with error_set().
int ckpt_summary(const char *path, FILE *out);

// The checkpoint to resume from: `spec` is "auto" (or NULL or ""): the file
// `latest` names in dir; if that is missing, names a missing file or does not
// verify (full ckpt_read), the newest ckpt-*.h5 that does, with log_warn()
// saying why and which; or a path to a checkpoint file, returned as is when it
// exists. Returns a malloc'ed path, or NULL with error_set() (auto and no
// usable checkpoint: the message says whether there were none or all failed).
char *ckpt_resolve(const char *dir, const char *spec);

// Whether `dir` holds a `latest` file or any ckpt-*.h5 (usable or not): tells
// "nothing to resume yet" from "checkpoints exist but none reads back" when
// ckpt_resolve(dir, "auto") returns NULL.
int ckpt_any(const char *dir);

// Copy tensors of `src` into `dst_params` (laid out by `dst`) by name: shapes
// must agree; tensors of dst missing from src are left as they are and listed
// in *missing (count); tensors of src absent from dst are counted in *unused
// (missing and unused may be NULL). Returns 0 or -1 with error_set()
// describing the first shape mismatch; on error nothing is copied.
int ckpt_copy_tensors(const CkptState *src, const ParamTable *dst, float *dst_params,
                      size_t *missing, size_t *unused);

// A named scalar of a loaded state; `def` when absent.
double ckpt_scalar(const CkptState *s, const char *key, double def);

#endif
