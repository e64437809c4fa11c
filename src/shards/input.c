// Inputs: format detection, opening, range reads with the counts check, labels
// from a TSV file, and helpers shared by the format back ends.
#include "perfcell/input.h"

#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/util.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static const char *FORMATS_HINT =
    "perfcell-shard reads AnnData .h5ad files, 10x Genomics HDF5 files (CellRanger v2 or v3 "
    "filtered_feature_bc_matrix.h5) and 10x MatrixMarket folders (matrix.mtx[.gz] with "
    "barcodes.tsv[.gz] and features.tsv[.gz] or genes.tsv)";

// Values read from HDF5 per piece when a range is read (bounds the scratch memory).
#define READ_PIECE ((size_t)1 << 22)

// ---------------------------------------------------------------------------
// String index

static uint64_t str_hash(const char *s) { return hash_fnv64(HASH_FNV_INIT, s, strlen(s)); }

void str_index_build(StrIndex *t, char *const *strs, size_t n) {
    memset(t, 0, sizeof *t);
    t->strs = strs;
    t->n = n;
    t->cap = 16;
    while (t->cap < 2 * n) t->cap *= 2;
    t->slot = xmalloc(t->cap * sizeof *t->slot);
    t->next = xmalloc((n ? n : 1) * sizeof *t->next);
    memset(t->slot, 0xff, t->cap * sizeof *t->slot);
    int32_t *last = xmalloc((n ? n : 1) * sizeof *last); // last index of each chain, by head
    for (size_t i = 0; i < n; i++) {
        t->next[i] = -1;
        size_t k = (size_t)str_hash(strs[i]) & (t->cap - 1);
        while (t->slot[k] >= 0 && strcmp(strs[t->slot[k]], strs[i]) != 0) k = (k + 1) & (t->cap - 1);
        if (t->slot[k] < 0) {
            t->slot[k] = (int32_t)i;
            last[i] = (int32_t)i;
        } else {
            int32_t head = t->slot[k];
            t->next[last[head]] = (int32_t)i;
            last[head] = (int32_t)i;
        }
    }
    free(last);
}

int32_t str_index_find(const StrIndex *t, const char *s) {
    if (!t->cap) return -1;
    size_t k = (size_t)str_hash(s) & (t->cap - 1);
    while (t->slot[k] >= 0) {
        if (strcmp(t->strs[t->slot[k]], s) == 0) return t->slot[k];
        k = (k + 1) & (t->cap - 1);
    }
    return -1;
}

int32_t str_index_next(const StrIndex *t, int32_t i) { return t->next[i]; }

void str_index_free(StrIndex *t) {
    free(t->slot);
    free(t->next);
    memset(t, 0, sizeof *t);
}

static size_t str_set_slot(const StrSet *t, const char *s) {
    size_t k = (size_t)str_hash(s) & (t->cap - 1);
    while (t->slot[k] >= 0 && strcmp(t->names[t->slot[k]], s) != 0) k = (k + 1) & (t->cap - 1);
    return k;
}

int32_t str_set_find(const StrSet *t, const char *s) {
    if (!t->cap) return -1;
    return t->slot[str_set_slot(t, s)];
}

int32_t str_set_add(StrSet *t, const char *s) {
    if (2 * (t->n + 1) > t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 64;
        free(t->slot);
        t->slot = xmalloc(cap * sizeof *t->slot);
        memset(t->slot, 0xff, cap * sizeof *t->slot);
        t->cap = cap;
        t->names = xrealloc(t->names, cap * sizeof *t->names);
        for (size_t i = 0; i < t->n; i++) t->slot[str_set_slot(t, t->names[i])] = (int32_t)i;
    }
    size_t k = str_set_slot(t, s);
    if (t->slot[k] >= 0) return t->slot[k];
    t->names[t->n] = xstrdup(s);
    t->slot[k] = (int32_t)t->n;
    return (int32_t)t->n++;
}

char **str_set_take(StrSet *t, size_t *n) {
    char **names = t->names;
    *n = t->n;
    t->names = NULL;
    t->n = 0;
    str_set_free(t);
    return names;
}

void str_set_free(StrSet *t) {
    for (size_t i = 0; i < t->n; i++) free(t->names[i]);
    free(t->names);
    free(t->slot);
    memset(t, 0, sizeof *t);
}

// ---------------------------------------------------------------------------
// Row storage

void raw_rows_clear(RawRows *r) {
    r->n_cells = r->nnz = 0;
    r->n_implicit = 0;
    if (r->indptr) r->indptr[0] = 0;
}

