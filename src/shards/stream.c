// Deterministic training streams over a shard folder (semantics: stream.h).
#include "perfcell/stream.h"

#include "perfcell/error.h"
#include "perfcell/rng.h"
#include "perfcell/shard_reader.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define STREAM_DEFAULT_BLOCK 256
#define STREAM_MAX_BLOCK ((size_t)1 << 20)
#define STREAM_MAX_PREFETCH 4096
#define NO_BLOCK UINT32_MAX

// RNG_SHUFFLE sub-streams.
enum { SHUFFLE_BLOCKS = 0, SHUFFLE_CELLS = 1 };

typedef struct {
    int64_t first;  // global id of the block's first cell
    uint32_t n;     // cells
    uint32_t train; // cells not in the validation split
} Block;

// Where the reading side is in one of this rank's streams.
typedef struct {
    size_t j;        // stream index in [0, k)
    size_t t;        // current block: perm[j + t k]
    size_t off;      // training cells of that block already handed out
    uint32_t cached; // block held in `cache` (NO_BLOCK: none)
    int64_t cached_epoch;
    CellBatch cache; // the cached block's cells, as read
    uint32_t *order; // (block_cells) its training cells in shuffled order
} LocalStream;

typedef struct {
    CellBatch batch;
    size_t j;
} Slot;

struct Stream {
    StreamConfig cfg;
    int rank, size;
    size_t k, m; // streams, streams of this rank
    size_t n_blocks;
    Block *blocks; // (n_blocks) in folder order
    int64_t train_cells;
    int64_t *val_ids; // (n_val) ascending
    size_t n_val;

    // Reading side (the prefetch thread, or the caller when prefetch is 0).
    ShardReader *reader;
    int64_t p_epoch, p_step, p_steps;
    size_t p_local;
    uint32_t *p_perm; // (n_blocks)
    LocalStream *ls;  // (m)
    StreamReadHook hook;
    void *hook_ctx;

    // Consuming side (the caller of stream_next).
    int64_t c_epoch, c_step, c_steps;
    size_t c_local;
    uint32_t *c_perm; // (n_blocks)
    int started;

    // Ring of prefetched micro-batches [head, head + count).
    int threaded;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t filled, freed;
    Slot *ring;
    size_t cap, head, count;
    int stop, failed;
    char err[1024];

    // The calling thread's own reader (validation cells, replays).
    ShardReader *own_reader;

    // Replay (stream_replay): the step of the last micro-batch returned.
    int r_valid;
    int64_t r_epoch, r_step, r_perm_epoch;
    uint32_t *r_perm; // (n_blocks) that epoch's permutation, planned lazily
    LocalStream r_ls;
};

int stream_is_validation(uint64_t split_seed, double val_fraction, int64_t cell_id) {
    if (!(val_fraction > 0)) return 0;
    Rng r = rng_init(split_seed, RNG_SPLIT, 0, (uint64_t)cell_id, 0);
    return rng_uniform_double(&r) < val_fraction;
}

// ===========================================================================
// Epoch plans: a pure function of (seed, epoch), computed by both sides

// The block permutation of an epoch into perm; returns the epoch's steps (the
// shortest stream's training cells / b), or 0 with error_set().
static int64_t plan_epoch(const Stream *s, int64_t epoch, uint32_t *perm) {
    for (size_t i = 0; i < s->n_blocks; i++) perm[i] = (uint32_t)i;
    Rng r = rng_init(s->cfg.seed, RNG_SHUFFLE, SHUFFLE_BLOCKS, (uint64_t)epoch, 0);
    rng_shuffle_u32(&r, perm, s->n_blocks);
    int64_t *cells = xcalloc(s->k, sizeof *cells);
    for (size_t p = 0; p < s->n_blocks; p++) cells[p % s->k] += s->blocks[perm[p]].train;
    size_t j = 0;
    for (size_t i = 1; i < s->k; i++)
        if (cells[i] < cells[j]) j = i;
    int64_t steps = cells[j] / (int64_t)s->cfg.micro_batch;
    if (steps == 0)
        error_set(
            "%s: epoch %lld has no complete step: stream %zu of %zu gets %lld training cells, "
            "fewer than a micro-batch of %zu (%zu blocks of %zu cells); lower the global batch "
            "or block_cells",
            shard_reader_manifest(s->reader)->folder, (long long)epoch, j, s->k,
            (long long)cells[j], s->cfg.micro_batch, s->n_blocks, s->cfg.block_cells);
    free(cells);
    return steps;
}

