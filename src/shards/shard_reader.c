// Reading perfcell shards: one file (ShardFile) and a folder (ShardReader).
#include "perfcell/shard_reader.h"

#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/util.h"
#include "perfcell/zstd_filter.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

// ===========================================================================
// Little helpers

// CRC-32 of n values of `width` bytes as little-endian, whatever the host.
static uint32_t crc_le(uint32_t crc, const void *v, size_t n, size_t width) {
    const uint16_t probe = 1;
    if (*(const unsigned char *)&probe == 1) return hash_crc32(crc, v, n * width);
    unsigned char buf[4096];
    const unsigned char *p = v;
    size_t per = sizeof buf / width;
    for (size_t i = 0; i < n; i += per) {
        size_t m = n - i < per ? n - i : per;
        for (size_t k = 0; k < m; k++)
            for (size_t b = 0; b < width; b++)
                buf[k * width + b] = p[(i + k) * width + width - 1 - b];
        crc = hash_crc32(crc, buf, m * width);
    }
    return crc;
}

static uint32_t crc_join(uint32_t a, uint32_t b, uint64_t len_b) {
    return (uint32_t)crc32_combine(a, b, (z_off_t)len_b);
}

int shard_file_crc(const char *path, uint32_t *crc, int64_t *bytes) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return error_set("%s: cannot open: %s", path, strerror(errno));
    size_t cap = (size_t)1 << 20;
    unsigned char *buf = xmalloc(cap);
    uint32_t c = 0;
    int64_t total = 0;
    size_t got;
    while ((got = fread(buf, 1, cap, fp)) > 0) {
        c = hash_crc32(c, buf, got);
        total += (int64_t)got;
    }
    int bad = ferror(fp);
    fclose(fp);
    free(buf);
    if (bad) return error_set("%s: read error while checksumming", path);
    *crc = c;
    *bytes = total;
    return 0;
}

// ===========================================================================
// Checked HDF5 access (called with h5_lock held)

// Open a dataset that must be 1-D (or scalar when expect_n == -2) of the given
// type class with expect_n elements (-1: any, returned in *n).
static int ds_open(hid_t loc, const char *name, const char *path, H5T_class_t cls, int64_t expect_n,
                   hid_t dapl, hid_t *out, int64_t *n) {
    hid_t d = H5I_INVALID_HID, t = H5I_INVALID_HID, s = H5I_INVALID_HID;
    int rc = -1;
    if (h5_object_type(loc, name) != H5O_TYPE_DATASET) {
        error_set("%s: missing dataset '%s'", path, name);
        goto cleanup;
    }
    if ((d = H5Dopen2(loc, name, dapl)) < 0 || (t = H5Dget_type(d)) < 0 ||
        (s = H5Dget_space(d)) < 0) {
        error_set_h5("%s: cannot open dataset '%s'", path, name);
        goto cleanup;
    }
    if (H5Tget_class(t) != cls) {
        error_set("%s: dataset '%s' has the wrong type (expected %s)", path, name,
                  cls == H5T_INTEGER ? "integers" : "strings");
        goto cleanup;
    }
    int nd = H5Sget_simple_extent_ndims(s);
    hssize_t np = H5Sget_simple_extent_npoints(s);
    if (nd < 0 || np < 0) {
        error_set_h5("%s: bad shape for '%s'", path, name);
        goto cleanup;
    }
    if (expect_n == -2 ? nd != 0 && np != 1 : nd != 1) {
        error_set("%s: dataset '%s' has %d dimensions, expected %s", path, name, nd,
                  expect_n == -2 ? "a scalar" : "1");
        goto cleanup;
    }
    if (expect_n >= 0 && np != expect_n) {
        error_set("%s: dataset '%s' has %lld values, expected %lld", path, name, (long long)np,
                  (long long)expect_n);
        goto cleanup;
    }
    if (n) *n = (int64_t)np;
    *out = d;
    d = H5I_INVALID_HID;
    rc = 0;
cleanup:
    if (s >= 0) H5Sclose(s);
    if (t >= 0) H5Tclose(t);
    if (d >= 0) H5Dclose(d);
    return rc;
}

// Read a whole integer dataset of n values converted to memtype.
static int read_ints(hid_t loc, const char *name, const char *path, int64_t n, hid_t memtype,
                     void *buf) {
    hid_t d = H5I_INVALID_HID;
    if (ds_open(loc, name, path, H5T_INTEGER, n, H5P_DEFAULT, &d, NULL) != 0) return -1;
    herr_t e = n > 0 ? H5Dread(d, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) : 0;
    H5Dclose(d);
    if (e < 0) return error_set_h5("%s: cannot read '%s'", path, name);
    return 0;
}

