// Inference from a checkpoint, on shard folders or atlases aligned on the fly.
#include "perfcell/infer.h"

#include "perfcell/error.h"
#include "perfcell/log.h"
#include "perfcell/mlm.h"
#include "perfcell/tokens.h"
#include "perfcell/train.h"
#include "perfcell/util.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// A text into a temporary file (iniparser and vocab_load read files).
static char *text_to_tmp(const char *text, const char *what) {
    char tmpl[] = "/tmp/perfcell-XXXXXX";
    int fd = mkstemp(tmpl);
    if (fd < 0) {
        error_set("cannot create a temporary file for the %s: %s", what, strerror(errno));
        return NULL;
    }
    size_t n = strlen(text);
    int ok = write(fd, text, n) == (ssize_t)n;
    close(fd);
    if (!ok) {
        unlink(tmpl);
        error_set("cannot write a temporary file for the %s", what);
        return NULL;
    }
    return xstrdup(tmpl);
}

// error_set("PATH: WHAT: <the last error>"); the last error is copied first
// (error_set writes the buffer it lives in).
static int error_wrap_path(const char *path, const char *what) {
    char last[1024];
    snprintf(last, sizeof last, "%s", error_last());
    return error_set("%s: %s: %s", path, what, last);
}

int infer_model_open(InferModel *im, const char *spec, int need_cls) {
    memset(im, 0, sizeof *im);
    vocab_init(&im->vocab);
    im->path = path_is_dir(spec) ? ckpt_resolve(spec, "auto") : xstrdup(spec);
    if (!im->path) return -1;
    if (ckpt_read(im->path, &im->ck) != 0) return -1;
    if (!im->ck.sealed)
        log_warn("%s has no root checksum (written before perfcell had them); its tensors' CRC-32 were "
                 "checked",
                 im->path);
    if (!im->ck.config_ini || !im->ck.vocab_tsv)
        return error_set("%s holds no configuration or vocabulary", im->path);
    char *cpath = text_to_tmp(im->ck.config_ini, "configuration");
    if (!cpath) return -1;
    im->cfg = config_load(cpath, TRAIN_SCHEMA, TRAIN_SCHEMA_LEN, NULL, 0);
    unlink(cpath);
    free(cpath);
    if (!im->cfg) return error_wrap_path(im->path, "stored configuration");
    char *vpath = text_to_tmp(im->ck.vocab_tsv, "vocabulary");
    if (!vpath) return -1;
    int vrc = vocab_load(&im->vocab, vpath);
    unlink(vpath);
    free(vpath);
    if (vrc != 0) return error_wrap_path(im->path, "stored vocabulary");
    if (vocab_hash(&im->vocab) != im->ck.vocab_hash)
        return error_set("%s: the stored vocabulary does not match its hash", im->path);
    if (train_model_config(im->cfg, im->vocab.n, &im->mc) != 0) return -1;
    im->has_classifier = strcmp(im->ck.kind, "finetune") == 0 && im->ck.n_labels > 0;
    if (need_cls && !im->has_classifier) {
        error_set("%s is a %s checkpoint without a classification head", im->path, im->ck.kind);
        return error_set_hint("predict with a checkpoint from `perfcell finetune` (RUN_DIR/best)");
    }
    return 0;
}

int infer_model_alloc(InferModel *im, size_t max_cells, size_t max_cell_nnz) {
    ParamTable t;
    param_table_init(&t);
    model_table_add_encoder(&t, &im->mc);
    if (im->has_classifier) {
        const char *head = config_str(im->cfg, "finetune.head");
        im->cls_cfg.kind = cls_kind_of(head, im->mc.mode);
        im->cls_cfg.n_classes = im->ck.n_labels;
        im->cls_cfg.hidden = (size_t)config_int(im->cfg, "finetune.hidden");
        im->cls_cfg.pool_mean = strcmp(config_str(im->cfg, "finetune.pooling"), "mean") == 0;
        classifier_head_add(&t, &im->mc, &im->cls_cfg);
    }
    const size_t per_cell = tokens_cell_length(&im->mc, max_cell_nnz);
    if (model_alloc_inference(&im->model, &im->mc, &t, max_cells * per_cell, max_cells, per_cell) != 0)
        return -1;
    size_t missing = 0, unused = 0;
    if (ckpt_copy_tensors(&im->ck, &im->model.table, im->model.params, &missing, &unused) != 0) return -1;
    if (missing) return error_set("%s lacks %zu tensors of its own model", im->path, missing);
    size_t np = im->mc.depth * im->mc.n_features * im->mc.dim_head;
    if (!im->ck.proj || im->ck.depth != im->mc.depth || im->ck.n_features != im->mc.n_features ||
        im->ck.dim_head != im->mc.dim_head)
        return error_set("%s: random features missing or of another shape", im->path);
    memcpy(im->model.proj, im->ck.proj, np * sizeof(float));
    if (im->has_classifier) classifier_init(&im->cls, &im->model, &im->cls_cfg);
    return 0;
}