void raw_rows_reserve(RawRows *r, size_t n_cells, size_t nnz) {
    if (!r->indptr || n_cells + 1 > r->cap_cells) {
        size_t cap = r->cap_cells ? r->cap_cells : 1024;
        while (cap < n_cells + 1) cap *= 2;
        r->indptr = xrealloc(r->indptr, cap * sizeof *r->indptr);
        if (!r->cap_cells) r->indptr[0] = 0;
        r->cap_cells = cap;
    }
    if (nnz > r->cap_nnz || !r->gene) {
        size_t cap = r->cap_nnz ? r->cap_nnz : 4096;
        while (cap < nnz) cap *= 2;
        r->gene = xrealloc(r->gene, cap * sizeof *r->gene);
        r->value = xrealloc(r->value, cap * sizeof *r->value);
        r->cap_nnz = cap;
    }
}

void raw_rows_free(RawRows *r) {
    free(r->indptr);
    free(r->gene);
    free(r->value);
    memset(r, 0, sizeof *r);
}

void input_rows_init(InputRows *r) {
    memset(r, 0, sizeof *r);
    counts_check_init(&r->check);
}

void input_rows_free(InputRows *r) {
    free(r->indptr);
    free(r->gene);
    free(r->count);
    free(r->total);
    input_rows_init(r);
}

static void input_rows_reserve(InputRows *r, size_t n_cells, size_t nnz) {
    if (!r->indptr || n_cells + 1 > r->cap_cells) {
        size_t cap = r->cap_cells ? r->cap_cells : 1024;
        while (cap < n_cells + 1) cap *= 2;
        r->indptr = xrealloc(r->indptr, cap * sizeof *r->indptr);
        r->total = xrealloc(r->total, cap * sizeof *r->total);
        r->cap_cells = cap;
    }
    if (nnz > r->cap_nnz || !r->gene) {
        size_t cap = r->cap_nnz ? r->cap_nnz : 4096;
        while (cap < nnz) cap *= 2;
        r->gene = xrealloc(r->gene, cap * sizeof *r->gene);
        r->count = xrealloc(r->count, cap * sizeof *r->count);
        r->cap_nnz = cap;
    }
}

// ---------------------------------------------------------------------------
// Counts check

void counts_check_init(CountsCheck *c) {
    memset(c, 0, sizeof *c);
    c->bad_cell = -1;
    c->bad_gene = -1;
}

int64_t counts_check_bad(const CountsCheck *c) {
    return c->n_negative + c->n_nonfinite + c->n_fraction + c->n_large;
}

void counts_check_merge(CountsCheck *a, const CountsCheck *b) {
    a->n_values += b->n_values;
    a->n_negative += b->n_negative;
    a->n_nonfinite += b->n_nonfinite;
    a->n_fraction += b->n_fraction;
    a->n_large += b->n_large;
    if (b->max_value > a->max_value) a->max_value = b->max_value;
    if (b->bad_cell >= 0 && (a->bad_cell < 0 || b->bad_cell < a->bad_cell)) {
        a->bad_cell = b->bad_cell;
        a->bad_gene = b->bad_gene;
        a->bad_value = b->bad_value;
    }
}

// "12,345"
static const char *fmt_count(int64_t v, char buf[32]) {
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%lld", (long long)(v < 0 ? -v : v));
    int k = 0;
    if (v < 0) buf[k++] = '-';
    for (int i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0) buf[k++] = ',';
        buf[k++] = tmp[i];
    }
    buf[k] = '\0';
    return buf;
}

int input_counts_verdict(const Input *in, const CountsCheck *c) {
    if (counts_check_bad(c) == 0) return 0;
    char parts[512] = "", b1[32], b2[32];
    size_t k = 0;
#define PART(n, what)                                                                              \
    if ((n) > 0)                                                                                   \
        k += (size_t)snprintf(parts + k, sizeof parts - k, "%s%s %s", k ? ", " : "",              \
                              fmt_count((n), b1), (what));
    PART(c->n_negative, "negative");
    PART(c->n_nonfinite, "NaN or infinite");
    PART(c->n_fraction, "non-integer");
    PART(c->n_large, "2^31 or larger");
#undef PART
    char example[512] = "";
    if (c->bad_cell >= 0 && (size_t)c->bad_cell < in->n_cells && c->bad_gene >= 0 &&
        (size_t)c->bad_gene < in->n_genes)
        snprintf(example, sizeof example, ", e.g. %.9g at cell %lld '%s', gene '%s'", c->bad_value,
                 (long long)c->bad_cell, in->cells[c->bad_cell], in->symbols[c->bad_gene]);
    const char *looks = "";
    if (c->n_negative > 0)
        looks = "; it looks scaled (centred), not raw counts";
    else if (c->n_fraction > 0 && c->max_value < 50)
        looks = "; it looks log-normalised, not raw counts";
    else if (c->n_fraction > 0)
        looks = "; it looks normalised, not raw counts";
    error_set("%s: %s does not hold raw counts: %s values among %s %s%s%s", in->path, in->matrix,
              parts, fmt_count(c->n_values, b2), in->dense ? "values" : "stored values", example,
              looks);
    if (in->others && in->others[0])
        return error_set_hint("shards store raw integer counts; this file also has %s: pass the "
                              "option of the matrix that holds them",
                              in->others);
    if (in->format == INPUT_H5AD)
        return error_set_hint("shards store raw integer counts and %s has no other matrix (no "
                              "raw/X, no layers); build from the file with the raw counts (for "
                              "10x data, CellRanger's filtered_feature_bc_matrix.h5)",
                              in->path);
    return error_set_hint("shards store raw integer counts; 10x matrices hold them unless the "
                          "file was altered: use the file CellRanger wrote");
}