// ===========================================================================
// Reading side

// Place L (its stream j set) where its stream is at the start of `step` of
// the epoch whose block permutation is perm: step * b training cells consumed.
static void position(const Stream *s, const uint32_t *perm, int64_t step, LocalStream *L) {
    int64_t left = step * (int64_t)s->cfg.micro_batch;
    L->t = 0;
    for (size_t p = L->j; p < s->n_blocks && left >= s->blocks[perm[p]].train; p += s->k) {
        left -= s->blocks[perm[p]].train;
        L->t++;
    }
    L->off = (size_t)left;
}

// Position the reading side at (epoch, step): every stream has consumed
// step * b training cells of its blocks.
static int reader_seek(Stream *s, int64_t epoch, int64_t step) {
    s->p_epoch = epoch;
    s->p_steps = plan_epoch(s, epoch, s->p_perm);
    if (s->p_steps == 0) return -1;
    s->p_step = step;
    s->p_local = 0;
    for (size_t l = 0; l < s->m; l++) position(s, s->p_perm, step, &s->ls[l]);
    return 0;
}

// Read block `blk` of stream L into its cache, with the order in which its
// training cells are handed out.
static int load_block(Stream *s, ShardReader *reader, int64_t epoch, LocalStream *L, uint32_t blk) {
    const Block *B = &s->blocks[blk];
    L->cached = NO_BLOCK;
    cellbatch_clear(&L->cache);
    if (shard_reader_read(reader, B->first, B->first + B->n, &L->cache) != 0) return -1;
    size_t nt = 0;
    for (size_t i = 0; i < L->cache.n; i++)
        if (!stream_is_validation(s->cfg.split_seed, s->cfg.val_fraction, L->cache.cell_id[i]))
            L->order[nt++] = (uint32_t)i;
    if (nt != B->train)
        return error_set("%s: block at cell %lld holds %zu training cells, expected %u",
                         shard_reader_manifest(s->reader)->folder, (long long)B->first, nt,
                         B->train);
    Rng r = rng_init(s->cfg.seed, RNG_SHUFFLE, SHUFFLE_CELLS, (uint64_t)epoch, blk);
    rng_shuffle_u32(&r, L->order, nt);
    L->cached = blk;
    L->cached_epoch = epoch;
    if (s->hook && reader == s->reader) s->hook(s->hook_ctx, epoch, L->j, blk, B->first, B->n);
    return 0;
}

static void drop_block(LocalStream *L) {
    if (L->cached == NO_BLOCK) return;
    cellbatch_free(&L->cache);
    cellbatch_init(&L->cache);
    L->cached = NO_BLOCK;
}

// The next micro-batch of stream L (positioned in `epoch`, whose permutation
// is perm) into `out`. A block is cached in L only while it still has cells to
// hand out, so memory holds at most one partly used block per stream; with
// blocks no larger than the micro-batch not even that: a block split over two
// micro-batches is read twice, and memory does not grow with the streams.
static int take(Stream *s, ShardReader *reader, int64_t epoch, const uint32_t *perm, LocalStream *L,
                CellBatch *out) {
    size_t need = s->cfg.micro_batch;
    cellbatch_clear(out);
    while (need > 0) {
        size_t p = L->j + L->t * s->k;
        if (p >= s->n_blocks)
            return error_set("internal: stream %zu ran out of blocks in epoch %lld", L->j,
                             (long long)epoch);
        uint32_t blk = perm[p];
        size_t train = s->blocks[blk].train;
        if (L->off < train) {
            if (L->cached != blk || L->cached_epoch != epoch) {
                if (load_block(s, reader, epoch, L, blk) != 0) return -1;
            }
            size_t n = train - L->off < need ? train - L->off : need;
            for (size_t i = L->off; i < L->off + n; i++)
                cellbatch_append(out, &L->cache, L->order[i], L->order[i] + 1);
            L->off += n;
            need -= n;
        }
        if (L->off == train) {
            L->t++;
            L->off = 0;
            drop_block(L);
        }
    }
    if (s->cfg.block_cells <= s->cfg.micro_batch) drop_block(L);
    return 0;
}

