// `perfcell finetune`: cell-type fine-tuning from a pretrained checkpoint.
//
// Labelled cells are split into train / validation / test, stratified by
// label (keyed by finetune.split_seed) or as a split file says. Each epoch is
// a keyed permutation of the training cells cut into global batches; rank r
// takes micro-batches j = r, r + N, ... of each step (the same global batches
// for any number of ranks). After each epoch the validation macro-F1 decides
// early stopping and which parameters are kept as the best; at the end the
// best model is evaluated on the validation and test cells. With
// finetune.solver = lbfgs an epoch is instead a round of full-batch L-BFGS on
// the linear head's readout (see Readout below).
#include "perfcell/classifier.h"
#include "perfcell/error.h"
#include "perfcell/lbfgs.h"
#include "perfcell/log.h"
#include "perfcell/pretrain.h"
#include "perfcell/report.h"
#include "perfcell/rng.h"
#include "perfcell/shard_reader.h"
#include "perfcell/tokens.h"
#include "perfcell/train.h"
#include "perfcell/util.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char USAGE[] =
    "usage: mpirun -np N perfcell finetune --config FILE --init PRETRAINED_CKPT [--resume auto|CKPT]\n"
    "                                      [section.key=value ...]\n"
    "\n"
    "Fine-tunes a pretrained model to annotate cell types from the shards' label\n"
    "column. Heads: scBERT's (the default in full mode), a linear readout of the\n"
    "gene slots (the default in nonzero mode) or a pooled MLP (finetune.head);\n"
    "freezing: scBERT's policy (final norm, second-to-last block and head train),\n"
    "none, embeddings (all but the gene and token embeddings train), or all (head\n"
    "only) (finetune.freeze); a frozen encoder's hidden states are computed once\n"
    "(finetune.cache_mib) and the linear head's readout may be trained by\n"
    "full-batch L-BFGS on them (finetune.solver = lbfgs). Early stopping on validation\n"
    "macro-F1. Writes RUN_DIR/best/ (the best model, for `perfcell predict`),\n"
    "RUN_DIR/report_val.{tsv,svg} and, with a test split, RUN_DIR/report_test.*\n"
    "One run per folder: a second command on the same RUN_DIR is refused (the\n"
    "lock file RUN_DIR/perfcell.lock names the running one's host and pid), and a\n"
    "start refused for any reason leaves RUN_DIR as it was.\n"
    "--print-config prints the resolved configuration and exits (no run).\n";

typedef struct {
    int64_t *id;
    size_t n;
} IdList;

static void idlist_push(IdList *l, int64_t id, size_t *cap) {
    if (l->n == *cap) {
        *cap = *cap ? 2 * *cap : 256;
        l->id = xrealloc(l->id, *cap * sizeof *l->id);
    }
    l->id[l->n++] = id;
}

static int cmp_str_idx(const void *a, const void *b, void *names) {
    char **n = names;
    return strcmp(n[*(const int64_t *)a], n[*(const int64_t *)b]);
}

// Cell names of the folder, in cell-id order.
static char **read_cell_names(ShardReader *r, const Manifest *m) {
    char **names = xcalloc((size_t)m->n_cells, sizeof *names);
    for (size_t i = 0; i < m->n_shards; i++) {
        ShardFile *f = shard_reader_file(r, i);
        char **s = NULL;
        if (!f || shard_file_strings(f, "obs/cell", (size_t)f->n_cells, &s) != 0) {
            for (int64_t c = 0; c < m->n_cells; c++) free(names[c]);
            free(names);
            return NULL;
        }
        for (int64_t c = 0; c < f->n_cells; c++) names[f->first_cell + c] = s[c];
        free(s);
    }
    return names;
}

// split[cell] = 0 train, 1 validation, 2 test, -1 unused (unlabelled).
static int read_split_file(const char *path, ShardReader *r, const Manifest *m, int8_t *split) {
    char **names = read_cell_names(r, m);
    if (!names) return -1;
    int64_t n = m->n_cells;
    int64_t *order = xmalloc((size_t)n * sizeof *order);
    for (int64_t i = 0; i < n; i++) order[i] = i;
    qsort_r(order, (size_t)n, sizeof *order, cmp_str_idx, names);
    FILE *f = fopen(path, "r");
    int rc = 0;
    if (!f) rc = error_set("cannot open split file '%s': %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0, no = 0, assigned = 0;
    while (rc == 0 && getline(&line, &cap, f) > 0) {
        no++;
        char *tab = strchr(line, '\t');
        char *s = str_trim(tab ? tab + 1 : line);
        if (!tab) {
            rc = error_set("%s:%zu: expected 'cell<TAB>train|val|test'", path, no);
            break;
        }
        *tab = '\0';
        const char *cell = str_trim(line);
        int8_t which = strcmp(s, "train") == 0 ? 0 : strcmp(s, "val") == 0 ? 1 : strcmp(s, "test") == 0 ? 2 : -2;
        if (which == -2) {
            if (no == 1) continue; // a header line
            rc = error_set("%s:%zu: split '%s' is not train, val or test", path, no, s);
            break;
        }
        // Binary search of the cell name.
        int64_t lo = 0, hi = n;
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if (strcmp(names[order[mid]], cell) < 0) lo = mid + 1;
            else hi = mid;
        }
        if (lo >= n || strcmp(names[order[lo]], cell) != 0) {
            rc = error_set("%s:%zu: cell '%s' is not in the shards", path, no, cell);
            break;
        }
        if (lo + 1 < n && strcmp(names[order[lo + 1]], cell) == 0) {
            rc = error_set("%s:%zu: cell name '%s' is not unique in the shards", path, no, cell);
            break;
        }
        split[order[lo]] = which;
        assigned++;
    }
    if (f) fclose(f);
    free(line);
    free(order);
    for (int64_t i = 0; i < n; i++) free(names[i]);
    free(names);
    if (rc == 0 && assigned == 0) rc = error_set("%s: no cell assigned to a split", path);
    return rc;
}

// The frozen encoder's final hidden states of the training and validation
// cells. With no trainable encoder tensor, no dropout, no feature redraw and
// tokens that do not depend on the step, every epoch would compute the same
// states again; computed once, an epoch trains the head alone. Each rank
// encodes a contiguous share of the cells in micro-batches in id order (the
// same states for a resumed run), then every rank gathers all of them.
typedef struct {
    int64_t *slot;  // (cells of the folder) row of a cached cell, or -1
    int64_t *off;   // (n + 1) token offsets of the rows
    int32_t *gene;  // (tokens) gene slot of each position
    int32_t *token; // (tokens) expression token of each position
    float *hidden;  // (tokens, C); NULL: no cache
    size_t n;
} Cache;

typedef struct {
    Trainer *t;
    const ModelConfig *mc;
    Classifier *cls;
    ShardReader *reader;
    CellBatch cb;
    TokenBatch tb;
    float *logits, *dlogits, *dhidden;
    size_t K, b;
    const Cache *cache;
    const int32_t *label_of; // (cells of the folder) label code or -1
} Ctx;

