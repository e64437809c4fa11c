// 10x Genomics HDF5 inputs. CellRanger v2: one group per genome,
// /<genome>/{barcodes,data,indices,indptr,shape,genes,gene_names}; v3:
// /matrix/{barcodes,data,indices,indptr,shape,features/{id,name,genome,
// feature_type}}. The matrix is genes x cells in CSC, that is one stored row
// per cell, so a range of cells reads only its own values.
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/input.h"
#include "perfcell/util.h"

#include <stdlib.h>
#include <string.h>

#define TENX_MAX_GENOMES 64

typedef struct {
    hid_t file;
    size_t n_parts; // genomes read (v2 --genome all), 1 otherwise
    H5RowMatrix part[TENX_MAX_GENOMES];
    int32_t *col_map; // v3: feature -> gene, -1 left out
    RawRows piece[TENX_MAX_GENOMES];
} TenX;

static int read_shape(hid_t file, const char *path, const char *where, int64_t shape[2]) {
    int64_t n = 0;
    int rank = 0;
    if (h5_object_type(file, path) != H5O_TYPE_DATASET)
        return error_set("%s: missing dataset '%s'", where, path);
    if (h5_dataset_size(file, path, where, &n, &rank) != 0) return -1;
    if (n != 2 || rank != 1) return error_set("%s: '%s' does not hold two values", where, path);
    if (h5_read_all(file, path, where, H5T_NATIVE_INT64, shape) != 0) return -1;
    if (shape[0] < 0 || shape[1] < 0 || shape[0] > INT32_MAX || shape[1] > INT32_MAX)
        return error_set("%s: '%s' is an impossible shape (%lld, %lld)", where, path,
                         (long long)shape[0], (long long)shape[1]);
    return 0;
}

static int tenx_read_raw(Input *in, size_t c0, size_t c1, RawRows *out) {
    TenX *t = in->impl;
    if (t->n_parts == 1) return h5_row_matrix_read(&t->part[0], c0, c1, out);
    // Several genomes: each cell's row is the concatenation of its rows.
    size_t nnz = 0;
    for (size_t p = 0; p < t->n_parts; p++) {
        raw_rows_clear(&t->piece[p]);
        raw_rows_reserve(&t->piece[p], c1 - c0, 0);
        if (h5_row_matrix_read(&t->part[p], c0, c1, &t->piece[p]) != 0) return -1;
        nnz += t->piece[p].nnz;
    }
    raw_rows_reserve(out, out->n_cells + (c1 - c0), out->nnz + nnz);
    size_t k = out->nnz;
    for (size_t i = 0; i < c1 - c0; i++) {
        for (size_t p = 0; p < t->n_parts; p++) {
            const RawRows *r = &t->piece[p];
            for (int64_t j = r->indptr[i]; j < r->indptr[i + 1]; j++) {
                out->gene[k] = r->gene[j];
                out->value[k++] = r->value[j];
            }
        }
        out->indptr[++out->n_cells] = (int64_t)k;
    }
    out->nnz = k;
    return 0;
}

static void tenx_close(Input *in) {
    TenX *t = in->impl;
    if (!t) return;
    for (size_t p = 0; p < TENX_MAX_GENOMES; p++) {
        if (p < t->n_parts) h5_row_matrix_close(&t->part[p]);
        raw_rows_free(&t->piece[p]);
    }
    free(t->col_map);
    if (t->file >= 0) H5Fclose(t->file);
    free(t);
    in->impl = NULL;
}