// The next micro-batch of this rank into `out`; advances the reading side.
static int produce(Stream *s, CellBatch *out, size_t *j_out) {
    // The next epoch is planned when its first micro-batch is wanted, so an
    // epoch without steps fails that call, not the last batch of the previous.
    if (s->p_step == s->p_steps && reader_seek(s, s->p_epoch + 1, 0) != 0) return -1;
    LocalStream *L = &s->ls[s->p_local];
    if (take(s, s->reader, s->p_epoch, s->p_perm, L, out) != 0) return -1;
    *j_out = L->j;
    if (++s->p_local == s->m) {
        s->p_local = 0;
        s->p_step++;
    }
    return 0;
}

static void *prefetch_main(void *arg) {
    Stream *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (s->count == s->cap && !s->stop) pthread_cond_wait(&s->freed, &s->mu);
        if (s->stop) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        Slot *slot = &s->ring[(s->head + s->count) % s->cap];
        pthread_mutex_unlock(&s->mu);
        // The consumer only touches slots [head, head + count): this one is ours.
        int rc = produce(s, &slot->batch, &slot->j);
        pthread_mutex_lock(&s->mu);
        if (rc != 0) {
            snprintf(s->err, sizeof s->err, "%s", error_last());
            s->failed = 1;
        } else {
            s->count++;
        }
        pthread_cond_signal(&s->filled);
        pthread_mutex_unlock(&s->mu);
        if (rc != 0) break;
    }
    return NULL;
}

// ===========================================================================
// Opening and closing

Stream *stream_open(const Manifest *m, const StreamConfig *cfg, int rank, int size) {
    StreamConfig c = *cfg;
    if (c.block_cells == 0) c.block_cells = STREAM_DEFAULT_BLOCK;
    if (c.micro_batch == 0 || c.global_batch == 0 || c.global_batch % c.micro_batch != 0) {
        error_set(
            "stream: the global batch (%zu) must be a positive multiple of the micro-batch (%zu)",
            c.global_batch, c.micro_batch);
        return NULL;
    }
    size_t k = c.global_batch / c.micro_batch;
    if (size <= 0 || rank < 0 || rank >= size || k % (size_t)size != 0) {
        error_set(
            "stream: %d ranks must divide the %zu micro-batches of a step (global batch %zu / "
            "micro-batch %zu)",
            size, k, c.global_batch, c.micro_batch);
        return NULL;
    }
    if (c.block_cells > STREAM_MAX_BLOCK || !(c.val_fraction >= 0 && c.val_fraction < 1) ||
        c.prefetch < 0 || c.prefetch > STREAM_MAX_PREFETCH) {
        error_set("stream: bad config (block_cells %zu, at most %zu; val_fraction %g, in [0, 1); "
                  "prefetch %d, in [0, %d])",
                  c.block_cells, STREAM_MAX_BLOCK, c.val_fraction, c.prefetch, STREAM_MAX_PREFETCH);
        return NULL;
    }
    size_t n_blocks = 0;
    for (size_t i = 0; i < m->n_shards; i++)
        n_blocks += ((size_t)m->shards[i].n_cells + c.block_cells - 1) / c.block_cells;
    if (n_blocks >= NO_BLOCK) {
        error_set("%s: %zu blocks, more than a stream handles; raise block_cells", m->folder,
                  n_blocks);
        return NULL;
    }

    Stream *s = xcalloc(1, sizeof *s);
    s->cfg = c;
    s->rank = rank;
    s->size = size;
    s->k = k;
    s->m = k / (size_t)size;
    s->n_blocks = n_blocks;
    s->blocks = xmalloc(n_blocks * sizeof *s->blocks);
    size_t b = 0, cap_val = 0;
    for (size_t i = 0; i < m->n_shards; i++) {
        const ShardEntry *e = &m->shards[i];
        for (int64_t c0 = 0; c0 < e->n_cells; c0 += (int64_t)c.block_cells) {
            int64_t n =
                e->n_cells - c0 < (int64_t)c.block_cells ? e->n_cells - c0 : (int64_t)c.block_cells;
            Block *B = &s->blocks[b++];
            B->first = e->first_cell + c0;
            B->n = (uint32_t)n;
            B->train = (uint32_t)n;
            for (int64_t id = B->first; id < B->first + n; id++) {
                if (!stream_is_validation(c.split_seed, c.val_fraction, id)) continue;
                B->train--;
                if (s->n_val == cap_val) {
                    cap_val = cap_val ? 2 * cap_val : 1024;
                    s->val_ids = xrealloc(s->val_ids, cap_val * sizeof *s->val_ids);
                }
                s->val_ids[s->n_val++] = id;
            }
            s->train_cells += B->train;
        }
    }
    s->reader = shard_reader_open_manifest(m, SHARD_LAZY | (c.skip_file_crc ? 0 : SHARD_CHECK_CRC));
    s->p_perm = xmalloc((n_blocks ? n_blocks : 1) * sizeof *s->p_perm);
    s->c_perm = xmalloc((n_blocks ? n_blocks : 1) * sizeof *s->c_perm);
    s->ls = xcalloc(s->m, sizeof *s->ls);
    for (size_t l = 0; l < s->m; l++) {
        s->ls[l].j = (size_t)rank + l * (size_t)size;
        s->ls[l].cached = NO_BLOCK;
        s->ls[l].order = xmalloc(c.block_cells * sizeof *s->ls[l].order);
        cellbatch_init(&s->ls[l].cache);
    }
    s->r_perm_epoch = -1;
    s->r_ls.cached = NO_BLOCK;
    s->r_ls.order = xmalloc(c.block_cells * sizeof *s->r_ls.order);
    cellbatch_init(&s->r_ls.cache);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->filled, NULL);
    pthread_cond_init(&s->freed, NULL);
    s->c_steps = plan_epoch(s, 0, s->c_perm);
    if (s->c_steps == 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", error_last());
        stream_close(s);
        error_set("%s", msg);
        return NULL;
    }
    return s;
}