// ---------------------------------------------------------------------------
// Which features are genes

int input_feature_is_gene(const char *type) {
    return !type || !type[0] || strcmp(type, "Gene Expression") == 0;
}

char *input_skipped_what(char *const *types, const int32_t *map, size_t n, size_t other_genome) {
    StrSet tset = {0};
    int64_t *tcount = xcalloc(n + 1, sizeof *tcount);
    for (size_t i = 0; i < n; i++)
        if (map[i] < 0 && types && !input_feature_is_gene(types[i])) tcount[str_set_add(&tset, types[i])]++;
    char what[512] = "";
    size_t k = 0;
    for (size_t i = 0; i < tset.n && k < sizeof what; i++)
        k += (size_t)snprintf(what + k, sizeof what - k, "%s%lld %s", k ? ", " : "",
                              (long long)tcount[i], tset.names[i]);
    if (other_genome && k < sizeof what)
        snprintf(what + k, sizeof what - k, "%s%zu of other genomes", k ? ", " : "", other_genome);
    str_set_free(&tset);
    free(tcount);
    return xstrdup(what);
}

// ---------------------------------------------------------------------------
// Format detection and opening

const char *input_format_name(InputFormat f) {
    switch (f) {
    case INPUT_H5AD: return "AnnData .h5ad";
    case INPUT_10X_H5: return "10x HDF5";
    case INPUT_10X_MTX: return "10x MatrixMarket";
    }
    return "unknown";
}

int input_detect(const char *path, InputFormat *format) {
    if (path_is_dir(path)) {
        *format = INPUT_10X_MTX;
        return 0;
    }
    if (!path_exists(path)) {
        error_set("input '%s' does not exist", path);
        return error_set_hint("give the path of an .h5ad file, a 10x .h5 file or a 10x "
                              "MatrixMarket folder");
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        error_set("cannot open input '%s'", path);
        return error_set_hint("check the permissions of the file");
    }
    unsigned char head[32] = {0};
    size_t got = fread(head, 1, sizeof head, f);
    fclose(f);
    htri_t is_h5 = got >= 8 ? H5Fis_hdf5(path) : 0;
    if (is_h5 > 0) {
        hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (file < 0) {
            error_set_h5("cannot open HDF5 file '%s'", path);
            return error_set_hint("the file may be truncated or corrupt");
        }
        int rc = 0;
        if (h5_exists(file, "X") || h5_exists(file, "obs") || h5_exists(file, "raw/X"))
            *format = INPUT_H5AD;
        else if (h5_object_type(file, "matrix") == H5O_TYPE_GROUP)
            *format = INPUT_10X_H5;
        else {
            // CellRanger v2: a group per genome holding the matrix.
            hsize_t n = 0;
            H5G_info_t gi;
            int found = 0;
            if (H5Gget_info(file, &gi) >= 0) n = gi.nlinks;
            for (hsize_t i = 0; i < n && !found; i++) {
                char name[256];
                if (H5Lget_name_by_idx(file, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name,
                                       H5P_DEFAULT) < 0)
                    continue;
                char sub[300];
                snprintf(sub, sizeof sub, "%s/indptr", name);
                if (h5_exists(file, sub)) found = 1;
            }
            if (found) {
                *format = INPUT_10X_H5;
            } else {
                error_set("'%s' is an HDF5 file but neither AnnData (no X, obs) nor 10x "
                          "(no matrix group, no genome group with indptr)",
                          path);
                rc = error_set_hint("%s", FORMATS_HINT);
            }
        }
        H5Fclose(file);
        return rc;
    }
    if (got >= 14 && strncasecmp((const char *)head, "%%MatrixMarket", 14) == 0) {
        *format = INPUT_10X_MTX;
        return 0;
    }
    if (got >= 2 && head[0] == 0x1f && head[1] == 0x8b && (str_ends_with(path, ".mtx.gz"))) {
        *format = INPUT_10X_MTX;
        return 0;
    }
    error_set("input '%s' has an unknown format", path);
    return error_set_hint("%s", FORMATS_HINT);
}

