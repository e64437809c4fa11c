// Tests of the shard reader and the training stream on a real shard folder.
//
//   test_stream unit DIR                    one process: split, cursor across
//                                           simulated rank counts, reader paths
//   test_stream mpi DIR G B BLOCK EPOCHS    under mpirun: N ranks give the global
//                                           batches of one rank, every training
//                                           cell once per epoch, no block read by
//                                           two ranks, validation partition
//   test_stream dump DIR G B BLOCK STEPS [--cursor-in F] [--cursor-out F]
//                                           under mpirun: print STEPS global
//                                           batches (rank 0), resume / save a cursor
//   test_stream epochs COMBOS SEED DIR...   the coverage rule over random seeds,
//                                           geometries, block sizes and 1, 2, 3
//                                           simulated ranks (and resumes)
//   test_stream compare DIR REF             decoded cells equal a reference dump
//                                           (tests/py/stream_dump_cells.py)
//   test_stream drain DIR EPOCHS [--prefetch P] [--no-crc] [--expect-hash H]
//                                           read EPOCHS epochs; exit 1 with the
//                                           reader's message on any fault
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/manifest.h"
#include "perfcell/mpienv.h"
#include "perfcell/rng.h"
#include "perfcell/shard_reader.h"
#include "perfcell/stream.h"
#include "perfcell/util.h"
#include "testlib.h"

#include <inttypes.h>
#include <mpi.h>
#include <pthread.h>
#include <string.h>

// ---------------------------------------------------------------------------
// Helpers

static Manifest load_manifest(const char *dir) {
    Manifest m;
    CHECK_OK(manifest_load(&m, dir));
    return m;
}

static StreamConfig config(size_t G, size_t b, size_t block, double val, int prefetch) {
    StreamConfig c = {0};
    c.seed = 1234;
    c.global_batch = G;
    c.micro_batch = b;
    c.block_cells = block;
    c.val_fraction = val;
    c.split_seed = 7;
    c.prefetch = prefetch;
    return c;
}

// Hash of a micro-batch's whole content (ids, labels, totals, rows).
static uint64_t batch_hash(const CellBatch *b) {
    uint64_t h = HASH_FNV_INIT;
    h = hash_fnv64(h, b->cell_id, b->n * sizeof *b->cell_id);
    h = hash_fnv64(h, b->label, b->n * sizeof *b->label);
    h = hash_fnv64(h, b->total, b->n * sizeof *b->total);
    h = hash_fnv64(h, b->offset, (b->n + 1) * sizeof *b->offset);
    h = hash_fnv64(h, b->gene, b->nnz * sizeof *b->gene);
    h = hash_fnv64(h, b->count, b->nnz * sizeof *b->count);
    return h;
}

// Structural sanity of a decoded batch.
static int batch_ok(const CellBatch *b, int64_t n_genes) {
    if (b->offset[0] != 0 || (size_t)b->offset[b->n] != b->nnz) return 0;
    for (size_t i = 0; i < b->n; i++) {
        double t = 0;
        for (int64_t e = b->offset[i]; e < b->offset[i + 1]; e++) {
            if (b->gene[e] < 0 || b->gene[e] >= n_genes || b->count[e] <= 0) return 0;
            if (e > b->offset[i] && b->gene[e] <= b->gene[e - 1]) return 0;
            t += b->count[e];
        }
        if (t != b->total[i]) return 0;
    }
    return 1;
}

// Global batches of `steps` steps with N simulated ranks (N streams in one
// process, each with its own prefetch thread), starting from `cursor_in`
// (NULL: the start). ids: (steps, G) cell ids, micro-batch j at [j b, (j+1) b);
// hashes: (steps, k) content hashes. cursor_out (optional) receives the cursor
// after the last step, checked equal on every simulated rank.
// Cell reads of simulated ranks (the hook runs on their prefetch threads):
// reads[e n_cells + id] for epochs below `epochs`; by[...] the stream + 1 that
// read it (0: none yet), other_stream counts cells read by a second stream.
typedef struct {
    pthread_mutex_t mu;
    uint32_t *reads, *by;
    int64_t n_cells, epochs, other_stream;
} ReadTally;

static void tally_read(void *ctx, int64_t epoch, size_t stream, uint32_t block, int64_t first,
                       size_t n) {
    ReadTally *t = ctx;
    (void)block;
    if (epoch >= t->epochs) return;
    pthread_mutex_lock(&t->mu);
    for (int64_t id = first; id < first + (int64_t)n && id < t->n_cells; id++) {
        size_t i = (size_t)(epoch * t->n_cells + id);
        t->reads[i]++;
        if (t->by[i] && t->by[i] != stream + 1) t->other_stream++;
        t->by[i] = (uint32_t)stream + 1;
    }
    pthread_mutex_unlock(&t->mu);
}

static void run_ranks(const Manifest *m, const StreamConfig *c, int N, const int64_t *cursor_in,
                      size_t len, int64_t steps, int64_t *ids, uint64_t *hashes,
                      int64_t *cursor_out, ReadTally *tally);

static void run_global(const Manifest *m, const StreamConfig *c, int N, const int64_t *cursor_in,
                       size_t len, int64_t steps, int64_t *ids, uint64_t *hashes,
                       int64_t *cursor_out) {
    run_ranks(m, c, N, cursor_in, len, steps, ids, hashes, cursor_out, NULL);
}

static void run_ranks(const Manifest *m, const StreamConfig *c, int N, const int64_t *cursor_in,
                      size_t len, int64_t steps, int64_t *ids, uint64_t *hashes,
                      int64_t *cursor_out, ReadTally *tally) {
    size_t k = c->global_batch / c->micro_batch, b = c->micro_batch;
    Stream **s = xcalloc((size_t)N, sizeof *s);
    for (int r = 0; r < N; r++) {
        s[r] = stream_open(m, c, r, N);
        CHECK(s[r], "stream_open: %s", error_last());
        if (cursor_in) CHECK_OK(stream_cursor_set(s[r], cursor_in, len));
        if (tally) stream_set_read_hook(s[r], tally_read, tally);
    }
    CellBatch mb;
    cellbatch_init(&mb);
    for (int64_t st = 0; st < steps; st++) {
        for (int r = 0; r < N; r++) {
            for (size_t l = 0; l < stream_local_micro_batches(s[r]); l++) {
                size_t j = 0;
                CHECK_OK(stream_next(s[r], &mb, &j));
                T_CHECK(mb.n == b && j % (size_t)N == (size_t)r && j == (size_t)r + l * (size_t)N,
                        "micro-batch of %zu cells from stream %zu on rank %d of %d", mb.n, j, r, N);
                if (mb.n != b || j >= k) continue;
                memcpy(ids + st * (int64_t)c->global_batch + (int64_t)(j * b), mb.cell_id,
                       b * sizeof *ids);
                hashes[st * (int64_t)k + (int64_t)j] = batch_hash(&mb);
            }
        }
    }
    if (cursor_out) {
        stream_cursor_get(s[0], cursor_out);
        int64_t *other = xmalloc(stream_cursor_len(s[0]) * sizeof *other);
        for (int r = 1; r < N; r++) {
            stream_cursor_get(s[r], other);
            T_CHECK(memcmp(other, cursor_out, stream_cursor_len(s[0]) * sizeof *other) == 0,
                    "cursor of rank %d differs from rank 0", r);
        }
        free(other);
    }
    cellbatch_free(&mb);
    for (int r = 0; r < N; r++) stream_close(s[r]);
    free(s);
}

