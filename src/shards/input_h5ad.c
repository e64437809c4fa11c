// AnnData .h5ad inputs: X (or raw/X, layers/NAME) as CSR, CSC or dense, any
// numeric type; genes from the var index (raw/var for raw/X), Ensembl ids from
// a var column; cells from the obs index; labels from an obs column.
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/input.h"
#include "perfcell/util.h"

#include <stdlib.h>
#include <string.h>

enum { LAYOUT_CSR, LAYOUT_CSC, LAYOUT_DENSE };

// Rows per dense read: about this many values.
#define DENSE_PIECE ((size_t)1 << 22)

typedef struct {
    hid_t file;
    int layout;
    char *mpath;     // "X", "raw/X", "layers/NAME"
    H5RowMatrix csr; // CSR, and CSC read as rows of genes
    hid_t dense;
    size_t n_cols;   // columns of the matrix (features; genes may be fewer)
    // CSC: the whole matrix as rows of cells, read on the first range read.
    int cached;
    int64_t *c_ptr;  // (n_cells + 1)
    int32_t *c_gene; // (nnz)
    double *c_val;   // (nnz)
} H5ad;

static const char *ID_COLUMNS[] = {"gene_ids", "gene_id", "ensembl_id", "ensembl_ids",
                                   "feature_id", "feature_ids", "gene_ensembl_id"};
static const char *SYMBOL_COLUMNS[] = {"feature_name", "gene_symbols", "gene_symbol", "gene_name",
                                       "gene_names", "symbol", "symbols"};

// ---------------------------------------------------------------------------
// Strings and columns

// A numeric 1-D dataset of n values as int64.
static int read_ints(hid_t file, const char *path, const char *where, size_t n, int64_t **out) {
    hid_t d = H5Dopen2(file, path, H5P_DEFAULT);
    if (d < 0) return error_set_h5("%s: cannot open '%s'", where, path);
    hid_t sp = H5Dget_space(d), t = H5Dget_type(d);
    hssize_t np = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    int rank = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
    H5T_class_t cls = t >= 0 ? H5Tget_class(t) : H5T_NO_CLASS;
    int rc = 0;
    if (rank != 1 || np != (hssize_t)n)
        rc = error_set("%s: '%s' has %lld values, expected %zu", where, path, (long long)np, n);
    else if (cls != H5T_INTEGER && cls != H5T_ENUM)
        rc = error_set("%s: '%s' does not hold integers", where, path);
    if (rc == 0) {
        *out = xmalloc((n ? n : 1) * sizeof **out);
        if (n > 0 && H5Dread(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, *out) < 0) {
            free(*out);
            *out = NULL;
            rc = error_set_h5("%s: cannot read '%s'", where, path);
        }
    }
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    H5Dclose(d);
    return rc;
}

// Category names: strings, or numbers written as text.
static int read_categories(hid_t file, const char *path, const char *where, char ***out,
                           size_t *n) {
    hid_t d = H5Dopen2(file, path, H5P_DEFAULT);
    if (d < 0) return error_set_h5("%s: cannot open '%s'", where, path);
    hid_t t = H5Dget_type(d);
    H5T_class_t cls = t >= 0 ? H5Tget_class(t) : H5T_NO_CLASS;
    if (t >= 0) H5Tclose(t);
    int rc = input_h5_check_storage(d, where, path);
    hid_t sp = H5Dget_space(d);
    hssize_t np = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    if (sp >= 0) H5Sclose(sp);
    H5Dclose(d);
    if (rc != 0) return -1;
    if (cls == H5T_STRING) return input_h5_read_strings(file, path, where, -1, out, n);
    if (cls != H5T_INTEGER || np < 0) return error_set("%s: '%s' holds neither strings nor integers", where, path);
    int64_t *v = NULL;
    if (read_ints(file, path, where, (size_t)np, &v) != 0) return -1;
    *n = (size_t)np;
    *out = xmalloc((*n ? *n : 1) * sizeof **out);
    for (size_t i = 0; i < *n; i++) {
        char buf[32];
        snprintf(buf, sizeof buf, "%lld", (long long)v[i]);
        (*out)[i] = xstrdup(buf);
    }
    free(v);
    return 0;
}

