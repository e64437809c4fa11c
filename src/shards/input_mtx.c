// 10x MatrixMarket folders: matrix.mtx (genes x cells, `coordinate integer|real
// general`), barcodes.tsv and features.tsv (v3: id, name, feature type) or
// genes.tsv (v2: id, name), each gzip-compressed or not. The text has no
// index, so the matrix is parsed whole on the first range read and kept as
// rows of cells; the header, the sizes and the file list are checked at open.
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/input.h"
#include "perfcell/util.h"

#include <ctype.h>
#include <errno.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *matrix_path;
    size_t n_features;
    int32_t *col_map;  // (n_features) feature -> gene, -1 left out
    int transposed;    // the file is cells x genes
    int64_t rows, cols, declared;
    int loaded;
    int64_t *ptr;      // (n_cells + 1)
    int32_t *gene;     // (nnz)
    double *val;       // (nnz)
} Mtx;

// The first of `names` present in `dir`, or NULL.
static char *find_file(const char *dir, const char *const *names, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char *p = path_join(dir, names[i]);
        if (path_exists(p) && !path_is_dir(p)) return p;
        free(p);
    }
    return NULL;
}

// Every line of a text file, split on tabs: calls `fn` with the fields.
typedef int (*LineFn)(void *ctx, size_t line_no, char **f, size_t nf);
static int each_line(const char *path, LineFn fn, void *ctx) {
    gzFile f = gzopen(path, "rb");
    if (!f) return error_set("cannot open '%s'", path);
    char *line = NULL;
    size_t cap = 0, line_no = 0;
    int64_t len;
    int rc = 0;
    while (rc == 0 && (len = input_gz_line(f, &line, &cap)) >= 0) {
        line_no++;
        if (strlen(line) != (size_t)len) {
            rc = error_set("%s:%zu: binary data in a text file", path, line_no);
            break;
        }
        if (len == 0) {
            rc = error_set("%s:%zu: empty line", path, line_no);
            break;
        }
        char *fl[4];
        size_t nf = 0;
        char *p = line;
        while (nf < 4) {
            fl[nf++] = p;
            char *t = strchr(p, '\t');
            if (!t) break;
            *t = '\0';
            p = t + 1;
        }
        rc = fn(ctx, line_no, fl, nf);
    }
    if (rc == 0 && len == -2) rc = error_set("%s: read error (truncated or corrupt gzip?)", path);
    free(line);
    gzclose(f);
    return rc;
}

typedef struct {
    size_t n, cap;
    char **a, **b, **c; // first three fields ("" when absent)
} Lines;

static int collect(void *ctx, size_t line_no, char **f, size_t nf) {
    Lines *l = ctx;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 1024;
        l->a = xrealloc(l->a, l->cap * sizeof *l->a);
        l->b = xrealloc(l->b, l->cap * sizeof *l->b);
        l->c = xrealloc(l->c, l->cap * sizeof *l->c);
    }
    l->a[l->n] = xstrdup(f[0]);
    l->b[l->n] = xstrdup(nf > 1 ? f[1] : "");
    l->c[l->n] = xstrdup(nf > 2 ? f[2] : "");
    l->n++;
    return 0;
}

static void lines_free(Lines *l) {
    h5_free_strings(l->a, l->n);
    h5_free_strings(l->b, l->n);
    h5_free_strings(l->c, l->n);
    memset(l, 0, sizeof *l);
}