// ---------------------------------------------------------------------------
// unit

static int count_val_cb(const CellBatch *b, void *ctx) {
    int64_t **p = ctx;
    for (size_t i = 0; i < b->n; i++) *(*p)++ = b->cell_id[i];
    return 0;
}

static void test_split(const Manifest *m) {
    // Stable: a function of (split_seed, fraction, id) only; fraction close to
    // the request (binomial: 2638 cells at 0.1 has sd 15 cells, 5 sd = 75).
    int64_t n = m->n_cells, nval = 0;
    for (int64_t id = 0; id < n; id++) nval += stream_is_validation(7, 0.1, id);
    T_CHECK(llabs(nval - n / 10) < 75, "validation share %lld of %lld cells", (long long)nval,
            (long long)n);
    T_CHECK(!stream_is_validation(7, 0.0, 5), "fraction 0 holds out cells");
    int nested = 1;
    for (int64_t id = 0; id < n; id++)
        if (stream_is_validation(7, 0.05, id) && !stream_is_validation(7, 0.1, id)) nested = 0;
    T_CHECK(nested, "a larger fraction does not contain the smaller one");

    // The same list whatever the seed, batch, block size or rank count; the
    // ranks' parts are disjoint, in id order, and cover the list.
    StreamConfig cfgs[3] = {config(12, 2, 16, 0.1, 2), config(6, 1, 64, 0.1, 0),
                            config(24, 4, 256, 0.1, 3)};
    cfgs[1].seed = 99;
    int64_t *all = xmalloc((size_t)n * sizeof *all);
    for (int ci = 0; ci < 3; ci++) {
        for (int N = 1; N <= 3; N++) {
            int64_t *p = all;
            for (int r = 0; r < N; r++) {
                Stream *s = stream_open(m, &cfgs[ci], r, N);
                CHECK(s, "%s", error_last());
                T_CHECK(stream_validation_cells(s) == nval, "validation count %lld, expected %lld",
                        (long long)stream_validation_cells(s), (long long)nval);
                T_CHECK(stream_train_cells(s) + nval == n, "train + validation != cells");
                CHECK_OK(stream_for_each_validation(s, 5, 0, count_val_cb, &p));
                stream_close(s);
            }
            T_CHECK(p - all == nval,
                    "config %d, %d ranks: %lld validation cells read, expected %lld", ci, N,
                    (long long)(p - all), (long long)nval);
            int64_t q = 0, good = 1;
            for (int64_t id = 0; id < n && q < p - all; id++)
                if (stream_is_validation(7, 0.1, id)) good &= all[q++] == id;
            T_CHECK(good && q == nval,
                    "config %d, %d ranks: validation cells differ from the hash split", ci, N);
        }
    }
    // A cap of 60 / N cells per rank: the same first 60 cells for any N.
    for (int N = 1; N <= 3; N++) {
        int64_t *p = all;
        for (int r = 0; r < N; r++) {
            Stream *s = stream_open(m, &cfgs[0], r, N);
            int64_t *before = p;
            CHECK_OK(stream_for_each_validation(s, 4, (size_t)(60 / N), count_val_cb, &p));
            T_CHECK(p - before <= 60 / N, "rank %d of %d read %lld cells, cap %d", r, N,
                    (long long)(p - before), 60 / N);
            stream_close(s);
        }
        int64_t q = 0, good = p - all == 60;
        for (int64_t id = 0; id < n && q < p - all; id++)
            if (stream_is_validation(7, 0.1, id)) good &= all[q++] == id;
        T_CHECK(good, "%d ranks: a cap of %d per rank gives %lld cells or other cells", N, 60 / N,
                (long long)(p - all));
    }
    free(all);
}

static void test_cursor(const Manifest *m) {
    // Run s steps on N1 ranks, save the cursor, reopen on N2 ranks, restore,
    // continue t steps: equal to s + t uninterrupted steps on one rank. s is
    // chosen so that the continuation crosses an epoch boundary.
    StreamConfig c = config(12, 2, 16, 0.1, 3);
    Stream *probe = stream_open(m, &c, 0, 1);
    CHECK(probe, "%s", error_last());
    int64_t S = stream_steps_per_epoch(probe);
    size_t len = stream_cursor_len(probe), k = 6;
    stream_close(probe);
    int64_t s_steps = S - 3, t_steps = 7, total = s_steps + t_steps;
    int64_t *ref = xmalloc((size_t)total * 12 * sizeof *ref),
            *got = xmalloc((size_t)total * 12 * sizeof *got);
    uint64_t *href = xmalloc((size_t)total * k * sizeof *href),
             *hgot = xmalloc((size_t)total * k * sizeof *hgot);
    int64_t *cur = xmalloc(len * sizeof *cur), *cur_end = xmalloc(len * sizeof *cur_end);
    run_global(m, &c, 1, NULL, 0, total, ref, href, cur_end);
    T_CHECK(cur_end[0] == 1 && cur_end[1] == 4,
            "cursor after %lld steps is (%lld, %lld), expected (1, 4)", (long long)total,
            (long long)cur_end[0], (long long)cur_end[1]);
    for (int N1 = 1; N1 <= 3; N1++) {
        for (int N2 = 1; N2 <= 3; N2++) {
            if (N1 == 2 && N2 == 2) continue;
            StreamConfig c1 = c, c2 = c;
            c1.prefetch = N1 == 3 ? 0 : 2; // both the synchronous and the threaded path
            c2.prefetch = N2 == 1 ? 0 : 5;
            run_global(m, &c1, N1, NULL, 0, s_steps, got, hgot, cur);
            T_CHECK(cur[0] == 0 && cur[1] == s_steps, "cursor (%lld, %lld)", (long long)cur[0],
                    (long long)cur[1]);
            run_global(m, &c2, N2, cur, len, t_steps, got + s_steps * 12,
                       hgot + s_steps * (int64_t)k, NULL);
            T_CHECK(memcmp(got, ref, (size_t)total * 12 * sizeof *got) == 0,
                    "resumed %d -> %d ranks: cell ids differ from the uninterrupted run", N1, N2);
            T_CHECK(memcmp(hgot, href, (size_t)total * k * sizeof *hgot) == 0,
                    "resumed %d -> %d ranks: batch contents differ", N1, N2);
        }
    }
    // Bad cursors: wrong length, another global batch or micro-batch, past the
    // epoch, after start; a cursor of the former layout is accepted.
    Stream *s = stream_open(m, &c, 0, 1);
    T_CHECK(len == 5 && cur[2] < 0 && cur[3] == 12 && cur[4] == 2, "cursor layout");
    T_CHECK(stream_cursor_set(s, cur, len - 1) != 0, "short cursor accepted");
    cur[3] = 24;
    T_CHECK(stream_cursor_set(s, cur, len) != 0 && strstr(error_last(), "global batch 24") &&
                strstr(error_last(), "global batch 12"),
            "cursor of another global batch: %s", error_last());
    cur[3] = 12;
    cur[4] = 4;
    T_CHECK(stream_cursor_set(s, cur, len) != 0 && strstr(error_last(), "micro-batch 4"),
            "cursor of another micro-batch: %s", error_last());
    cur[4] = 2;
    int64_t st = cur[1];
    cur[1] = S + 5;
    T_CHECK(stream_cursor_set(s, cur, len) != 0, "step past the epoch accepted");
    cur[1] = st;
    int64_t former[8] = {cur[0], st};
    for (size_t j = 0; j < k; j++) former[2 + j] = st * 2;
    T_CHECK(stream_cursor_set(s, former, 2 + k - 1) != 0, "former cursor of 5 streams accepted");
    former[3] += 2;
    T_CHECK(stream_cursor_set(s, former, 2 + k) != 0, "inconsistent former cursor accepted");
    former[3] -= 2;
    CHECK_OK(stream_cursor_set(s, former, 2 + k));
    CHECK_OK(stream_cursor_set(s, cur, len));
    CellBatch mb;
    cellbatch_init(&mb);
    CHECK_OK(stream_next(s, &mb, NULL));
    T_CHECK(stream_cursor_set(s, cur, len) != 0, "cursor set after the first batch accepted");
    // Mid-step, the cursor still names the step in progress.
    int64_t now[8];
    stream_cursor_get(s, now);
    T_CHECK(now[0] == cur[0] && now[1] == st, "cursor mid-step is (%lld, %lld)",
            (long long)now[0], (long long)now[1]);
    cellbatch_free(&mb);
    stream_close(s);
    free(ref);
    free(got);
    free(href);
    free(hgot);
    free(cur);
    free(cur_end);
}