void input_ids_normalise(Input *in) {
    if (!in->ids) {
        in->ids = xmalloc((in->n_genes ? in->n_genes : 1) * sizeof *in->ids);
        for (size_t g = 0; g < in->n_genes; g++) in->ids[g] = xstrdup("");
        return;
    }
    for (size_t g = 0; g < in->n_genes; g++) {
        if (in->ids[g][0] && strcmp(in->ids[g], in->symbols[g]) == 0) in->ids[g][0] = '\0';
    }
}

Input *input_open(const char *path, const InputOptions *opt) {
    InputOptions none = {0};
    if (!opt) opt = &none;
    InputFormat fmt;
    if (input_detect(path, &fmt) != 0) return NULL;
    Input *in = xcalloc(1, sizeof *in);
    in->path = xstrdup(path);
    in->format = fmt;
    int rc = fmt == INPUT_H5AD     ? input_h5ad_open(in, opt)
             : fmt == INPUT_10X_H5 ? input_10x_h5_open(in, opt)
                                   : input_mtx_open(in, opt);
    if (rc == 0 && !in->others) in->others = xstrdup("");
    if (rc == 0) input_ids_normalise(in);
    if (rc == 0 && opt->labels_tsv) rc = input_labels_from_tsv(in, opt->labels_tsv, opt->label_key);
    if (rc == 0 && opt->label_key && !opt->labels_tsv && !in->label_key) {
        error_set("%s: %s files carry no cell labels (asked for label column '%s')", path,
                  input_format_name(fmt), opt->label_key);
        rc = error_set_hint("give the labels in a TSV file (barcode<TAB>label) with --labels FILE");
    }
    if (rc != 0) {
        // Keep the message and hint of the failure across the cleanup.
        char msg[1024], hint[1024];
        snprintf(msg, sizeof msg, "%s", error_last());
        const char *h = error_last_hint();
        snprintf(hint, sizeof hint, "%s", h ? h : "");
        input_close(in);
        error_set("%s", msg);
        if (hint[0]) error_set_hint("%s", hint);
        return NULL;
    }
    return in;
}

void input_close(Input *in) {
    if (!in) return;
    if (in->close_impl) in->close_impl(in);
    h5_free_strings(in->cells, in->cells ? in->n_cells : 0);
    h5_free_strings(in->symbols, in->symbols ? in->n_genes : 0);
    h5_free_strings(in->ids, in->ids ? in->n_genes : 0);
    h5_free_strings(in->label_names, in->n_label_names);
    free(in->label_codes);
    free(in->label_key);
    free(in->label_source);
    free(in->path);
    free(in->matrix);
    free(in->others);
    free(in->genomes);
    free(in->skipped_what);
    free(in->feature_gene);
    raw_rows_free(&in->scratch);
    free(in);
}

const char *input_describe(const Input *in) {
    static _Thread_local char buf[256];
    const char *layout = in->layout ? in->layout : "";
    snprintf(buf, sizeof buf, "%s, %s (%s)", input_format_name(in->format), in->matrix, layout);
    return buf;
}

// ---------------------------------------------------------------------------
// Range reads

// Convert raw values of cells starting at input cell `c0` into counts, with the check.
static void rows_append_raw(InputRows *r, const RawRows *raw, size_t c0, const int32_t *feature_gene) {
    input_rows_reserve(r, r->n_cells + raw->n_cells, r->nnz + raw->nnz);
    CountsCheck *c = &r->check;
    c->n_values += (int64_t)raw->nnz + raw->n_implicit;
    size_t k = r->nnz;
    for (size_t i = 0; i < raw->n_cells; i++) {
        int64_t total = 0;
        for (int64_t j = raw->indptr[i]; j < raw->indptr[i + 1]; j++) {
            int32_t gene = feature_gene ? feature_gene[raw->gene[j]] : raw->gene[j];
            if (gene < 0) { // not a gene (input_feature_is_gene)
                c->n_values--;
                continue;
            }
            double v = raw->value[j];
            int bad = 0;
            if (!isfinite(v)) {
                c->n_nonfinite++;
                bad = 1;
            } else {
                if (v > c->max_value) c->max_value = v;
                if (v < 0) {
                    c->n_negative++;
                    bad = 1;
                } else if (v != floor(v)) {
                    c->n_fraction++;
                    bad = 1;
                } else if (v >= 2147483648.0) {
                    c->n_large++;
                    bad = 1;
                }
            }
            if (bad) {
                if (c->bad_cell < 0) {
                    c->bad_cell = (int64_t)(c0 + i);
                    c->bad_gene = gene;
                    c->bad_value = v;
                }
                continue;
            }
            if (v == 0) continue;
            r->gene[k] = gene;
            r->count[k++] = (int32_t)v;
            total += (int64_t)v;
        }
        r->total[r->n_cells] = total;
        r->indptr[++r->n_cells] = (int64_t)k;
    }
    r->nnz = k;
}

