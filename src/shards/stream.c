// Deterministic training streams over a shard folder (semantics: stream.h).
#include "perfcell/stream.h"

#include "perfcell/error.h"
#include "perfcell/log.h"
#include "perfcell/rng.h"
#include "perfcell/shard_reader.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define STREAM_DEFAULT_BLOCK 256
#define STREAM_MAX_BLOCK ((size_t)1 << 20)
#define STREAM_MAX_PREFETCH 4096
#define MAX_BLOCKS UINT32_MAX
// Third value of a cursor of this layout (a former cursor holds a stream
// position there, never negative).
#define CURSOR_TAG (-2)
#define CURSOR_LEN 5

// RNG_SHUFFLE sub-streams: the block order, and the order inside a piece
// starting at the block's cell lo of the epoch (SHUFFLE_CELLS + lo).
enum { SHUFFLE_BLOCKS = 0, SHUFFLE_CELLS = 1 };

typedef struct {
    int64_t first;  // global id of the block's first cell
    uint32_t n;     // cells
    uint32_t train; // cells not in the validation split
    int64_t tfirst; // training index of its first training cell (folder order)
} Block;

// A piece: cells [lo, hi) of a block's cells of the epoch (its training cells
// less the left-out window, in folder order). A block is one piece, or
// several where segments of two streams meet inside it.
typedef struct {
    uint32_t blk;
    uint32_t lo, hi;
} Piece;

// An epoch's order: pieces of the permuted blocks, and where each starts in
// the epoch.
typedef struct {
    int64_t epoch; // -1: not planned
    int64_t w0;    // first training index of the left-out window
    size_t n;      // pieces
    uint32_t *perm; // (n_blocks) block order
    Piece *piece;   // (n) in epoch order
    int64_t *start; // (n + 1) epoch position of each piece's first cell
} EpochPlan;

// Where the reading side is in one of this rank's streams.
typedef struct {
    size_t j;        // stream index in [0, k)
    size_t p;        // current piece
    size_t off;      // cells of that piece already handed out
    size_t cached;   // piece held in `cache` (SIZE_MAX: none)
    int64_t cached_epoch;
    CellBatch cache; // the cached piece's cells, as read
    uint32_t *order; // (block_cells) its cells of the epoch in shuffled order
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
    int64_t steps;     // steps per epoch: train_cells / G
    int64_t remainder; // train_cells mod G: the window left out each epoch
    int64_t segment;   // cells of each stream per epoch: steps * b
    int64_t *val_ids;  // (n_val) ascending
    size_t n_val;

    // Reading side (the prefetch thread, or the caller when prefetch is 0).
    ShardReader *reader;
    int64_t p_step;
    size_t p_local;
    EpochPlan p_plan;
    LocalStream *ls; // (m)
    StreamReadHook hook;
    void *hook_ctx;

    // Consuming side (the caller of stream_next).
    int64_t c_epoch, c_step;
    size_t c_local;
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
    int64_t r_epoch, r_step;
    EpochPlan r_plan;
    LocalStream r_ls;
};

int stream_is_validation(uint64_t split_seed, double val_fraction, int64_t cell_id) {
    if (!(val_fraction > 0)) return 0;
    Rng r = rng_init(split_seed, RNG_SPLIT, 0, (uint64_t)cell_id, 0);
    return rng_uniform_double(&r) < val_fraction;
}

int64_t stream_left_out_start(int64_t n, int64_t global_batch, int64_t epoch) {
    if (n <= 0 || global_batch <= 0) return 0;
    int64_t r = n % global_batch;
    // (epoch mod n) r < n G: no overflow for any realistic n and G.
    return (int64_t)(((unsigned __int128)(epoch % n) * (unsigned __int128)r) % (unsigned __int128)n);
}

int stream_is_left_out(int64_t n, int64_t global_batch, int64_t epoch, int64_t i) {
    if (n <= 0 || global_batch <= 0) return 0;
    int64_t r = n % global_batch;
    if (r == 0) return 0;
    int64_t w0 = stream_left_out_start(n, global_batch, epoch);
    return (i - w0 + n) % n < r;
}

// ===========================================================================
// Epoch plans: a pure function of (seed, epoch), computed by each side

// At most n_blocks + k - 1 pieces: the k - 1 segment cuts split blocks.
static void plan_init(EpochPlan *P, size_t n_blocks, size_t k) {
    P->epoch = -1;
    P->w0 = 0;
    P->n = 0;
    P->perm = xmalloc((n_blocks ? n_blocks : 1) * sizeof *P->perm);
    P->piece = xmalloc((n_blocks + k) * sizeof *P->piece);
    P->start = xmalloc((n_blocks + k + 1) * sizeof *P->start);
}