void stream_close(Stream *s) {
    if (!s) return;
    if (s->threaded) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_signal(&s->freed);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thread, NULL);
    }
    for (size_t i = 0; i < s->cap; i++) cellbatch_free(&s->ring[i].batch);
    free(s->ring);
    for (size_t l = 0; l < s->m; l++) {
        cellbatch_free(&s->ls[l].cache);
        free(s->ls[l].order);
    }
    free(s->ls);
    cellbatch_free(&s->r_ls.cache);
    free(s->r_ls.order);
    free(s->r_perm);
    shard_reader_close(s->reader);
    shard_reader_close(s->own_reader);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->filled);
    pthread_cond_destroy(&s->freed);
    free(s->blocks);
    free(s->val_ids);
    free(s->p_perm);
    free(s->c_perm);
    free(s);
}

size_t stream_local_micro_batches(const Stream *s) { return s->m; }
int64_t stream_steps_per_epoch(const Stream *s) { return s->c_steps; }
int64_t stream_train_cells(const Stream *s) { return s->train_cells; }
int64_t stream_validation_cells(const Stream *s) { return (int64_t)s->n_val; }

void stream_set_read_hook(Stream *s, StreamReadHook fn, void *ctx) {
    s->hook = fn;
    s->hook_ctx = ctx;
}

// ===========================================================================
// Consuming

static int start(Stream *s) {
    if (reader_seek(s, s->c_epoch, s->c_step) != 0) return -1;
    s->started = 1;
    if (s->cfg.prefetch == 0) return 0;
    s->cap = (size_t)s->cfg.prefetch;
    s->ring = xcalloc(s->cap, sizeof *s->ring);
    for (size_t i = 0; i < s->cap; i++) cellbatch_init(&s->ring[i].batch);
    if (pthread_create(&s->thread, NULL, prefetch_main, s) != 0)
        return error_set("stream: cannot start the prefetch thread");
    s->threaded = 1;
    return 0;
}

int stream_next(Stream *s, CellBatch *out, size_t *stream_index) {
    if (!s->started && start(s) != 0) return -1;
    size_t j = 0;
    if (!s->threaded) {
        if (produce(s, out, &j) != 0) return -1;
    } else {
        pthread_mutex_lock(&s->mu);
        while (s->count == 0 && !s->failed) pthread_cond_wait(&s->filled, &s->mu);
        if (s->count == 0) {
            pthread_mutex_unlock(&s->mu);
            return error_set("%s", s->err);
        }
        Slot *slot = &s->ring[s->head];
        // Swap buffers: the caller gets the decoded batch, the ring reuses
        // the caller's old arrays.
        CellBatch tmp = *out;
        *out = slot->batch;
        slot->batch = tmp;
        j = slot->j;
        s->head = (s->head + 1) % s->cap;
        s->count--;
        pthread_cond_signal(&s->freed);
        pthread_mutex_unlock(&s->mu);
    }
    if (stream_index) *stream_index = j;
    if (s->c_local == 0) {
        s->r_valid = 1;
        s->r_epoch = s->c_epoch;
        s->r_step = s->c_step;
    }
    if (++s->c_local == s->m) {
        s->c_local = 0;
        if (++s->c_step == s->c_steps) {
            s->c_epoch++;
            s->c_step = 0;
            s->c_steps = plan_epoch(s, s->c_epoch, s->c_perm);
        }
    }
    return 0;
}