// A dataframe column of n values as category names + codes (-1: missing):
// a categorical (codes + categories, or pre-0.8 codes with uns/<col>_categories),
// a string column or an integer column.
static int read_column_coded(hid_t file, const char *frame, const char *col, const char *where,
                             size_t n, char ***names, size_t *n_names, int32_t **codes) {
    char path[1024], cats[1100];
    snprintf(path, sizeof path, "%s/%s", frame, col);
    int type = h5_object_type(file, path);
    *names = NULL;
    *n_names = 0;
    *codes = NULL;
    int64_t *raw = NULL;
    int rc = -1;
    if (type == H5O_TYPE_GROUP) {
        snprintf(cats, sizeof cats, "%s/categories", path);
        char codes_path[1100];
        snprintf(codes_path, sizeof codes_path, "%s/codes", path);
        if (h5_object_type(file, cats) != H5O_TYPE_DATASET ||
            h5_object_type(file, codes_path) != H5O_TYPE_DATASET) {
            error_set("%s: column '%s' is a group but not a categorical (codes, categories)", where,
                      path);
            goto done;
        }
        if (read_categories(file, cats, where, names, n_names) != 0) goto done;
        if (read_ints(file, codes_path, where, n, &raw) != 0) goto done;
    } else if (type == H5O_TYPE_DATASET) {
        hid_t d = H5Dopen2(file, path, H5P_DEFAULT);
        hid_t t = d >= 0 ? H5Dget_type(d) : H5I_INVALID_HID;
        H5T_class_t cls = t >= 0 ? H5Tget_class(t) : H5T_NO_CLASS;
        if (t >= 0) H5Tclose(t);
        if (d >= 0) H5Dclose(d);
        // Pre-0.8 anndata: integer codes here, categories in uns/<col>_categories.
        snprintf(cats, sizeof cats, "uns/%s_categories", col);
        if (cls == H5T_STRING) {
            char **s = NULL;
            size_t ns = 0;
            if (input_h5_read_strings(file, path, where, (int64_t)n, &s, &ns) != 0) goto done;
            StrSet set = {0};
            *codes = xmalloc((n ? n : 1) * sizeof **codes);
            for (size_t i = 0; i < n; i++) (*codes)[i] = str_set_add(&set, s[i]);
            h5_free_strings(s, ns);
            *names = str_set_take(&set, n_names);
            rc = 0;
            goto done;
        } else if (cls == H5T_INTEGER && strcmp(frame, "obs") == 0 &&
                   h5_object_type(file, cats) == H5O_TYPE_DATASET) {
            if (read_categories(file, cats, where, names, n_names) != 0) goto done;
            if (read_ints(file, path, where, n, &raw) != 0) goto done;
        } else if (cls == H5T_INTEGER) {
            if (read_ints(file, path, where, n, &raw) != 0) goto done;
            StrSet set = {0};
            *codes = xmalloc((n ? n : 1) * sizeof **codes);
            for (size_t i = 0; i < n; i++) {
                char buf[32];
                snprintf(buf, sizeof buf, "%lld", (long long)raw[i]);
                (*codes)[i] = str_set_add(&set, buf);
            }
            *names = str_set_take(&set, n_names);
            rc = 0;
            goto done;
        } else {
            error_set("%s: column '%s' holds neither strings, integers nor categories", where, path);
            goto done;
        }
    } else {
        error_set("%s: no column '%s'", where, path);
        goto done;
    }
    *codes = xmalloc((n ? n : 1) * sizeof **codes);
    for (size_t i = 0; i < n; i++) {
        if (raw[i] < -1 || raw[i] >= (int64_t)*n_names) {
            error_set("%s: code %lld of cell/gene %zu in '%s' is outside the %zu categories", where,
                      (long long)raw[i], i, path, *n_names);
            goto done;
        }
        (*codes)[i] = (int32_t)raw[i];
    }
    rc = 0;
done:
    free(raw);
    if (rc != 0) {
        h5_free_strings(*names, *n_names);
        free(*codes);
        *names = NULL;
        *n_names = 0;
        *codes = NULL;
    }
    return rc;
}