static void test_orders(const Manifest *m) {
    // Same seed: same order (threaded vs synchronous); another seed or
    // another epoch: another order.
    StreamConfig a = config(6, 1, 16, 0.1, 4), b = config(6, 1, 16, 0.1, 0),
                 c = config(6, 1, 16, 0.1, 4);
    c.seed = 4321;
    Stream *probe = stream_open(m, &a, 0, 1);
    int64_t S = stream_steps_per_epoch(probe);
    stream_close(probe);
    int64_t steps = S + 20;
    int64_t *ia = xmalloc((size_t)steps * 6 * sizeof *ia),
            *ib = xmalloc((size_t)steps * 6 * sizeof *ib),
            *ic = xmalloc((size_t)steps * 6 * sizeof *ic);
    uint64_t *h = xmalloc((size_t)steps * 6 * sizeof *h),
             *h2 = xmalloc((size_t)steps * 6 * sizeof *h2);
    run_global(m, &a, 1, NULL, 0, steps, ia, h, NULL);
    run_global(m, &b, 1, NULL, 0, steps, ib, h2, NULL);
    run_global(m, &c, 1, NULL, 0, steps, ic, h2, NULL);
    T_CHECK(memcmp(ia, ib, (size_t)steps * 6 * sizeof *ia) == 0, "same seed, different order");
    T_CHECK(memcmp(ia, ic, 20 * 6 * sizeof *ia) != 0, "another seed, same order");
    T_CHECK(memcmp(ia, ia + S * 6, 20 * 6 * sizeof *ia) != 0, "epoch 1 starts like epoch 0");
    free(ia);
    free(ib);
    free(ic);
    free(h);
    free(h2);
}

// The main thread writes HDF5 files (as checkpoints are written) under
// h5_lock() while the prefetch thread reads: the batches are those of a
// synchronous run and every file written reads back.
static void test_concurrent_hdf5(const Manifest *m) {
    StreamConfig a = config(12, 2, 16, 0.1, 6), b = config(12, 2, 16, 0.1, 0);
    Stream *s = stream_open(m, &a, 0, 1), *ref = stream_open(m, &b, 0, 1);
    CHECK(s && ref, "%s", error_last());
    CellBatch x, y;
    cellbatch_init(&x);
    cellbatch_init(&y);
    char *path = path_join(t_tmpdir(), "concurrent.h5");
    float w[4096], back[4096];
    int same = 1, written = 1;
    for (int step = 0; step < 300; step++) {
        for (size_t l = 0; l < 6; l++) {
            CHECK_OK(stream_next(s, &x, NULL));
            CHECK_OK(stream_next(ref, &y, NULL));
            same &= batch_hash(&x) == batch_hash(&y);
        }
        if (step % 10 != 0) continue;
        for (int i = 0; i < 4096; i++) w[i] = (float)(step * 4096 + i);
        hsize_t dim = 4096;
        h5_lock();
        hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
        hid_t sp = H5Screate_simple(1, &dim, NULL);
        hid_t d = H5Dcreate2(f, "w", H5T_NATIVE_FLOAT, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        written &= f >= 0 && d >= 0 &&
                   H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, w) >= 0;
        H5Dclose(d);
        H5Sclose(sp);
        H5Fclose(f);
        f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        written &= f >= 0 && h5_read_all(f, "w", path, H5T_NATIVE_FLOAT, back) == 0 &&
                   memcmp(w, back, sizeof w) == 0;
        H5Fclose(f);
        h5_unlock();
    }
    T_CHECK(same, "batches read beside HDF5 writes differ from a synchronous run");
    T_CHECK(written, "HDF5 writes beside the prefetch thread failed");
    free(path);
    cellbatch_free(&x);
    cellbatch_free(&y);
    stream_close(s);
    stream_close(ref);
}

static void test_config_errors(const Manifest *m) {
    StreamConfig c = config(12, 5, 16, 0.1, 0);
    T_CHECK(stream_open(m, &c, 0, 1) == NULL, "G %% b != 0 accepted");
    c = config(12, 2, 16, 0.1, 0);
    T_CHECK(stream_open(m, &c, 0, 4) == NULL && strstr(error_last(), "must divide"),
            "4 ranks for k = 6: %s", error_last());
    c = config(12, 2, 16, 1.0, 0);
    T_CHECK(stream_open(m, &c, 0, 1) == NULL, "val_fraction 1 accepted");
    // More streams than blocks: still every step complete.
    c = config(2000, 1, 1000, 0.1, 0);
    Stream *s = stream_open(m, &c, 0, 1);
    T_CHECK(s && stream_steps_per_epoch(s) == 1, "2000 streams over 3 blocks: %s",
            s ? "not one step" : error_last());
    stream_close(s);
    // Fewer training cells than the global batch: no complete step.
    c = config(2400, 1, 1000, 0.1, 0);
    T_CHECK(stream_open(m, &c, 0, 1) == NULL && strstr(error_last(), "no complete step"), "%s",
            error_last());
}