// CellRanger v3 and later.
static int open_v3(Input *in, TenX *t, const InputOptions *opt) {
    const char *path = in->path;
    int64_t shape[2];
    if (read_shape(t->file, "matrix/shape", path, shape) != 0) return -1;
    size_t n_feat = (size_t)shape[0];
    char **ids = NULL, **names = NULL, **types = NULL, **genomes = NULL;
    size_t n = 0;
    int rc = -1;
    StrSet gset = {0};
    if (input_h5_read_strings(t->file, "matrix/barcodes", path, shape[1], &in->cells, &in->n_cells) != 0)
        goto done;
    if (input_h5_read_strings(t->file, "matrix/features/id", path, (int64_t)n_feat, &ids, &n) != 0 ||
        input_h5_read_strings(t->file, "matrix/features/name", path, (int64_t)n_feat, &names, &n) != 0)
        goto done;
    if (h5_exists(t->file, "matrix/features/feature_type") &&
        input_h5_read_strings(t->file, "matrix/features/feature_type", path, (int64_t)n_feat, &types,
                        &n) != 0)
        goto done;
    if (h5_exists(t->file, "matrix/features/genome") &&
        input_h5_read_strings(t->file, "matrix/features/genome", path, (int64_t)n_feat, &genomes, &n) != 0)
        goto done;
    const char *want = opt->genome && strcmp(opt->genome, "all") != 0 ? opt->genome : NULL;
    if (want && !genomes) {
        error_set("%s: --genome %s, but the file records no genomes (no matrix/features/genome)",
                  path, want);
        error_set_hint("leave out --genome for this file");
        goto done;
    }
    if (genomes)
        for (size_t f = 0; f < n_feat; f++) str_set_add(&gset, genomes[f]);
    if (want && str_set_find(&gset, want) < 0) {
        char list[512] = "";
        size_t k = 0;
        for (size_t i = 0; i < gset.n && k < sizeof list; i++)
            k += (size_t)snprintf(list + k, sizeof list - k, "%s%s", i ? ", " : "", gset.names[i]);
        error_set("%s: no genome '%s' (genomes: %s)", path, want, list);
        error_set_hint("pass --genome with one of the genomes of the file, or --genome all");
        goto done;
    }
    t->col_map = xmalloc((n_feat ? n_feat : 1) * sizeof *t->col_map);
    size_t n_genes = 0, other_genome = 0;
    StrSet kept_genomes = {0};
    for (size_t f = 0; f < n_feat; f++) {
        t->col_map[f] = -1;
        if (types && !input_feature_is_gene(types[f])) continue;
        if (want && strcmp(genomes[f], want) != 0) {
            other_genome++;
            continue;
        }
        if (genomes) str_set_add(&kept_genomes, genomes[f]);
        t->col_map[f] = (int32_t)n_genes++;
    }
    in->n_genes = n_genes;
    in->symbols = xmalloc((n_genes ? n_genes : 1) * sizeof *in->symbols);
    in->ids = xmalloc((n_genes ? n_genes : 1) * sizeof *in->ids);
    for (size_t f = 0; f < n_feat; f++) {
        int32_t g = t->col_map[f];
        if (g < 0) continue;
        in->symbols[g] = xstrdup(names[f]);
        in->ids[g] = xstrdup(ids[f]);
    }
    in->n_skipped = n_feat - n_genes;
    if (in->n_skipped) in->skipped_what = input_skipped_what(types, t->col_map, n_feat, other_genome);
    if (kept_genomes.n) {
        char list[1024] = "";
        size_t m = 0;
        for (size_t i = 0; i < kept_genomes.n && m < sizeof list; i++)
            m += (size_t)snprintf(list + m, sizeof list - m, "%s%s", i ? "," : "",
                                  kept_genomes.names[i]);
        in->genomes = xstrdup(list);
    }
    str_set_free(&kept_genomes);
    in->matrix = xstrdup("matrix");
    in->layout = "CellRanger v3";
    t->n_parts = 1;
    char where[1100];
    snprintf(where, sizeof where, "%s: matrix", path);
    if (h5_row_matrix_open(&t->part[0], t->file, "matrix", where, (int64_t)in->n_cells,
                           (int64_t)n_feat) != 0)
        goto done;
    t->part[0].col_map = t->col_map;
    rc = 0;
done:
    h5_free_strings(ids, ids ? n_feat : 0);
    h5_free_strings(names, names ? n_feat : 0);
    h5_free_strings(types, types ? n_feat : 0);
    h5_free_strings(genomes, genomes ? n_feat : 0);
    str_set_free(&gset);
    return rc;
}