// A column as n strings ("" where missing).
static int read_column_strings(hid_t file, const char *frame, const char *col, const char *where,
                               size_t n, char ***out) {
    char **names = NULL;
    size_t nn = 0;
    int32_t *codes = NULL;
    if (read_column_coded(file, frame, col, where, n, &names, &nn, &codes) != 0) return -1;
    *out = xmalloc((n ? n : 1) * sizeof **out);
    for (size_t i = 0; i < n; i++) (*out)[i] = xstrdup(codes[i] >= 0 ? names[codes[i]] : "");
    h5_free_strings(names, nn);
    free(codes);
    return 0;
}

// Name of the index dataset of a dataframe group.
static int frame_index(hid_t file, const char *frame, const char *where, char *name, size_t len) {
    int type = h5_object_type(file, frame);
    if (type == H5O_TYPE_DATASET)
        return error_set("%s: '%s' is a table (the layout of anndata before 0.7); re-save the file "
                         "with a recent anndata",
                         where, frame);
    if (type != H5O_TYPE_GROUP) return error_set("%s: no '%s' dataframe", where, frame);
    hid_t g = H5Gopen2(file, frame, H5P_DEFAULT);
    if (g < 0) return error_set_h5("%s: cannot open '%s'", where, frame);
    name[0] = '\0';
    if (h5_attr_exists(g, "_index")) h5_attr_read_string(g, "_index", name, len);
    H5Gclose(g);
    char path[1024];
    if (name[0]) {
        snprintf(path, sizeof path, "%s/%s", frame, name);
        if (h5_object_type(file, path) == H5O_TYPE_DATASET) return 0;
        return error_set("%s: '%s' names its index '%s', which does not exist", where, frame, name);
    }
    static const char *guesses[] = {"_index", "index"};
    for (size_t i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", frame, guesses[i]);
        if (h5_object_type(file, path) == H5O_TYPE_DATASET) {
            snprintf(name, len, "%s", guesses[i]);
            return 0;
        }
    }
    return error_set("%s: the '%s' dataframe has no index (no _index attribute)", where, frame);
}

// Names of the members of a group, comma separated, leaving out `skip`.
static void list_members(hid_t file, const char *group, const char *skip, char *out, size_t len) {
    out[0] = '\0';
    hid_t g = H5Gopen2(file, group, H5P_DEFAULT);
    if (g < 0) return;
    H5G_info_t gi;
    size_t k = 0;
    if (H5Gget_info(g, &gi) >= 0) {
        for (hsize_t i = 0; i < gi.nlinks && k + 1 < len; i++) {
            char name[256];
            if (H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name,
                                   H5P_DEFAULT) < 0)
                continue;
            if (skip && strcmp(name, skip) == 0) continue;
            k += (size_t)snprintf(out + k, len - k, "%s'%s'", k ? ", " : "", name);
        }
    }
    H5Gclose(g);
    if (k >= len) snprintf(out + len - 5, 5, "...");
}

// Features that are not genes (a var column feature_types, as 10x data read by
// scanpy has): left out by the rule of every format, input_feature_is_gene().
static int h5ad_features_select(Input *in, const H5ad *h, const char *var, const char *where) {
    static const char *TYPE_COLUMNS[] = {"feature_types", "feature_type"};
    char **types = NULL;
    for (size_t i = 0; i < sizeof TYPE_COLUMNS / sizeof *TYPE_COLUMNS && !types; i++) {
        char p[300];
        snprintf(p, sizeof p, "%s/%s", var, TYPE_COLUMNS[i]);
        if (h5_exists(h->file, p) &&
            read_column_strings(h->file, var, TYPE_COLUMNS[i], where, in->n_genes, &types) != 0)
            return -1;
    }
    if (!types) return 0;
    size_t n = in->n_genes, kept = 0;
    int32_t *map = xmalloc((n ? n : 1) * sizeof *map);
    for (size_t f = 0; f < n; f++) map[f] = input_feature_is_gene(types[f]) ? (int32_t)kept++ : -1;
    if (kept < n) {
        for (size_t f = 0; f < n; f++) {
            if (map[f] >= 0) {
                in->symbols[map[f]] = in->symbols[f];
                if (in->ids) in->ids[map[f]] = in->ids[f];
            } else {
                free(in->symbols[f]);
                if (in->ids) free(in->ids[f]);
            }
        }
        in->n_genes = kept;
        in->n_skipped = n - kept;
        in->skipped_what = input_skipped_what(types, map, n, 0);
        in->feature_gene = map;
    } else {
        free(map);
    }
    h5_free_strings(types, n);
    return 0;
}