static void plan_free(EpochPlan *P) {
    free(P->perm);
    free(P->piece);
    free(P->start);
}

// Training cells of block B in the epoch whose window starts at w0: those not
// in the cyclic window [w0, w0 + R) of training indices.
static int64_t block_epoch_cells(const Stream *s, const Block *B, int64_t w0) {
    int64_t T = s->train_cells, R = s->remainder, a = B->tfirst, e = B->tfirst + B->train;
    if (R == 0 || B->train == 0) return B->train;
    int64_t out = 0, lo, hi;
    // The window as at most two intervals: [w0, min(w0 + R, T)) and [0, w0 + R - T).
    lo = w0 > a ? w0 : a;
    hi = (w0 + R < T ? w0 + R : T) < e ? (w0 + R < T ? w0 + R : T) : e;
    if (hi > lo) out += hi - lo;
    if (w0 + R > T) {
        hi = w0 + R - T < e ? w0 + R - T : e;
        if (hi > a) out += hi - a;
    }
    return (int64_t)B->train - out;
}

static void plan_epoch(const Stream *s, int64_t epoch, EpochPlan *P) {
    if (P->epoch == epoch) return;
    for (size_t i = 0; i < s->n_blocks; i++) P->perm[i] = (uint32_t)i;
    Rng r = rng_init(s->cfg.seed, RNG_SHUFFLE, SHUFFLE_BLOCKS, (uint64_t)epoch, 0);
    rng_shuffle_u32(&r, P->perm, s->n_blocks);
    P->w0 = stream_left_out_start(s->train_cells, (int64_t)s->cfg.global_batch, epoch);
    // Cut the blocks where one stream's segment ends and the next begins.
    int64_t pos = 0;
    P->n = 0;
    P->start[0] = 0;
    for (size_t q = 0; q < s->n_blocks; q++) {
        uint32_t blk = P->perm[q];
        int64_t cells = block_epoch_cells(s, &s->blocks[blk], P->w0), lo = 0;
        while (lo < cells) {
            int64_t cut = (pos + lo) / s->segment * s->segment + s->segment; // next segment end
            int64_t hi = cut - pos < cells ? cut - pos : cells;
            P->piece[P->n] = (Piece){blk, (uint32_t)lo, (uint32_t)hi};
            P->start[P->n + 1] = pos + hi;
            P->n++;
            lo = hi;
        }
        pos += cells;
    }
    P->epoch = epoch;
}

// ===========================================================================
// Reading side

// Place L (its stream j set) where its stream is at the start of `step` of
// the planned epoch: at epoch position j segment + step b.
static void position(const Stream *s, const EpochPlan *P, int64_t step, LocalStream *L) {
    int64_t pos = (int64_t)L->j * s->segment + step * (int64_t)s->cfg.micro_batch;
    // The piece holding pos: the first p with start[p + 1] > pos.
    size_t lo = 0, hi = P->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (P->start[mid + 1] > pos)
            hi = mid;
        else
            lo = mid + 1;
    }
    L->p = lo;
    L->off = lo < P->n ? (size_t)(pos - P->start[lo]) : 0;
}

// Whether a training cell (training index ti) is in the epoch's left-out window.
static int left_out(const Stream *s, const EpochPlan *P, int64_t ti) {
    return s->remainder && (ti - P->w0 + s->train_cells) % s->train_cells < s->remainder;
}

