// Shared pieces of the training programs.
#include "perfcell/error.h"
#include "perfcell/log.h"
#include "perfcell/shard_reader.h"
#include "perfcell/train.h"
#include "perfcell/util.h"
#include "perfcell/vocab.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

// In this file `ok = !error_set(...)` records the message and clears ok
// (error_set returns -1).

// ---------------------------------------------------------------------------
// Agreement: an error that some ranks may see and others not (a file missing
// on one node) must end every rank, not leave the others waiting in a
// collective. Every rank says whether it is fine; if one is not, the lowest
// such rank prints its error_last() (and hint) and all ranks exit with status
// 1 after MPI_Finalize.

static void agree(int ok, const char *hint) {
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int bad_rank = ok ? size : rank, first = size;
    CHECK_MPI(MPI_Allreduce(&bad_rank, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (first == size) return;
    if (rank == first) {
        if (size > 1)
            fprintf(stderr, "[rank %d] error: %s\n", rank, error_last());
        else
            fprintf(stderr, "error: %s\n", error_last());
        const char *h = error_last_hint() ? error_last_hint() : hint;
        if (h) fprintf(stderr, "  HINT: %s\n", h);
        fflush(stderr);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    exit(1);
}

static void bcast_bytes(void *buf, size_t n, int root) {
    char *p = buf;
    while (n > 0) {
        int chunk = n > (size_t)1 << 30 ? 1 << 30 : (int)n;
        CHECK_MPI(MPI_Bcast(p, chunk, MPI_BYTE, root, MPI_COMM_WORLD));
        p += chunk;
        n -= (size_t)chunk;
    }
}

// A string from rank 0 to all (NULL allowed). Returns a malloc'ed copy.
static char *bcast_string(const char *s) {
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    int64_t len = rank == 0 ? (s ? (int64_t)strlen(s) : -1) : 0;
    CHECK_MPI(MPI_Bcast(&len, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
    if (len < 0) return NULL;
    char *out = xmalloc((size_t)len + 1);
    if (rank == 0) memcpy(out, s, (size_t)len + 1);
    bcast_bytes(out, (size_t)len + 1, 0);
    return out;
}

// ---------------------------------------------------------------------------
// Command line

int train_args_parse(int argc, char **argv, TrainArgs *a, const char *usage) {
    memset(a, 0, sizeof *a);
    a->overrides = xcalloc((size_t)argc + 1, sizeof *a->overrides);
    for (int i = 0; i < argc; i++) {
        const char *s = argv[i];
        if (strcmp(s, "--help") == 0 || strcmp(s, "-h") == 0) {
            int rank = 0;
            MPI_Comm_rank(MPI_COMM_WORLD, &rank);
            if (rank == 0) {
                fputs(usage, stdout);
                printf("\nConfiguration keys (section.key  type  default  meaning):\n");
                config_print_schema(stdout, TRAIN_SCHEMA, TRAIN_SCHEMA_LEN);
            }
            return 1;
        } else if (strcmp(s, "--print-config") == 0) {
            a->print_config = 1;
        } else if (strcmp(s, "--config") == 0 || strcmp(s, "--resume") == 0 ||
                   strcmp(s, "--init") == 0) {
            if (i + 1 >= argc) return error_set("%s needs a value", s);
            const char *v = argv[++i];
            if (s[2] == 'c') a->config_path = v;
            else if (s[2] == 'r') a->resume = v;
            else a->init = v;
        } else if (s[0] == '-') {
            return error_set("unknown option '%s'", s);
        } else if (strchr(s, '=')) {
            a->overrides[a->n_overrides++] = s;
        } else {
            return error_set("unexpected argument '%s' (overrides look like section.key=value)", s);
        }
    }
    if (!a->config_path) return error_set("no --config FILE given");
    return 0;
}

// ---------------------------------------------------------------------------
// Configuration and run folder

// The checkpoint folder is locked like the run folder, the default
// RUN_DIR/checkpoints too (two runs in two run folders must not share it,
// whether it is one's default and the other's checkpoint.dir or both set it),
// unless it is the run folder itself.
static int ckpt_dir_lock(Trainer *t) {
    char *top = path_first_missing(t->ckpt_dir);
    if (path_mkdir_p(t->ckpt_dir) != 0) {
        free(top);
        return -1;
    }
    struct stat a, b;
    if (stat(t->run_dir, &a) == 0 && stat(t->ckpt_dir, &b) == 0 && a.st_dev == b.st_dev &&
        a.st_ino == b.st_ino) {
        free(top);
        return 0;
    }
    char *p = path_join(t->ckpt_dir, RUNLOCK_FILE);
    int rc = runlock_acquire(&t->ckpt_lock, p, t->ckpt_dir);
    free(p);
    if (rc == 0) runlock_own_folder(&t->ckpt_lock, t->ckpt_dir, top);
    free(top);
    return rc;
}

void trainer_config(Trainer *t, const TrainArgs *a, const ConfigKey *schema, size_t n_schema,
                    const char *kind) {
    memset(t, 0, sizeof *t);
    t->metrics_fd = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &t->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &t->size);
    snprintf(t->kind, sizeof t->kind, "%s", kind);
    t->cfg = config_load(a->config_path, schema, n_schema, a->overrides, a->n_overrides);
    agree(t->cfg != NULL,
          "check the key names and values; `perfcell pretrain --help` lists every key");
    t->config_ini = config_to_ini(t->cfg);
    // Every rank must run the same configuration.
    uint64_t h = config_hash(t->cfg), lo = 0, hi = 0;
    CHECK_MPI(MPI_Allreduce(&h, &lo, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allreduce(&h, &hi, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD));
    if (lo != hi) error_set("the ranks hold different configurations (config hashes differ)");
    agree(lo == hi, "give every rank the same --config file and the same key=value overrides");
    if (a->print_config) {
        if (t->rank == 0) fputs(t->config_ini, stdout);
        fflush(stdout);
        MPI_Finalize();
        exit(0);
    }
    t->seed = (uint64_t)config_int(t->cfg, "run.seed");
    t->run_dir = xstrdup(config_str(t->cfg, "run.dir"));
    const char *cd = config_str(t->cfg, "checkpoint.dir");
    t->ckpt_dir = cd[0] ? xstrdup(cd) : path_join(t->run_dir, "checkpoints");
    // One run per folder: rank 0 locks the run folder before anything is
    // written; nothing else is written there until trainer_begin(), after
    // every check that can refuse the start.
    runlock_init(&t->lock);
    runlock_init(&t->ckpt_lock);
    int ok = 1;
    if (t->rank == 0) {
        char *top = path_first_missing(t->run_dir);
        ok = path_mkdir_p(t->run_dir) == 0;
        if (ok) {
            char *p = path_join(t->run_dir, RUNLOCK_FILE);
            ok = runlock_acquire(&t->lock, p, t->run_dir) == 0;
            free(p);
        }
        if (ok) runlock_own_folder(&t->lock, t->run_dir, top);
        free(top);
        if (ok) ok = ckpt_dir_lock(t) == 0;
    }
    agree(ok, "check that run.dir (and checkpoint.dir) can be created and written");
    train_adam_config(t->cfg, &t->adam);
    t->sched = train_sched_config(t->cfg);
}

void trainer_open_data(Trainer *t) {
    const char *folder = config_str(t->cfg, "data.shards");
    int ok = 1;
    if (!folder[0]) ok = !error_set("%s: data.shards is not set", config_path(t->cfg));
    agree(ok, "set data.shards to a folder made by `perfcell-shard build`, in the config or as "
              "data.shards=PATH");
    ok = manifest_load(&t->manifest, folder) == 0;
    agree(ok, "data.shards must name a folder made by `perfcell-shard build` (with manifest.tsv)");
    char *vpath = path_join(folder, SHARD_VOCAB_FILE);
    Vocab v;
    vocab_init(&v);
    ok = vocab_load(&v, vpath) == 0;
    if (ok) {
        t->vocab_hash = vocab_hash(&v);
        if (t->vocab_hash != t->manifest.vocab_hash) {
            char a[17], b[17];
            vocab_hash_format(t->vocab_hash, a);
            vocab_hash_format(t->manifest.vocab_hash, b);
            ok = !error_set("%s has hash %s but the shards were built with vocabulary %s", vpath, a, b);
        } else if ((int64_t)v.n != t->manifest.n_genes) {
            ok = !error_set("%s has %zu genes, the manifest says %lld", vpath, v.n,
                           (long long)t->manifest.n_genes);
        }
    }
    if (ok) t->vocab_tsv = file_read_all(vpath, NULL);
    if (ok && !t->vocab_tsv) ok = 0;
    vocab_free(&v);
    free(vpath);
    agree(ok, "rebuild the shards, or restore the shard folder's vocab.tsv");
}

int64_t trainer_max_cell_nnz(const Trainer *t) {
    int64_t mx = 0;
    int ok = 1;
    if (t->rank == 0) {
        ShardReader *r = shard_reader_open_manifest(&t->manifest, 0);
        ok = r != NULL;
        for (size_t i = 0; ok && i < t->manifest.n_shards; i++) {
            ShardFile *f = shard_reader_file(r, i);
            if (!f) {
                ok = 0;
                break;
            }
            for (int64_t c = 0; c < f->n_cells; c++) {
                int64_t n = f->indptr[c + 1] - f->indptr[c];
                if (n > mx) mx = n;
            }
        }
        if (r) shard_reader_close(r);
    }
    agree(ok, "run `perfcell-inspect --verify` on the shard folder");
    CHECK_MPI(MPI_Bcast(&mx, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
    return mx;
}

void trainer_build_model(Trainer *t, const ModelConfig *mc, ParamTable *table, size_t max_tokens,
                         size_t max_cells, size_t max_cell_tokens) {
    int ok = model_alloc(&t->model, mc, table, max_tokens, max_cells, max_cell_tokens) == 0;
    agree(ok, NULL);
    const ParamTable *pt = &t->model.table;
    t->exp_avg = floats_alloc(pt->total);
    t->exp_avg_sq = floats_alloc(pt->total);
    model_init_params(&t->model, t->seed);
    model_draw_features(&t->model, t->seed, 0);
    size_t bucket = (size_t)(config_float(t->cfg, "dist.bucket_mb") * 1048576.0 / sizeof(float));
    gradsync_init(&t->sync, pt, bucket, MPI_COMM_WORLD);
    int64_t n = (int64_t)pt->total, lo = 0, hi = 0;
    CHECK_MPI(MPI_Allreduce(&n, &lo, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Allreduce(&n, &hi, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD));
    if (lo != hi) error_set("the ranks built models of different sizes (%lld vs %lld floats)",
                            (long long)lo, (long long)hi);
    agree(lo == hi, NULL);
    char b1[32];
    log_info("model: %zu tensors, %zu parameters (%zu trainable), activation arena %s",
             pt->n, pt->total, param_table_trainable(pt), fmt_bytes((double)t->model.arena_bytes, b1));
}

void trainer_load_gene2vec(Trainer *t) {
    const char *path = config_str(t->cfg, "model.gene2vec");
    if (!path[0]) {
        if (t->model.cfg.gene_emb_frozen)
            log_warn("model.gene_emb = frozen without model.gene2vec: the gene embedding stays at its "
                     "random initialisation");
        return;
    }
    const size_t C = t->model.cfg.dim, G = t->model.cfg.n_genes;
    char *vpath = path_join(config_str(t->cfg, "data.shards"), SHARD_VOCAB_FILE);
    Vocab v;
    vocab_init(&v);
    int ok = vocab_load(&v, vpath) == 0;
    FILE *f = ok ? fopen(path, "r") : NULL;
    if (ok && !f) ok = !error_set("cannot open gene2vec file '%s': %s", path, strerror(errno));
    size_t matched = 0, lines = 0;
    char *line = NULL;
    size_t cap = 0;
    float *row = xmalloc(C * sizeof *row);
    unsigned char *seen = xcalloc(G ? G : 1, 1);
    while (ok && getline(&line, &cap, f) > 0) {
        lines++;
        char *save = NULL, *sym = strtok_r(line, " \t\r\n", &save);
        if (!sym) continue;
        size_t k = 0;
        char *tok;
        while ((tok = strtok_r(NULL, " \t\r\n", &save)) && k <= C) {
            char *end;
            double x = strtod(tok, &end);
            if (*end || !isfinite(x)) {
                ok = !error_set("%s:%zu: '%s' is not a number", path, lines, tok);
                break;
            }
            if (k < C) row[k] = (float)x;
            k++;
        }
        if (!ok) break;
        if (lines == 1 && k == 1) continue; // word2vec header "N D"
        if (k != C) {
            ok = !error_set("%s:%zu: %zu values for %s, the model's gene embedding has %zu (model.dim)",
                           path, lines, k, sym, C);
            break;
        }
        int64_t g = vocab_match(&v, sym, NULL);
        if (g >= 0 && !seen[g]) {
            seen[g] = 1;
            memcpy(t->model.gene_emb + (size_t)g * C, row, C * sizeof *row);
            matched++;
        }
    }
    if (f) fclose(f);
    free(line);
    free(row);
    free(seen);
    vocab_free(&v);
    free(vpath);
    agree(ok, "a gene2vec file holds one gene per line: SYMBOL v1 ... vD, D = model.dim");
    log_info("gene2vec: %zu of %zu vocabulary genes found in %s%s", matched, G, path,
             t->model.cfg.gene_emb_frozen ? " (frozen)" : "");
    if (matched < G)
        log_warn("%zu vocabulary genes have no gene2vec vector and keep a random embedding", G - matched);
}

// ---------------------------------------------------------------------------
// Checkpoints

static void fill_state(Trainer *t, CkptState *s, int64_t *cursor, size_t cursor_len,
                       const CkptScalar *extra, size_t n_extra) {
    memset(s, 0, sizeof *s);
    snprintf(s->kind, sizeof s->kind, "%s", t->kind);
    s->step = t->step;
    s->epoch = cursor_len > 0 ? cursor[0] : 0;
    s->seed = t->seed;
    s->vocab_hash = t->vocab_hash;
    s->table = t->model.table; // shallow: entries are only read
    s->params = t->model.params;
    s->exp_avg = t->exp_avg;
    s->exp_avg_sq = t->exp_avg_sq;
    s->depth = t->model.cfg.depth;
    s->n_features = t->model.cfg.n_features;
    s->dim_head = t->model.cfg.dim_head;
    s->proj = t->model.proj;
    s->redraw_index = t->model.redraw_index;
    s->feature_seed = t->model.feature_seed;
    s->cursor = cursor;
    s->cursor_len = cursor_len;
    s->config_ini = t->config_ini;
    s->vocab_tsv = t->vocab_tsv;
    s->labels = t->labels;
    s->n_labels = t->n_labels;
    s->scalars = xcalloc(n_extra + 3, sizeof *s->scalars);
    s->scalars[0] = (CkptScalar){"cells_seen", (double)t->cells_seen};
    s->scalars[1] = (CkptScalar){"tokens_seen", (double)t->tokens_seen};
    s->scalars[2] = (CkptScalar){"train_seconds", t->train_seconds};
    for (size_t i = 0; i < n_extra; i++) s->scalars[3 + i] = extra[i];
    s->n_scalars = n_extra + 3;
}

static void metrics_agree(Trainer *t);

void trainer_checkpoint(Trainer *t, const CkptScalar *extra, size_t n_extra) {
    // No checkpoint beyond the metrics on disk.
    metrics_agree(t);
    size_t len = t->stream ? stream_cursor_len(t->stream) : t->cursor_len;
    int64_t *cursor = xcalloc(len ? len : 1, sizeof *cursor);
    if (t->stream)
        stream_cursor_get(t->stream, cursor);
    else
        memcpy(cursor, t->cursor, len * sizeof *cursor);
    int ok = 1;
    double t0 = time_now();
    if (t->rank == 0) {
        CkptState s;
        fill_state(t, &s, cursor, len, extra, n_extra);
        ok = ckpt_write(t->ckpt_dir, &s, (int)config_int(t->cfg, "checkpoint.keep")) == 0;
        free(s.scalars);
    }
    free(cursor);
    agree(ok, "the previous checkpoints are intact: free space (or choose checkpoint.dir "
              "elsewhere) and resume with --resume auto");
    log_info("checkpoint: step %lld written to %s (%.1fs)", (long long)t->step, t->ckpt_dir,
             time_now() - t0);
}

// Configuration keys that must agree between a checkpoint and a resumed run.
static const char *const RESUME_KEYS[] = {
    "data.mode", "data.max_tokens", "model.dim", "model.depth", "model.heads", "model.dim_head",
    "model.nb_features", "model.ff_dim", "model.bins", "model.gene_emb", "run.seed",
    "mlm.mask_prob", "mlm.replace_prob", "contrastive.weight", "contrastive.proj_dim",
    "contrastive.proj_hidden", "contrastive.pooling", "data.val_fraction", "data.split_seed",
    "data.block_cells"};

// The data stream's cursor (and fine-tuning's position in an epoch) counts
// steps of this batch geometry: it cannot be continued with another one.
// With batch.global_batch = 0 the global batch is micro_batch x accumulation
// x ranks: accumulation is compared too (the rank count is not stored; the
// stream's cursor, which holds the global batch, catches it in pretraining).
static int compare_geometry(const char *ckpt_path, const Config *old, const Config *now) {
    if (config_int(old, "batch.global_batch") == config_int(now, "batch.global_batch") &&
        config_int(old, "batch.micro_batch") == config_int(now, "batch.micro_batch") &&
        (config_int(now, "batch.global_batch") != 0 ||
         config_int(old, "batch.accumulation") == config_int(now, "batch.accumulation")))
        return 0;
    if (config_int(now, "batch.global_batch") == 0 &&
        config_int(old, "batch.accumulation") != config_int(now, "batch.accumulation")) {
        error_set("%s was written with batch.accumulation = %ld (batch.global_batch = 0); this run has "
                  "batch.accumulation = %ld: its data position cannot be continued with another global batch",
                  ckpt_path, config_int(old, "batch.accumulation"), config_int(now, "batch.accumulation"));
        return error_set_hint("resume with batch.accumulation=%ld on as many ranks, or start a new run.dir",
                              config_int(old, "batch.accumulation"));
    }
    error_set("%s was written with batch.micro_batch = %ld, batch.global_batch = %ld; this run has "
              "batch.micro_batch = %ld, batch.global_batch = %ld: its data position cannot be continued "
              "with another batch geometry",
              ckpt_path, config_int(old, "batch.micro_batch"), config_int(old, "batch.global_batch"),
              config_int(now, "batch.micro_batch"), config_int(now, "batch.global_batch"));
    return error_set_hint("resume with batch.micro_batch=%ld batch.global_batch=%ld, or start a new run.dir",
                          config_int(old, "batch.micro_batch"), config_int(old, "batch.global_batch"));
}

// Optimizer and schedule settings may change on resume (a lower learning
// rate for the rest of a run), but never silently: one line per key that
// differs, on rank 0 (the caller's), numbers compared by value.
static void report_changed_settings(const char *ckpt_path, const Config *old, const Config *now) {
    for (size_t i = 0; i < TRAIN_SCHEMA_LEN; i++) {
        const ConfigKey *k = &TRAIN_SCHEMA[i];
        if (strncmp(k->name, "optim.", 6) != 0 && strncmp(k->name, "schedule.", 9) != 0) continue;
        const char *a = config_str(old, k->name), *b = config_str(now, k->name);
        int same = k->type == CFG_INT || k->type == CFG_FLOAT
                       ? config_float(old, k->name) == config_float(now, k->name)
                       : strcmp(a, b) == 0;
        if (!same)
            log_warn("resume: %s = %s in the configuration of %s, %s = %s now: the run continues with %s",
                     k->name, a, ckpt_path, k->name, b, b);
    }
}

// Compare the checkpoint's configuration with the current one.
static int compare_configs(const Trainer *t, const char *ckpt_path, const char *ini) {
    char tmpl[] = "/tmp/perfcell-ckpt-config-XXXXXX";
    int fd = mkstemp(tmpl);
    if (fd < 0) return error_set("cannot create a temporary file: %s", strerror(errno));
    size_t n = strlen(ini);
    int wrote = write(fd, ini, n) == (ssize_t)n;
    close(fd);
    Config *old = wrote ? config_load(tmpl, TRAIN_SCHEMA, TRAIN_SCHEMA_LEN, NULL, 0) : NULL;
    unlink(tmpl);
    if (!old) return error_set("%s: the stored configuration cannot be read: %s", ckpt_path, error_last());
    int rc = 0;
    for (size_t i = 0; i < sizeof RESUME_KEYS / sizeof *RESUME_KEYS && rc == 0; i++) {
        const char *k = RESUME_KEYS[i];
        if (strcmp(config_str(old, k), config_str(t->cfg, k)) != 0)
            rc = error_set("%s was trained with %s = %s, the configuration says %s", ckpt_path, k,
                           config_str(old, k), config_str(t->cfg, k));
    }
    if (rc == 0) rc = compare_geometry(ckpt_path, old, t->cfg);
    if (rc == 0) report_changed_settings(ckpt_path, old, t->cfg);
    config_free(old);
    return rc;
}

int trainer_resume(Trainer *t, const char *spec, CkptState *out) {
    int ok = 1, found = 1;
    char *path = NULL;
    CkptState s;
    memset(&s, 0, sizeof s);
    if (t->rank == 0) {
        if (!spec) {
            // A fresh start must not mix with an earlier run's checkpoints.
            char *latest = path_join(t->ckpt_dir, CKPT_LATEST);
            if (path_exists(latest)) {
                ok = !error_set("%s already holds checkpoints of a run (see %s)", t->ckpt_dir, latest);
                error_set_hint("resume it with --resume auto, or choose another run.dir");
            }
            free(latest);
            found = 0;
        } else {
            path = ckpt_resolve(t->ckpt_dir, spec);
            if (!path) {
                if (strcmp(spec, "auto") == 0 && !ckpt_any(t->ckpt_dir)) {
                    found = 0; // nothing to resume yet: a fresh start
                } else {
                    // Checkpoints exist but none can be read: never restart
                    // silently from step 0 over them.
                    ok = 0;
                }
            }
        }
        if (ok && found && ckpt_read(path, &s) != 0) {
            ok = 0;
            error_set_hint("resume from an earlier checkpoint of the run (--resume auto takes the newest "
                           "that reads back), or start a new run.dir");
        }
        if (ok && found && !s.sealed)
            log_warn("%s has no root checksum (written before perfcell had them): its step, cursor and "
                     "other attributes are taken as they are",
                     path);
        if (ok && found) {
            char a[17], b[17];
            vocab_hash_format(s.vocab_hash, a);
            vocab_hash_format(t->vocab_hash, b);
            if (s.vocab_hash != t->vocab_hash)
                ok = !error_set("%s was trained with vocabulary %s, the shards use %s", path, a, b);
            else if (strcmp(s.kind, t->kind) != 0)
                ok = !error_set("%s is a %s checkpoint, this is a %s run", path, s.kind, t->kind);
            else if (s.config_ini)
                ok = compare_configs(t, path, s.config_ini) == 0;
        }
        if (ok && found) {
            size_t missing = 0, unused = 0;
            ok = ckpt_copy_tensors(&s, &t->model.table, t->model.params, &missing, &unused) == 0;
            if (ok && (missing || unused))
                ok = !error_set("%s holds a different model: %zu tensors missing, %zu unexpected", path,
                               missing, unused);
            if (ok && (s.depth != t->model.cfg.depth || s.n_features != t->model.cfg.n_features ||
                       s.dim_head != t->model.cfg.dim_head))
                ok = !error_set("%s: random-feature matrices of another shape", path);
        }
        if (ok && found && s.exp_avg) {
            // Moments by name, like the parameters.
            CkptState m = s;
            m.params = s.exp_avg;
            ok = ckpt_copy_tensors(&m, &t->model.table, t->exp_avg, NULL, NULL) == 0;
            m.params = s.exp_avg_sq;
            if (ok) ok = ckpt_copy_tensors(&m, &t->model.table, t->exp_avg_sq, NULL, NULL) == 0;
        } else if (ok && found) {
            log_warn("%s holds no optimizer state: Adam moments start from zero", path);
        }
    }
    agree(ok, "resume with the configuration and shards the checkpoint was made with, or start a "
              "new run.dir");
    CHECK_MPI(MPI_Bcast(&found, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (!found) {
        if (spec) log_info("resume: no checkpoint in %s yet, starting from step 0", t->ckpt_dir);
        return 0;
    }
    const size_t P = t->model.table.total;
    bcast_bytes(t->model.params, P * sizeof(float), 0);
    bcast_bytes(t->exp_avg, P * sizeof(float), 0);
    bcast_bytes(t->exp_avg_sq, P * sizeof(float), 0);
    size_t np = t->model.cfg.depth * t->model.cfg.n_features * t->model.cfg.dim_head;
    if (t->rank == 0) memcpy(t->model.proj, s.proj, np * sizeof(float));
    bcast_bytes(t->model.proj, np * sizeof(float), 0);
    int64_t hdr[5] = {s.step, s.redraw_index, (int64_t)s.feature_seed, (int64_t)s.cursor_len, 0};
    if (t->rank == 0) {
        hdr[4] = (int64_t)ckpt_scalar(&s, "cells_seen", 0);
        t->tokens_seen = (int64_t)ckpt_scalar(&s, "tokens_seen", 0);
        t->train_seconds = ckpt_scalar(&s, "train_seconds", 0);
    }
    CHECK_MPI(MPI_Bcast(hdr, 5, MPI_INT64_T, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Bcast(&t->tokens_seen, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
    CHECK_MPI(MPI_Bcast(&t->train_seconds, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD));
    t->step = hdr[0];
    t->model.redraw_index = hdr[1];
    t->model.feature_seed = (uint64_t)hdr[2];
    t->cells_seen = hdr[4];
    size_t cl = (size_t)hdr[3];
    int64_t *cursor = xcalloc(cl ? cl : 1, sizeof *cursor);
    if (t->rank == 0 && cl) memcpy(cursor, s.cursor, cl * sizeof *cursor);
    bcast_bytes(cursor, cl * sizeof *cursor, 0);
    ok = 1;
    if (t->stream) {
        ok = stream_cursor_set(t->stream, cursor, cl) == 0;
    } else if (cl <= sizeof t->cursor / sizeof *t->cursor) {
        memcpy(t->cursor, cursor, cl * sizeof *cursor);
        t->cursor_len = cl;
    } else {
        ok = !error_set("checkpoint cursor of %zu values, expected at most %zu", cl,
                        sizeof t->cursor / sizeof *t->cursor);
    }
    free(cursor);
    char *p = bcast_string(path);
    if (!ok) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", error_last());
        error_set("%s: %s", p, msg);
    }
    agree(ok, "the data stream of the checkpoint cannot be continued with this batch configuration: "
              "the global batch (batch.global_batch, or micro_batch x accumulation x ranks when it "
              "is 0) and the micro-batch must stay the same");
    log_info("resume: %s at step %lld", p, (long long)t->step);
    free(p);
    if (out) {
        // Hand the scalars to the caller (rank 0 has them; broadcast count + values).
        int64_t ns = t->rank == 0 ? (int64_t)s.n_scalars : 0;
        CHECK_MPI(MPI_Bcast(&ns, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
        memset(out, 0, sizeof *out);
        out->n_scalars = (size_t)ns;
        out->scalars = xcalloc((size_t)ns + 1, sizeof *out->scalars);
        for (int64_t i = 0; i < ns; i++) {
            char *k = bcast_string(t->rank == 0 ? s.scalars[i].key : NULL);
            double v = t->rank == 0 ? s.scalars[i].value : 0;
            CHECK_MPI(MPI_Bcast(&v, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD));
            out->scalars[i].key = k;
            out->scalars[i].value = v;
        }
        int64_t nl = t->rank == 0 ? (int64_t)s.n_labels : 0;
        CHECK_MPI(MPI_Bcast(&nl, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
        out->n_labels = (size_t)nl;
        out->labels = nl ? xcalloc((size_t)nl, sizeof *out->labels) : NULL;
        for (int64_t i = 0; i < nl; i++) out->labels[i] = bcast_string(t->rank == 0 ? s.labels[i] : NULL);
    }
    if (t->rank == 0) ckpt_state_free(&s);
    free(path);
    return 1;
}

void trainer_maybe_redraw(Trainer *t) {
    int64_t every = t->model.cfg.feature_redraw_interval;
    if (every <= 0) return;
    int64_t idx = t->step / every;
    if (idx != t->model.redraw_index) {
        model_draw_features(&t->model, t->seed, idx);
        log_verbose("step %lld: random features redrawn (redraw %lld)", (long long)t->step,
                    (long long)idx);
    }
}

// ---------------------------------------------------------------------------
// The optimizer step

// Fault injection for the reliability tests: PERFCELL_INJECT_NAN="STEP:RANK:TENSOR"
// writes a NaN into the gradient of TENSOR on rank RANK at optimizer step STEP
// (numbered from 1, as the progress lines number steps),
// so the detection and both run.nan_policy paths can be exercised end to end.
static void inject_nan(Trainer *t) {
    // The specification is read once per process; -1: none.
    static long long step = -2;
    static int rank;
    static size_t offset;
    if (step == -2) {
        const char *spec = getenv("PERFCELL_INJECT_NAN");
        step = -1;
        if (!spec || !*spec) return;
        int used = 0;
        char name[128];
        if (sscanf(spec, "%lld:%d:%127[^:]%n", &step, &rank, name, &used) != 3 || spec[used] != '\0')
            DIE("PERFCELL_INJECT_NAN='%s': expected STEP:RANK:TENSOR, e.g. 4:1:performer.net.layers.0.1.fn.fn.w1.weight", spec);
        const ParamEntry *e = param_table_find(&t->model.table, name);
        if (!e) DIE("PERFCELL_INJECT_NAN='%s': no tensor named '%s' in this model", spec, name);
        offset = e->offset;
    }
    if (step == (long long)t->step + 1 && rank == t->rank) t->model.grads[offset] = NAN;
}

int trainer_local_nonfinite(Trainer *t) {
    inject_nan(t);
    return (int)grad_first_nonfinite(&t->model.table, t->model.grads);
}

double trainer_optimizer_step(Trainer *t, int local_bad, double *lr_out) {
    // Which ranks saw a non-finite value, and in which tensor (-2: the loss).
    int *all = xmalloc((size_t)t->size * sizeof *all);
    CHECK_MPI(MPI_Allgather(&local_bad, 1, MPI_INT, all, 1, MPI_INT, MPI_COMM_WORLD));
    int any = 0;
    char ranks[256] = "";
    const char *what = NULL;
    for (int r = 0; r < t->size; r++) {
        if (all[r] == -1) continue;
        size_t l = strlen(ranks);
        snprintf(ranks + l, sizeof ranks - l, "%s%d", any ? "," : "", r);
        if (!what) what = all[r] == -2 ? "the loss" : t->model.table.e[all[r]].name;
        any = 1;
    }
    free(all);
    if (any) {
        int skip = strcmp(config_str(t->cfg, "run.nan_policy"), "skip") == 0;
        char msg[512];
        // Steps are numbered as the progress lines number them (from 1).
        snprintf(msg, sizeof msg, "step %lld: NaN or Inf in %s%s on rank%s %s", (long long)t->step + 1,
                 what, strcmp(what, "the loss") == 0 ? "" : " (gradient)", strchr(ranks, ',') ? "s" : "",
                 ranks);
        if (!skip) {
            error_set("%s (run.nan_policy = stop)", msg);
            agree(0, "lower optim.lr, check the input data, or set run.nan_policy = skip; the "
                          "last checkpoint is intact");
        }
        if (t->rank == 0) log_warn("%s: step skipped (run.nan_policy = skip)", msg);
        model_zero_grad(&t->model);
        t->step++;
        return -1.0;
    }
    double norm = grad_global_norm(&t->model.table, t->model.grads);
    grad_clip(&t->model.table, t->model.grads, norm, config_float(t->cfg, "optim.clip_norm"));
    double lr = sched_lr(&t->sched, t->step);
    adam_update(&t->model.table, t->model.params, t->model.grads, t->exp_avg, t->exp_avg_sq,
                t->step + 1, (float)lr, &t->adam);
    t->step++;
    if (lr_out) *lr_out = lr;
    return norm;
}

// ---------------------------------------------------------------------------
// Signals and step flags

static volatile sig_atomic_t g_stop_signal = 0;

// Said at once (async-signal-safe write), so that a log ends with the cause
// even when the rank is killed before the next step boundary: mpirun kills
// its ranks about 2 s after a SIGTERM of its own.
static char g_term_note[160], g_usr1_note[160];
static size_t g_term_len, g_usr1_len;

static void on_stop_signal(int sig) {
    g_stop_signal = sig;
    const char *note = sig == SIGTERM ? g_term_note : g_usr1_note;
    size_t len = sig == SIGTERM ? g_term_len : g_usr1_len;
    if (write(STDERR_FILENO, note, len) < 0) return;
}

void trainer_install_signals(void) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    const char *fmt = "[rank %d] %s received: stopping with a checkpoint after this step\n";
    g_term_len = (size_t)snprintf(g_term_note, sizeof g_term_note, fmt, rank, "SIGTERM");
    g_usr1_len = (size_t)snprintf(g_usr1_note, sizeof g_usr1_note, fmt, rank, "SIGUSR1");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    // A file-size limit (ulimit -f) must fail the checkpoint write with EFBIG
    // and a message, not kill the rank.
    signal(SIGXFSZ, SIG_IGN);
}

static const char *signal_name(int sig) {
    return sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "a signal";
}

// Rank 0 logs which ranks received which stop signal. Collective.
static void log_stop_signals(const Trainer *t) {
    int sig = (int)g_stop_signal;
    int *all = t->rank == 0 ? xcalloc((size_t)t->size, sizeof *all) : NULL;
    CHECK_MPI(MPI_Gather(&sig, 1, MPI_INT, all, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (t->rank != 0) return;
    char who[512] = "";
    size_t len = 0;
    for (int r = 0; r < t->size && len < sizeof who - 1; r++) {
        if (!all[r]) continue;
        int first = 1;
        for (int q = 0; q < r; q++) first &= all[q] != all[r];
        if (!first) continue;
        // Every rank that received this signal: "SIGTERM (15) on ranks 1,3".
        int n = 0;
        char ranks[256] = "";
        for (int q = r; q < t->size; q++) {
            if (all[q] != all[r]) continue;
            size_t l = strlen(ranks);
            snprintf(ranks + l, sizeof ranks - l, "%s%d", n ? "," : "", q);
            n++;
        }
        len += (size_t)snprintf(who + len, sizeof who - len, "%s%s (%d) on rank%s %s", len ? ", " : "",
                                signal_name(all[r]), all[r], n > 1 ? "s" : "", ranks);
    }
    free(all);
    log_info("stop signal %s: checkpointing at step %lld and exiting", who, (long long)t->step);
}

StepFlags trainer_step_flags(Trainer *t, double *last_ckpt_time, double start_time) {
    // stop, checkpoint, a signal on some rank, a failed metrics write (rank 0)
    int local[4] = {g_stop_signal != 0, 0, g_stop_signal != 0, t->metrics_error != NULL};
    int global[4] = {0, 0, 0, 0};
    if (t->rank == 0) {
        double now = time_now();
        double budget = config_float(t->cfg, "run.max_minutes") * 60.0;
        if (budget > 0 && now - start_time > budget) local[0] = 1;
        double every = config_float(t->cfg, "checkpoint.every_minutes") * 60.0;
        if (every > 0 && now - *last_ckpt_time > every) local[1] = 1;
    }
    CHECK_MPI(MPI_Allreduce(local, global, 4, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
    if (global[3]) metrics_agree(t);
    StepFlags f = {global[0], global[1]};
    if (f.checkpoint) *last_ckpt_time = time_now();
    if (global[2])
        log_stop_signals(t);
    else if (f.stop)
        log_info("run.max_minutes reached: checkpointing at step %lld and exiting", (long long)t->step);
    return f;
}

// ---------------------------------------------------------------------------
// Metrics

static void metrics_open(Trainer *t, int resumed);

// The "step" of a metrics line, or -1.
static long long line_step(const char *line) {
    const char *p = strstr(line, "\"step\":");
    return p ? strtoll(p + 7, NULL, 10) : -1;
}

void trainer_begin(Trainer *t, int resumed) {
    int ok = 1;
    if (t->rank == 0) {
        runlock_keep_folder(&t->lock);
        runlock_keep_folder(&t->ckpt_lock);
        ok = path_mkdir_p(t->ckpt_dir) == 0;
        if (ok) {
            char *p = path_join(t->run_dir, "config.ini");
            ok = file_write_atomic(p, t->config_ini, strlen(t->config_ini)) == 0;
            free(p);
        }
    }
    agree(ok, "check that run.dir (and checkpoint.dir) can be created and written");
    metrics_open(t, resumed);
}

// Collective: an open that fails stops every rank.
static void metrics_open(Trainer *t, int resumed) {
    int ok = 1;
    if (t->rank == 0) {
        char *path = path_join(t->run_dir, "metrics.jsonl");
        if (resumed && path_exists(path)) {
            size_t len = 0;
            char *old = file_read_all(path, &len);
            ok = old != NULL;
            if (ok) {
                // Keep what was logged up to the resumed step (and no torn last line).
                char *keep = xmalloc(len + 1);
                size_t k = 0;
                char *save = NULL;
                int whole = len > 0 && old[len - 1] == '\n';
                for (char *l = strtok_r(old, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
                    if (line_step(l) > t->step || (!whole && l + strlen(l) == old + len)) continue;
                    size_t n = strlen(l);
                    memcpy(keep + k, l, n);
                    keep[k + n] = '\n';
                    k += n + 1;
                }
                ok = file_write_atomic(path, keep, k) == 0;
                free(keep);
                free(old);
            }
        }
        if (ok) {
            t->metrics_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (resumed ? 0 : O_TRUNC), 0644);
            ok = t->metrics_fd >= 0 || !error_set("cannot write '%s': %s", path, strerror(errno));
        }
        if (ok) {
            off_t end = lseek(t->metrics_fd, 0, SEEK_END);
            ok = end >= 0 || !error_set("cannot write '%s': %s", path, strerror(errno));
            t->metrics_end = (int64_t)end;
        }
        free(path);
    }
    agree(ok, "run.dir must be on a file system with room for the metrics; free space or choose "
              "another run.dir");
}

// Rank 0: record a failed metrics write and cut the file back to its last
// whole line.
static void metrics_fail(Trainer *t, int err) {
    char *path = path_join(t->run_dir, "metrics.jsonl");
    char msg[1024];
    int n = snprintf(msg, sizeof msg, "cannot write '%s': %s (at step %lld)", path, strerror(err),
                     (long long)t->step);
    if (ftruncate(t->metrics_fd, (off_t)t->metrics_end) != 0 && n > 0 && (size_t)n < sizeof msg)
        snprintf(msg + n, sizeof msg - (size_t)n, "; cutting it back to its last whole line failed too: %s",
                 strerror(errno));
    close(t->metrics_fd);
    t->metrics_fd = -1;
    t->metrics_error = xstrdup(msg);
    free(path);
}

// A failed metrics write (rank 0) ends every rank here. Collective.
static void metrics_agree(Trainer *t) {
    int bad = t->rank == 0 && t->metrics_error;
    if (bad) error_set("%s", t->metrics_error);
    agree(!bad, "the run stopped without a further checkpoint and metrics.jsonl ends with a whole line: "
                "free space on run.dir's file system, then resume with --resume auto");
}

void trainer_metrics_write(Trainer *t, const char *json_fields) {
    if (t->rank != 0 || t->metrics_fd < 0) return;
    // The whole line in memory, then one write. printf writes a non-finite
    // value as nan / inf, which JSON does not have: such a value (a NaN loss
    // under run.nan_policy = skip) becomes null.
    size_t cap = strlen(json_fields) * 2 + 64, n = 0;
    char *line = xmalloc(cap);
    n = (size_t)snprintf(line, cap, "{\"step\":%lld,", (long long)t->step);
    for (const char *p = json_fields; *p;) {
        int after_colon = p > json_fields && p[-1] == ':';
        const char *q = p + (*p == '-');
        if (after_colon && (strncmp(q, "nan", 3) == 0 || strncmp(q, "inf", 3) == 0)) {
            memcpy(line + n, "null", 4);
            n += 4;
            p = q + 3;
            while (isalnum((unsigned char)*p) || *p == '(' || *p == ')' || *p == '_') p++;
        } else {
            line[n++] = *p++;
        }
    }
    memcpy(line + n, "}\n", 2);
    n += 2;
    for (size_t done = 0; done < n;) {
        ssize_t w = write(t->metrics_fd, line + done, n - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            metrics_fail(t, w < 0 ? errno : ENOSPC);
            break;
        }
        done += (size_t)w;
    }
    if (t->metrics_fd >= 0) t->metrics_end += (int64_t)n;
    free(line);
}

void trainer_free(Trainer *t) {
    metrics_agree(t);
    if (t->stream) stream_close(t->stream);
    if (t->metrics_fd >= 0) close(t->metrics_fd);
    free(t->metrics_error);
    gradsync_free(&t->sync);
    model_free(&t->model);
    free(t->exp_avg);
    free(t->exp_avg_sq);
    manifest_free(&t->manifest);
    free(t->vocab_tsv);
    free(t->config_ini);
    free(t->run_dir);
    free(t->ckpt_dir);
    config_free(t->cfg);
    runlock_release(&t->ckpt_lock);
    runlock_release(&t->lock);
    memset(t, 0, sizeof *t);
}

const char *fmt_duration(double s, char buf[32]) {
    if (!(s >= 0) || s > 1e9) {
        snprintf(buf, 32, "?");
    } else if (s >= 3600) {
        snprintf(buf, 32, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
    } else if (s >= 60) {
        snprintf(buf, 32, "%dm%02ds", (int)(s / 60), (int)s % 60);
    } else {
        snprintf(buf, 32, "%.0fs", s);
    }
    return buf;
}