static int looks_ensembl(const char *s) {
    if (strncmp(s, "ENS", 3) != 0) return 0;
    for (const char *p = s + 3; *p; p++)
        if (*p >= '0' && *p <= '9') return 1;
    return 0;
}

// ---------------------------------------------------------------------------
// Reading

static int h5ad_read_raw(Input *in, size_t c0, size_t c1, RawRows *out) {
    H5ad *h = in->impl;
    if (h->layout == LAYOUT_CSR) return h5_row_matrix_read(&h->csr, c0, c1, out);
    if (h->layout == LAYOUT_DENSE) {
        size_t g = h->n_cols;
        size_t step = g ? DENSE_PIECE / g : DENSE_PIECE;
        if (step == 0) step = 1;
        size_t n_buf = step * g;
        double *buf = xmalloc((n_buf ? n_buf : 1) * sizeof *buf);
        int rc = 0;
        for (size_t a = c0; a < c1 && rc == 0; a += step) {
            size_t b = a + step < c1 ? a + step : c1;
            hsize_t st[2] = {a, 0}, cn[2] = {b - a, g};
            hid_t fs = H5Dget_space(h->dense), ms = H5Screate_simple(2, cn, NULL);
            if (g > 0 && (fs < 0 || ms < 0 ||
                          H5Sselect_hyperslab(fs, H5S_SELECT_SET, st, NULL, cn, NULL) < 0 ||
                          H5Dread(h->dense, H5T_NATIVE_DOUBLE, ms, fs, H5P_DEFAULT, buf) < 0))
                rc = error_set_h5("%s: cannot read rows %zu..%zu of %s", in->path, a, b, h->mpath);
            if (ms >= 0) H5Sclose(ms);
            if (fs >= 0) H5Sclose(fs);
            if (rc != 0) break;
            size_t nz = 0;
            for (size_t i = 0; i < (b - a) * g; i++) nz += buf[i] != 0;
            raw_rows_reserve(out, out->n_cells + (b - a), out->nnz + nz);
            size_t k = out->nnz;
            for (size_t i = 0; i < b - a; i++) {
                for (size_t j = 0; j < g; j++) {
                    double v = buf[i * g + j];
                    if (v == 0) continue;
                    out->gene[k] = (int32_t)j;
                    out->value[k++] = v;
                }
                out->indptr[++out->n_cells] = (int64_t)k;
            }
            out->n_implicit += (int64_t)((b - a) * g - (k - out->nnz));
            out->nnz = k;
        }
        free(buf);
        return rc;
    }
    // CSC: transpose the whole matrix once.
    if (!h->cached) {
        RawRows genes = {0};
        raw_rows_reserve(&genes, h->n_cols, 0);
        genes.indptr[0] = 0;
        if (h5_row_matrix_read(&h->csr, 0, h->n_cols, &genes) != 0) {
            raw_rows_free(&genes);
            return -1;
        }
        size_t nnz = genes.nnz;
        h->c_ptr = xcalloc(in->n_cells + 1, sizeof *h->c_ptr);
        h->c_gene = xmalloc((nnz ? nnz : 1) * sizeof *h->c_gene);
        h->c_val = xmalloc((nnz ? nnz : 1) * sizeof *h->c_val);
        for (size_t j = 0; j < nnz; j++) h->c_ptr[genes.gene[j] + 1]++;
        for (size_t c = 0; c < in->n_cells; c++) h->c_ptr[c + 1] += h->c_ptr[c];
        int64_t *fill = xmalloc((in->n_cells ? in->n_cells : 1) * sizeof *fill);
        memcpy(fill, h->c_ptr, in->n_cells * sizeof *fill);
        // Genes in ascending order, so every cell's row comes out ascending.
        for (size_t g = 0; g < h->n_cols; g++) {
            for (int64_t j = genes.indptr[g]; j < genes.indptr[g + 1]; j++) {
                int64_t at = fill[genes.gene[j]]++;
                h->c_gene[at] = (int32_t)g;
                h->c_val[at] = genes.value[j];
            }
        }
        free(fill);
        raw_rows_free(&genes);
        h->cached = 1;
    }
    size_t nnz = (size_t)(h->c_ptr[c1] - h->c_ptr[c0]);
    raw_rows_reserve(out, out->n_cells + (c1 - c0), out->nnz + nnz);
    size_t k = out->nnz;
    for (size_t c = c0; c < c1; c++) {
        for (int64_t j = h->c_ptr[c]; j < h->c_ptr[c + 1]; j++) {
            out->gene[k] = h->c_gene[j];
            out->value[k++] = h->c_val[j];
        }
        out->indptr[++out->n_cells] = (int64_t)k;
    }
    out->nnz = k;
    return 0;
}