// Rank r's contiguous share [lo, hi) of n items split over `size` ranks
// (ceil(n / size) each, the last ones shorter or empty).
static void rank_share(size_t n, int r, int size, size_t *lo, size_t *hi) {
    const size_t per = (n + (size_t)size - 1) / (size_t)size;
    *lo = per * (size_t)r < n ? per * (size_t)r : n;
    *hi = *lo + per < n ? *lo + per : n;
}

static void cache_free(Cache *k) {
    free(k->slot), free(k->off), free(k->gene), free(k->token), free(k->hidden);
    memset(k, 0, sizeof *k);
}

static int cache_has(const Cache *k, const int64_t *ids, size_t n) {
    if (!k->hidden) return 0;
    for (size_t i = 0; i < n; i++)
        if (k->slot[ids[i]] < 0) return 0;
    return 1;
}

// tb from cached cells.
static void cache_batch(const Cache *k, const int64_t *ids, size_t n, TokenBatch *tb, const int32_t *label_of) {
    size_t T = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t s = k->slot[ids[i]];
        T += (size_t)(k->off[s + 1] - k->off[s]);
    }
    tokenbatch_reserve(tb, n, T);
    tb->n_cells = n;
    tb->n_tokens = T;
    tb->offset[0] = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t s = k->slot[ids[i]], t0 = tb->offset[i], len = k->off[s + 1] - k->off[s];
        memcpy(tb->gene + t0, k->gene + k->off[s], (size_t)len * sizeof *tb->gene);
        memcpy(tb->token + t0, k->token + k->off[s], (size_t)len * sizeof *tb->token);
        for (int64_t j = t0; j < t0 + len; j++) tb->target[j] = -1;
        tb->offset[i + 1] = t0 + len;
        tb->cell_id[i] = ids[i];
        tb->label[i] = label_of[ids[i]];
    }
}

// The cached hidden states of tb's cells into hidden (T, C).
static void cache_hidden(const Cache *k, const TokenBatch *tb, float *hidden, size_t C) {
    for (size_t i = 0; i < tb->n_cells; i++) {
        int64_t s = k->slot[tb->cell_id[i]];
        memcpy(hidden + (size_t)tb->offset[i] * C, k->hidden + (size_t)k->off[s] * C,
               (size_t)(k->off[s + 1] - k->off[s]) * C * sizeof *hidden);
    }
}

// Cells `ids` read, tokenised and encoded (no dropout) into x->tb and the
// model's hidden states; 0, or -1 when a read fails.
static int read_encode(Ctx *x, const int64_t *ids, size_t n) {
    Trainer *t = x->t;
    PassCtx ctx = {t->seed, 0, 0, 0};
    cellbatch_clear(&x->cb);
    if (shard_reader_read_ids(x->reader, ids, n, &x->cb) != 0) return -1;
    tokens_from_cells(&x->tb, &x->cb, x->mc, t->seed, 0);
    model_forward(&t->model, &x->tb, &ctx);
    return 0;
}

// The same from the cache when it holds all of the cells.
static int load_encoded(Ctx *x, const int64_t *ids, size_t n) {
    if (!cache_has(x->cache, ids, n)) return read_encode(x, ids, n);
    cache_batch(x->cache, ids, n, &x->tb, x->label_of);
    cache_hidden(x->cache, &x->tb, x->t->model.hidden, x->mc->dim);
    return 0;
}

// Cache the cells of a and b (ascending ids) when the encoder is frozen and
// the states fit in cap_bytes; otherwise log why not (when it matters) and
// return the reason. ntok: tokens of every cell of the folder. Collective.
static const char *cache_build(Cache *k, Ctx *x, const IdList *a, const IdList *b, const int32_t *ntok,
                        int64_t n_folder, int64_t max_nnz, double cap_bytes) {
    Trainer *t = x->t;
    const ModelConfig *mc = x->mc;
    const size_t C = mc->dim;
    memset(k, 0, sizeof *k);
    if (t->model.any_trainable) return "encoder tensors train (finetune.freeze is not all)";
    if (cap_bytes <= 0) return "finetune.cache_mib is 0";
    const char *why = NULL;
    if (mc->dropout_emb > 0 || mc->dropout_attn > 0 || mc->dropout_ff > 0)
        why = "the model has dropout (set model.dropout_emb, dropout_attn and dropout_ff to 0)";
    else if (mc->feature_redraw_interval > 0)
        why = "random features are redrawn (set model.feature_redraw_interval = 0)";
    else if (mc->mode == SEQ_NONZERO && mc->max_tokens > 0 && (size_t)max_nnz > mc->max_tokens)
        why = "cells keep a different sample of their genes each step (data.max_tokens)";
    size_t n = a->n + b->n;
    int64_t *ids = xmalloc((n ? n : 1) * sizeof *ids);
    size_t ia = 0, ib = 0;
    for (size_t i = 0; i < n; i++)
        ids[i] = ib >= b->n || (ia < a->n && a->id[ia] < b->id[ib]) ? a->id[ia++] : b->id[ib++];
    double tokens = 0;
    for (size_t i = 0; i < n; i++) tokens += ntok[ids[i]];
    double bytes = tokens * (double)C * sizeof(float);
    if (!why && bytes > cap_bytes)
        why = "the hidden states would exceed finetune.cache_mib";
    if (!why && tokens * (double)C >= (double)INT32_MAX) why = "the hidden states exceed 2^31 values";
    if (why) {
        log_info("finetune: the frozen encoder runs every epoch: %s (%.0f MiB of hidden states)", why,
                 bytes / 1048576.0);
        free(ids);
        return why;
    }
    double t0 = time_now();
    k->n = n;
    k->slot = xmalloc((size_t)n_folder * sizeof *k->slot);
    for (int64_t c = 0; c < n_folder; c++) k->slot[c] = -1;
    k->off = xmalloc((n + 1) * sizeof *k->off);
    k->off[0] = 0;
    for (size_t i = 0; i < n; i++) {
        k->slot[ids[i]] = (int64_t)i;
        k->off[i + 1] = k->off[i] + ntok[ids[i]];
    }
    k->gene = xmalloc(((size_t)k->off[n] + 1) * sizeof *k->gene);
    k->token = xmalloc(((size_t)k->off[n] + 1) * sizeof *k->token);
    k->hidden = floats_alloc((size_t)k->off[n] * C + 1);
    int *cnt_h = xmalloc((size_t)t->size * sizeof(int)), *dsp_h = xmalloc((size_t)t->size * sizeof(int));
    int *cnt_g = xmalloc((size_t)t->size * sizeof(int)), *dsp_g = xmalloc((size_t)t->size * sizeof(int));
    for (int r = 0; r < t->size; r++) {
        size_t lo, hi;
        rank_share(n, r, t->size, &lo, &hi);
        cnt_g[r] = (int)(k->off[hi] - k->off[lo]);
        dsp_g[r] = (int)k->off[lo];
        cnt_h[r] = cnt_g[r] * (int)C;
        dsp_h[r] = dsp_g[r] * (int)C;
    }
    size_t lo, hi;
    rank_share(n, t->rank, t->size, &lo, &hi);
    int ok = 1;
    for (size_t i = lo; i < hi && ok; i += x->b) {
        size_t nb = hi - i < x->b ? hi - i : x->b;
        if (read_encode(x, ids + i, nb) != 0) {
            ok = 0;
            break;
        }
        if ((int64_t)x->tb.n_tokens != k->off[i + nb] - k->off[i]) {
            ok = !error_set("internal: cells %lld.. have %zu tokens, expected %lld", (long long)ids[i],
                            x->tb.n_tokens, (long long)(k->off[i + nb] - k->off[i]));
            break;
        }
        memcpy(k->hidden + (size_t)k->off[i] * C, t->model.hidden, x->tb.n_tokens * C * sizeof(float));
        memcpy(k->gene + k->off[i], x->tb.gene, x->tb.n_tokens * sizeof *k->gene);
        memcpy(k->token + k->off[i], x->tb.token, x->tb.n_tokens * sizeof *k->token);
    }
    int all = 0;
    CHECK_MPI(MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (!all) DIE("encoding the training cells failed: %s", ok ? "a read failed on another rank" : error_last());
    CHECK_MPI(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, k->hidden, cnt_h, dsp_h, MPI_FLOAT,
                             MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, k->gene, cnt_g, dsp_g, MPI_INT32_T,
                             MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, k->token, cnt_g, dsp_g, MPI_INT32_T,
                             MPI_COMM_WORLD));
    free(cnt_h), free(dsp_h), free(cnt_g), free(dsp_g), free(ids);
    log_info("finetune: frozen encoder: hidden states of %zu training and validation cells computed once "
             "(%.0f MiB per rank, %.1f s); epochs train the head alone",
             n, bytes / 1048576.0, time_now() - t0);
    return NULL;
}