// The header: banner and size line. Leaves `f` at the first entry.
static int read_header(gzFile f, const char *path, Mtx *m, char **line, size_t *cap,
                       size_t *line_no) {
    int64_t len = input_gz_line(f, line, cap);
    *line_no = 1;
    if (len < 0) return error_set("%s: empty or unreadable file", path);
    char tok[5][64] = {{0}};
    int nt = sscanf(*line, "%63s %63s %63s %63s %63s", tok[0], tok[1], tok[2], tok[3], tok[4]);
    for (int i = 0; i < 5; i++)
        for (char *p = tok[i]; *p; p++) *p = (char)tolower((unsigned char)*p);
    if (nt < 1 || strcmp(tok[0], "%%matrixmarket") != 0)
        return error_set("%s:1: not a MatrixMarket file (no %%%%MatrixMarket banner)", path);
    if (nt != 5 || strcmp(tok[1], "matrix") != 0)
        return error_set("%s:1: bad MatrixMarket banner '%s' (expected '%%%%MatrixMarket matrix "
                         "coordinate integer general')",
                         path, *line);
    if (strcmp(tok[2], "coordinate") != 0)
        return error_set("%s:1: a '%s' MatrixMarket matrix; 10x matrices are 'coordinate'", path,
                         tok[2]);
    if (strcmp(tok[3], "integer") != 0 && strcmp(tok[3], "real") != 0 &&
        strcmp(tok[3], "double") != 0)
        return error_set("%s:1: MatrixMarket field '%s' holds no counts (expected integer or real)",
                         path, tok[3]);
    if (strcmp(tok[4], "general") != 0)
        return error_set("%s:1: a '%s' MatrixMarket matrix; 10x matrices are 'general'", path,
                         tok[4]);
    for (;;) {
        len = input_gz_line(f, line, cap);
        (*line_no)++;
        if (len < 0) return error_set("%s: no size line after the header (truncated file?)", path);
        if ((*line)[0] != '%') break;
    }
    long long r, c, n;
    char extra;
    if (sscanf(*line, "%lld %lld %lld %c", &r, &c, &n, &extra) != 3 || r < 0 || c < 0 || n < 0)
        return error_set("%s:%zu: bad size line '%s' (expected: rows columns entries)", path,
                         *line_no, *line);
    if (r > INT32_MAX || c > INT32_MAX || (r > 0 && c > 0 && n / r > c) || ((r == 0 || c == 0) && n > 0))
        return error_set("%s:%zu: impossible sizes %lld x %lld with %lld entries", path, *line_no,
                         r, c, n);
    m->rows = r;
    m->cols = c;
    m->declared = n;
    return 0;
}

typedef struct {
    int32_t gene;
    double val;
} Entry;

static int cmp_entry(const void *a, const void *b) {
    int32_t x = ((const Entry *)a)->gene, y = ((const Entry *)b)->gene;
    return x < y ? -1 : x > y;
}