static void h5ad_close(Input *in) {
    H5ad *h = in->impl;
    if (!h) return;
    h5_row_matrix_close(&h->csr);
    if (h->dense >= 0) H5Dclose(h->dense);
    if (h->file >= 0) H5Fclose(h->file);
    free(h->mpath);
    free(h->c_ptr);
    free(h->c_gene);
    free(h->c_val);
    free(h);
    in->impl = NULL;
}

// ---------------------------------------------------------------------------
// Opening

// Is `path` a matrix (a sparse group or a 2-D dataset)?
static int is_matrix(hid_t file, const char *path) {
    int t = h5_object_type(file, path);
    if (t == H5O_TYPE_GROUP) {
        char sub[1100];
        snprintf(sub, sizeof sub, "%s/indptr", path);
        return h5_exists(file, sub);
    }
    return t == H5O_TYPE_DATASET;
}

// The file's other count matrices and their options, for the hint of a refusal.
static void list_others(Input *in, hid_t file, const char *current) {
    char others[1024] = "";
    size_t a = 0;
#define ADD(...)                                                                                   \
    do {                                                                                           \
        if (a < sizeof others) a += (size_t)snprintf(others + a, sizeof others - a, __VA_ARGS__);  \
    } while (0)
    if (strcmp(current, "X") != 0 && is_matrix(file, "X"))
        ADD("%sX (without --use-raw and --layer)", a ? ", " : "");
    if (strcmp(current, "raw/X") != 0 && is_matrix(file, "raw/X")) ADD("%sraw/X (--use-raw)", a ? ", " : "");
    hid_t g = h5_object_type(file, "layers") == H5O_TYPE_GROUP ? H5Gopen2(file, "layers", H5P_DEFAULT)
                                                               : H5I_INVALID_HID;
    H5G_info_t gi;
    if (g >= 0 && H5Gget_info(g, &gi) >= 0) {
        for (hsize_t i = 0; i < gi.nlinks && i < 32; i++) {
            char name[256], path[300];
            if (H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name,
                                   H5P_DEFAULT) < 0)
                continue;
            snprintf(path, sizeof path, "layers/%s", name);
            if (strcmp(current, path) == 0 || !is_matrix(file, path)) continue;
            ADD("%s%s (--layer %s)", a ? ", " : "", path, name);
        }
    }
    if (g >= 0) H5Gclose(g);
#undef ADD
    in->others = xstrdup(others);
}