static void test_reader(const Manifest *m) {
    // Ranges across shards, ids in any order, ranges vs ids agree.
    ShardReader *r = shard_reader_open(m->folder, m->vocab_hash, SHARD_CHECK_CRC);
    CHECK(r, "%s", error_last());
    T_CHECK(shard_reader_open(m->folder, m->vocab_hash ^ 1, 0) == NULL &&
                strstr(error_last(), "vocabulary"),
            "wrong expected vocabulary accepted: %s", error_last());
    int64_t edge = m->shards[1].first_cell;
    CellBatch a, b;
    cellbatch_init(&a);
    cellbatch_init(&b);
    CHECK_OK(shard_reader_read(r, edge - 5, edge + 5, &a));
    T_CHECK(a.n == 10 && a.cell_id[0] == edge - 5 && a.cell_id[9] == edge + 4 &&
                batch_ok(&a, m->n_genes),
            "range across shards");
    int64_t ids[] = {edge + 4, edge - 5, edge - 3, edge - 2,      edge,
                     edge + 2, edge + 2, 0,        m->n_cells - 1};
    size_t nid = sizeof ids / sizeof *ids;
    CHECK_OK(shard_reader_read_ids(r, ids, nid, &b));
    T_CHECK(b.n == nid && batch_ok(&b, m->n_genes), "read_ids: %zu cells", b.n);
    int same = 1;
    for (size_t i = 0; i < nid && b.n == nid; i++) {
        same &= b.cell_id[i] == ids[i];
        if (ids[i] >= edge - 5 && ids[i] < edge + 5) {
            size_t at = (size_t)(ids[i] - (edge - 5));
            int64_t la = a.offset[at + 1] - a.offset[at], lb = b.offset[i + 1] - b.offset[i];
            same &= la == lb && a.total[at] == b.total[i] && a.label[at] == b.label[i];
            same &= memcmp(a.gene + a.offset[at], b.gene + b.offset[i],
                           (size_t)la * sizeof *a.gene) == 0;
            same &= memcmp(a.count + a.offset[at], b.count + b.offset[i],
                           (size_t)la * sizeof *a.count) == 0;
        }
    }
    T_CHECK(same, "cells read by id differ from the range read");
    T_CHECK(shard_reader_read(r, -1, 3, &a) != 0 &&
                shard_reader_read(r, 0, m->n_cells + 1, &a) != 0,
            "out-of-range read accepted");
    int64_t bad = m->n_cells;
    T_CHECK(shard_reader_read_ids(r, &bad, 1, &a) != 0, "out-of-range id accepted");
    // A lazy reader (no per-cell arrays) reads the same cells.
    ShardReader *lazy = shard_reader_open(m->folder, 0, SHARD_LAZY | SHARD_CHECK_CRC);
    CHECK(lazy, "%s", error_last());
    CellBatch c;
    cellbatch_init(&c);
    CHECK_OK(shard_reader_read_ids(lazy, ids, nid, &c));
    T_CHECK(batch_hash(&c) == batch_hash(&b), "lazy reader: cells by id differ");
    cellbatch_clear(&a);
    cellbatch_clear(&c);
    CHECK_OK(shard_reader_read(r, 0, m->n_cells, &a));
    CHECK_OK(shard_reader_read(lazy, 0, m->n_cells, &c));
    T_CHECK(a.n == (size_t)m->n_cells && a.nnz == (size_t)m->nnz &&
                batch_hash(&a) == batch_hash(&c),
            "lazy reader: the whole folder differs (%zu cells, %zu values)", c.n, c.nnz);
    uint32_t lazy_crc;
    T_CHECK(shard_file_content_crc(shard_reader_file(lazy, 0), &lazy_crc) != 0,
            "content CRC of a lazy file");
    cellbatch_free(&c);
    shard_reader_close(lazy);
    // Content CRC of every shard equals the manifest.
    for (size_t i = 0; i < m->n_shards; i++) {
        ShardFile *f = shard_reader_file(r, i);
        uint32_t crc = 0;
        T_CHECK(f && shard_file_content_crc(f, &crc) == 0 && crc == m->shards[i].content_crc,
                "content CRC of shard %zu: %08x vs %08x", i, crc, m->shards[i].content_crc);
    }
    cellbatch_free(&a);
    cellbatch_free(&b);
    shard_reader_close(r);
}

// stream_replay gives back every micro-batch of the current step bitwise,
// in any order, across epoch boundaries, on every rank of a simulated group,
// with blocks larger than, equal to and smaller than the micro-batch; the
// stream itself goes on unchanged.
static void test_replay(const Manifest *m) {
    const size_t cases[][3] = {{12, 2, 16}, {16, 4, 4}, {8, 4, 3}}; // G, b, block
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        size_t G = cases[ci][0], b = cases[ci][1], block = cases[ci][2];
        for (int N = 1; N <= 2; N++) {
            for (int rank = 0; rank < N; rank++) {
                StreamConfig c = config(G, b, block, 0.1, 3), r = config(G, b, block, 0.1, 0);
                Stream *s = stream_open(m, &c, rank, N), *ref = stream_open(m, &r, rank, N);
                CHECK(s && ref, "%s", error_last());
                CellBatch x, y;
                cellbatch_init(&x);
                cellbatch_init(&y);
                CellBatch none;
                cellbatch_init(&none);
                T_CHECK(stream_replay(s, 0, &none) != 0, "replay before the first micro-batch");
                size_t mb = stream_local_micro_batches(s);
                int64_t steps = stream_steps_per_epoch(s) + 3;
                uint64_t *h = xmalloc(mb * sizeof *h);
                int bad = 0;
                for (int64_t st = 0; st < steps && !bad; st++) {
                    for (size_t i = 0; i < mb; i++) {
                        CHECK_OK(stream_next(s, &x, NULL));
                        CHECK_OK(stream_next(ref, &y, NULL));
                        h[i] = batch_hash(&x);
                        bad |= h[i] != batch_hash(&y);
                        // Mid-step: the micro-batches so far replay already.
                        CHECK_OK(stream_replay(s, i, &y));
                        bad |= batch_hash(&y) != h[i];
                    }
                    for (size_t i = mb; i-- > 0;) { // backwards, after the step
                        CHECK_OK(stream_replay(s, i, &y));
                        bad |= batch_hash(&y) != h[i];
                    }
                }
                T_CHECK(!bad, "replay differs (G %zu, b %zu, block %zu, rank %d of %d)", G, b, block,
                        rank, N);
                T_CHECK(stream_replay(s, mb, &y) != 0, "replay past the rank's micro-batches");
                free(h);
                cellbatch_free(&x);
                cellbatch_free(&y);
                cellbatch_free(&none);
                stream_close(s);
                stream_close(ref);
            }
        }
    }
}

static int mode_unit(const char *dir) {
    Manifest m = load_manifest(dir);
    CHECK(m.n_shards >= 2, "the test wants a folder of several shards");
    test_split(&m);
    test_cursor(&m);
    test_orders(&m);
    test_replay(&m);
    test_concurrent_hdf5(&m);
    test_config_errors(&m);
    test_reader(&m);
    manifest_free(&m);
    return t_finish("test_stream unit");
}

// ---------------------------------------------------------------------------
// mpi

typedef struct {
    int64_t *ev; // (n, 5): epoch, stream, block, first cell, cells
    size_t n, cap;
} ReadLog;

static void log_read(void *ctx, int64_t epoch, size_t stream, uint32_t block, int64_t first,
                     size_t n) {
    ReadLog *L = ctx;
    if (L->n == L->cap) {
        L->cap = L->cap ? 2 * L->cap : 1024;
        L->ev = xrealloc(L->ev, L->cap * 5 * sizeof *L->ev);
    }
    int64_t *e = L->ev + 5 * L->n++;
    e[0] = epoch;
    e[1] = (int64_t)stream;
    e[2] = block;
    e[3] = first;
    e[4] = (int64_t)n;
}