// Strings of a 1-D dataset, its size checked before anything is allocated
// (names, barcodes and categories are short: fixed-length strings wider than
// SHARD_MAX_STRING bytes are refused).
#define SHARD_MAX_STRING 4096
static int read_strings(hid_t loc, const char *name, const char *path, int64_t expect_n,
                        int64_t max_n, char ***out, size_t *n) {
    hid_t d = H5I_INVALID_HID;
    int64_t np = 0;
    if (ds_open(loc, name, path, H5T_STRING, expect_n, H5P_DEFAULT, &d, &np) != 0) return -1;
    hid_t t = H5Dget_type(d);
    htri_t vlen = t >= 0 ? H5Tis_variable_str(t) : -1;
    size_t width = vlen == 0 ? H5Tget_size(t) : 0;
    if (t >= 0) H5Tclose(t);
    H5Dclose(d);
    if (vlen != 0)
        return error_set("%s: dataset '%s' holds variable-length strings; perfcell shards hold "
                         "fixed-length ones (a damaged or foreign file)",
                         path, name);
    if (np > max_n || width > SHARD_MAX_STRING)
        return error_set(
            "%s: dataset '%s' has %lld strings of %zu bytes, more than %lld of at most %d", path,
            name, (long long)np, width, (long long)max_n, SHARD_MAX_STRING);
    if (h5_read_strings(loc, name, path, out, n) != 0) return -1;
    return 0;
}