void infer_model_close(InferModel *im) {
    if (im->has_classifier && im->cls.x0) classifier_free(&im->cls);
    model_free(&im->model);
    ckpt_state_free(&im->ck);
    config_free(im->cfg);
    vocab_free(&im->vocab);
    free(im->path);
    memset(im, 0, sizeof *im);
}

// ---------------------------------------------------------------------------
// Cell sources

#define SCAN_CELLS 4096

int cell_source_open(CellSource *s, const char *path, const Vocab *v, uint64_t vocab_hash,
                     const char *label_key, const char *layer, int use_raw) {
    memset(s, 0, sizeof *s);
    input_rows_init(&s->rows);
    counts_check_init(&s->check);
    char *mpath = path_join(path, SHARD_MANIFEST_FILE);
    s->is_shards = path_is_dir(path) && path_exists(mpath);
    free(mpath);
    if (s->is_shards) {
        s->reader = shard_reader_open(path, vocab_hash, 0);
        if (!s->reader) return -1;
        const Manifest *m = shard_reader_manifest(s->reader);
        s->n_cells = m->n_cells;
        s->names = xcalloc((size_t)m->n_cells, sizeof *s->names);
        if (m->label_key[0]) {
            s->labels = xmalloc((size_t)m->n_cells * sizeof *s->labels);
            s->label_names = m->labels;
            s->n_label_names = m->n_labels;
        }
        for (size_t i = 0; i < m->n_shards; i++) {
            ShardFile *f = shard_reader_file(s->reader, i);
            char **names = NULL;
            if (!f || shard_file_strings(f, "obs/cell", (size_t)f->n_cells, &names) != 0) return -1;
            for (int64_t c = 0; c < f->n_cells; c++) {
                s->names[f->first_cell + c] = names[c];
                int64_t nnz = f->indptr[c + 1] - f->indptr[c];
                if (nnz > s->max_cell_nnz) s->max_cell_nnz = nnz;
            }
            free(names);
            if (s->labels) memcpy(s->labels + f->first_cell, f->label, (size_t)f->n_cells * sizeof(int32_t));
        }
        return 0;
    }
    InputOptions opt = {.layer = layer, .use_raw = use_raw, .label_key = label_key};
    s->input = input_open(path, &opt);
    if (!s->input && label_key && error_last_hint() && strstr(error_last_hint(), "--labels"))
        // The input reader's hint is perfcell-shard's (--labels FILE); predict
        // and embed take labels from an obs column only.
        return error_set_hint("--label-key names an obs column of an .h5ad input (or leave --label-key "
                              "out to run without labels); labels from a barcode<TAB>label file come with "
                              "a shard folder built with them (perfcell-shard build), given as --input");
    if (!s->input) return -1;
    Input *in = s->input;
    s->n_cells = (int64_t)in->n_cells;
    vocab_map_build(&s->map, v, in->symbols, in->ids, in->n_genes);
    log_info("%s: %s, %zu cells; genes: %zu of the model's %zu matched, %zu missing (zero), %zu input "
             "genes dropped, %zu duplicates summed",
             path, input_describe(in), in->n_cells, s->map.matched, v->n, s->map.missing,
             s->map.dropped, s->map.duplicates);
    if (s->map.matched == 0)
        return error_set("%s shares no gene with the model's vocabulary (%zu genes)", path, v->n);
    s->names = xcalloc(in->n_cells ? in->n_cells : 1, sizeof *s->names);
    for (size_t c = 0; c < in->n_cells; c++) s->names[c] = xstrdup(in->cells[c]);
    if (in->label_key) {
        s->labels = xmalloc(in->n_cells * sizeof *s->labels);
        memcpy(s->labels, in->label_codes, in->n_cells * sizeof *s->labels);
        s->label_names = in->label_names;
        s->n_label_names = in->n_label_names;
    }
    // One pass first: refuse non-counts before any output, and size the arena.
    for (size_t c0 = 0; c0 < in->n_cells; c0 += SCAN_CELLS) {
        size_t c1 = c0 + SCAN_CELLS < in->n_cells ? c0 + SCAN_CELLS : in->n_cells;
        if (input_read_rows(in, c0, c1, &s->rows) != 0) return -1;
        counts_check_merge(&s->check, &s->rows.check);
        for (size_t i = 0; i < s->rows.n_cells; i++) {
            int64_t nnz = s->rows.indptr[i + 1] - s->rows.indptr[i];
            if (nnz > s->max_cell_nnz) s->max_cell_nnz = nnz;
        }
    }
    if (input_counts_verdict(in, &s->check) != 0) return -1;
    return 0;
}