static int mode_mpi(const char *dir, size_t G, size_t b, size_t block, int epochs) {
    int rank = mpienv_rank(), size = mpienv_size();
    Manifest m = load_manifest(dir);
    StreamConfig c = config(G, b, block, 0.1, 4);
    size_t k = G / b;
    Stream *s = stream_open(&m, &c, rank, size);
    CHECK(s, "%s", error_last());
    ReadLog log = {0};
    stream_set_read_hook(s, log_read, &log);
    size_t ml = stream_local_micro_batches(s);
    T_CHECK(ml * (size_t)size == k, "local micro-batches %zu", ml);

    // Rank 0's reference: the same config on one rank, synchronous reads.
    StreamConfig c1 = c;
    c1.prefetch = 0;
    Stream *ref = rank == 0 ? stream_open(&m, &c1, 0, 1) : NULL;
    int64_t *send = xmalloc(ml * (1 + b + 1) * sizeof *send);
    int64_t *recv = rank == 0 ? xmalloc((size_t)size * ml * (2 + b) * sizeof *recv) : NULL;
    // seen[e n_cells + id]: cell id came in epoch e (rank 0).
    uint8_t *seen = xcalloc((size_t)epochs * (size_t)m.n_cells, 1);
    int64_t *epoch_first = xcalloc((size_t)epochs, sizeof *epoch_first); // first cell of each epoch
    CellBatch mb, rb;
    cellbatch_init(&mb);
    cellbatch_init(&rb);
    int64_t *ref_ids = xmalloc(k * b * sizeof *ref_ids);
    uint64_t *ref_hash = xmalloc(k * sizeof *ref_hash);
    for (int e = 0; e < epochs; e++) {
        int64_t S = stream_steps_per_epoch(s), got = 0;
        uint8_t *sn = seen + (size_t)e * (size_t)m.n_cells;
        for (int64_t st = 0; st < S; st++) {
            for (size_t l = 0; l < ml; l++) {
                size_t j = 0;
                CHECK_OK(stream_next(s, &mb, &j));
                T_CHECK(mb.n == b && batch_ok(&mb, m.n_genes), "bad micro-batch at step %lld",
                        (long long)st);
                int64_t *p = send + l * (2 + b);
                p[0] = (int64_t)j;
                p[1] = (int64_t)batch_hash(&mb);
                for (size_t i = 0; i < b; i++) p[2 + i] = i < mb.n ? mb.cell_id[i] : -1;
            }
            CHECK_MPI(MPI_Gather(send, (int)(ml * (2 + b)), MPI_INT64_T, recv, (int)(ml * (2 + b)),
                                 MPI_INT64_T, 0, MPI_COMM_WORLD));
            if (rank != 0) continue;
            for (size_t j = 0; j < k; j++) {
                size_t jj = 0;
                CHECK_OK(stream_next(ref, &rb, &jj));
                T_CHECK(jj == j, "reference stream order");
                memcpy(ref_ids + j * b, rb.cell_id, b * sizeof *ref_ids);
                ref_hash[j] = batch_hash(&rb);
            }
            for (int r = 0; r < size; r++) {
                for (size_t l = 0; l < ml; l++) {
                    const int64_t *p = recv + ((size_t)r * ml + l) * (2 + b);
                    size_t j = (size_t)p[0];
                    T_CHECK(j == (size_t)r + l * (size_t)size,
                            "rank %d sent stream %zu as its %zu-th", r, j, l);
                    if (j >= k) continue;
                    T_CHECK(memcmp(p + 2, ref_ids + j * b, b * sizeof *p) == 0 &&
                                (uint64_t)p[1] == ref_hash[j],
                            "epoch %d step %lld micro-batch %zu differs from the one-rank run", e,
                            (long long)st, j);
                    for (size_t i = 0; i < b; i++) {
                        int64_t id = p[2 + i];
                        if (id < 0 || id >= m.n_cells) continue;
                        T_CHECK(!sn[id], "epoch %d: cell %lld twice", e, (long long)id);
                        T_CHECK(!stream_is_validation(c.split_seed, c.val_fraction, id),
                                "validation cell %lld in training", (long long)id);
                        sn[id] = 1;
                        got++;
                    }
                }
            }
            if (st == 0) epoch_first[e] = recv[2];
        }
        if (rank == 0)
            T_CHECK(got == S * (int64_t)G, "epoch %d: %lld cells for %lld steps", e, (long long)got,
                    (long long)S);
    }
    // The read log is complete once the prefetch thread has stopped.
    stream_close(s);

    // Gather the read logs of the epochs run, check them on rank 0.
    int64_t *mine = xmalloc((log.n ? log.n : 1) * 5 * sizeof *mine);
    int n_ev = 0;
    for (size_t i = 0; i < log.n; i++)
        if (log.ev[5 * i] < epochs) {
            memcpy(mine + n_ev, log.ev + 5 * i, 5 * sizeof *mine);
            n_ev += 5;
        }
    int *counts = xmalloc((size_t)size * sizeof *counts),
        *displs = xmalloc((size_t)size * sizeof *displs);
    CHECK_MPI(MPI_Gather(&n_ev, 1, MPI_INT, counts, 1, MPI_INT, 0, MPI_COMM_WORLD));
    int total = 0;
    for (int r = 0; rank == 0 && r < size; r++) {
        displs[r] = total;
        total += counts[r];
    }
    int64_t *all = xmalloc(((size_t)total + 1) * sizeof *all);
    CHECK_MPI(
        MPI_Gatherv(mine, n_ev, MPI_INT64_T, all, counts, displs, MPI_INT64_T, 0, MPI_COMM_WORLD));
    int64_t T = 0;
    for (int64_t id = 0; id < m.n_cells; id++)
        T += !stream_is_validation(c.split_seed, c.val_fraction, id);
    for (int e = 0; rank == 0 && e < epochs; e++) {
        // Each rank reads only its streams' cells, and every cell is read by
        // one rank, once per epoch (twice at most when blocks are no larger
        // than the micro-batch: a piece split over two micro-batches).
        uint32_t *reads = xcalloc((size_t)m.n_cells, sizeof *reads);
        int *reader_rank = xmalloc((size_t)m.n_cells * sizeof *reader_rank);
        for (int64_t id = 0; id < m.n_cells; id++) reader_rank[id] = -1;
        int64_t two_ranks = 0;
        uint32_t max_reads = 0, most = block > b ? 1 : 2;
        for (int r = 0; r < size; r++) {
            for (int i = displs[r]; i < displs[r] + counts[r]; i += 5) {
                int64_t j = all[i + 1], first = all[i + 3], n = all[i + 4];
                if (all[i] != e) continue;
                T_CHECK(j % size == r, "rank %d read cells of stream %lld", r, (long long)j);
                for (int64_t id = first; id < first + n && id < m.n_cells; id++) {
                    two_ranks += reader_rank[id] >= 0 && reader_rank[id] != r;
                    reader_rank[id] = r;
                    if (++reads[id] > max_reads) max_reads = reads[id];
                }
            }
        }
        T_CHECK(two_ranks == 0 && max_reads <= most,
                "epoch %d: %lld cells read by two ranks, a cell read %u times (at most %u)", e,
                (long long)two_ranks, max_reads, most);
        free(reader_rank);
        // The cells left out are exactly the epoch's window of T mod G.
        const uint8_t *sn = seen + (size_t)e * (size_t)m.n_cells;
        int64_t ti = 0, wrong = 0;
        for (int64_t id = 0; id < m.n_cells; id++) {
            if (stream_is_validation(c.split_seed, c.val_fraction, id)) continue;
            wrong += sn[id] == stream_is_left_out(T, (int64_t)G, e, ti++);
        }
        T_CHECK(wrong == 0, "epoch %d: %lld cells used or left out against the rule", e,
                (long long)wrong);
        free(reads);
    }
    if (rank == 0) {
        int differ = 0;
        for (int e = 1; e < epochs; e++) differ |= epoch_first[e] != epoch_first[0];
        T_CHECK(epochs < 2 || differ, "every epoch starts with the same cell");
    }
    free(all);
    free(counts);
    free(displs);
    free(mine);

    // Validation: the ranks' parts are disjoint and together the hash split.
    Stream *sv = stream_open(&m, &c, rank, size);
    int64_t nval = stream_validation_cells(sv);
    int64_t *vids = xmalloc(((size_t)nval + 1) * sizeof *vids), *vp = vids;
    CHECK_OK(stream_for_each_validation(sv, 7, 0, count_val_cb, &vp));
    int nv = (int)(vp - vids);
    int *vc = xmalloc((size_t)size * sizeof *vc), *vd = xmalloc((size_t)size * sizeof *vd);
    CHECK_MPI(MPI_Allgather(&nv, 1, MPI_INT, vc, 1, MPI_INT, MPI_COMM_WORLD));
    int vt = 0;
    for (int r = 0; r < size; r++) {
        vd[r] = vt;
        vt += vc[r];
    }
    int64_t *vall = xmalloc(((size_t)vt + 1) * sizeof *vall);
    CHECK_MPI(MPI_Allgatherv(vids, nv, MPI_INT64_T, vall, vc, vd, MPI_INT64_T, MPI_COMM_WORLD));
    int64_t q = 0;
    int good = vt == nval;
    for (int64_t id = 0; id < m.n_cells && good; id++)
        if (stream_is_validation(c.split_seed, c.val_fraction, id))
            good &= q < vt && vall[q++] == id;
    T_CHECK(good, "validation parts over %d ranks are not the hash split in order", size);
    stream_close(sv);

    stream_close(ref);
    cellbatch_free(&mb);
    cellbatch_free(&rb);
    free(send);
    free(recv);
    free(seen);
    free(epoch_first);
    free(ref_ids);
    free(ref_hash);
    free(vids);
    free(vall);
    free(vc);
    free(vd);
    free(log.ev);
    manifest_free(&m);
    int bad = t_failures, any = 0;
    CHECK_MPI(MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
    if (rank == 0)
        printf("%d ranks, G %zu, b %zu, blocks of %zu, %d epochs\n", size, G, b, block, epochs);
    return t_finish("test_stream mpi") || any ? 1 : 0;
}

// ---------------------------------------------------------------------------
// epochs: the coverage rule over random geometries

// Checks one epoch of the one-rank reference: every training cell once but a
// window of T mod G consecutive training cells (cyclic, folder order), which
// shares no cell with the previous epoch's window. left: (T) 1 = left out.
static void check_epoch_cover(const int64_t *ids, int64_t S, size_t G, const int64_t *tindex,
                              int64_t n_cells, int64_t T, uint8_t *left, const uint8_t *prev_left,
                              int e, const char *what) {
    memset(left, 1, (size_t)T);
    int64_t twice = 0, val = 0;
    for (int64_t i = 0; i < S * (int64_t)G; i++) {
        int64_t id = ids[i];
        if (id < 0 || id >= n_cells || tindex[id] < 0) {
            val++;
            continue;
        }
        twice += !left[tindex[id]];
        left[tindex[id]] = 0;
    }
    int64_t R = T % (int64_t)G, n_left = 0, starts = 0, both = 0;
    for (int64_t i = 0; i < T; i++) {
        n_left += left[i];
        starts += left[i] && !left[(i + T - 1) % T];
        if (prev_left) both += left[i] && prev_left[i];
    }
    T_CHECK(twice == 0 && val == 0, "%s epoch %d: %lld cells twice, %lld not training cells", what,
            e, (long long)twice, (long long)val);
    T_CHECK(n_left == R && (R == 0 || R == T || starts == 1),
            "%s epoch %d: %lld cells left out in %lld runs (the remainder is %lld, one run)", what,
            e, (long long)n_left, (long long)starts, (long long)R);
    T_CHECK(both == 0, "%s epoch %d: %lld cells left out of two epochs in a row", what, e,
            (long long)both);
}

static int64_t pick(Rng *r, const int64_t *v, size_t n) { return v[rng_below(r, n)]; }

// One random geometry on folder m: the global batches of 1 rank (checked
// against the rule), equal on 2 and 3 ranks where they divide k, resumed from
// a cursor on another rank count, and the block reads bounded.
static void property_combo(const Manifest *m, Rng *r, int combo, size_t *n_runs) {
    static const int64_t BLOCKS[] = {1, 2, 3, 5, 8, 16, 64, 256, 1000};
    static const int64_t KS[] = {1, 2, 3, 4, 5, 6, 6, 12, 12, 18, 24};
    static const double VALS[] = {0, 0, 0.1, 0.35};
    StreamConfig c = {0};
    c.seed = rng_u64(r);
    c.split_seed = rng_below(r, 4);
    c.val_fraction = VALS[rng_below(r, 4)];
    c.block_cells = (size_t)pick(r, BLOCKS, sizeof BLOCKS / sizeof *BLOCKS);
    c.prefetch = rng_below(r, 2) ? 3 : 0;
    int64_t *tindex = xmalloc((size_t)m->n_cells * sizeof *tindex), T = 0;
    for (int64_t id = 0; id < m->n_cells; id++)
        tindex[id] = stream_is_validation(c.split_seed, c.val_fraction, id) ? -1 : T++;
    // A geometry with at least one step: G <= T.
    size_t k = 1, b = 1;
    for (int tries = 0; tries < 50; tries++) {
        k = (size_t)pick(r, KS, sizeof KS / sizeof *KS);
        b = 1 + (size_t)rng_below(r, 8);
        if ((int64_t)(k * b) <= T) break;
        k = b = 1;
    }
    c.micro_batch = b;
    c.global_batch = k * b;
    const size_t G = k * b;
    const int64_t S = T / (int64_t)G, E = 3, steps = E * S;
    char what[160];
    snprintf(what, sizeof what, "combo %d (%s, %lld training cells, G %zu, b %zu, block %zu)",
             combo, m->folder, (long long)T, G, b, c.block_cells);
    int64_t *ref = xmalloc((size_t)steps * G * sizeof *ref),
            *got = xmalloc((size_t)steps * G * sizeof *got);
    uint64_t *href = xmalloc((size_t)steps * k * sizeof *href),
             *hgot = xmalloc((size_t)steps * k * sizeof *hgot);
    const size_t n_tally = (size_t)(E * m->n_cells);
    ReadTally tally = {.n_cells = m->n_cells, .epochs = E};
    pthread_mutex_init(&tally.mu, NULL);
    tally.reads = xcalloc(n_tally, sizeof *tally.reads);
    tally.by = xcalloc(n_tally, sizeof *tally.by);

    Stream *probe = stream_open(m, &c, 0, 1);
    CHECK(probe, "%s: %s", what, error_last());
    T_CHECK(stream_steps_per_epoch(probe) == S && stream_train_cells(probe) == T &&
                stream_epoch_cells(probe) == S * (int64_t)G,
            "%s: %lld steps, %lld cells per epoch", what, (long long)stream_steps_per_epoch(probe),
            (long long)stream_epoch_cells(probe));
    size_t len = stream_cursor_len(probe);
    stream_close(probe);

    for (int N = 1; N <= 3; N++) {
        if (k % (size_t)N != 0) continue;
        memset(tally.reads, 0, n_tally * sizeof *tally.reads);
        memset(tally.by, 0, n_tally * sizeof *tally.by);
        tally.other_stream = 0;
        run_ranks(m, &c, N, NULL, 0, steps, N == 1 ? ref : got, N == 1 ? href : hgot, NULL,
                  &tally);
        (*n_runs)++;
        if (N > 1)
            T_CHECK(memcmp(got, ref, (size_t)steps * G * sizeof *got) == 0 &&
                        memcmp(hgot, href, (size_t)steps * k * sizeof *hgot) == 0,
                    "%s: %d ranks give other global batches than 1", what, N);
        // Reads: every cell by one stream only, once per epoch (twice at
        // most when blocks are no larger than the micro-batch).
        const uint32_t most = c.block_cells > b ? 1 : 2;
        uint32_t max_reads = 0;
        for (size_t i = 0; i < n_tally; i++)
            if (tally.reads[i] > max_reads) max_reads = tally.reads[i];
        T_CHECK(max_reads <= most && tally.other_stream == 0,
                "%s, %d ranks: a cell read %u times in an epoch (at most %u), %lld reads by a "
                "second stream",
                what, N, max_reads, most, (long long)tally.other_stream);
    }
    uint8_t *left = xmalloc((size_t)T * 2);
    for (int64_t e = 0; e < E; e++)
        check_epoch_cover(ref + e * S * (int64_t)G, S, G, tindex, m->n_cells, T,
                          left + (size_t)T * (size_t)(e % 2),
                          e ? left + (size_t)T * (size_t)((e + 1) % 2) : NULL, (int)e, what);
    // Resume: stop after a random step on N1 ranks, continue on N2.
    int N1 = 1 + (int)rng_below(r, 3), N2 = 1 + (int)rng_below(r, 3);
    if (k % (size_t)N1 == 0 && k % (size_t)N2 == 0 && steps > 1) {
        int64_t st = 1 + (int64_t)rng_below(r, (uint64_t)steps - 1);
        int64_t *cur = xmalloc(len * sizeof *cur);
        run_ranks(m, &c, N1, NULL, 0, st, got, hgot, cur, NULL);
        run_ranks(m, &c, N2, cur, len, steps - st, got + st * (int64_t)G, hgot + st * (int64_t)k,
                  NULL, NULL);
        *n_runs += 2;
        T_CHECK(memcmp(got, ref, (size_t)steps * G * sizeof *got) == 0 &&
                    memcmp(hgot, href, (size_t)steps * k * sizeof *hgot) == 0,
                "%s: stopped after step %lld on %d ranks, resumed on %d: other batches", what,
                (long long)st, N1, N2);
        free(cur);
    }
    pthread_mutex_destroy(&tally.mu);
    free(tally.reads);
    free(tally.by);
    free(left);
    free(ref);
    free(got);
    free(href);
    free(hgot);
    free(tindex);
}

// The remainder rule on its own (fine-tuning's epochs use it over their list
// of training cells): R = n mod G items left out, one cyclic run, never the
// same item in two consecutive epochs, and every item used in any two.
static void check_left_out_rule(Rng *r) {
    for (int trial = 0; trial < 300; trial++) {
        int64_t n = 1 + (int64_t)rng_below(r, 500), G = 1 + (int64_t)rng_below(r, (uint64_t)n);
        int64_t R = n % G, e0 = (int64_t)rng_below(r, 1000000);
        uint8_t *prev = xcalloc((size_t)n, 1), *cur = xcalloc((size_t)n, 1);
        for (int64_t e = e0; e < e0 + 4; e++) {
            int64_t count = 0, runs = 0, both = 0;
            for (int64_t i = 0; i < n; i++) cur[i] = (uint8_t)stream_is_left_out(n, G, e, i);
            for (int64_t i = 0; i < n; i++) {
                count += cur[i];
                runs += cur[i] && !cur[(i + n - 1) % n];
                both += e > e0 && cur[i] && prev[i];
            }
            T_CHECK(count == R && (R == 0 || runs == 1) && both == 0,
                    "n %lld, G %lld, epoch %lld: %lld left out in %lld runs, %lld as before",
                    (long long)n, (long long)G, (long long)e, (long long)count, (long long)runs,
                    (long long)both);
            memcpy(prev, cur, (size_t)n);
        }
        free(prev);
        free(cur);
    }
}

static int mode_epochs(int combos, uint64_t seed, char **dirs, int n_dirs) {
    Manifest *ms = xcalloc((size_t)n_dirs, sizeof *ms);
    for (int i = 0; i < n_dirs; i++) ms[i] = load_manifest(dirs[i]);
    Rng r = rng_init(seed, RNG_SHUFFLE, 99, 0, 0);
    check_left_out_rule(&r);
    size_t runs = 0;
    for (int i = 0; i < combos; i++) {
        int before = t_failures;
        property_combo(&ms[i % n_dirs], &r, i, &runs);
        if (t_failures > before && t_failures > 20) break;
    }
    for (int i = 0; i < n_dirs; i++) manifest_free(&ms[i]);
    free(ms);
    printf("%d combinations over %d shard folders, %zu stream runs\n", combos, n_dirs, runs);
    return t_finish("test_stream epochs");
}

// ---------------------------------------------------------------------------
// dump

static int read_cursor(const char *path, int64_t *cur, size_t len) {
    FILE *f = xfopen(path, "r");
    size_t n = 0;
    long long v;
    while (n < len && fscanf(f, "%lld", &v) == 1) cur[n++] = v;
    fclose(f);
    return n == len ? 0 : error_set("%s: %zu cursor values, expected %zu", path, n, len);
}

static int mode_dump(const char *dir, size_t G, size_t b, size_t block, int64_t steps,
                     const char *cin, const char *cout) {
    int rank = mpienv_rank(), size = mpienv_size();
    Manifest m = load_manifest(dir);
    StreamConfig c = config(G, b, block, 0.1, 3);
    Stream *s = stream_open(&m, &c, rank, size);
    CHECK(s, "%s", error_last());
    size_t len = stream_cursor_len(s), ml = stream_local_micro_batches(s), k = G / b;
    int64_t *cur = xmalloc(len * sizeof *cur);
    if (cin) {
        CHECK_OK(read_cursor(cin, cur, len));
        CHECK_OK(stream_cursor_set(s, cur, len));
    }
    int64_t *send = xmalloc(ml * (2 + b) * sizeof *send);
    int64_t *recv = xmalloc((size_t)size * ml * (2 + b) * sizeof *recv);
    CellBatch mb;
    cellbatch_init(&mb);
    for (int64_t st = 0; st < steps; st++) {
        for (size_t l = 0; l < ml; l++) {
            size_t j = 0;
            CHECK_OK(stream_next(s, &mb, &j));
            CHECK(mb.n == b, "short micro-batch");
            int64_t *p = send + l * (2 + b);
            p[0] = (int64_t)j;
            p[1] = (int64_t)batch_hash(&mb);
            memcpy(p + 2, mb.cell_id, b * sizeof *p);
        }
        CHECK_MPI(MPI_Gather(send, (int)(ml * (2 + b)), MPI_INT64_T, recv, (int)(ml * (2 + b)),
                             MPI_INT64_T, 0, MPI_COMM_WORLD));
        if (rank != 0) continue;
        for (size_t j = 0; j < k; j++) {
            for (size_t i = 0; i < (size_t)size * ml; i++) {
                const int64_t *p = recv + i * (2 + b);
                if ((size_t)p[0] != j) continue;
                printf("%zu %016" PRIx64, j, (uint64_t)p[1]);
                for (size_t q = 0; q < b; q++) printf(" %lld", (long long)p[2 + q]);
                printf("\n");
            }
        }
    }
    stream_cursor_get(s, cur);
    if (cout && rank == 0) {
        FILE *f = xfopen(cout, "w");
        for (size_t i = 0; i < len; i++) fprintf(f, "%lld\n", (long long)cur[i]);
        fclose(f);
    }
    cellbatch_free(&mb);
    stream_close(s);
    free(send);
    free(recv);
    free(cur);
    manifest_free(&m);
    return 0;
}

// ---------------------------------------------------------------------------
// compare

static int mode_compare(const char *dir, const char *refpath) {
    // Reference lines: "id label total g:c g:c ..." (vocabulary index, count).
    size_t len = 0;
    char *text = file_read_all(refpath, &len);
    CHECK(text, "%s", error_last());
    ShardReader *r = shard_reader_open(dir, 0, SHARD_CHECK_CRC);
    CHECK(r, "%s", error_last());
    CellBatch b;
    cellbatch_init(&b);
    int cells = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *tok = NULL;
        long long id = strtoll(strtok_r(line, " ", &tok), NULL, 10);
        int label = (int)strtol(strtok_r(NULL, " ", &tok), NULL, 10);
        double total = strtod(strtok_r(NULL, " ", &tok), NULL);
        cellbatch_clear(&b);
        int64_t id64 = id;
        CHECK_OK(shard_reader_read_ids(r, &id64, 1, &b));
        T_CHECK(b.cell_id[0] == id && b.label[0] == label && b.total[0] == total,
                "cell %lld: label %d total %g, reference %d %g", id, b.label[0], b.total[0], label,
                total);
        int64_t e = 0, n = b.offset[1];
        int same = 1;
        for (char *g = strtok_r(NULL, " ", &tok); g; g = strtok_r(NULL, " ", &tok), e++) {
            char *colon = strchr(g, ':');
            int gene = (int)strtol(g, NULL, 10);
            float count = strtof(colon + 1, NULL);
            same &= e < n && b.gene[e] == gene && b.count[e] == count;
        }
        T_CHECK(same && e == n,
                "cell %lld: genes or counts differ (%lld stored, %lld in the reference)", id,
                (long long)n, (long long)e);
        cells++;
    }
    T_CHECK(cells > 0, "empty reference");
    printf("%d cells compared\n", cells);
    cellbatch_free(&b);
    shard_reader_close(r);
    free(text);
    return t_finish("test_stream compare");
}