// ===========================================================================
// Cursor

size_t stream_cursor_len(const Stream *s) { return 2 + s->k; }

void stream_cursor_get(const Stream *s, int64_t *out) {
    out[0] = s->c_epoch;
    out[1] = s->c_step;
    for (size_t j = 0; j < s->k; j++) out[2 + j] = s->c_step * (int64_t)s->cfg.micro_batch;
}

int stream_cursor_set(Stream *s, const int64_t *cur, size_t len) {
    if (s->started)
        return error_set("stream: the cursor can only be set before the first micro-batch");
    if (len != 2 + s->k)
        return error_set(
            "stream: cursor of %zu values for %zu streams (expected %zu): the global batch "
            "or the micro-batch changed",
            len, s->k, 2 + s->k);
    if (cur[0] < 0 || cur[1] < 0) return error_set("stream: negative epoch or step in the cursor");
    for (size_t j = 0; j < s->k; j++) {
        if (cur[2 + j] != cur[1] * (int64_t)s->cfg.micro_batch)
            return error_set(
                "stream: cursor position %lld of stream %zu does not match step %lld of "
                "micro-batches of %zu: the micro-batch changed",
                (long long)cur[2 + j], j, (long long)cur[1], s->cfg.micro_batch);
    }
    int64_t steps = plan_epoch(s, cur[0], s->c_perm);
    if (steps == 0) return -1;
    if (cur[1] >= steps)
        return error_set(
            "stream: cursor step %lld is past the %lld steps of epoch %lld (another seed, "
            "block size or validation split?)",
            (long long)cur[1], (long long)steps, (long long)cur[0]);
    s->c_epoch = cur[0];
    s->c_step = cur[1];
    s->c_steps = steps;
    s->c_local = 0;
    return 0;
}

// The calling thread's reader, opened on first use.
static ShardReader *own_reader(Stream *s) {
    if (!s->own_reader)
        s->own_reader =
            shard_reader_open_manifest(shard_reader_manifest(s->reader),
                                       SHARD_LAZY | (s->cfg.skip_file_crc ? 0 : SHARD_CHECK_CRC));
    return s->own_reader;
}

// ===========================================================================
// Replay

int stream_replay(Stream *s, size_t i, CellBatch *out) {
    if (!s->r_valid) return error_set("stream: no micro-batch returned yet, nothing to replay");
    if (i >= s->m)
        return error_set("stream: micro-batch %zu of a step replayed, this rank has %zu", i, s->m);
    if (s->r_perm_epoch != s->r_epoch) {
        if (!s->r_perm) s->r_perm = xmalloc((s->n_blocks ? s->n_blocks : 1) * sizeof *s->r_perm);
        if (plan_epoch(s, s->r_epoch, s->r_perm) == 0) return -1;
        s->r_perm_epoch = s->r_epoch;
    }
    LocalStream *L = &s->r_ls;
    L->j = (size_t)s->rank + i * (size_t)s->size;
    position(s, s->r_perm, s->r_step, L);
    return take(s, own_reader(s), s->r_epoch, s->r_perm, L, out);
}

// ===========================================================================
// Validation

int stream_for_each_validation(Stream *s, size_t batch, size_t max_cells, StreamBatchFn cb,
                               void *ctx) {
    if (batch == 0) batch = s->cfg.micro_batch;
    size_t N = (size_t)s->size, total = s->n_val;
    if (max_cells && max_cells < (total + N - 1) / N) total = max_cells * N;
    size_t lo = total * (size_t)s->rank / N, hi = total * ((size_t)s->rank + 1) / N;
    ShardReader *reader = own_reader(s);
    CellBatch b;
    cellbatch_init(&b);
    int rc = 0;
    for (size_t i = lo; i < hi && rc == 0; i += batch) {
        size_t n = hi - i < batch ? hi - i : batch;
        cellbatch_clear(&b);
        if (shard_reader_read_ids(reader, s->val_ids + i, n, &b) != 0)
            rc = -1;
        else
            rc = cb(&b, ctx);
    }
    cellbatch_free(&b);
    return rc;
}