// CellRanger v2: one group per genome.
static int open_v2(Input *in, TenX *t, const InputOptions *opt) {
    const char *path = in->path;
    char names[TENX_MAX_GENOMES][256];
    size_t n_gen = 0;
    H5G_info_t gi;
    if (H5Gget_info(t->file, &gi) < 0) return error_set_h5("%s: cannot list the file", path);
    for (hsize_t i = 0; i < gi.nlinks; i++) {
        char name[256], sub[300];
        if (H5Lget_name_by_idx(t->file, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name,
                               H5P_DEFAULT) < 0)
            continue;
        snprintf(sub, sizeof sub, "%s/indptr", name);
        if (!h5_exists(t->file, sub)) continue;
        if (n_gen == TENX_MAX_GENOMES)
            return error_set("%s: more than %d genomes", path, TENX_MAX_GENOMES);
        snprintf(names[n_gen++], 256, "%s", name);
    }
    char list[1024] = "";
    size_t k = 0;
    for (size_t i = 0; i < n_gen && k < sizeof list; i++)
        k += (size_t)snprintf(list + k, sizeof list - k, "%s%s", i ? ", " : "", names[i]);
    size_t use[TENX_MAX_GENOMES], n_use = 0;
    if (!opt->genome) {
        if (n_gen != 1) {
            error_set("%s holds %zu genomes (%s)", path, n_gen, list);
            return error_set_hint("pass --genome NAME to read one of them, or --genome all to "
                                  "read their genes side by side");
        }
        use[n_use++] = 0;
    } else if (strcmp(opt->genome, "all") == 0) {
        for (size_t i = 0; i < n_gen; i++) use[n_use++] = i;
    } else {
        for (size_t i = 0; i < n_gen; i++)
            if (strcmp(names[i], opt->genome) == 0) use[n_use++] = i;
        if (n_use == 0) {
            error_set("%s: no genome '%s' (genomes: %s)", path, opt->genome, list);
            return error_set_hint("pass --genome with one of the genomes of the file, or "
                                  "--genome all");
        }
    }
    int64_t n_cells = -1;
    size_t total_genes = 0;
    char **sym[TENX_MAX_GENOMES] = {0}, **ids[TENX_MAX_GENOMES] = {0};
    size_t ng[TENX_MAX_GENOMES] = {0};
    int rc = -1;
    char matrix[1024] = "";
    size_t mk = 0;
    for (size_t u = 0; u < n_use; u++) {
        const char *g = names[use[u]];
        char p[300], where[1100];
        int64_t shape[2];
        snprintf(p, sizeof p, "%s/shape", g);
        if (read_shape(t->file, p, path, shape) != 0) goto done;
        char **bc = NULL;
        size_t nbc = 0;
        snprintf(p, sizeof p, "%s/barcodes", g);
        if (input_h5_read_strings(t->file, p, path, shape[1], &bc, &nbc) != 0) goto done;
        if (n_cells < 0) {
            n_cells = shape[1];
            in->cells = bc;
            in->n_cells = nbc;
        } else {
            int same = nbc == in->n_cells;
            for (size_t i = 0; same && i < nbc; i++) same = strcmp(bc[i], in->cells[i]) == 0;
            h5_free_strings(bc, nbc);
            if (!same) {
                error_set("%s: genomes '%s' and '%s' hold different cells, so their genes cannot "
                          "be read side by side",
                          path, names[use[0]], g);
                error_set_hint("pass --genome NAME to read one genome");
                goto done;
            }
        }
        size_t n = 0;
        snprintf(p, sizeof p, "%s/genes", g);
        if (input_h5_read_strings(t->file, p, path, shape[0], &ids[u], &n) != 0) goto done;
        ng[u] = n;
        snprintf(p, sizeof p, "%s/gene_names", g);
        if (h5_exists(t->file, p)) {
            if (input_h5_read_strings(t->file, p, path, shape[0], &sym[u], &n) != 0) goto done;
        } else {
            sym[u] = xmalloc((n ? n : 1) * sizeof *sym[u]);
            for (size_t i = 0; i < n; i++) sym[u][i] = xstrdup(ids[u][i]);
        }
        snprintf(where, sizeof where, "%s: %s", path, g);
        if (h5_row_matrix_open(&t->part[u], t->file, g, where, shape[1], shape[0]) != 0) {
            t->n_parts = u + 1;
            goto done;
        }
        t->n_parts = u + 1;
        t->part[u].gene_offset = (int32_t)total_genes;
        total_genes += n;
        if (total_genes > INT32_MAX) {
            error_set("%s: too many genes", path);
            goto done;
        }
        if (mk < sizeof matrix)
            mk += (size_t)snprintf(matrix + mk, sizeof matrix - mk, "%s%s", u ? "," : "", g);
    }
    in->n_genes = total_genes;
    in->symbols = xmalloc((total_genes ? total_genes : 1) * sizeof *in->symbols);
    in->ids = xmalloc((total_genes ? total_genes : 1) * sizeof *in->ids);
    for (size_t u = 0, at = 0; u < n_use; u++) {
        for (size_t i = 0; i < ng[u]; i++, at++) {
            in->symbols[at] = sym[u][i];
            in->ids[at] = ids[u][i];
        }
        free(sym[u]);
        free(ids[u]);
        sym[u] = ids[u] = NULL;
    }
    in->matrix = xstrdup(matrix);
    in->genomes = xstrdup(matrix);
    in->layout = "CellRanger v2";
    rc = 0;
done:
    for (size_t u = 0; u < n_use; u++) {
        h5_free_strings(sym[u], sym[u] ? ng[u] : 0);
        h5_free_strings(ids[u], ids[u] ? ng[u] : 0);
    }
    return rc;
}

int input_10x_h5_open(Input *in, const InputOptions *opt) {
    TenX *t = xcalloc(1, sizeof *t);
    t->file = H5I_INVALID_HID;
    in->impl = t;
    in->read_raw = tenx_read_raw;
    in->close_impl = tenx_close;
    if ((t->file = H5Fopen(in->path, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0)
        return error_set_h5("cannot open '%s'", in->path);
    if (h5_object_type(t->file, "matrix") == H5O_TYPE_GROUP) return open_v3(in, t, opt);
    return open_v2(in, t, opt);
}