static int open_matrix(Input *in, H5ad *h, const char *where, int64_t *rows, int64_t *cols) {
    int type = h5_object_type(h->file, h->mpath);
    if (type == H5O_TYPE_DATASET) {
        hid_t d = H5Dopen2(h->file, h->mpath, H5P_DEFAULT);
        if (d < 0) return error_set_h5("%s: cannot open %s", where, h->mpath);
        h->dense = d;
        hid_t sp = H5Dget_space(d), t = H5Dget_type(d);
        hsize_t dims[2] = {0, 0};
        int rank = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
        if (rank == 2) H5Sget_simple_extent_dims(sp, dims, NULL);
        H5T_class_t cls = t >= 0 ? H5Tget_class(t) : H5T_NO_CLASS;
        if (sp >= 0) H5Sclose(sp);
        if (t >= 0) H5Tclose(t);
        if (rank != 2) return error_set("%s: %s is a dataset of rank %d, not a matrix", where, h->mpath, rank);
        if (cls != H5T_INTEGER && cls != H5T_FLOAT)
            return error_set("%s: %s does not hold numbers", where, h->mpath);
        if (input_h5_check_storage(d, where, h->mpath) != 0) return -1;
        h->layout = LAYOUT_DENSE;
        in->layout = "dense";
        in->dense = 1;
        *rows = (int64_t)dims[0];
        *cols = (int64_t)dims[1];
        return 0;
    }
    if (type != H5O_TYPE_GROUP) return error_set("%s: no matrix %s", where, h->mpath);
    hid_t g = H5Gopen2(h->file, h->mpath, H5P_DEFAULT);
    if (g < 0) return error_set_h5("%s: cannot open %s", where, h->mpath);
    char enc[64] = "";
    int64_t shape[2] = {-1, -1};
    int rc = 0;
    if (h5_attr_exists(g, "encoding-type"))
        h5_attr_read_string(g, "encoding-type", enc, sizeof enc);
    else if (h5_attr_exists(g, "h5sparse_format"))
        h5_attr_read_string(g, "h5sparse_format", enc, sizeof enc);
    const char *shape_attr = h5_attr_exists(g, "shape") ? "shape" : "h5sparse_shape";
    if (!h5_attr_exists(g, shape_attr) || h5_attr_read_i64s(g, shape_attr, shape, 2) != 0)
        rc = error_set("%s: %s has no shape attribute of two values", where, h->mpath);
    H5Gclose(g);
    if (rc != 0) return -1;
    if (shape[0] < 0 || shape[1] < 0 || shape[0] > INT32_MAX || shape[1] > INT32_MAX)
        return error_set("%s: %s has an impossible shape (%lld, %lld)", where, h->mpath,
                         (long long)shape[0], (long long)shape[1]);
    if (strcmp(enc, "csr_matrix") == 0 || strcmp(enc, "csr") == 0) {
        h->layout = LAYOUT_CSR;
        in->layout = "CSR";
    } else if (strcmp(enc, "csc_matrix") == 0 || strcmp(enc, "csc") == 0) {
        h->layout = LAYOUT_CSC;
        in->layout = "CSC";
    } else {
        return error_set("%s: %s is a group with encoding '%s', not a csr_matrix or csc_matrix",
                         where, h->mpath, enc);
    }
    *rows = shape[0];
    *cols = shape[1];
    return 0;
}