// Read piece p of the planned epoch into L's cache: only the cell range from
// its first to its last cell, so two streams that share a block read disjoint
// ranges; `order` lists its cells in the order they are handed out.
static int load_piece(Stream *s, ShardReader *reader, const EpochPlan *P, LocalStream *L,
                      size_t p) {
    const Piece *pc = &P->piece[p];
    const Block *B = &s->blocks[pc->blk];
    // The ids of the piece's first and last cell, from the split and the window.
    int64_t id0 = -1, id1 = -1, ti = B->tfirst, ti0 = 0, q = 0;
    for (int64_t id = B->first; id < B->first + B->n && q < pc->hi; id++) {
        if (stream_is_validation(s->cfg.split_seed, s->cfg.val_fraction, id)) continue;
        int64_t t = ti++;
        if (left_out(s, P, t)) continue;
        if (q == pc->lo) id0 = id, ti0 = t;
        if (++q == pc->hi) id1 = id + 1;
    }
    L->cached = SIZE_MAX;
    cellbatch_clear(&L->cache);
    if (id0 < 0 || id1 < 0)
        return error_set("%s: internal: piece [%u, %u) of the block at cell %lld not found",
                         shard_reader_manifest(s->reader)->folder, pc->lo, pc->hi,
                         (long long)B->first);
    if (shard_reader_read(reader, id0, id1, &L->cache) != 0) return -1;
    ti = ti0;
    size_t ne = 0;
    for (size_t i = 0; i < L->cache.n; i++) {
        if (L->cache.cell_id[i] != id0 + (int64_t)i)
            return error_set("%s: cell %lld read where cell %lld was expected",
                             shard_reader_manifest(s->reader)->folder,
                             (long long)L->cache.cell_id[i], (long long)(id0 + (int64_t)i));
        if (stream_is_validation(s->cfg.split_seed, s->cfg.val_fraction, L->cache.cell_id[i]))
            continue;
        if (left_out(s, P, ti++)) continue;
        L->order[ne++] = (uint32_t)i;
    }
    if (ne != (size_t)(pc->hi - pc->lo))
        return error_set("%s: %zu cells of the epoch at cells [%lld, %lld), expected %u",
                         shard_reader_manifest(s->reader)->folder, ne, (long long)id0,
                         (long long)id1, pc->hi - pc->lo);
    Rng r = rng_init(s->cfg.seed, RNG_SHUFFLE, SHUFFLE_CELLS + pc->lo, (uint64_t)P->epoch, pc->blk);
    rng_shuffle_u32(&r, L->order, ne);
    L->cached = p;
    L->cached_epoch = P->epoch;
    if (s->hook && reader == s->reader)
        s->hook(s->hook_ctx, P->epoch, L->j, pc->blk, id0, (size_t)(id1 - id0));
    return 0;
}

static void drop_piece(LocalStream *L) {
    if (L->cached == SIZE_MAX) return;
    cellbatch_free(&L->cache);
    cellbatch_init(&L->cache);
    L->cached = SIZE_MAX;
}

// The next micro-batch of stream L (positioned in the planned epoch P) into
// `out`. A piece is cached in L only while it still has cells to hand out, so
// memory holds at most one partly used piece per stream; with blocks no
// larger than the micro-batch not even that: a piece split over two
// micro-batches is read twice, and memory does not grow with the streams.
static int take(Stream *s, ShardReader *reader, const EpochPlan *P, LocalStream *L,
                CellBatch *out) {
    size_t need = s->cfg.micro_batch;
    cellbatch_clear(out);
    while (need > 0) {
        if (L->p >= P->n)
            return error_set("%s: internal: stream %zu ran out of cells in epoch %lld",
                             shard_reader_manifest(s->reader)->folder, L->j, (long long)P->epoch);
        size_t cells = (size_t)(P->start[L->p + 1] - P->start[L->p]);
        if (L->off < cells) {
            if (L->cached != L->p || L->cached_epoch != P->epoch) {
                if (load_piece(s, reader, P, L, L->p) != 0) return -1;
            }
            size_t n = cells - L->off < need ? cells - L->off : need;
            for (size_t i = L->off; i < L->off + n; i++)
                cellbatch_append(out, &L->cache, L->order[i], L->order[i] + 1);
            L->off += n;
            need -= n;
        }
        if (L->off == cells) {
            L->p++;
            L->off = 0;
            drop_piece(L);
        }
    }
    if (s->cfg.block_cells <= s->cfg.micro_batch) drop_piece(L);
    return 0;
}

// Position the reading side at (epoch, step).
static void reader_seek(Stream *s, int64_t epoch, int64_t step) {
    plan_epoch(s, epoch, &s->p_plan);
    s->p_step = step;
    s->p_local = 0;
    for (size_t l = 0; l < s->m; l++) position(s, &s->p_plan, step, &s->ls[l]);
}