// finetune.solver = lbfgs. With the encoder frozen and cached and the linear
// head's slot projection fixed, every training cell's ReLU slot values are
// fixed features, and training the readout (fc: K x T weights and K biases)
// is a class-weighted, L2-regularised multinomial logistic regression on
// them, the convex problem scikit-learn's LogisticRegression solves with
// L-BFGS:
//   f(W, b) = Σ_i w_{y_i} CE(W s_i + b, y_i) / Σ_i w_{y_i} + λ/2 |W|²
// Each rank holds the slot values of a contiguous share of the training
// cells (sparse: one value per position) and evaluates its part in double;
// one all-reduce per evaluation sums the parts. classifier_forward computes
// the same logits from the same slot values (for validation, test, predict).
typedef struct {
    size_t n;            // cells of this rank
    int64_t *off;        // (n + 1) positions of each cell
    int32_t *slot;       // gene slot of each position
    float *value;        // ReLU slot value of each position
    int32_t *label;      // (n)
    const double *cw;    // class weights, or NULL
    double wsum;         // Σ class weight over all training cells
    double lambda;       // L2 coefficient of W
    size_t K, T;         // classes, slots per cell (genes + 1)
    double *gl, *z;      // local gradient (K T + K), logits of one cell (K)
    double ce;           // weighted cross-entropy of the last evaluation
} Readout;