int input_read_rows(Input *in, size_t c0, size_t c1, InputRows *rows) {
    if (c0 > c1 || c1 > in->n_cells)
        return error_set("%s: cell range [%zu, %zu) outside [0, %zu)", in->path, c0, c1,
                         in->n_cells);
    input_rows_reserve(rows, c1 - c0, 0);
    rows->n_cells = rows->nnz = 0;
    rows->indptr[0] = 0;
    counts_check_init(&rows->check);
    // Pieces of cells of about READ_PIECE values keep the raw scratch small.
    size_t step = in->n_genes > 0 ? READ_PIECE / in->n_genes : READ_PIECE;
    if (step < 256) step = 256;
    for (size_t a = c0; a < c1; a += step) {
        size_t b = a + step < c1 ? a + step : c1;
        raw_rows_clear(&in->scratch);
        raw_rows_reserve(&in->scratch, b - a, 0);
        if (in->read_raw(in, a, b, &in->scratch) != 0) return -1;
        if (in->scratch.n_cells != b - a)
            return error_set("%s: internal: read %zu cells, expected %zu", in->path,
                             in->scratch.n_cells, b - a);
        rows_append_raw(rows, &in->scratch, a, in->feature_gene);
    }
    return 0;
}

// ---------------------------------------------------------------------------
// Labels from a TSV file

int64_t input_gz_line(gzFile f, char **buf, size_t *cap) {
    size_t n = 0;
    if (!*buf) {
        *cap = 4096;
        *buf = xmalloc(*cap);
    }
    for (;;) {
        if (!gzgets(f, *buf + n, (int)(*cap - n))) {
            int err = 0;
            gzerror(f, &err);
            if (err != Z_OK && err != Z_STREAM_END) return -2;
            if (n == 0) return -1;
            break;
        }
        n += strlen(*buf + n);
        if (n > 0 && (*buf)[n - 1] == '\n') break;
        if (n + 1 >= *cap) {
            if (*cap >= ((size_t)1 << 26)) return -2; // a 64 MiB line is no TSV line
            *cap *= 2;
            *buf = xrealloc(*buf, *cap);
        }
    }
    while (n > 0 && ((*buf)[n - 1] == '\n' || (*buf)[n - 1] == '\r')) (*buf)[--n] = '\0';
    return (int64_t)n;
}

static size_t split_fields(char *line, char **f, size_t max) {
    size_t n = 0;
    char *p = line;
    while (n < max) {
        f[n++] = p;
        char *t = strchr(p, '\t');
        if (!t) break;
        *t = '\0';
        p = t + 1;
    }
    return n;
}

static int header_first_field(const char *s) {
    static const char *names[] = {"",        "barcode",      "barcodes",  "cell",  "cells",
                                  "cell_id", "cellid",       "cell_barcode", "obs_names",
                                  "index",   "name",         "cell_name"};
    char low[64];
    size_t n = strlen(s);
    if (n >= sizeof low) return 0;
    for (size_t i = 0; i <= n; i++) low[i] = (char)tolower((unsigned char)s[i]);
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strcmp(low, names[i]) == 0) return 1;
    return 0;
}

#define TSV_MAX_FIELDS 256