static int mtx_load(Input *in, Mtx *m) {
    const char *path = m->matrix_path;
    gzFile f = gzopen(path, "rb");
    if (!f) return error_set("cannot open '%s'", path);
    char *line = NULL;
    size_t cap = 0, line_no = 0, n = 0, cap_e = 0;
    int32_t *cell = NULL, *gene = NULL;
    double *val = NULL;
    int rc = -1;
    int64_t len = 0;
    if (read_header(f, path, m, &line, &cap, &line_no) != 0) goto done;
    int64_t seen = 0;
    while ((len = input_gz_line(f, &line, &cap)) >= 0) {
        line_no++;
        if (len == 0 || line[0] == '%') continue;
        char *p = line, *end;
        errno = 0;
        long long i = strtoll(p, &end, 10);
        if (end == p) goto bad_line;
        p = end;
        long long j = strtoll(p, &end, 10);
        if (end == p) goto bad_line;
        p = end;
        double v = strtod(p, &end);
        if (end == p || errno == ERANGE) goto bad_line;
        while (*end == ' ' || *end == '\t' || *end == '\r') end++;
        if (*end) goto bad_line;
        if (++seen > m->declared) {
            error_set("%s:%zu: more entries than the %lld the size line declares", path, line_no,
                      (long long)m->declared);
            goto done;
        }
        if (i < 1 || i > m->rows || j < 1 || j > m->cols) {
            error_set("%s:%zu: entry (%lld, %lld) outside the %lld x %lld matrix", path, line_no, i,
                      j, (long long)m->rows, (long long)m->cols);
            goto done;
        }
        int64_t feat = m->transposed ? j - 1 : i - 1, c = m->transposed ? i - 1 : j - 1;
        int32_t g = m->col_map[feat];
        if (g < 0) continue;
        if (n == cap_e) {
            cap_e = cap_e ? 2 * cap_e : 65536;
            cell = xrealloc(cell, cap_e * sizeof *cell);
            gene = xrealloc(gene, cap_e * sizeof *gene);
            val = xrealloc(val, cap_e * sizeof *val);
        }
        cell[n] = (int32_t)c;
        gene[n] = g;
        val[n++] = v;
        continue;
    bad_line:
        error_set("%s:%zu: bad entry '%.80s' (expected: row column value)", path, line_no, line);
        goto done;
    }
    if (len == -2) {
        error_set("%s: read error after line %zu (truncated or corrupt gzip?)", path, line_no);
        goto done;
    }
    if (seen != m->declared) {
        error_set("%s: %lld entries, but the size line declares %lld (truncated file?)", path,
                  (long long)seen, (long long)m->declared);
        goto done;
    }
    // Rows of cells (counting sort keeps file order), then genes ascending in each.
    m->ptr = xcalloc(in->n_cells + 1, sizeof *m->ptr);
    m->gene = xmalloc((n ? n : 1) * sizeof *m->gene);
    m->val = xmalloc((n ? n : 1) * sizeof *m->val);
    for (size_t e = 0; e < n; e++) m->ptr[cell[e] + 1]++;
    for (size_t c = 0; c < in->n_cells; c++) m->ptr[c + 1] += m->ptr[c];
    int64_t *fill = xmalloc((in->n_cells ? in->n_cells : 1) * sizeof *fill);
    memcpy(fill, m->ptr, in->n_cells * sizeof *fill);
    for (size_t e = 0; e < n; e++) {
        int64_t at = fill[cell[e]]++;
        m->gene[at] = gene[e];
        m->val[at] = val[e];
    }
    free(fill);
    Entry *tmp = NULL;
    size_t tmp_cap = 0;
    for (size_t c = 0; c < in->n_cells; c++) {
        int64_t a = m->ptr[c], b = m->ptr[c + 1];
        int sorted = 1;
        for (int64_t k = a + 1; k < b && sorted; k++) sorted = m->gene[k - 1] <= m->gene[k];
        if (sorted) continue;
        size_t len_row = (size_t)(b - a);
        if (len_row > tmp_cap) {
            tmp_cap = len_row;
            tmp = xrealloc(tmp, tmp_cap * sizeof *tmp);
        }
        for (size_t k = 0; k < len_row; k++) {
            tmp[k].gene = m->gene[a + (int64_t)k];
            tmp[k].val = m->val[a + (int64_t)k];
        }
        qsort(tmp, len_row, sizeof *tmp, cmp_entry);
        for (size_t k = 0; k < len_row; k++) {
            m->gene[a + (int64_t)k] = tmp[k].gene;
            m->val[a + (int64_t)k] = tmp[k].val;
        }
    }
    free(tmp);
    m->loaded = 1;
    rc = 0;
done:
    free(line);
    free(cell);
    free(gene);
    free(val);
    gzclose(f);
    return rc;
}

static int mtx_read_raw(Input *in, size_t c0, size_t c1, RawRows *out) {
    Mtx *m = in->impl;
    if (!m->loaded && mtx_load(in, m) != 0) return -1;
    size_t nnz = (size_t)(m->ptr[c1] - m->ptr[c0]);
    raw_rows_reserve(out, out->n_cells + (c1 - c0), out->nnz + nnz);
    size_t k = out->nnz;
    for (size_t c = c0; c < c1; c++) {
        for (int64_t j = m->ptr[c]; j < m->ptr[c + 1]; j++) {
            out->gene[k] = m->gene[j];
            out->value[k++] = m->val[j];
        }
        out->indptr[++out->n_cells] = (int64_t)k;
    }
    out->nnz = k;
    return 0;
}

static void mtx_close(Input *in) {
    Mtx *m = in->impl;
    if (!m) return;
    free(m->matrix_path);
    free(m->col_map);
    free(m->ptr);
    free(m->gene);
    free(m->val);
    free(m);
    in->impl = NULL;
}

static const char *MTX_HINT =
    "a 10x MatrixMarket folder holds matrix.mtx[.gz], barcodes.tsv[.gz] and features.tsv[.gz] "
    "(CellRanger v3) or genes.tsv (v2)";