// A scalar (or one-element) dataset holding an integer, or a string when
// `str` is given (then *v is not touched).
static int read_scalar(hid_t loc, const char *name, const char *path, int64_t *v, char *str,
                       size_t len) {
    if (str) {
        char **s = NULL;
        size_t n = 0;
        if (read_strings(loc, name, path, -2, 1, &s, &n) != 0) return -1;
        snprintf(str, len, "%s", n == 1 ? s[0] : "");
        h5_free_strings(s, n);
        return 0;
    }
    hid_t d = H5I_INVALID_HID;
    if (ds_open(loc, name, path, H5T_INTEGER, -2, H5P_DEFAULT, &d, NULL) != 0) return -1;
    herr_t e = H5Dread(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    H5Dclose(d);
    if (e < 0) return error_set_h5("%s: cannot read '%s'", path, name);
    return 0;
}

// The vocabulary hash: 16 hex digits (as in the manifest) or an integer.
static int read_vocab_hash(hid_t loc, const char *name, const char *path, uint64_t *h) {
    hid_t d = H5I_INVALID_HID;
    if (ds_open(loc, name, path, H5T_INTEGER, -2, H5P_DEFAULT, &d, NULL) == 0) {
        herr_t e = H5Dread(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, h);
        H5Dclose(d);
        if (e < 0) return error_set_h5("%s: cannot read '%s'", path, name);
        return 0;
    }
    char buf[64];
    if (read_scalar(loc, name, path, NULL, buf, sizeof buf) != 0) return -1;
    if (vocab_hash_parse(buf, h) != 0)
        return error_set("%s: '%s' is not a vocabulary hash (16 hex digits): '%s'", path, name,
                         buf);
    return 0;
}

// Shards keep every string fixed-length (shards/README.md): a variable-length
// one lives in HDF5's global heap, which has no checksums and which HDF5 1.10
// follows unchecked (a damaged heap crashes or hangs it), so it is refused
// before anything reads it.
static int attr_is(hid_t obj, const char *name, const char *want) {
    char buf[64];
    if (!h5_is_fixed_string_attr(obj, name) || h5_attr_read_string(obj, name, buf, sizeof buf) != 0)
        return 0;
    return strcmp(buf, want) == 0;
}

// Codes of cells [c0, c0 + n) of a categorical column inside [-1 or 0, n_cats).
static int check_codes(const char *path, const char *name, const int32_t *codes, int64_t c0,
                       size_t n, size_t n_cats, int allow_missing) {
    for (size_t i = 0; i < n; i++) {
        if (codes[i] >= (int64_t)n_cats || codes[i] < (allow_missing ? -1 : 0))
            return error_set("%s: obs/%s: cell %lld has code %d, outside the %zu categories", path,
                             name, (long long)(c0 + (int64_t)i), codes[i], n_cats);
    }
    return 0;
}

// An AnnData categorical column of n cells: its categories, and its codes
// read into `codes` or, when codes is NULL, the codes dataset left open in
// *codes_d (NULL: closed after its size is checked).
static int open_categorical(hid_t obs, const char *name, const char *path, int64_t n,
                            int allow_missing, char ***cats, size_t *n_cats, int32_t *codes,
                            hid_t *codes_d) {
    char sub[512];
    if (h5_object_type(obs, name) != H5O_TYPE_GROUP)
        return error_set("%s: obs/%s is not a categorical column", path, name);
    snprintf(sub, sizeof sub, "%s/categories", name);
    if (read_strings(obs, sub, path, -1, SHARD_MAX_LABELS, cats, n_cats) != 0) return -1;
    snprintf(sub, sizeof sub, "%s/codes", name);
    if (codes) {
        if (read_ints(obs, sub, path, n, H5T_NATIVE_INT32, codes) != 0) return -1;
        return check_codes(path, name, codes, 0, (size_t)n, *n_cats, allow_missing);
    }
    hid_t d = H5I_INVALID_HID;
    if (ds_open(obs, sub, path, H5T_INTEGER, n, H5P_DEFAULT, &d, NULL) != 0) return -1;
    if (codes_d)
        *codes_d = d;
    else
        H5Dclose(d);
    return 0;
}

// ===========================================================================
// ShardFile

static void file_ids_reset(ShardFile *f) {
    f->file = f->data = f->indices = f->indptr_d = f->cell_id_d = f->label_d = H5I_INVALID_HID;
}

void shard_file_close(ShardFile *f) {
    hid_t ds[] = {f->data, f->indices, f->indptr_d, f->cell_id_d, f->label_d};
    h5_lock();
    for (size_t i = 0; i < sizeof ds / sizeof *ds; i++)
        if (ds[i] >= 0) H5Dclose(ds[i]);
    if (f->file >= 0) H5Fclose(f->file);
    h5_unlock();
    free(f->path);
    free(f->label_key);
    h5_free_strings(f->labels, f->n_labels);
    h5_free_strings(f->datasets, f->n_datasets);
    free(f->indptr);
    free(f->cell_id);
    free(f->label);
    free(f->dataset);
    free(f->total_counts);
    free(f->scratch);
    free(f->range_indptr);
    free(f->range_id);
    free(f->range_label);
    memset(f, 0, sizeof *f);
    file_ids_reset(f);
}

// Checks against the manifest that need no HDF5.
static int check_against_manifest_file(const char *path, int64_t bytes, const Manifest *m,
                                       size_t index, int check_crc) {
    const ShardEntry *e = &m->shards[index];
    if (bytes != e->bytes)
        return error_set("%s: file has %lld bytes, the manifest says %lld (truncated or rewritten)",
                         path, (long long)bytes, (long long)e->bytes);
    if (check_crc) {
        uint32_t crc;
        int64_t got;
        if (shard_file_crc(path, &crc, &got) != 0) return -1;
        if (crc != e->file_crc)
            return error_set("%s: file CRC-32 %08x, the manifest says %08x (the file is corrupt)",
                             path, crc, e->file_crc);
    }
    return 0;
}

// Dataset access without a chunk cache: each read decompresses the chunks it
// touches straight into the result. Streams read whole blocks in a shuffled
// order and so rarely revisit a chunk, and a cache (even of one chunk per
// dataset) costs about 20 MiB of resident memory per rank through the
// allocator's handling of the cached chunk buffers, growing with the cells a
// step reads (tests/bench/bench_contrastive.sh, part 2); the throughput of
// the training stream is the same without it (tests/bench/bench_reader.sh).
static hid_t data_access(void) {
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
    if (dapl >= 0) H5Pset_chunk_cache(dapl, 521, 0, 1.0);
    return dapl;
}

// indptr values of cells [c0, c1] (c1 - c0 + 1 values): ascending, rows no
// longer than the vocabulary, 0 at cell 0 and nnz at the last cell.
static int check_indptr(const ShardFile *f, const int64_t *ip, int64_t c0, int64_t c1) {
    int64_t n = c1 - c0;
    if (ip[0] < 0 || ip[n] > f->nnz || (c0 == 0 && ip[0] != 0) ||
        (c1 == f->n_cells && ip[n] != f->nnz))
        return error_set("%s: X/indptr runs from %lld to %lld at cells %lld..%lld, outside 0..%lld",
                         f->path, (long long)ip[0], (long long)ip[n], (long long)c0, (long long)c1,
                         (long long)f->nnz);
    for (int64_t i = 0; i < n; i++) {
        int64_t len = ip[i + 1] - ip[i];
        if (len < 0 || len > f->n_genes)
            return error_set(
                "%s: X/indptr is not monotonic or a row is longer than the vocabulary at cell %lld",
                f->path, (long long)(c0 + i));
    }
    return 0;
}

// obs/cell_id of cells [c0, c0 + n): the cell's position in the folder.
static int check_ids(const ShardFile *f, const int64_t *id, int64_t c0, size_t n) {
    for (size_t i = 0; i < n; i++) {
        int64_t want = f->first_cell + c0 + (int64_t)i;
        if (id[i] != want)
            return error_set(
                "%s: obs/cell_id of cell %lld is %lld, expected %lld (first_cell + position)",
                f->path, (long long)(c0 + (int64_t)i), (long long)id[i], (long long)want);
    }
    return 0;
}

// uns/perfcell: what makes an .h5ad a perfcell shard (h5_lock held).
static int open_uns(ShardFile *f) {
    const char *path = f->path;
    hid_t g = H5I_INVALID_HID;
    int64_t version = 0;
    char key[512];
    int rc = -1;
    if (h5_object_type(f->file, "uns/perfcell") != H5O_TYPE_GROUP) {
        error_set("%s: not a perfcell shard (no uns/perfcell)", path);
        goto cleanup;
    }
    if ((g = H5Gopen2(f->file, "uns/perfcell", H5P_DEFAULT)) < 0) {
        error_set_h5("%s: cannot open uns/perfcell", path);
        goto cleanup;
    }
    if (read_scalar(g, "format_version", path, &version, NULL, 0) != 0) goto cleanup;
    if (version != SHARD_FORMAT_VERSION) {
        error_set("%s: shard format version %lld, this perfcell reads version %d", path,
                  (long long)version, SHARD_FORMAT_VERSION);
        goto cleanup;
    }
    if (read_vocab_hash(g, "vocab_hash", path, &f->vocab_hash) != 0 ||
        read_scalar(g, "shard_index", path, &f->shard_index, NULL, 0) != 0 ||
        read_scalar(g, "first_cell", path, &f->first_cell, NULL, 0) != 0 ||
        read_scalar(g, "label_key", path, NULL, key, sizeof key) != 0)
        goto cleanup;
    if (f->first_cell < 0 || f->shard_index < 0) {
        error_set("%s: negative first_cell or shard_index in uns/perfcell", path);
        goto cleanup;
    }
    free(f->label_key);
    f->label_key =
        xstrdup(strcmp(key, "-") == 0 ? "" : key); // no labels: "" (or "-", as in the manifest)
    rc = 0;
cleanup:
    if (g >= 0) H5Gclose(g);
    return rc;
}

// X: shape, the CSR arrays opened, indptr read and checked (h5_lock held).
static int open_x(ShardFile *f) {
    const char *path = f->path;
    hid_t x = H5I_INVALID_HID, dapl = H5I_INVALID_HID;
    int64_t shape[2], nnz_idx = 0;
    int rc = -1;
    if (h5_object_type(f->file, "X") != H5O_TYPE_GROUP ||
        (x = H5Gopen2(f->file, "X", H5P_DEFAULT)) < 0) {
        error_set("%s: X is missing or not a group", path);
        goto cleanup;
    }
    if (!attr_is(x, "encoding-type", "csr_matrix")) {
        error_set("%s: X is not a csr_matrix", path);
        goto cleanup;
    }
    if (h5_attr_read_i64s(x, "shape", shape, 2) != 0) {
        error_set("%s: X has no valid shape attribute: %s", path, error_last());
        goto cleanup;
    }
    f->n_cells = shape[0];
    f->n_genes = shape[1];
    // A valid shard spends well over one byte per cell (ids, totals, names),
    // so more cells than bytes means a corrupt shape: refuse before allocating.
    if (f->n_cells <= 0 || f->n_cells > SHARD_MAX_CELLS || f->n_cells > f->bytes ||
        f->n_genes <= 0 || f->n_genes > SHARD_MAX_GENES) {
        error_set("%s: implausible X shape [%lld, %lld]", path, (long long)f->n_cells,
                  (long long)f->n_genes);
        goto cleanup;
    }
    if ((dapl = data_access()) < 0 ||
        ds_open(x, "data", path, H5T_INTEGER, -1, dapl, &f->data, &f->nnz) != 0 ||
        ds_open(x, "indices", path, H5T_INTEGER, -1, dapl, &f->indices, &nnz_idx) != 0)
        goto cleanup;
    if (nnz_idx != f->nnz || f->nnz > f->n_cells * f->n_genes) {
        error_set("%s: X/data has %lld values and X/indices %lld, for %lld x %lld cells x genes",
                  path, (long long)f->nnz, (long long)nnz_idx, (long long)f->n_cells,
                  (long long)f->n_genes);
        goto cleanup;
    }
    if (f->flags & SHARD_LAZY) {
        // Checked range by range as the rows are read.
        if (ds_open(x, "indptr", path, H5T_INTEGER, f->n_cells + 1, H5P_DEFAULT, &f->indptr_d,
                    NULL) != 0)
            goto cleanup;
    } else {
        f->indptr = xmalloc(((size_t)f->n_cells + 1) * sizeof *f->indptr);
        if (read_ints(x, "indptr", path, f->n_cells + 1, H5T_NATIVE_INT64, f->indptr) != 0 ||
            check_indptr(f, f->indptr, 0, f->n_cells) != 0)
            goto cleanup;
    }
    rc = 0;
cleanup:
    if (dapl >= 0) H5Pclose(dapl);
    if (x >= 0) H5Gclose(x);
    return rc;
}

// obs: cell ids, input totals, dataset and label columns (h5_lock held).
static int open_obs(ShardFile *f) {
    const char *path = f->path;
    size_t nc = (size_t)f->n_cells;
    hid_t obs = H5I_INVALID_HID;
    int rc = -1;
    if (h5_object_type(f->file, "obs") != H5O_TYPE_GROUP ||
        (obs = H5Gopen2(f->file, "obs", H5P_DEFAULT)) < 0) {
        error_set("%s: obs is missing or not a group", path);
        goto cleanup;
    }
    if (f->flags & SHARD_LAZY) {
        // Sizes and categories now; ids and labels range by range.
        hid_t d = H5I_INVALID_HID;
        if (ds_open(obs, "cell_id", path, H5T_INTEGER, f->n_cells, H5P_DEFAULT, &f->cell_id_d,
                    NULL) != 0 ||
            ds_open(obs, "total_counts", path, H5T_INTEGER, f->n_cells, H5P_DEFAULT, &d, NULL) !=
                0 ||
            open_categorical(obs, "dataset", path, f->n_cells, 0, &f->datasets, &f->n_datasets,
                             NULL, NULL) != 0 ||
            (f->label_key[0] && open_categorical(obs, f->label_key, path, f->n_cells, 1, &f->labels,
                                                 &f->n_labels, NULL, &f->label_d) != 0)) {
            if (d >= 0) H5Dclose(d);
            goto cleanup;
        }
        H5Dclose(d);
        rc = 0;
        goto cleanup;
    }
    f->cell_id = xmalloc(nc * sizeof *f->cell_id);
    f->total_counts = xmalloc(nc * sizeof *f->total_counts);
    f->label = xmalloc(nc * sizeof *f->label);
    f->dataset = xmalloc(nc * sizeof *f->dataset);
    if (read_ints(obs, "cell_id", path, f->n_cells, H5T_NATIVE_INT64, f->cell_id) != 0 ||
        check_ids(f, f->cell_id, 0, nc) != 0 ||
        read_ints(obs, "total_counts", path, f->n_cells, H5T_NATIVE_INT64, f->total_counts) != 0 ||
        open_categorical(obs, "dataset", path, f->n_cells, 0, &f->datasets, &f->n_datasets,
                         f->dataset, NULL) != 0)
        goto cleanup;
    if (f->label_key[0]) {
        if (open_categorical(obs, f->label_key, path, f->n_cells, 1, &f->labels, &f->n_labels,
                             f->label, NULL) != 0)
            goto cleanup;
    } else {
        for (size_t i = 0; i < nc; i++) f->label[i] = -1;
    }
    rc = 0;
cleanup:
    if (obs >= 0) H5Gclose(obs);
    return rc;
}

// The shard's header against row `index` of the manifest.
static int check_manifest(const ShardFile *f, const Manifest *m, size_t index) {
    const ShardEntry *e = &m->shards[index];
    const char *path = f->path;
    if (f->n_cells != e->n_cells || f->n_genes != m->n_genes)
        return error_set("%s: X is %lld x %lld, the manifest says %lld x %lld", path,
                         (long long)f->n_cells, (long long)f->n_genes, (long long)e->n_cells,
                         (long long)m->n_genes);
    if (f->nnz != e->nnz)
        return error_set("%s: X holds %lld non-zeros, the manifest says %lld", path,
                         (long long)f->nnz, (long long)e->nnz);
    if (f->first_cell != e->first_cell || f->shard_index != (int64_t)index)
        return error_set(
            "%s: shard %lld starting at cell %lld, the manifest lists it as shard %zu at %lld",
            path, (long long)f->shard_index, (long long)f->first_cell, index,
            (long long)e->first_cell);
    if (f->vocab_hash != m->vocab_hash) {
        char a[17], b[17];
        vocab_hash_format(f->vocab_hash, a);
        vocab_hash_format(m->vocab_hash, b);
        return error_set("%s: vocabulary hash %s, the manifest says %s", path, a, b);
    }
    if (strcmp(f->label_key, m->label_key) != 0 || f->n_labels != m->n_labels)
        return error_set(
            "%s: label column '%s' with %zu categories, the manifest says '%s' with %zu", path,
            f->label_key, f->n_labels, m->label_key, m->n_labels);
    for (size_t i = 0; i < f->n_labels; i++)
        if (strcmp(f->labels[i], m->labels[i]) != 0)
            return error_set("%s: label category %zu is '%s', the manifest says '%s'", path, i,
                             f->labels[i], m->labels[i]);
    return 0;
}

// Everything HDF5 does in shard_file_open (h5_lock held).
static int open_h5(ShardFile *f) {
    if (zstd_filter_register() != 0) return -1;
    if (H5Fis_hdf5(f->path) <= 0) return error_set("%s: not an HDF5 file (or unreadable)", f->path);
    if ((f->file = H5Fopen(f->path, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0)
        return error_set_h5("%s: HDF5 cannot open the file", f->path);
    // The 1.8 file format: HDF5 checks object-header checksums before use.
    H5F_info2_t info;
    if (H5Fget_info2(f->file, &info) < 0 || info.super.version < 2)
        return error_set("%s: not a perfcell shard (an HDF5 file without metadata checksums; shards "
                         "use the HDF5 1.8 format)",
                         f->path);
    if (!attr_is(f->file, "encoding-type", "anndata"))
        return error_set("%s: not an AnnData file written by perfcell (root attribute encoding-type "
                         "is not the fixed-length string 'anndata')",
                         f->path);
    if (open_uns(f) != 0 || open_x(f) != 0 || open_obs(f) != 0) return -1;
    return 0;
}

int shard_file_open(ShardFile *f, const char *path, const Manifest *m, size_t index,
                    unsigned flags) {
    memset(f, 0, sizeof *f);
    file_ids_reset(f);
    f->flags = flags;
    f->path = xstrdup(path);
    f->label_key = xstrdup("");
    int rc = -1;
    f->bytes = path_file_size(path);
    if (f->bytes < 0) {
        error_set("%s: cannot read the shard: %s", path, strerror(errno));
    } else if (m && index >= m->n_shards) {
        error_set("%s: shard index %zu outside the manifest's %zu shards", path, index,
                  m->n_shards);
    } else if (!m || check_against_manifest_file(path, f->bytes, m, index,
                                                 flags & SHARD_CHECK_CRC) == 0) {
        h5_lock();
        rc = open_h5(f);
        h5_unlock();
        if (rc == 0 && m) rc = check_manifest(f, m, index);
    }
    if (rc != 0) {
        // Keep the message: closing must not overwrite it.
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", error_last());
        shard_file_close(f);
        error_set("%s", msg);
    }
    return rc;
}

// Read n values from offset e0 of a 1-D dataset as memtype (h5_lock held).
static int read_slab(hid_t d, const char *path, const char *name, int64_t e0, size_t n,
                     hid_t memtype, void *buf) {
    hid_t fs = H5Dget_space(d), ms = H5I_INVALID_HID;
    hsize_t start = (hsize_t)e0, count = (hsize_t)n;
    int rc = -1;
    if (fs < 0 || H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, NULL, &count, NULL) < 0 ||
        (ms = H5Screate_simple(1, &count, NULL)) < 0) {
        error_set_h5("%s: cannot select %s", path, name);
        goto cleanup;
    }
    if (H5Dread(d, memtype, ms, fs, H5P_DEFAULT, buf) < 0) {
        error_set_h5("%s: cannot read %s values [%lld, %lld) (corrupt chunk?)", path, name,
                     (long long)e0, (long long)(e0 + (int64_t)n));
        goto cleanup;
    }
    rc = 0;
cleanup:
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return rc;
}

static void scratch_reserve(ShardFile *f, size_t n) {
    if (n <= f->scratch_cap) return;
    size_t cap = f->scratch_cap ? f->scratch_cap : 4096;
    while (cap < n) cap *= 2;
    free(f->scratch);
    f->scratch = xmalloc(cap * sizeof *f->scratch);
    f->scratch_cap = cap;
}

// indptr[c0..c1] and labels [c0, c1) of a range: pointers into the arrays,
// or with SHARD_LAZY read from the file and checked.
static int range_meta(ShardFile *f, int64_t c0, int64_t c1, const int64_t **ip,
                      const int32_t **label) {
    if (!(f->flags & SHARD_LAZY)) {
        *ip = f->indptr + c0;
        *label = f->label + c0;
        return 0;
    }
    size_t n = (size_t)(c1 - c0);
    if (n + 1 > f->range_cap) {
        f->range_cap = n + 1 > 2 * f->range_cap ? n + 1 : 2 * f->range_cap;
        f->range_indptr = xrealloc(f->range_indptr, f->range_cap * sizeof *f->range_indptr);
        f->range_id = xrealloc(f->range_id, f->range_cap * sizeof *f->range_id);
        f->range_label = xrealloc(f->range_label, f->range_cap * sizeof *f->range_label);
    }
    h5_lock();
    int rc =
        read_slab(f->indptr_d, f->path, "X/indptr", c0, n + 1, H5T_NATIVE_INT64, f->range_indptr);
    if (rc == 0 && n > 0)
        rc = read_slab(f->cell_id_d, f->path, "obs/cell_id", c0, n, H5T_NATIVE_INT64, f->range_id);
    if (rc == 0 && n > 0 && f->label_d >= 0)
        rc = read_slab(f->label_d, f->path, "label codes", c0, n, H5T_NATIVE_INT32, f->range_label);
    h5_unlock();
    if (rc != 0 || check_indptr(f, f->range_indptr, c0, c1) != 0 ||
        check_ids(f, f->range_id, c0, n) != 0)
        return -1;
    if (f->label_d < 0)
        for (size_t i = 0; i < n; i++) f->range_label[i] = -1;
    else if (check_codes(f->path, f->label_key, f->range_label, c0, n, f->n_labels, 1) != 0)
        return -1;
    *ip = f->range_indptr;
    *label = f->range_label;
    return 0;
}

// Read the rows of the cells of ip (n + 1 row starts) that begin at local
// cell c0: genes into `gene`, raw counts into f->scratch, and check every row
// in the same pass. With `count` and `total`, also the counts as floats and
// each row's sum.
static int read_rows(ShardFile *f, const int64_t *ip, int64_t c0, size_t cells, int32_t *gene,
                     float *count, double *total) {
    int64_t e0 = ip[0];
    size_t n = (size_t)(ip[cells] - e0);
    scratch_reserve(f, n);
    const int32_t *raw = f->scratch;
    if (n > 0) {
        h5_lock();
        int rc = read_slab(f->indices, f->path, "X/indices", e0, n, H5T_NATIVE_INT32, gene);
        if (rc == 0)
            rc = read_slab(f->data, f->path, "X/data", e0, n, H5T_NATIVE_INT32, f->scratch);
        h5_unlock();
        if (rc != 0) return -1;
    }
    for (size_t k = 0; k < cells; k++) {
        int64_t c = c0 + (int64_t)k;
        size_t a = (size_t)(ip[k] - e0), b = (size_t)(ip[k + 1] - e0);
        int32_t prev = -1;
        double t = 0;
        for (size_t i = a; i < b; i++) {
            int32_t g = gene[i], v = raw[i];
            if (g <= prev || g >= f->n_genes)
                return error_set(
                    "%s: cell %lld: gene index %d %s", f->path, (long long)(f->first_cell + c), g,
                    g >= f->n_genes || g < 0 ? "outside the vocabulary" : "not ascending");
            if (v <= 0)
                return error_set("%s: cell %lld: count %d for gene %d (counts must be > 0)",
                                 f->path, (long long)(f->first_cell + c), v, g);
            prev = g;
            t += v;
            if (count) count[i] = (float)v;
        }
        if (total) total[k] = t;
    }
    return 0;
}

int shard_file_read(ShardFile *f, int64_t c0, int64_t c1, CellBatch *out) {
    if (c0 < 0 || c1 < c0 || c1 > f->n_cells)
        return error_set("%s: cells [%lld, %lld) outside the shard's %lld cells", f->path,
                         (long long)c0, (long long)c1, (long long)f->n_cells);
    const int64_t *ip;
    const int32_t *label;
    if (range_meta(f, c0, c1, &ip, &label) != 0) return -1;
    size_t cells = (size_t)(c1 - c0), n = (size_t)(ip[cells] - ip[0]);
    if ((int64_t)n > SHARD_MAX_READ)
        return error_set("%s: cells [%lld, %lld) hold %zu values, more than one read takes (%lld)",
                         f->path, (long long)c0, (long long)c1, n, (long long)SHARD_MAX_READ);
    cellbatch_reserve(out, out->n + cells, out->nnz + n);
    if (read_rows(f, ip, c0, cells, out->gene + out->nnz, out->count + out->nnz,
                  out->total + out->n) != 0)
        return -1;
    int64_t shift = (int64_t)out->nnz - ip[0];
    for (size_t k = 0; k < cells; k++) {
        out->cell_id[out->n + k] = f->first_cell + c0 + (int64_t)k;
        out->label[out->n + k] = label[k];
        out->offset[out->n + k + 1] = ip[k + 1] + shift;
    }
    out->n += cells;
    out->nnz += n;
    return 0;
}

int shard_file_content_crc(ShardFile *f, uint32_t *crc) {
    // Rows in pieces of about 2^20 values; indices and data are checksummed
    // separately and joined, since the format puts all indices first.
    const size_t piece = (size_t)1 << 20;
    size_t nc = (size_t)f->n_cells;
    if (f->flags & SHARD_LAZY)
        return error_set("%s: the content CRC needs the shard opened without SHARD_LAZY", f->path);
    uint32_t c_ind = 0, c_dat = 0;
    int32_t *gene = NULL;
    int rc = -1;
    for (size_t c0 = 0; c0 < nc;) {
        size_t c1 = c0 + 1;
        while (c1 < nc && (size_t)(f->indptr[c1 + 1] - f->indptr[c0]) <= piece) c1++;
        size_t n = (size_t)(f->indptr[c1] - f->indptr[c0]);
        gene = xrealloc(gene, (n ? n : 1) * sizeof *gene);
        if (read_rows(f, f->indptr + c0, (int64_t)c0, c1 - c0, gene, NULL, NULL) != 0) goto cleanup;
        c_ind = crc_le(c_ind, gene, n, 4);
        c_dat = crc_le(c_dat, f->scratch, n, 4);
        c0 = c1;
    }
    uint32_t c = crc_le(0, f->indptr, nc + 1, 8);
    c = crc_join(c, c_ind, (uint64_t)f->nnz * 4);
    c = crc_join(c, c_dat, (uint64_t)f->nnz * 4);
    c = crc_le(c, f->cell_id, nc, 8);
    if (f->label_key[0]) c = crc_le(c, f->label, nc, 4);
    *crc = c;
    rc = 0;
cleanup:
    free(gene);
    return rc;
}

int shard_file_strings(ShardFile *f, const char *name, size_t expect_n, char ***out) {
    size_t n = 0;
    h5_lock();
    int rc = read_strings(f->file, name, f->path, (int64_t)expect_n, (int64_t)expect_n, out, &n);
    h5_unlock();
    return rc;
}

// ===========================================================================
// ShardReader

// Shard files kept open: a few with their per-cell arrays (about 30 bytes a
// cell), more with SHARD_LAZY (the stream reads blocks from every shard in
// random order; a lazy open of a 2^17-cell shard costs about half a block
// read, and an open file about 2 MiB of HDF5 caches).
#define READER_OPEN_FULL 4
#define READER_OPEN_LAZY 32
#define READER_ID_GAP 32    // ids this close are read with one range read
#define READER_ID_SPAN 4096 // cells at most in one such range

struct ShardReader {
    Manifest m;
    unsigned flags;
    unsigned char *checked; // (n_shards) file CRC already verified
    struct {
        size_t shard;
        uint64_t used;
        ShardFile f;
    } open[READER_OPEN_LAZY];
    size_t n_open, max_open;
    uint64_t tick;
    CellBatch span; // cells of a range read by shard_reader_read_ids
};

static char **copy_strings(char *const *s, size_t n) {
    char **d = xcalloc(n ? n : 1, sizeof *d);
    for (size_t i = 0; i < n; i++) d[i] = xstrdup(s[i]);
    return d;
}

static void manifest_copy(Manifest *d, const Manifest *s) {
    *d = *s;
    d->folder = xstrdup(s->folder);
    d->label_key = xstrdup(s->label_key);
    d->labels = copy_strings(s->labels, s->n_labels);
    d->label_counts = xmalloc((s->n_labels ? s->n_labels : 1) * sizeof *d->label_counts);
    if (s->n_labels) memcpy(d->label_counts, s->label_counts, s->n_labels * sizeof *d->label_counts);
    d->datasets = copy_strings(s->datasets, s->n_datasets);
    d->dataset_paths = copy_strings(s->dataset_paths, s->n_datasets);
    d->dataset_cells = xmalloc((s->n_datasets ? s->n_datasets : 1) * sizeof *d->dataset_cells);
    if (s->n_datasets)
        memcpy(d->dataset_cells, s->dataset_cells, s->n_datasets * sizeof *d->dataset_cells);
    d->shards = xmalloc(s->n_shards * sizeof *d->shards);
    for (size_t i = 0; i < s->n_shards; i++) {
        d->shards[i] = s->shards[i];
        d->shards[i].file = xstrdup(s->shards[i].file);
    }
}

ShardReader *shard_reader_open_manifest(const Manifest *m, unsigned flags) {
    ShardReader *r = xcalloc(1, sizeof *r);
    manifest_copy(&r->m, m);
    r->flags = flags;
    r->max_open = flags & SHARD_LAZY ? READER_OPEN_LAZY : READER_OPEN_FULL;
    r->checked = xcalloc(m->n_shards, 1);
    cellbatch_init(&r->span);
    return r;
}

ShardReader *shard_reader_open(const char *folder, uint64_t expect_vocab_hash, unsigned flags) {
    Manifest m;
    if (manifest_load(&m, folder) != 0) return NULL;
    if (expect_vocab_hash && m.vocab_hash != expect_vocab_hash) {
        char a[17], b[17];
        vocab_hash_format(m.vocab_hash, a);
        vocab_hash_format(expect_vocab_hash, b);
        error_set("%s: shards built with vocabulary %s, expected vocabulary %s", folder, a, b);
        manifest_free(&m);
        return NULL;
    }
    ShardReader *r = shard_reader_open_manifest(&m, flags);
    manifest_free(&m);
    return r;
}

void shard_reader_close(ShardReader *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_open; i++) shard_file_close(&r->open[i].f);
    manifest_free(&r->m);
    free(r->checked);
    cellbatch_free(&r->span);
    free(r);
}

const Manifest *shard_reader_manifest(const ShardReader *r) { return &r->m; }

ShardFile *shard_reader_file(ShardReader *r, size_t i) {
    if (i >= r->m.n_shards) {
        error_set("%s: no shard %zu (the folder has %zu)", r->m.folder, i, r->m.n_shards);
        return NULL;
    }
    for (size_t k = 0; k < r->n_open; k++) {
        if (r->open[k].shard == i) {
            r->open[k].used = ++r->tick;
            return &r->open[k].f;
        }
    }
    size_t slot = r->n_open;
    if (slot == r->max_open) {
        slot = 0;
        for (size_t k = 1; k < r->n_open; k++)
            if (r->open[k].used < r->open[slot].used) slot = k;
        shard_file_close(&r->open[slot].f);
        r->open[slot] = r->open[--r->n_open];
        slot = r->n_open;
    }
    char *path = manifest_shard_path(&r->m, i);
    unsigned flags = r->checked[i] ? r->flags & ~SHARD_CHECK_CRC : r->flags;
    int rc = shard_file_open(&r->open[slot].f, path, &r->m, i, flags);
    free(path);
    if (rc != 0) return NULL;
    r->checked[i] = 1;
    r->open[slot].shard = i;
    r->open[slot].used = ++r->tick;
    r->n_open++;
    return &r->open[slot].f;
}

int shard_reader_read(ShardReader *r, int64_t cell0, int64_t cell1, CellBatch *out) {
    if (cell0 < 0 || cell1 < cell0 || cell1 > r->m.n_cells)
        return error_set("%s: cells [%lld, %lld) outside the folder's %lld cells", r->m.folder,
                         (long long)cell0, (long long)cell1, (long long)r->m.n_cells);
    while (cell0 < cell1) {
        size_t i = manifest_shard_of(&r->m, cell0);
        const ShardEntry *e = &r->m.shards[i];
        int64_t end = e->first_cell + e->n_cells < cell1 ? e->first_cell + e->n_cells : cell1;
        ShardFile *f = shard_reader_file(r, i);
        if (!f || shard_file_read(f, cell0 - e->first_cell, end - e->first_cell, out) != 0)
            return -1;
        cell0 = end;
    }
    return 0;
}

int shard_reader_read_ids(ShardReader *r, const int64_t *ids, size_t n, CellBatch *out) {
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= r->m.n_cells)
            return error_set("%s: cell id %lld outside the folder's %lld cells", r->m.folder,
                             (long long)ids[i], (long long)r->m.n_cells);
    }
    for (size_t i = 0; i < n;) {
        const ShardEntry *e = &r->m.shards[manifest_shard_of(&r->m, ids[i])];
        int64_t end = e->first_cell + e->n_cells;
        size_t j = i + 1;
        while (j < n && ids[j] > ids[j - 1] && ids[j] - ids[j - 1] <= READER_ID_GAP &&
               ids[j] < end && ids[j] - ids[i] < READER_ID_SPAN)
            j++;
        int64_t lo = ids[i], hi = ids[j - 1] + 1;
        if (hi - lo == (int64_t)(j - i)) {
            if (shard_reader_read(r, lo, hi, out) != 0) return -1;
        } else {
            cellbatch_clear(&r->span);
            if (shard_reader_read(r, lo, hi, &r->span) != 0) return -1;
            for (size_t k = i; k < j; k++) {
                size_t at = (size_t)(ids[k] - lo);
                cellbatch_append(out, &r->span, at, at + 1);
            }
        }
        i = j;
    }
    return 0;
}