int input_labels_from_tsv(Input *in, const char *tsv, const char *label_key) {
    gzFile f = gzopen(tsv, "rb");
    if (!f) {
        error_set("cannot open labels file '%s'", tsv);
        return error_set_hint("--labels takes a text file of barcode<TAB>label lines");
    }
    char *line = NULL;
    size_t cap = 0, line_no = 0, col = 1;
    int32_t *codes = xmalloc((in->n_cells ? in->n_cells : 1) * sizeof *codes);
    for (size_t i = 0; i < in->n_cells; i++) codes[i] = -1;
    char *key = NULL;
    StrIndex cells;
    StrSet labels = {0};
    str_index_build(&cells, in->cells, in->n_cells);
    int rc = -1;
    int64_t len;
    while ((len = input_gz_line(f, &line, &cap)) >= 0) {
        line_no++;
        if (strlen(line) != (size_t)len) {
            error_set("%s:%zu: binary data in a labels file", tsv, line_no);
            error_set_hint("--labels takes a text file of barcode<TAB>label lines");
            goto done;
        }
        if (len == 0) continue;
        char *f_[TSV_MAX_FIELDS];
        size_t nf = split_fields(line, f_, TSV_MAX_FIELDS);
        if (line_no == 1) {
            int has_key = 0;
            for (size_t i = 1; label_key && i < nf; i++)
                if (strcmp(f_[i], label_key) == 0) {
                    has_key = 1;
                    col = i;
                }
            if (has_key || (header_first_field(f_[0]) && str_index_find(&cells, f_[0]) < 0)) {
                if (label_key && !has_key) {
                    char list[512] = "";
                    size_t k = 0;
                    for (size_t i = 1; i < nf && k < sizeof list; i++)
                        k += (size_t)snprintf(list + k, sizeof list - k, "%s'%s'", i > 1 ? ", " : "",
                                              f_[i]);
                    error_set("%s: no column '%s' in the header (columns: %s)", tsv, label_key,
                              list);
                    error_set_hint("pass --label-key with one of the columns of the header");
                    goto done;
                }
                if (nf < 2) {
                    error_set("%s:1: the header has no label column", tsv);
                    error_set_hint("--labels takes a text file of barcode<TAB>label lines");
                    goto done;
                }
                key = xstrdup(f_[col]);
                continue;
            }
        }
        if (nf <= col) {
            error_set("%s:%zu: expected a barcode and a label separated by a tab, found %zu "
                      "field(s)",
                      tsv, line_no, nf);
            error_set_hint("--labels takes a text file of barcode<TAB>label lines");
            goto done;
        }
        const char *label = f_[col];
        int32_t cell = str_index_find(&cells, f_[0]);
        if (cell < 0) {
            in->tsv_unmatched++;
            continue;
        }
        if (!label[0]) continue;
        int32_t code = str_set_add(&labels, label);
        for (int32_t c = cell; c >= 0; c = str_index_next(&cells, c)) {
            if (codes[c] >= 0 && codes[c] != code) {
                error_set("%s:%zu: cell '%s' is labelled twice ('%s' and '%s')", tsv, line_no,
                          f_[0], labels.names[codes[c]], label);
                error_set_hint("give each barcode one label");
                goto done;
            }
            codes[c] = code;
        }
    }
    if (len == -2) {
        error_set("%s: read error (truncated or corrupt gzip?)", tsv);
        goto done;
    }
    in->label_key = key ? key : xstrdup(label_key ? label_key : "label");
    key = NULL;
    in->label_source = xstrdup(tsv);
    in->label_names = str_set_take(&labels, &in->n_label_names);
    in->label_codes = codes;
    codes = NULL;
    rc = 0;
done:
    gzclose(f);
    free(line);
    free(key);
    free(codes);
    str_set_free(&labels);
    str_index_free(&cells);
    return rc;
}

// ---------------------------------------------------------------------------
// HDF5 helpers

int input_h5_check_storage(hid_t dset, const char *where, const char *name) {
    hid_t sp = H5Dget_space(dset), t = H5Dget_type(dset);
    int rc = 0;
    hssize_t n = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    size_t w = t >= 0 ? H5Tget_size(t) : 0;
    if (n < 0 || w == 0) {
        rc = error_set_h5("%s: cannot read the shape of '%s'", where, name);
    } else {
        double declared = (double)n * (double)w;
        double stored = (double)H5Dget_storage_size(dset);
        if (declared > (double)(1u << 26) && declared > 4096.0 * stored)
            rc = error_set("%s: dataset '%s' declares %lld values but stores only %.0f bytes "
                           "(corrupt file?)",
                           where, name, (long long)n, stored);
    }
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    return rc;
}

// Strings of a 1-D dataset, with the storage checked and, when expect >= 0,
// the number of values.
int input_h5_read_strings(hid_t file, const char *path, const char *where, int64_t expect,
                        char ***out, size_t *n) {
    if (h5_object_type(file, path) != H5O_TYPE_DATASET)
        return error_set("%s: missing dataset '%s'", where, path);
    hid_t d = H5Dopen2(file, path, H5P_DEFAULT);
    if (d < 0) return error_set_h5("%s: cannot open '%s'", where, path);
    int rc = input_h5_check_storage(d, where, path);
    H5Dclose(d);
    if (rc != 0) return -1;
    if (h5_read_strings(file, path, where, out, n) != 0) return -1;
    if (expect >= 0 && (int64_t)*n != expect) {
        h5_free_strings(*out, *n);
        *out = NULL;
        return error_set("%s: '%s' has %zu values, expected %lld", where, path, *n,
                         (long long)expect);
    }
    return 0;
}