int input_mtx_open(Input *in, const InputOptions *opt) {
    (void)opt;
    Mtx *m = xcalloc(1, sizeof *m);
    in->impl = m;
    in->read_raw = mtx_read_raw;
    in->close_impl = mtx_close;
    char *dir = NULL;
    if (path_is_dir(in->path)) {
        dir = xstrdup(in->path);
    } else {
        char *tmp = xstrdup(in->path);
        dir = xstrdup(dirname(tmp));
        free(tmp);
    }
    static const char *mnames[] = {"matrix.mtx.gz", "matrix.mtx"};
    static const char *fnames[] = {"features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"};
    static const char *bnames[] = {"barcodes.tsv.gz", "barcodes.tsv"};
    char *fpath = NULL, *bpath = NULL;
    Lines feat = {0}, bc = {0};
    int rc = -1;
    m->matrix_path = path_is_dir(in->path) ? find_file(dir, mnames, 2) : xstrdup(in->path);
    fpath = find_file(dir, fnames, 4);
    bpath = find_file(dir, bnames, 2);
    if (!m->matrix_path || !fpath || !bpath) {
        error_set("%s: not a 10x MatrixMarket folder (no %s)", in->path,
                  !m->matrix_path ? "matrix.mtx[.gz]"
                  : !fpath        ? "features.tsv[.gz] or genes.tsv[.gz]"
                                  : "barcodes.tsv[.gz]");
        error_set_hint("%s", MTX_HINT);
        goto done;
    }
    if (each_line(fpath, collect, &feat) != 0 || each_line(bpath, collect, &bc) != 0) goto done;
    // Check the header and the sizes now; the entries are parsed on the first read.
    gzFile f = gzopen(m->matrix_path, "rb");
    if (!f) {
        error_set("cannot open '%s'", m->matrix_path);
        goto done;
    }
    char *line = NULL;
    size_t cap = 0, line_no = 0;
    int hrc = read_header(f, m->matrix_path, m, &line, &cap, &line_no);
    free(line);
    gzclose(f);
    if (hrc != 0) goto done;
    if (feat.n == bc.n && m->rows == (int64_t)feat.n && m->cols == (int64_t)feat.n) {
        // The orientation is told by the lengths of the two files alone.
        error_set("%s: the matrix is %lld x %lld, and %s lists %zu features and %s %zu barcodes: "
                  "whether it is genes x cells or cells x genes cannot be told",
                  m->matrix_path, (long long)m->rows, (long long)m->cols, fpath, feat.n, bpath, bc.n);
        error_set_hint("perfcell reads a MatrixMarket matrix the way its features and barcodes "
                       "files fit; with as many cells as genes, write the data as .h5ad "
                       "(cells x genes) and build from that");
        goto done;
    }
    if (m->rows == (int64_t)feat.n && m->cols == (int64_t)bc.n) {
        m->transposed = 0;
    } else if (m->rows == (int64_t)bc.n && m->cols == (int64_t)feat.n) {
        m->transposed = 1;
    } else {
        error_set("%s: the matrix is %lld x %lld but the folder lists %zu features and %zu barcodes",
                  m->matrix_path, (long long)m->rows, (long long)m->cols, feat.n, bc.n);
        error_set_hint("the three files must come from the same CellRanger run");
        goto done;
    }
    m->n_features = feat.n;
    m->col_map = xmalloc((feat.n ? feat.n : 1) * sizeof *m->col_map);
    size_t n_genes = 0;
    for (size_t i = 0; i < feat.n; i++) {
        if (!input_feature_is_gene(feat.c[i])) {
            m->col_map[i] = -1;
        } else {
            m->col_map[i] = (int32_t)n_genes++;
        }
    }
    in->n_genes = n_genes;
    in->symbols = xmalloc((n_genes ? n_genes : 1) * sizeof *in->symbols);
    in->ids = xmalloc((n_genes ? n_genes : 1) * sizeof *in->ids);
    for (size_t i = 0; i < feat.n; i++) {
        int32_t g = m->col_map[i];
        if (g < 0) continue;
        in->ids[g] = xstrdup(feat.a[i]);
        in->symbols[g] = xstrdup(feat.b[i][0] ? feat.b[i] : feat.a[i]);
    }
    in->n_skipped = feat.n - n_genes;
    if (in->n_skipped) in->skipped_what = input_skipped_what(feat.c, m->col_map, feat.n, 0);
    in->n_cells = bc.n;
    in->cells = bc.a;
    bc.a = NULL;
    h5_free_strings(bc.b, bc.n);
    h5_free_strings(bc.c, bc.n);
    bc.b = bc.c = NULL;
    bc.n = 0;
    const char *base = strrchr(m->matrix_path, '/');
    in->matrix = xstrdup(base ? base + 1 : m->matrix_path);
    in->layout = m->transposed ? "cells x genes" : "genes x cells";
    rc = 0;
done:
    lines_free(&feat);
    lines_free(&bc);
    free(fpath);
    free(bpath);
    free(dir);
    return rc;
}