// The next micro-batch of this rank into `out`; advances the reading side.
static int produce(Stream *s, CellBatch *out, size_t *j_out) {
    if (s->p_step == s->steps) reader_seek(s, s->p_plan.epoch + 1, 0);
    LocalStream *L = &s->ls[s->p_local];
    if (take(s, s->reader, &s->p_plan, L, out) != 0) return -1;
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

static int check_config(const StreamConfig *c, int rank, int size) {
    if (c->micro_batch == 0 || c->global_batch == 0 || c->global_batch % c->micro_batch != 0)
        return error_set(
            "stream: the global batch (%zu) must be a positive multiple of the micro-batch (%zu)",
            c->global_batch, c->micro_batch);
    size_t k = c->global_batch / c->micro_batch;
    if (size <= 0 || rank < 0 || rank >= size || k % (size_t)size != 0)
        return error_set(
            "stream: %d ranks must divide the %zu micro-batches of a step (global batch %zu / "
            "micro-batch %zu)",
            size, k, c->global_batch, c->micro_batch);
    if (c->block_cells > STREAM_MAX_BLOCK || !(c->val_fraction >= 0 && c->val_fraction < 1) ||
        c->prefetch < 0 || c->prefetch > STREAM_MAX_PREFETCH)
        return error_set(
            "stream: bad config (block_cells %zu, at most %zu; val_fraction %g, in [0, 1); "
            "prefetch %d, in [0, %d])",
            c->block_cells, STREAM_MAX_BLOCK, c->val_fraction, c->prefetch, STREAM_MAX_PREFETCH);
    return 0;
}

// The blocks of the folder (and the validation ids); 0, or -1 with error_set().
static int cut_blocks(Stream *s, const Manifest *m) {
    const size_t bc = s->cfg.block_cells;
    size_t n_blocks = 0;
    for (size_t i = 0; i < m->n_shards; i++)
        n_blocks += ((size_t)m->shards[i].n_cells + bc - 1) / bc;
    if (n_blocks >= MAX_BLOCKS)
        return error_set("%s: %zu blocks, more than a stream handles; raise block_cells",
                         m->folder, n_blocks);
    s->n_blocks = n_blocks;
    s->blocks = xmalloc((n_blocks ? n_blocks : 1) * sizeof *s->blocks);
    size_t b = 0, cap_val = 0;
    for (size_t i = 0; i < m->n_shards; i++) {
        const ShardEntry *e = &m->shards[i];
        for (int64_t c0 = 0; c0 < e->n_cells; c0 += (int64_t)bc) {
            int64_t n = e->n_cells - c0 < (int64_t)bc ? e->n_cells - c0 : (int64_t)bc;
            Block *B = &s->blocks[b++];
            B->first = e->first_cell + c0;
            B->n = (uint32_t)n;
            B->train = (uint32_t)n;
            B->tfirst = s->train_cells;
            for (int64_t id = B->first; id < B->first + n; id++) {
                if (!stream_is_validation(s->cfg.split_seed, s->cfg.val_fraction, id)) continue;
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
    const int64_t G = (int64_t)s->cfg.global_batch;
    s->steps = s->train_cells / G;
    s->remainder = s->train_cells % G;
    s->segment = s->steps * (int64_t)s->cfg.micro_batch;
    if (s->steps == 0)
        return error_set("%s: %lld training cells, fewer than the global batch of %zu: an epoch "
                         "has no complete step; lower batch.global_batch",
                         m->folder, (long long)s->train_cells, s->cfg.global_batch);
    return 0;
}

static void local_stream_init(LocalStream *L, size_t j, size_t block_cells) {
    memset(L, 0, sizeof *L);
    L->j = j;
    L->cached = SIZE_MAX;
    L->cached_epoch = -1;
    L->order = xmalloc(block_cells * sizeof *L->order);
    cellbatch_init(&L->cache);
}

static void local_stream_free(LocalStream *L) {
    cellbatch_free(&L->cache);
    free(L->order);
}

Stream *stream_open(const Manifest *m, const StreamConfig *cfg, int rank, int size) {
    StreamConfig c = *cfg;
    if (c.block_cells == 0) c.block_cells = STREAM_DEFAULT_BLOCK;
    if (check_config(&c, rank, size) != 0) return NULL;
    Stream *s = xcalloc(1, sizeof *s);
    s->cfg = c;
    s->rank = rank;
    s->size = size;
    s->k = c.global_batch / c.micro_batch;
    s->m = s->k / (size_t)size;
    if (cut_blocks(s, m) != 0) {
        free(s->blocks);
        free(s->val_ids);
        free(s);
        return NULL;
    }
    s->reader = shard_reader_open_manifest(m, SHARD_LAZY | (c.skip_file_crc ? 0 : SHARD_CHECK_CRC));
    plan_init(&s->p_plan, s->n_blocks, s->k);
    s->ls = xcalloc(s->m, sizeof *s->ls);
    for (size_t l = 0; l < s->m; l++)
        local_stream_init(&s->ls[l], (size_t)rank + l * (size_t)size, c.block_cells);
    local_stream_init(&s->r_ls, 0, c.block_cells);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->filled, NULL);
    pthread_cond_init(&s->freed, NULL);
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
    for (size_t l = 0; l < s->m; l++) local_stream_free(&s->ls[l]);
    free(s->ls);
    local_stream_free(&s->r_ls);
    plan_free(&s->p_plan);
    plan_free(&s->r_plan);
    shard_reader_close(s->reader);
    shard_reader_close(s->own_reader);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->filled);
    pthread_cond_destroy(&s->freed);
    free(s->blocks);
    free(s->val_ids);
    free(s);
}

size_t stream_local_micro_batches(const Stream *s) { return s->m; }
int64_t stream_steps_per_epoch(const Stream *s) { return s->steps; }
int64_t stream_train_cells(const Stream *s) { return s->train_cells; }
int64_t stream_epoch_cells(const Stream *s) { return s->steps * (int64_t)s->cfg.global_batch; }
int64_t stream_validation_cells(const Stream *s) { return (int64_t)s->n_val; }

void stream_set_read_hook(Stream *s, StreamReadHook fn, void *ctx) {
    s->hook = fn;
    s->hook_ctx = ctx;
}

// ===========================================================================
// Consuming

static int start(Stream *s) {
    reader_seek(s, s->c_epoch, s->c_step);
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
        if (++s->c_step == s->steps) {
            s->c_epoch++;
            s->c_step = 0;
        }
    }
    return 0;
}

// ===========================================================================
// Cursor: {epoch, step, CURSOR_TAG, global batch, micro-batch}

size_t stream_cursor_len(const Stream *s) {
    (void)s;
    return CURSOR_LEN;
}

void stream_cursor_get(const Stream *s, int64_t *out) {
    out[0] = s->c_epoch;
    out[1] = s->c_step;
    out[2] = CURSOR_TAG;
    out[3] = (int64_t)s->cfg.global_batch;
    out[4] = (int64_t)s->cfg.micro_batch;
}

// A cursor of the former layout: {epoch, step, k positions of step b}.
static int former_cursor(const Stream *s, const int64_t *cur, size_t len) {
    if (len < 3 || cur[2] == CURSOR_TAG) return 0;
    for (size_t j = 2; j < len; j++)
        if (cur[j] < 0 || cur[j] % (int64_t)s->cfg.micro_batch != 0 || cur[j] != cur[2]) return 0;
    return 1;
}

int stream_cursor_set(Stream *s, const int64_t *cur, size_t len) {
    if (s->started)
        return error_set("stream: the cursor can only be set before the first micro-batch");
    if (len == CURSOR_LEN && cur[2] == CURSOR_TAG) {
        if (cur[3] != (int64_t)s->cfg.global_batch || cur[4] != (int64_t)s->cfg.micro_batch)
            return error_set("stream: the cursor is for global batch %lld and micro-batch %lld; "
                             "this run has global batch %zu and micro-batch %zu",
                             (long long)cur[3], (long long)cur[4], s->cfg.global_batch,
                             s->cfg.micro_batch);
    } else if (former_cursor(s, cur, len)) {
        if (len != 2 + s->k || cur[2] != cur[1] * (int64_t)s->cfg.micro_batch)
            return error_set("stream: the cursor holds %zu streams at %lld cells (an earlier "
                             "perfcell); this run has %zu streams of micro-batches of %zu: the "
                             "global batch or the micro-batch changed",
                             len - 2, (long long)cur[2], s->k, s->cfg.micro_batch);
        if (s->rank == 0)
            log_warn("stream: the checkpoint's cursor is from an earlier perfcell whose epochs "
                     "skipped cells; continuing at epoch %lld, step %lld in today's order",
                     (long long)cur[0], (long long)cur[1]);
    } else {
        return error_set("stream: a cursor of %zu values that is neither of this perfcell (%d) "
                         "nor of an earlier one",
                         len, CURSOR_LEN);
    }
    if (cur[0] < 0 || cur[1] < 0) return error_set("stream: negative epoch or step in the cursor");
    if (cur[1] >= s->steps)
        return error_set(
            "stream: cursor step %lld is past the %lld steps of an epoch (%lld training cells: "
            "another shard folder or validation split?)",
            (long long)cur[1], (long long)s->steps, (long long)s->train_cells);
    s->c_epoch = cur[0];
    s->c_step = cur[1];
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
    if (!s->r_plan.perm) plan_init(&s->r_plan, s->n_blocks, s->k); // first replay
    plan_epoch(s, s->r_epoch, &s->r_plan);
    LocalStream *L = &s->r_ls;
    L->j = (size_t)s->rank + i * (size_t)s->size;
    position(s, &s->r_plan, s->r_step, L);
    return take(s, own_reader(s), &s->r_plan, L, out);
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