int64_t cell_source_next(CellSource *s, size_t n, CellBatch *cb, int64_t *first) {
    cellbatch_clear(cb);
    int64_t c0 = s->next, c1 = c0 + (int64_t)n < s->n_cells ? c0 + (int64_t)n : s->n_cells;
    if (first) *first = c0;
    if (c0 >= c1) return 0;
    if (s->is_shards) {
        if (shard_reader_read(s->reader, c0, c1, cb) != 0) return -1;
        for (int64_t c = c0; c < c1; c++) cb->label[c - c0] = s->labels ? s->labels[c] : -1;
    } else {
        if (input_read_rows(s->input, (size_t)c0, (size_t)c1, &s->rows) != 0) return -1;
        const InputRows *r = &s->rows;
        cellbatch_reserve(cb, r->n_cells, r->nnz);
        if (s->max_cell_nnz > 0 && !s->tmp_gene) {
            s->tmp_gene = xmalloc((size_t)s->max_cell_nnz * sizeof *s->tmp_gene);
            s->tmp_count = xmalloc((size_t)s->max_cell_nnz * sizeof *s->tmp_count);
        }
        size_t k = 0;
        for (size_t i = 0; i < r->n_cells; i++) {
            size_t a = (size_t)r->indptr[i], nnz = (size_t)r->indptr[i + 1] - a;
            int64_t m = vocab_map_row(&s->map, r->gene + a, r->count + a, nnz, s->tmp_gene, s->tmp_count);
            if (m < 0) return error_set("%s: cell %lld: %s", s->input->path, (long long)(c0 + (int64_t)i), error_last());
            cb->offset[i] = (int64_t)k;
            double total = 0;
            for (int64_t j = 0; j < m; j++) {
                cb->gene[k] = s->tmp_gene[j];
                cb->count[k] = (float)s->tmp_count[j];
                total += s->tmp_count[j];
                k++;
            }
            cb->total[i] = total;
            cb->cell_id[i] = c0 + (int64_t)i;
            cb->label[i] = s->labels ? s->labels[c0 + (int64_t)i] : -1;
        }
        cb->offset[r->n_cells] = (int64_t)k;
        cb->n = r->n_cells;
        cb->nnz = k;
    }
    s->next = c1;
    return c1 - c0;
}

void cell_source_close(CellSource *s) {
    if (s->reader) shard_reader_close(s->reader);
    if (s->input) {
        vocab_map_free(&s->map);
        input_close(s->input);
    }
    input_rows_free(&s->rows);
    if (s->names)
        for (int64_t c = 0; c < s->n_cells; c++) free(s->names[c]);
    free(s->names);
    free(s->labels);
    free(s->tmp_gene);
    free(s->tmp_count);
    memset(s, 0, sizeof *s);
}

// ---------------------------------------------------------------------------
// Shared command-line options

int infer_args_take(InferArgs *a, int argc, char **argv, int *i, const char *command) {
    const char *opt = argv[*i];
    char hint[96];
    snprintf(hint, sizeof hint, "see `perfcell %s --help`", command);
    if (strcmp(opt, "--use-raw") == 0 || strcmp(opt, "--force") == 0) {
        if (opt[2] == 'u') a->use_raw = 1;
        else a->force = 1;
        return 1;
    }
    const char **dst = strcmp(opt, "--checkpoint") == 0  ? &a->checkpoint
                       : strcmp(opt, "--input") == 0     ? &a->input
                       : strcmp(opt, "--out") == 0       ? &a->out
                       : strcmp(opt, "--label-key") == 0 ? &a->label_key
                       : strcmp(opt, "--layer") == 0     ? &a->layer
                                                         : NULL;
    int is_batch = strcmp(opt, "--batch") == 0;
    if (!dst && !is_batch) return 0;
    if (*i + 1 >= argc) DIE_HINT(hint, "%s needs a value", opt);
    const char *v = argv[++*i];
    if (dst) {
        *dst = v;
    } else if (str_to_long(v, &a->batch) != 0 || a->batch < 1 || a->batch > 4096) {
        DIE_HINT("cells per forward pass, 1 to 4096", "--batch '%s' is not valid", v);
    }
    return 1;
}

void infer_args_require(const InferArgs *a, const char *command) {
    if (!a->checkpoint || !a->input || !a->out) {
        char hint[160];
        snprintf(hint, sizeof hint, "perfcell %s --checkpoint CKPT --input PATH --out FILE", command);
        DIE_HINT(hint, "--checkpoint, --input and --out are required");
    }
    const char *inputs[2] = {a->input, a->checkpoint};
    CHECK_OK_USER(path_out_check(a->out, a->force, inputs, 2));
}