// ---------------------------------------------------------------------------
// drain

static int mode_drain(const char *dir, int epochs, int prefetch, int no_crc,
                      const char *expect_hash) {
    if (expect_hash) {
        uint64_t h = 0;
        CHECK(vocab_hash_parse(expect_hash, &h) == 0, "bad hash %s", expect_hash);
        ShardReader *r = shard_reader_open(dir, h, no_crc ? 0 : SHARD_CHECK_CRC);
        if (!r) {
            fprintf(stderr, "error: %s\n", error_last());
            return 1;
        }
        shard_reader_close(r);
    }
    Manifest m;
    if (manifest_load(&m, dir) != 0) {
        fprintf(stderr, "error: %s\n", error_last());
        return 1;
    }
    StreamConfig c = config(6, 2, 32, 0.1, prefetch);
    c.skip_file_crc = no_crc;
    Stream *s = stream_open(&m, &c, 0, 1);
    if (!s) {
        fprintf(stderr, "error: %s\n", error_last());
        manifest_free(&m);
        return 1;
    }
    CellBatch b;
    cellbatch_init(&b);
    int rc = 0;
    int64_t n = 0;
    for (int e = 0; e < epochs && rc == 0; e++) {
        int64_t steps = stream_steps_per_epoch(s) * (int64_t)stream_local_micro_batches(s);
        for (int64_t i = 0; i < steps && rc == 0; i++) {
            if (stream_next(s, &b, NULL) != 0) {
                fprintf(stderr, "error: %s\n", error_last());
                rc = 1;
            } else if (!batch_ok(&b, m.n_genes)) {
                fprintf(stderr, "error: malformed batch\n");
                rc = 2;
            }
            n += (int64_t)b.n;
        }
    }
    int64_t nval = 0;
    int64_t *vids = xmalloc(((size_t)stream_validation_cells(s) + 1) * sizeof *vids), *vp = vids;
    if (rc == 0 && stream_for_each_validation(s, 16, 0, count_val_cb, &vp) != 0) {
        fprintf(stderr, "error: %s\n", error_last());
        rc = 1;
    }
    nval = vp - vids;
    free(vids);
    // Closing mid-epoch with the prefetch thread busy must not hang.
    stream_close(s);
    cellbatch_free(&b);
    manifest_free(&m);
    if (rc == 0)
        printf("%lld training and %lld validation cells read\n", (long long)n, (long long)nval);
    return rc;
}