static void readout_build(Readout *r, Ctx *x, const IdList *train, const double *cw, double lambda) {
    Trainer *t = x->t;
    memset(r, 0, sizeof *r);
    size_t lo, hi;
    rank_share(train->n, t->rank, t->size, &lo, &hi);
    r->n = hi - lo;
    r->K = x->K;
    r->T = x->cls->T_cell;
    r->cw = cw;
    r->lambda = lambda;
    r->off = xmalloc((r->n + 1) * sizeof *r->off);
    r->label = xmalloc((r->n + 1) * sizeof *r->label);
    r->off[0] = 0;
    size_t cap = 1;
    for (size_t i = lo; i < hi; i++) {
        int64_t s = x->cache->slot[train->id[i]];
        cap += (size_t)(x->cache->off[s + 1] - x->cache->off[s]);
    }
    r->slot = xmalloc(cap * sizeof *r->slot);
    r->value = xmalloc(cap * sizeof *r->value);
    double wl = 0;
    for (size_t i = lo; i < hi; i += x->b) {
        size_t nb = hi - i < x->b ? hi - i : x->b;
        load_encoded(x, train->id + i, nb);
        int64_t p0 = r->off[i - lo];
        classifier_slot_values(x->cls, &t->model, &x->tb, r->value + p0);
        memcpy(r->slot + p0, x->tb.gene, x->tb.n_tokens * sizeof *r->slot);
        for (size_t c = 0; c < nb; c++) {
            r->off[i - lo + c + 1] = p0 + x->tb.offset[c + 1];
            r->label[i - lo + c] = x->tb.label[c];
            if (x->tb.label[c] >= 0) wl += cw ? cw[x->tb.label[c]] : 1.0;
        }
    }
    CHECK_MPI(MPI_Allreduce(&wl, &r->wsum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    r->gl = xmalloc((r->K * r->T + r->K) * sizeof *r->gl);
    r->z = xmalloc(r->K * sizeof *r->z);
}

static void readout_free(Readout *r) {
    free(r->off), free(r->slot), free(r->value), free(r->label), free(r->gl), free(r->z);
    memset(r, 0, sizeof *r);
}

// v = [W (K x T, row-major as cls.fc.weight), b (K)]. Collective.
static double readout_objective(const double *v, double *g, void *ctx) {
    Readout *r = ctx;
    const size_t K = r->K, T = r->T, nv = K * T + K;
    const double *W = v, *bias = v + K * T;
    memset(r->gl, 0, nv * sizeof *r->gl);
    double loss = 0;
    for (size_t i = 0; i < r->n; i++) {
        int y = r->label[i];
        if (y < 0) continue;
        const int64_t p0 = r->off[i], p1 = r->off[i + 1];
        double zmax = -INFINITY;
        for (size_t k = 0; k < K; k++) {
            double z = bias[k];
            const double *wk = W + k * T;
            for (int64_t p = p0; p < p1; p++) z += wk[r->slot[p]] * (double)r->value[p];
            r->z[k] = z;
            if (z > zmax) zmax = z;
        }
        const double zy = r->z[y] - zmax;
        double sum = 0;
        for (size_t k = 0; k < K; k++) sum += (r->z[k] = exp(r->z[k] - zmax)); // unnormalised softmax
        double w = (r->cw ? r->cw[y] : 1.0) / r->wsum;
        loss += w * (log(sum) - zy);
        for (size_t k = 0; k < K; k++) {
            double dz = w * (r->z[k] / sum - (k == (size_t)y ? 1.0 : 0.0));
            double *gk = r->gl + k * T;
            for (int64_t p = p0; p < p1; p++) gk[r->slot[p]] += dz * (double)r->value[p];
            r->gl[K * T + k] += dz;
        }
    }
    CHECK_MPI(MPI_Allreduce(r->gl, g, (int)nv, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allreduce(&loss, &r->ce, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    double pen = 0;
    for (size_t i = 0; i < K * T; i++) {
        pen += W[i] * W[i];
        g[i] += r->lambda * W[i];
    }
    return r->ce + 0.5 * r->lambda * pen;
}

// v = the readout as stored (cls.fc.weight, then cls.fc.bias).
static void readout_get(const Model *m, const ParamEntry *w, const ParamEntry *b, double *v) {
    for (size_t i = 0; i < w->size; i++) v[i] = m->params[w->offset + i];
    for (size_t i = 0; i < b->size; i++) v[w->size + i] = m->params[b->offset + i];
}

// Store v (rounded to float), and round v to what is stored.
static void readout_set(Model *m, const ParamEntry *w, const ParamEntry *b, double *v) {
    for (size_t i = 0; i < w->size; i++) v[i] = m->params[w->offset + i] = (float)v[i];
    for (size_t i = 0; i < b->size; i++) v[w->size + i] = m->params[b->offset + i] = (float)v[w->size + i];
}

typedef struct {
    Trainer *t;
    double *last_ckpt, start;
} ReadoutStop;

// A stop signal or run.max_minutes ends the round (collective).
static int readout_stop(void *ctx) {
    ReadoutStop *s = ctx;
    return trainer_step_flags(s->t, s->last_ckpt, s->start).stop;
}

// A checkpoint inside an epoch: the cursor (epoch, step in epoch) as it
// stands, with the best macro-F1 (x 1e6) and the epochs without improvement.
static void checkpoint_progress(Trainer *t, double best_f1, int64_t bad_epochs) {
    t->cursor[2] = (int64_t)llround(best_f1 * 1e6);
    t->cursor[3] = bad_epochs;
    trainer_checkpoint(t, NULL, 0);
}

#define SLOT_INIT_CELLS 256

// Solve A x = b for symmetric positive definite A (D, D), only its lower
// triangle read: Cholesky A = L Lᵀ in place, then two triangular solves;
// x replaces b. 0, or -1 when A is not positive definite.
static int cholesky_solve(double *A, double *b, size_t D) {
    for (size_t j = 0; j < D; j++) {
        double d = A[j * D + j];
        for (size_t k = 0; k < j; k++) d -= A[j * D + k] * A[j * D + k];
        if (!(d > 0)) return -1;
        A[j * D + j] = sqrt(d);
        for (size_t i = j + 1; i < D; i++) {
            double v = A[i * D + j];
            for (size_t k = 0; k < j; k++) v -= A[i * D + k] * A[j * D + k];
            A[i * D + j] = v / A[j * D + j];
        }
    }
    for (size_t i = 0; i < D; i++) {
        for (size_t k = 0; k < i; k++) b[i] -= A[i * D + k] * b[k];
        b[i] /= A[i * D + i];
    }
    for (size_t i = D; i-- > 0;) {
        for (size_t k = i + 1; k < D; k++) b[i] -= A[k * D + i] * b[k];
        b[i] /= A[i * D + i];
    }
    return 0;
}

// A fresh linear head's slot projection: the least-squares readout of each
// gene position's own expression token from its final hidden state, over the
// first training cells (ridge 1e-6 of the mean diagonal), so that the slots
// start as the cells' expression levels, the features logistic regression
// reads, instead of a random direction (with a random start, the seed alone
// moved pbmc3k's test macro-F1 between 0.69 and 0.92). Rank 0 computes,
// everyone receives. Collective.
static void slot_init(Ctx *x, const IdList *train, float *w, float *bias) {
    Trainer *t = x->t;
    const size_t C = x->mc->dim, D = C + 1, G = x->mc->n_genes;
    int ok = 1;
    double rows = 0;
    if (t->rank == 0) {
        double *A = xcalloc(D * D, sizeof *A), *r = xcalloc(D, sizeof *r), *z = xmalloc(D * sizeof *z);
        size_t n = train->n < SLOT_INIT_CELLS ? train->n : SLOT_INIT_CELLS;
        for (size_t i = 0; i < n && ok; i += x->b) {
            size_t nb = n - i < x->b ? n - i : x->b;
            if (load_encoded(x, train->id + i, nb) != 0) {
                ok = 0;
                break;
            }
            for (size_t p = 0; p < x->tb.n_tokens; p++) {
                if ((size_t)x->tb.gene[p] >= G) continue; // the last position
                const float *h = t->model.hidden + p * C;
                for (size_t a = 0; a < C; a++) z[a] = h[a];
                z[C] = 1.0;
                double y = x->tb.token[p];
                for (size_t a = 0; a < D; a++) {
                    r[a] += z[a] * y;
                    for (size_t c = 0; c <= a; c++) A[a * D + c] += z[a] * z[c];
                }
                rows++;
            }
        }
        double tr = 0;
        for (size_t a = 0; a < D; a++) tr += A[a * D + a];
        for (size_t a = 0; a < D; a++) A[a * D + a] += 1e-6 * tr / (double)D + 1e-12;
        if (ok && cholesky_solve(A, r, D) != 0)
            ok = !error_set("the slot readout's normal equations are not positive definite");
        if (ok) {
            for (size_t a = 0; a < C; a++) w[a] = (float)r[a];
            *bias = (float)r[C];
        }
        free(A), free(r), free(z);
    }
    int all = 0;
    CHECK_MPI(MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (!all) DIE("initialising the linear head: %s", ok ? "failed on rank 0" : error_last());
    CHECK_MPI(MPI_Bcast(w, (int)C, MPI_FLOAT, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Bcast(bias, 1, MPI_FLOAT, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Bcast(&rows, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD));
    log_info("finetune: linear head: slots start as the expression readout fitted on %.0f positions", rows);
}

// Evaluate cells `ids` (split over ranks): confusion matrix (summed over
// ranks, complete on every rank) and mean loss. Collective.
static double evaluate(Ctx *x, const IdList *ids, Confusion *conf) {
    Trainer *t = x->t;
    size_t lo, hi;
    rank_share(ids->n, t->rank, t->size, &lo, &hi);
    double loss = 0.0;
    int ok = 1;
    for (size_t i = lo; i < hi && ok; i += x->b) {
        size_t n = hi - i < x->b ? hi - i : x->b;
        if (load_encoded(x, ids->id + i, n) != 0) {
            ok = 0;
            break;
        }
        classifier_forward(x->cls, &t->model, &x->tb, x->logits);
        loss += classifier_loss(NULL, x->logits, x->tb.label, n, x->K, NULL, 1.0, NULL);
        for (size_t c = 0; c < n; c++) {
            const float *z = x->logits + c * x->K;
            size_t am = 0;
            for (size_t k = 1; k < x->K; k++)
                if (z[k] > z[am]) am = k;
            confusion_add(conf, x->tb.label[c], (int)am);
        }
    }
    int all = 0;
    CHECK_MPI(MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (!all) DIE("evaluation failed: %s", ok ? "a read failed on another rank" : error_last());
    size_t KK = conf->K * (conf->K + 1);
    CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, conf->cm, (int)KK, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &conf->n, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &conf->unassigned, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    return ids->n ? loss / (double)ids->n : NAN;
}

// Trainable flags of the freezing policy.
static void apply_freeze(ParamTable *t, const ModelConfig *mc, const char *policy) {
    char keep[64];
    size_t second_last = mc->depth >= 2 ? mc->depth - 2 : 0;
    snprintf(keep, sizeof keep, "performer.net.layers.%zu.", second_last);
    for (size_t i = 0; i < t->n; i++) {
        ParamEntry *e = &t->e[i];
        int head = strncmp(e->name, "to_out.", 7) == 0 || strncmp(e->name, "cls.", 4) == 0;
        if (head) continue;
        int emb = strcmp(e->name, "pos_emb.emb.weight") == 0 || strcmp(e->name, "token_emb.weight") == 0;
        if (strcmp(policy, "all") == 0) {
            e->trainable = 0;
        } else if (strcmp(policy, "embeddings") == 0) {
            e->trainable = !emb;
        } else if (strcmp(policy, "scbert") == 0) {
            e->trainable = strncmp(e->name, "norm.", 5) == 0 || strncmp(e->name, keep, strlen(keep)) == 0;
        } else if (strcmp(e->name, "pos_emb.emb.weight") == 0) {
            e->trainable = !mc->gene_emb_frozen;
        }
    }
}

int cmd_finetune(int argc, char **argv) {
    TrainArgs args;
    int rc = train_args_parse(argc, argv, &args, USAGE);
    if (rc == 1) return 0;
    if (rc != 0) DIE_HINT("see `perfcell finetune --help`", "%s", error_last());
    if (!args.init && !args.resume && !args.print_config)
        DIE_HINT("give the pretrained checkpoint: --init RUN_DIR/checkpoints/ckpt-XXXXXXXX.h5",
                 "perfcell finetune needs --init (or --resume to continue a fine-tuning run)");

    Trainer t;
    trainer_config(&t, &args, TRAIN_SCHEMA, TRAIN_SCHEMA_LEN, "finetune");
    trainer_open_data(&t);
    const Config *cfg = t.cfg;
    const Manifest *man = &t.manifest;
    if (!man->label_key[0] || man->n_labels < 2)
        DIE_HINT("build the shards with --label-key COLUMN (or --labels FILE)",
                 "%s: the shards carry %s", man->folder,
                 man->label_key[0] ? "fewer than two label categories" : "no labels");
    const char *want_key = config_str(cfg, "finetune.label_key");
    if (want_key[0] && strcmp(want_key, man->label_key) != 0)
        DIE_HINT("shards store one label column; rebuild them with --label-key for another",
                 "finetune.label_key = %s but the shards hold labels '%s'", want_key, man->label_key);
    const size_t K = man->n_labels;
    t.labels = man->labels;
    t.n_labels = K;

    ModelConfig mc;
    if (train_model_config(cfg, (size_t)man->n_genes, &mc) != 0)
        DIE_HINT("check the [model] section", "%s", error_last());
    ClsConfig cc = {0};
    const char *head = config_str(cfg, "finetune.head");
    cc.kind = cls_kind_of(head, mc.mode);
    cc.n_classes = K;
    cc.hidden = (size_t)config_int(cfg, "finetune.hidden");
    cc.pool_mean = strcmp(config_str(cfg, "finetune.pooling"), "mean") == 0;

    // Splits (rank 0 computes, everyone receives).
    ShardReader *reader = shard_reader_open_manifest(man, 0);
    if (!reader) DIE("%s", error_last());
    int8_t *split = xmalloc((size_t)man->n_cells);
    int32_t *label_of = xmalloc((size_t)man->n_cells * sizeof *label_of);
    int32_t *ntok_of = xmalloc((size_t)man->n_cells * sizeof *ntok_of); // tokens of each cell
    int ok = 1;
    if (t.rank == 0) {
        for (size_t i = 0; i < man->n_shards && ok; i++) {
            ShardFile *f = shard_reader_file(reader, i);
            if (!f) {
                ok = 0;
                break;
            }
            memcpy(label_of + f->first_cell, f->label, (size_t)f->n_cells * sizeof *label_of);
            for (int64_t c = 0; c < f->n_cells; c++)
                ntok_of[f->first_cell + c] =
                    (int32_t)tokens_cell_length(&mc, (size_t)(f->indptr[c + 1] - f->indptr[c]));
        }
        memset(split, -1, (size_t)man->n_cells);
        const char *sf = config_str(cfg, "finetune.split_file");
        if (ok && sf[0]) {
            ok = read_split_file(sf, reader, man, split) == 0;
            for (int64_t c = 0; ok && c < man->n_cells; c++)
                if (label_of[c] < 0) split[c] = -1;
        } else if (ok) {
            double tf = config_float(cfg, "finetune.test_fraction");
            double vf = config_float(cfg, "finetune.val_fraction");
            uint64_t ss = (uint64_t)config_int(cfg, "finetune.split_seed");
            uint32_t *members = xmalloc((size_t)man->n_cells * sizeof *members);
            for (size_t k = 0; k < K; k++) {
                size_t n = 0;
                for (int64_t c = 0; c < man->n_cells; c++)
                    if (label_of[c] == (int32_t)k) members[n++] = (uint32_t)c;
                Rng r = rng_init(ss, RNG_FINETUNE, 0, k, 0);
                rng_shuffle_u32(&r, members, n);
                size_t n_test = (size_t)llround(tf * (double)n);
                size_t n_val = (size_t)llround(vf * (double)n);
                if (n >= 2 && n_val == 0 && vf > 0) n_val = 1;
                if (n_test + n_val > n) n_val = n - n_test;
                for (size_t i = 0; i < n; i++)
                    split[members[i]] = i < n_test ? 2 : i < n_test + n_val ? 1 : 0;
            }
            free(members);
        }
    }
    CHECK_MPI(MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (!ok) DIE_HINT("a split file holds lines 'cell<TAB>train|val|test'", "%s", error_last());
    CHECK_MPI(MPI_Bcast(split, (int)man->n_cells, MPI_INT8_T, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Bcast(label_of, (int)man->n_cells, MPI_INT32_T, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Bcast(ntok_of, (int)man->n_cells, MPI_INT32_T, 0, MPI_COMM_WORLD));
    IdList train = {0}, val = {0}, test = {0};
    size_t ctr = 0, cva = 0, cte = 0;
    for (int64_t c = 0; c < man->n_cells; c++) {
        if (split[c] == 0) idlist_push(&train, c, &ctr);
        else if (split[c] == 1) idlist_push(&val, c, &cva);
        else if (split[c] == 2) idlist_push(&test, c, &cte);
    }
    // Class weights from the training split (scikit-learn's "balanced").
    double *cw = NULL;
    int64_t *per_class = xcalloc(K, sizeof *per_class);
    if (t.rank == 0)
        for (size_t i = 0; i < train.n; i++) per_class[label_of[train.id[i]]]++;
    CHECK_MPI(MPI_Bcast(per_class, (int)K, MPI_INT64_T, 0, MPI_COMM_WORLD));
    if (config_bool(cfg, "finetune.class_weights")) {
        cw = xcalloc(K, sizeof *cw);
        for (size_t k = 0; k < K; k++)
            cw[k] = per_class[k] ? (double)train.n / ((double)K * (double)per_class[k]) : 0.0;
    }
    free(split);

    const size_t b = (size_t)config_int(cfg, "batch.micro_batch");
    size_t G = (size_t)config_int(cfg, "batch.global_batch");
    if (G == 0) G = b * (size_t)config_int(cfg, "batch.accumulation") * (size_t)t.size;
    if (G % b != 0 || (G / b) % (size_t)t.size != 0)
        DIE_HINT("choose batch.global_batch = micro_batch x accumulation x ranks",
                 "batch.global_batch %zu is not a multiple of batch.micro_batch %zu x %d ranks", G, b, t.size);
    if (train.n < G)
        DIE_HINT("lower batch.global_batch or finetune.val_fraction",
                 "%zu training cells, fewer than the global batch of %zu", train.n, G);
    const size_t k_mb = G / b, local_mb = k_mb / (size_t)t.size;
    const int64_t steps_per_epoch = (int64_t)(train.n / G);

    int64_t max_nnz = trainer_max_cell_nnz(&t);
    const size_t per_cell = tokens_cell_length(&mc, (size_t)max_nnz);
    ParamTable table;
    param_table_init(&table);
    model_table_add_encoder(&table, &mc);
    classifier_head_add(&table, &mc, &cc);
    apply_freeze(&table, &mc, config_str(cfg, "finetune.freeze"));
    const int lbfgs = strcmp(config_str(cfg, "finetune.solver"), "lbfgs") == 0;
    if (lbfgs) {
        if (cc.kind != CLS_LINEAR)
            DIE_HINT("set finetune.head = linear, or finetune.solver = minibatch",
                     "finetune.solver = lbfgs trains the linear head's readout; this head is %s",
                     config_str(cfg, "finetune.head"));
        // The slot projection stays the expression readout (slot_init).
        for (size_t i = 0; i < table.n; i++)
            if (strncmp(table.e[i].name, "cls.slot.", 9) == 0) table.e[i].trainable = 0;
    }
    trainer_build_model(&t, &mc, &table, b * per_cell, b, per_cell);
    int resumed = args.resume ? trainer_resume(&t, args.resume, NULL) : 0;
    if (!resumed) {
        if (!args.init)
            DIE_HINT("start fine-tuning with --init PRETRAINED_CKPT", "no fine-tuning checkpoint to resume in %s",
                     t.ckpt_dir);
        // The encoder (and its random features) from the pretrained checkpoint.
        int good = 1;
        if (t.rank == 0) {
            CkptState s;
            memset(&s, 0, sizeof s);
            size_t missing = 0, unused = 0;
            good = ckpt_read(args.init, &s) == 0;
            if (good && s.vocab_hash != t.vocab_hash) {
                char a[17], bh[17];
                vocab_hash_format(s.vocab_hash, a);
                vocab_hash_format(t.vocab_hash, bh);
                good = !error_set("%s was pretrained with vocabulary %s, the shards use %s", args.init, a, bh);
            }
            if (good && ckpt_copy_tensors(&s, &t.model.table, t.model.params, &missing, &unused) != 0) {
                char why[1024];
                snprintf(why, sizeof why, "%s", error_last());
                good = !error_set("%s does not fit this model: %s (check the [model] section)", args.init, why);
            }
            size_t head_tensors = cls_tensor_count(cc.kind);
            if (good && missing > head_tensors)
                good = !error_set("%s lacks %zu encoder tensors of this model (check the [model] section)",
                                  args.init, missing - head_tensors);
            if (good && (s.depth != mc.depth || s.n_features != mc.n_features || s.dim_head != mc.dim_head))
                good = !error_set("%s: random features of another shape", args.init);
            if (good)
                memcpy(t.model.proj, s.proj, mc.depth * mc.n_features * mc.dim_head * sizeof(float));
            if (good) log_info("init: encoder from %s (%zu tensors not used)", args.init, unused);
            ckpt_state_free(&s);
        }
        CHECK_MPI(MPI_Bcast(&good, 1, MPI_INT, 0, MPI_COMM_WORLD));
        if (!good) DIE_HINT("fine-tune from a pretraining checkpoint of the same model and vocabulary", "%s", error_last());
        CHECK_MPI(MPI_Bcast(t.model.params, (int)t.model.table.total, MPI_FLOAT, 0, MPI_COMM_WORLD));
        CHECK_MPI(MPI_Bcast(t.model.proj, (int)(mc.depth * mc.n_features * mc.dim_head), MPI_FLOAT, 0,
                            MPI_COMM_WORLD));
        t.cursor_len = 4;
        memset(t.cursor, 0, sizeof t.cursor);
    }

    Classifier cls;
    classifier_init(&cls, &t.model, &cc);
    Cache cache = {0};
    Ctx x = {&t, &mc, &cls, reader, {0}, {0}, NULL, NULL, NULL, K, b, &cache, label_of};
    cellbatch_init(&x.cb);
    tokenbatch_init(&x.tb);
    x.logits = floats_alloc(b * K);
    x.dlogits = floats_alloc(b * K);
    x.dhidden = floats_alloc(b * per_cell * mc.dim);
    const char *no_cache = cache_build(&cache, &x, &train, &val, ntok_of, man->n_cells, max_nnz,
                                       (double)config_int(cfg, "finetune.cache_mib") * 1048576.0);
    if (lbfgs && no_cache)
        DIE_HINT("freeze the encoder without dropout (see finetune.cache_mib), or set finetune.solver = minibatch",
                 "finetune.solver = lbfgs needs the frozen encoder's cached hidden states, but none are kept: %s",
                 no_cache);
    free(ntok_of);
    trainer_begin(&t, resumed);
    trainer_install_signals();
    if (!resumed && cc.kind == CLS_LINEAR) {
        const ParamEntry *sw = param_table_find(&t.model.table, "cls.slot.weight");
        const ParamEntry *sb = param_table_find(&t.model.table, "cls.slot.bias");
        slot_init(&x, &train, t.model.params + sw->offset, t.model.params + sb->offset);
    }
    Readout ro = {0};
    const ParamEntry *fcw = param_table_find(&t.model.table, "cls.fc.weight");
    const ParamEntry *fcb = param_table_find(&t.model.table, "cls.fc.bias");
    const size_t nv = lbfgs ? fcw->size + fcb->size : 0;
    double *v = lbfgs ? xmalloc(nv * sizeof *v) : NULL, *vg = lbfgs ? xmalloc(nv * sizeof *vg) : NULL;
    // Converged as scikit-learn's LogisticRegression (tol 1e-4 on the largest gradient entry).
    LbfgsConfig lcfg = {10, (int)config_int(cfg, "finetune.lbfgs_iters"), 1e-4, 1e-9};
    if (lbfgs) readout_build(&ro, &x, &train, cw, config_float(cfg, "optim.weight_decay"));
    // The best model so far: parameters and the random features they were
    // trained with (features are redrawn during training).
    const size_t P = t.model.table.total;
    const size_t NP = mc.depth * mc.n_features * mc.dim_head;
    float *best = floats_alloc(P), *best_proj = floats_alloc(NP);
    memcpy(best, t.model.params, P * sizeof *best);
    memcpy(best_proj, t.model.proj, NP * sizeof *best_proj);
    // cursor: epoch, step in epoch, best macro-F1 (x 1e6), epochs without improvement
    double best_f1 = resumed ? (double)t.cursor[2] / 1e6 : -1.0;
    int64_t bad_epochs = resumed ? t.cursor[3] : 0;
    const int64_t epochs = config_int(cfg, "finetune.epochs");
    const int64_t patience = config_int(cfg, "finetune.patience");
    char *best_dir = path_join(t.run_dir, "best");
    if (t.rank == 0 && path_mkdir_p(best_dir) != 0) DIE("%s", error_last());
    if (resumed && best_f1 >= 0) {
        // The best parameters so far live in RUN_DIR/best.
        int good = 1;
        if (t.rank == 0) {
            char *bp = ckpt_resolve(best_dir, "auto");
            CkptState s;
            memset(&s, 0, sizeof s);
            good = bp && ckpt_read(bp, &s) == 0 && ckpt_copy_tensors(&s, &t.model.table, best, NULL, NULL) == 0;
            if (good && s.proj) memcpy(best_proj, s.proj, NP * sizeof *best_proj);
            if (bp) ckpt_state_free(&s);
            free(bp);
        }
        CHECK_MPI(MPI_Bcast(&good, 1, MPI_INT, 0, MPI_COMM_WORLD));
        if (!good) DIE("cannot read the best checkpoint in %s", best_dir);
        CHECK_MPI(MPI_Bcast(best, (int)P, MPI_FLOAT, 0, MPI_COMM_WORLD));
        CHECK_MPI(MPI_Bcast(best_proj, (int)NP, MPI_FLOAT, 0, MPI_COMM_WORLD));
    }

    static const char *const HEAD_NAMES[3] = {"scbert", "pooled", "linear"};
    log_info("finetune: %zu classes, cells: %zu train, %zu validation, %zu test; head %s, freeze %s, "
             "%zu trainable parameters; %lld steps per epoch of %zu cells (%lld cells per epoch, %lld left out, a "
             "window that moves every epoch), %lld epochs at most",
             K, train.n, val.n, test.n, HEAD_NAMES[cc.kind],
             config_str(cfg, "finetune.freeze"), param_table_trainable(&t.model.table),
             (long long)steps_per_epoch, G, (long long)(steps_per_epoch * (int64_t)G),
             (long long)(train.n - (size_t)steps_per_epoch * G), (long long)epochs);

    const double start = time_now();
    double last_ckpt = start;
    const int64_t ckpt_every = config_int(cfg, "checkpoint.every_steps");
    const int64_t log_every = config_int(cfg, "run.log_every");
    int64_t *perm = xmalloc(train.n * sizeof *perm);
    CellBatch *cbs = xcalloc(local_mb, sizeof *cbs);
    TokenBatch *tbs = xcalloc(local_mb, sizeof *tbs);
    for (size_t m = 0; m < local_mb; m++) {
        cellbatch_init(&cbs[m]);
        tokenbatch_init(&tbs[m]);
    }
    uint32_t *pidx = xmalloc(train.n * sizeof *pidx);
    int stop = 0, early = 0;
    while (!stop && !early && t.cursor[0] < epochs) {
        const int64_t epoch = t.cursor[0];
        if (!lbfgs) {
            // Every training cell but the remainder's moving window (stream.h).
            size_t n_used = 0;
            for (size_t i = 0; i < train.n; i++)
                if (!stream_is_left_out((int64_t)train.n, (int64_t)G, epoch, (int64_t)i)) pidx[n_used++] = (uint32_t)i;
            Rng r = rng_init(t.seed, RNG_FINETUNE, 1, (uint64_t)epoch, 0);
            rng_shuffle_u32(&r, pidx, n_used);
            for (size_t i = 0; i < n_used; i++) perm[i] = train.id[pidx[i]];
        }
        double ep_loss = 0, ep_n = 0, ep_hit = 0, t_epoch = time_now();
        double tr_loss = 0, tr_acc = 0; // of the epoch
        int converged = 0;
        if (lbfgs) {
            // One round from a fresh history; the parameters change only when
            // it completes, so a stop inside it checkpoints the round's start.
            readout_get(&t.model, fcw, fcb, v);
            ReadoutStop rs = {&t, &last_ckpt, start};
            LbfgsResult res;
            lbfgs_minimize(v, nv, readout_objective, &ro, readout_stop, &rs, &lcfg, &res);
            if (res.status == LBFGS_STOPPED) {
                checkpoint_progress(&t, best_f1, bad_epochs);
                log_info("epoch %lld (L-BFGS) restarts from its beginning on resume", (long long)epoch);
                stop = 1;
                break;
            }
            readout_set(&t.model, fcw, fcb, v);
            double fx = readout_objective(v, vg, &ro); // at the parameters as stored
            t.step += res.iterations;
            t.cells_seen += (int64_t)train.n * res.evaluations;
            converged = res.status == LBFGS_CONVERGED || res.status == LBFGS_NO_PROGRESS;
            log_info("epoch %lld: L-BFGS %d iterations, %d evaluations: objective %.8g = cross-entropy %.8g + "
                     "L2 %.8g, max |gradient| %.2e (%s)",
                     (long long)epoch, res.iterations, res.evaluations, fx, ro.ce, fx - ro.ce, res.gmax,
                     lbfgs_status_name(res.status));
            // The training loss and accuracy as validation measures them (the
            // head's own forward pass, unweighted).
            Confusion tc;
            confusion_init(&tc, K, man->labels);
            tr_loss = evaluate(&x, &train, &tc);
            tr_acc = confusion_accuracy(&tc);
            confusion_free(&tc);
        }
        while (!lbfgs && t.cursor[1] < steps_per_epoch) {
            const int64_t s = t.cursor[1];
            trainer_maybe_redraw(&t);
            model_zero_grad(&t.model);
            // The global normaliser: Σ of the class weights over the global batch.
            double wsum = 0;
            double loss_local = 0;
            int64_t hit = 0;
            int rok = 1;
            PassCtx ctx = {t.seed, t.step, 0, 1};
            // First read and tokenise this rank's micro-batches (labels known), then
            // agree on the normaliser, then forward/backward.
            double wl = 0;
            for (size_t m = 0; m < local_mb && rok; m++) {
                size_t j = (size_t)t.rank + m * (size_t)t.size;
                const int64_t *mb_ids = perm + (size_t)s * G + j * b;
                if (cache.hidden) {
                    cache_batch(&cache, mb_ids, b, &tbs[m], label_of);
                } else {
                    cellbatch_clear(&cbs[m]);
                    rok = shard_reader_read_ids(reader, mb_ids, b, &cbs[m]) == 0;
                    if (!rok) break;
                    tokens_from_cells(&tbs[m], &cbs[m], &mc, t.seed, t.step);
                }
                for (size_t c = 0; c < b; c++) wl += cw ? cw[tbs[m].label[c]] : 1.0;
            }
            int all = 0;
            CHECK_MPI(MPI_Allreduce(&rok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
            if (!all) DIE("reading training cells failed: %s", rok ? "on another rank" : error_last());
            CHECK_MPI(MPI_Allreduce(&wl, &wsum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
            for (size_t m = 0; m < local_mb; m++) {
                if (cache.hidden) cache_hidden(&cache, &tbs[m], t.model.hidden, mc.dim);
                else model_forward(&t.model, &tbs[m], &ctx);
                classifier_forward(&cls, &t.model, &tbs[m], x.logits);
                loss_local += classifier_loss(x.dlogits, x.logits, tbs[m].label, b, K, cw, wsum, &hit);
                classifier_backward(&cls, &t.model, &tbs[m], x.dlogits, x.dhidden);
                if (!cache.hidden) model_backward(&t.model, &tbs[m], &ctx, x.dhidden);
            }
            int local_bad = isfinite(loss_local) ? trainer_local_nonfinite(&t) : -2;
            gradsync_allreduce(&t.sync, t.model.grads);
            double lr = 0;
            trainer_optimizer_step(&t, local_bad, &lr);
            double in[2] = {loss_local, (double)hit}, out[2];
            CHECK_MPI(MPI_Allreduce(in, out, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
            ep_loss += out[0];
            ep_n += 1;
            ep_hit += out[1];
            if (t.step % log_every == 0)
                log_info("step %lld (epoch %lld, %lld/%lld) | loss %.4f | acc %.4f | lr %.2e", (long long)t.step,
                         (long long)epoch, (long long)(t.cursor[1] + 1), (long long)steps_per_epoch, out[0],
                         out[1] / (double)G, lr);
            t.cells_seen += (int64_t)G;
            t.cursor[1]++;
            StepFlags f = trainer_step_flags(&t, &last_ckpt, start);
            if ((ckpt_every > 0 && t.step % ckpt_every == 0) || f.checkpoint || f.stop)
                checkpoint_progress(&t, best_f1, bad_epochs);
            if (f.stop) {
                stop = 1;
                break;
            }
        }
        if (stop) break;
        if (!lbfgs) {
            tr_loss = ep_loss / ep_n;
            tr_acc = ep_hit / ((double)G * ep_n);
        }
        t.train_seconds += time_now() - t_epoch;
        // End of epoch: validation, best model, early stopping.
        Confusion conf;
        confusion_init(&conf, K, man->labels);
        double vloss = evaluate(&x, &val, &conf);
        double f1 = confusion_macro_f1(&conf), acc = confusion_accuracy(&conf);
        confusion_free(&conf);
        int improved = f1 > best_f1;
        if (improved) {
            best_f1 = f1;
            bad_epochs = 0;
            memcpy(best, t.model.params, P * sizeof *best);
            memcpy(best_proj, t.model.proj, NP * sizeof *best_proj);
        } else {
            bad_epochs++;
        }
        log_info("epoch %lld: train loss %.4f acc %.4f | validation loss %.4f acc %.4f macro-F1 %.4f%s",
                 (long long)epoch, tr_loss, tr_acc, vloss, acc, f1, improved ? " (best)" : "");
        char js[256];
        snprintf(js, sizeof js,
                 "\"epoch\":%lld,\"loss\":%.6f,\"acc\":%.6f,\"val_loss\":%.6f,\"val_acc\":%.6f,\"val_macro_f1\":%.6f",
                 (long long)epoch, tr_loss, tr_acc, vloss, acc, f1);
        trainer_metrics_write(&t, js);
        t.cursor[0]++;
        t.cursor[1] = 0;
        t.cursor[2] = (int64_t)llround(best_f1 * 1e6);
        t.cursor[3] = bad_epochs;
        if (improved) {
            // RUN_DIR/best holds the best model (for predict and for resume).
            char *keep_dir = t.ckpt_dir;
            t.ckpt_dir = best_dir;
            trainer_checkpoint(&t, NULL, 0);
            t.ckpt_dir = keep_dir;
        }
        trainer_checkpoint(&t, NULL, 0);
        if (patience > 0 && bad_epochs >= patience) {
            log_info("early stop: no better validation macro-F1 for %lld epochs", (long long)bad_epochs);
            early = 1;
        } else if (converged) {
            log_info("L-BFGS converged: training ends");
            early = 1;
        }
    }

    if (!stop) {
        // The best model on the validation and test cells.
        memcpy(t.model.params, best, P * sizeof *best);
        memcpy(t.model.proj, best_proj, NP * sizeof *best_proj);
        const IdList *sets[2] = {&val, &test};
        const char *names[2] = {"validation", "test"}, *files[2] = {"report_val", "report_test"};
        for (int i = 0; i < 2; i++) {
            if (sets[i]->n == 0) continue;
            Confusion conf;
            confusion_init(&conf, K, man->labels);
            evaluate(&x, sets[i], &conf);
            if (t.rank == 0) {
                char title[128];
                snprintf(title, sizeof title, "%s cells, best model (validation macro-F1 %.4f)", names[i], best_f1);
                confusion_print(&conf, stdout, title);
                char *prefix = path_join(t.run_dir, files[i]);
                if (confusion_write(&conf, prefix, title) != 0) log_warn("%s", error_last());
                else log_info("wrote %s.tsv and %s.svg", prefix, prefix);
                char js[200];
                snprintf(js, sizeof js, "\"%s_acc\":%.6f,\"%s_macro_f1\":%.6f", i ? "test" : "final_val",
                         confusion_accuracy(&conf), i ? "test" : "final_val", confusion_macro_f1(&conf));
                trainer_metrics_write(&t, js);
                free(prefix);
            }
            confusion_free(&conf);
        }
        char dur[32];
        log_info("done: best validation macro-F1 %.4f; model in %s (%s of training)", best_f1, best_dir,
                 fmt_duration(t.train_seconds, dur));
    }

    for (size_t m = 0; m < local_mb; m++) {
        cellbatch_free(&cbs[m]);
        tokenbatch_free(&tbs[m]);
    }
    free(cbs);
    free(tbs);
    classifier_free(&cls);
    cellbatch_free(&x.cb);
    tokenbatch_free(&x.tb);
    free(x.logits), free(x.dlogits), free(x.dhidden), free(best), free(best_proj), free(best_dir), free(perm), free(pidx);
    free(train.id), free(val.id), free(test.id), free(cw), free(per_class), free(label_of);
    cache_free(&cache);
    readout_free(&ro);
    free(v), free(vg);
    shard_reader_close(reader);
    t.labels = NULL; // borrowed from the manifest
    trainer_free(&t);
    free(args.overrides);
    return 0;
}