// Chunks of an unfiltered chunked 1-D dataset that values [start, start +
// count) touch must each be stored whole: HDF5 1.10 trusts the size its chunk
// index records and reads past its buffer when a damaged index says less.
// One B-tree lookup per chunk, only for the chunks of this read.
static int check_chunks(hid_t d, int64_t start, size_t count, const char *where, const char *name) {
    hid_t dcpl = H5Dget_create_plist(d), t = H5Dget_type(d);
    int rc = 0;
    hsize_t chunk = 0;
    if (dcpl < 0 || t < 0) {
        rc = error_set_h5("%s: cannot read the storage of '%s'", where, name);
    } else if (H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_nfilters(dcpl) == 0 &&
               H5Pget_chunk(dcpl, 1, &chunk) == 1 && chunk > 0) {
        const size_t w = H5Tget_size(t);
        for (hsize_t c = (hsize_t)start / chunk; rc == 0 && c * chunk < (hsize_t)start + count; c++) {
            hsize_t off = c * chunk, size = 0;
            haddr_t addr = 0;
            unsigned mask = 0;
            if (H5Dget_chunk_info_by_coord(d, &off, &mask, &addr, &size) < 0)
                rc = error_set_h5("%s: cannot look up chunk %llu of '%s'", where, (unsigned long long)c, name);
            else if (addr != HADDR_UNDEF && size != chunk * w)
                rc = error_set("%s: chunk %llu of '%s' is stored in %llu bytes, an unfiltered chunk "
                               "holds %llu (corrupt file)",
                               where, (unsigned long long)c, name, (unsigned long long)size,
                               (unsigned long long)(chunk * w));
        }
    }
    if (t >= 0) H5Tclose(t);
    if (dcpl >= 0) H5Pclose(dcpl);
    return rc;
}

static int read_slab(hid_t d, hid_t memtype, int64_t start, size_t count, void *buf,
                     const char *where, const char *name) {
    if (count == 0) return 0;
    if (check_chunks(d, start, count, where, name) != 0) return -1;
    hid_t fs = H5Dget_space(d), ms = H5I_INVALID_HID;
    int rc = -1;
    hsize_t st = (hsize_t)start, cn = (hsize_t)count;
    if (fs < 0 || H5Sselect_hyperslab(fs, H5S_SELECT_SET, &st, NULL, &cn, NULL) < 0) {
        error_set_h5("%s: cannot select values %lld.. of '%s'", where, (long long)start, name);
        goto cleanup;
    }
    ms = H5Screate_simple(1, &cn, NULL);
    if (ms < 0 || H5Dread(d, memtype, ms, fs, H5P_DEFAULT, buf) < 0) {
        error_set_h5("%s: cannot read values %lld..%lld of '%s'", where, (long long)start,
                     (long long)(start + (int64_t)count), name);
        goto cleanup;
    }
    rc = 0;
cleanup:
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return rc;
}

static int open_1d(hid_t file, const char *group, const char *name, const char *where, hid_t *d,
                   int64_t *n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", group, name);
    if (h5_object_type(file, path) != H5O_TYPE_DATASET)
        return error_set("%s: missing dataset '%s'", where, path);
    if ((*d = H5Dopen2(file, path, H5P_DEFAULT)) < 0)
        return error_set_h5("%s: cannot open '%s'", where, path);
    hid_t sp = H5Dget_space(*d), t = H5Dget_type(*d);
    int rank = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
    hssize_t np = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    H5T_class_t cls = t >= 0 ? H5Tget_class(t) : H5T_NO_CLASS;
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    if (rank != 1 || np < 0) return error_set("%s: '%s' is not a one-dimensional dataset", where, path);
    if (cls != H5T_INTEGER && cls != H5T_FLOAT)
        return error_set("%s: '%s' does not hold numbers", where, path);
    *n = (int64_t)np;
    return input_h5_check_storage(*d, where, path);
}