int input_h5ad_open(Input *in, const InputOptions *opt) {
    H5ad *h = xcalloc(1, sizeof *h);
    h->file = h->dense = H5I_INVALID_HID;
    h->csr.data = h->csr.indices = h->csr.indptr = H5I_INVALID_HID;
    in->impl = h;
    in->read_raw = h5ad_read_raw;
    in->close_impl = h5ad_close;
    const char *path = in->path;
    if ((h->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0)
        return error_set_h5("cannot open '%s'", path);
    if (opt->use_raw && opt->layer) {
        error_set("%s: --use-raw and --layer both name the matrix to read", path);
        return error_set_hint("pass one of them");
    }
    if (opt->use_raw)
        h->mpath = xstrdup("raw/X");
    else if (opt->layer) {
        h->mpath = xmalloc(strlen(opt->layer) + 8);
        sprintf(h->mpath, "layers/%s", opt->layer);
    } else
        h->mpath = xstrdup("X");
    in->matrix = xstrdup(h->mpath);
    list_others(in, h->file, h->mpath);
    if (!is_matrix(h->file, h->mpath)) {
        char layers[512];
        list_members(h->file, "layers", NULL, layers, sizeof layers);
        error_set("%s: the file has no %s", path, h->mpath);
        if (in->others[0])
            return error_set_hint("this file has %s", in->others);
        return error_set_hint("this file holds no count matrix (no X, raw/X or layers%s%s)",
                              layers[0] ? ": " : "", layers);
    }
    char where[1200];
    snprintf(where, sizeof where, "%s", path);
    int64_t rows = 0, cols = 0;
    if (open_matrix(in, h, where, &rows, &cols) != 0) return -1;

    // Cells: the obs index.
    char idx[256];
    if (frame_index(h->file, "obs", where, idx, sizeof idx) != 0) return -1;
    char ipath[300];
    snprintf(ipath, sizeof ipath, "obs/%s", idx);
    if (input_h5_read_strings(h->file, ipath, where, -1, &in->cells, &in->n_cells) != 0) return -1;
    if ((int64_t)in->n_cells != rows)
        return error_set("%s: %s has %lld rows but obs has %zu cells", path, h->mpath,
                         (long long)rows, in->n_cells);

    // Genes: the var index (raw/var for raw/X), ids and symbols from its columns.
    const char *var = opt->use_raw ? "raw/var" : "var";
    if (frame_index(h->file, var, where, idx, sizeof idx) != 0) return -1;
    snprintf(ipath, sizeof ipath, "%s/%s", var, idx);
    if (input_h5_read_strings(h->file, ipath, where, -1, &in->symbols, &in->n_genes) != 0) return -1;
    if ((int64_t)in->n_genes != cols)
        return error_set("%s: %s has %lld columns but %s has %zu genes", path, h->mpath,
                         (long long)cols, var, in->n_genes);
    for (size_t i = 0; i < sizeof ID_COLUMNS / sizeof *ID_COLUMNS && !in->ids; i++) {
        char p[300];
        snprintf(p, sizeof p, "%s/%s", var, ID_COLUMNS[i]);
        if (h5_exists(h->file, p) &&
            read_column_strings(h->file, var, ID_COLUMNS[i], where, in->n_genes, &in->ids) != 0)
            return -1;
    }
    // Atlases indexed by Ensembl id (CELLxGENE): symbols live in a column.
    if (!in->ids && in->n_genes > 0 && looks_ensembl(in->symbols[0])) {
        for (size_t i = 0; i < sizeof SYMBOL_COLUMNS / sizeof *SYMBOL_COLUMNS; i++) {
            char p[300];
            snprintf(p, sizeof p, "%s/%s", var, SYMBOL_COLUMNS[i]);
            char **sym = NULL;
            if (!h5_exists(h->file, p)) continue;
            if (read_column_strings(h->file, var, SYMBOL_COLUMNS[i], where, in->n_genes, &sym) != 0)
                return -1;
            // A missing symbol keeps the id in its place.
            for (size_t g = 0; g < in->n_genes; g++) {
                if (!sym[g][0]) {
                    free(sym[g]);
                    sym[g] = xstrdup(in->symbols[g]);
                }
            }
            in->ids = in->symbols;
            in->symbols = sym;
            break;
        }
    }

    h->n_cols = in->n_genes;
    if (h5ad_features_select(in, h, var, where) != 0) return -1;

    // The matrix.
    if (h->layout != LAYOUT_DENSE) {
        int64_t r = h->layout == LAYOUT_CSR ? rows : cols, c = h->layout == LAYOUT_CSR ? cols : rows;
        snprintf(where, sizeof where, "%s: %s", path, h->mpath);
        if (h5_row_matrix_open(&h->csr, h->file, h->mpath, where, r, c) != 0) return -1;
    }

    // Labels from obs.
    if (opt->label_key && !opt->labels_tsv) {
        char p[1100];
        snprintf(p, sizeof p, "obs/%s", opt->label_key);
        if (!h5_exists(h->file, p)) {
            char cols_list[700];
            frame_index(h->file, "obs", path, idx, sizeof idx);
            list_members(h->file, "obs", idx, cols_list, sizeof cols_list);
            error_set("%s: no obs column '%s' for the labels (obs columns: %s)", path,
                      opt->label_key, cols_list[0] ? cols_list : "none");
            return error_set_hint("pass --label-key with one of the obs columns, or give the "
                                  "labels in a TSV file with --labels FILE");
        }
        if (read_column_coded(h->file, "obs", opt->label_key, path, in->n_cells, &in->label_names,
                              &in->n_label_names, &in->label_codes) != 0)
            return -1;
        // An empty label is no label.
        for (size_t i = 0; i < in->n_cells; i++) {
            int32_t c = in->label_codes[i];
            if (c >= 0 && !in->label_names[c][0]) in->label_codes[i] = -1;
        }
        in->label_key = xstrdup(opt->label_key);
        in->label_source = xstrdup(p);
    }
    return 0;
}