int main(int argc, char **argv) {
    mpienv_init(&argc, &argv);
    int rc = 2;
    if (argc >= 3 && strcmp(argv[1], "unit") == 0) {
        rc = mode_unit(argv[2]);
    } else if (argc >= 7 && strcmp(argv[1], "mpi") == 0) {
        rc = mode_mpi(argv[2], (size_t)atol(argv[3]), (size_t)atol(argv[4]), (size_t)atol(argv[5]),
                      atoi(argv[6]));
    } else if (argc >= 7 && strcmp(argv[1], "dump") == 0) {
        const char *cin = NULL, *cout = NULL;
        for (int i = 7; i + 1 < argc; i += 2) {
            if (strcmp(argv[i], "--cursor-in") == 0) cin = argv[i + 1];
            if (strcmp(argv[i], "--cursor-out") == 0) cout = argv[i + 1];
        }
        rc = mode_dump(argv[2], (size_t)atol(argv[3]), (size_t)atol(argv[4]), (size_t)atol(argv[5]),
                       atol(argv[6]), cin, cout);
    } else if (argc >= 5 && strcmp(argv[1], "epochs") == 0) {
        rc = mode_epochs(atoi(argv[2]), (uint64_t)strtoull(argv[3], NULL, 10), argv + 4, argc - 4);
    } else if (argc >= 4 && strcmp(argv[1], "compare") == 0) {
        rc = mode_compare(argv[2], argv[3]);
    } else if (argc >= 4 && strcmp(argv[1], "drain") == 0) {
        int prefetch = 4, no_crc = 0;
        const char *hash = NULL;
        for (int i = 4; i < argc; i++) {
            if (strcmp(argv[i], "--prefetch") == 0 && i + 1 < argc) prefetch = atoi(argv[++i]);
            if (strcmp(argv[i], "--no-crc") == 0) no_crc = 1;
            if (strcmp(argv[i], "--expect-hash") == 0 && i + 1 < argc) hash = argv[++i];
        }
        rc = mode_drain(argv[2], atoi(argv[3]), prefetch, no_crc, hash);
    } else {
        fprintf(stderr,
                "usage: test_stream unit|mpi|epochs|dump|compare|drain DIR ... (see the file's header)\n");
    }
    mpienv_finalize();
    return rc;
}