int h5_row_matrix_open(H5RowMatrix *m, hid_t file, const char *group, const char *where,
                       int64_t n_rows, int64_t n_cols) {
    memset(m, 0, sizeof *m);
    m->data = m->indices = m->indptr = H5I_INVALID_HID;
    m->n_rows = n_rows;
    m->n_cols = n_cols;
    m->where = xstrdup(where);
    int64_t nd = 0, ni = 0, np = 0;
    if (open_1d(file, group, "data", where, &m->data, &nd) != 0 ||
        open_1d(file, group, "indices", where, &m->indices, &ni) != 0 ||
        open_1d(file, group, "indptr", where, &m->indptr, &np) != 0)
        return -1;
    if (nd != ni)
        return error_set("%s: data has %lld values but indices %lld", where, (long long)nd,
                         (long long)ni);
    if (np != n_rows + 1)
        return error_set("%s: indptr has %lld values, expected %lld (cells + 1)", where,
                         (long long)np, (long long)n_rows + 1);
    m->nnz = nd;
    int64_t ends[2] = {0, 0};
    if (read_slab(m->indptr, H5T_NATIVE_INT64, 0, 1, &ends[0], where, "indptr") != 0 ||
        read_slab(m->indptr, H5T_NATIVE_INT64, n_rows, 1, &ends[1], where, "indptr") != 0)
        return -1;
    if (ends[0] != 0 || ends[1] != nd)
        return error_set("%s: indptr runs from %lld to %lld, expected 0 to %lld (the number of "
                         "stored values)",
                         where, (long long)ends[0], (long long)ends[1], (long long)nd);
    return 0;
}

void h5_row_matrix_close(H5RowMatrix *m) {
    if (m->data >= 0) H5Dclose(m->data);
    if (m->indices >= 0) H5Dclose(m->indices);
    if (m->indptr >= 0) H5Dclose(m->indptr);
    free(m->where);
    memset(m, 0, sizeof *m);
    m->data = m->indices = m->indptr = H5I_INVALID_HID;
}

int h5_row_matrix_read(const H5RowMatrix *m, size_t c0, size_t c1, RawRows *out) {
    if (c0 > c1 || (int64_t)c1 > m->n_rows)
        return error_set("%s: internal: rows [%zu, %zu) outside [0, %lld)", m->where, c0, c1,
                         (long long)m->n_rows);
    size_t n = c1 - c0;
    int64_t *ptr = xmalloc((n + 1) * sizeof *ptr);
    int64_t *idx = NULL;
    double *val = NULL;
    int rc = -1;
    if (read_slab(m->indptr, H5T_NATIVE_INT64, (int64_t)c0, n + 1, ptr, m->where, "indptr") != 0)
        goto done;
    for (size_t i = 0; i < n; i++) {
        if (ptr[i] < 0 || ptr[i] > ptr[i + 1] || ptr[i + 1] > m->nnz) {
            error_set("%s: indptr is not ascending within [0, %lld] at cell %zu", m->where,
                      (long long)m->nnz, c0 + i);
            goto done;
        }
    }
    raw_rows_reserve(out, out->n_cells + n, out->nnz);
    // Read the values in pieces of whole cells of at most READ_PIECE values.
    size_t cap = 0;
    for (size_t a = 0; a < n;) {
        size_t b = a + 1;
        while (b < n && ptr[b + 1] - ptr[a] <= (int64_t)READ_PIECE) b++;
        size_t cnt = (size_t)(ptr[b] - ptr[a]);
        if (cnt > cap) {
            free(idx);
            free(val);
            cap = cnt;
            idx = xmalloc(cap * sizeof *idx);
            val = xmalloc(cap * sizeof *val);
        }
        if (read_slab(m->indices, H5T_NATIVE_INT64, ptr[a], cnt, idx, m->where, "indices") != 0 ||
            read_slab(m->data, H5T_NATIVE_DOUBLE, ptr[a], cnt, val, m->where, "data") != 0)
            goto done;
        raw_rows_reserve(out, out->n_cells + (b - a), out->nnz + cnt);
        size_t k = out->nnz;
        for (size_t i = a; i < b; i++) {
            for (int64_t j = ptr[i] - ptr[a]; j < ptr[i + 1] - ptr[a]; j++) {
                int64_t col = idx[j];
                if (col < 0 || col >= m->n_cols) {
                    error_set("%s: gene index %lld out of range [0, %lld) at cell %zu", m->where,
                              (long long)col, (long long)m->n_cols, c0 + i);
                    goto done;
                }
                int32_t g = m->col_map ? m->col_map[col] : (int32_t)col;
                if (g < 0) continue;
                out->gene[k] = g + m->gene_offset;
                out->value[k++] = val[j];
            }
            out->indptr[++out->n_cells] = (int64_t)k;
        }
        out->nnz = k;
        a = b;
    }
    rc = 0;
done:
    free(ptr);
    free(idx);
    free(val);
    return rc;
}
