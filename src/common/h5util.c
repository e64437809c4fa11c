// HDF5 helpers.
#include "perfcell/h5util.h"

#include "perfcell/error.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

int h5_exists(hid_t loc, const char *path) {
    char buf[1024];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return 0;
    memcpy(buf, path, n + 1);
    // H5Lexists needs every intermediate link to exist: check each prefix.
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char c = buf[i];
            buf[i] = '\0';
            htri_t e = H5Lexists(loc, buf, H5P_DEFAULT);
            if (e <= 0) return 0;
            if (c) {
                H5O_info_t info;
                if (H5Oget_info_by_name(loc, buf, &info, H5P_DEFAULT) < 0 ||
                    info.type != H5O_TYPE_GROUP)
                    return 0;
            }
            buf[i] = c;
        }
    }
    return 1;
}

int h5_object_type(hid_t loc, const char *path) {
    if (!h5_exists(loc, path)) return -1;
    H5O_info_t info;
    if (H5Oget_info_by_name(loc, path, &info, H5P_DEFAULT) < 0) return -1;
    return (int)info.type;
}

int h5_dataset_size(hid_t loc, const char *name, const char *what, int64_t *n, int *rank) {
    hid_t d = H5I_INVALID_HID, s = H5I_INVALID_HID;
    int rc = -1;
    if ((d = H5Dopen2(loc, name, H5P_DEFAULT)) < 0) {
        error_set_h5("%s: cannot open dataset '%s'", what, name);
        goto cleanup;
    }
    if ((s = H5Dget_space(d)) < 0) {
        error_set_h5("%s: cannot read the shape of '%s'", what, name);
        goto cleanup;
    }
    int r = H5Sget_simple_extent_ndims(s);
    hssize_t np = H5Sget_simple_extent_npoints(s);
    if (r < 0 || np < 0) {
        error_set_h5("%s: bad shape for '%s'", what, name);
        goto cleanup;
    }
    *n = (int64_t)np;
    if (rank) *rank = r;
    rc = 0;
cleanup:
    if (s >= 0) H5Sclose(s);
    if (d >= 0) H5Dclose(d);
    return rc;
}

int h5_read_all(hid_t loc, const char *name, const char *what, hid_t memtype, void *buf) {
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0) return error_set_h5("%s: cannot open dataset '%s'", what, name);
    herr_t e = H5Dread(d, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
    H5Dclose(d);
    if (e < 0) return error_set_h5("%s: cannot read dataset '%s'", what, name);
    return 0;
}

void h5_free_strings(char **s, size_t n) {
    if (!s) return;
    for (size_t i = 0; i < n; i++) free(s[i]);
    free(s);
}

int h5_read_strings(hid_t loc, const char *name, const char *what, char ***out, size_t *n_out) {
    hid_t d = H5I_INVALID_HID, ft = H5I_INVALID_HID, mt = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    char **res = NULL;
    size_t n = 0;
    int rc = -1;
    if ((d = H5Dopen2(loc, name, H5P_DEFAULT)) < 0) {
        error_set_h5("%s: cannot open string dataset '%s'", what, name);
        goto cleanup;
    }
    if ((ft = H5Dget_type(d)) < 0 || (sp = H5Dget_space(d)) < 0) {
        error_set_h5("%s: cannot read type of '%s'", what, name);
        goto cleanup;
    }
    if (H5Tget_class(ft) != H5T_STRING) {
        error_set("%s: dataset '%s' does not hold strings", what, name);
        goto cleanup;
    }
    if (H5Sget_simple_extent_ndims(sp) > 1) {
        error_set("%s: dataset '%s' is not one-dimensional", what, name);
        goto cleanup;
    }
    hssize_t np = H5Sget_simple_extent_npoints(sp);
    if (np < 0) {
        error_set_h5("%s: bad shape for '%s'", what, name);
        goto cleanup;
    }
    n = (size_t)np;
    res = xcalloc(n ? n : 1, sizeof *res);
    htri_t vlen = H5Tis_variable_str(ft);
    if (vlen < 0) {
        error_set_h5("%s: cannot read string type of '%s'", what, name);
        goto cleanup;
    }
    if (vlen) {
        mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, H5T_VARIABLE);
        H5Tset_cset(mt, H5Tget_cset(ft));
        char **raw = xcalloc(n ? n : 1, sizeof *raw);
        if (H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw) < 0) {
            free(raw);
            error_set_h5("%s: cannot read strings of '%s'", what, name);
            goto cleanup;
        }
        for (size_t i = 0; i < n; i++) res[i] = xstrdup(raw[i] ? raw[i] : "");
        H5Dvlen_reclaim(mt, sp, H5P_DEFAULT, raw);
        free(raw);
    } else {
        size_t w = H5Tget_size(ft);
        if (w == 0 || w > (1u << 20)) {
            error_set("%s: dataset '%s' has an implausible string width %zu", what, name, w);
            goto cleanup;
        }
        mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, w);
        H5Tset_strpad(mt, H5T_STR_NULLPAD);
        H5Tset_cset(mt, H5Tget_cset(ft));
        char *raw = xmalloc(n * w + 1);
        if (H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw) < 0) {
            free(raw);
            error_set_h5("%s: cannot read strings of '%s'", what, name);
            goto cleanup;
        }
        for (size_t i = 0; i < n; i++) {
            size_t l = strnlen(raw + i * w, w);
            res[i] = xmalloc(l + 1);
            memcpy(res[i], raw + i * w, l);
            res[i][l] = '\0';
        }
        free(raw);
    }
    *out = res;
    *n_out = n;
    res = NULL;
    rc = 0;
cleanup:
    if (res) h5_free_strings(res, n);
    if (mt >= 0) H5Tclose(mt);
    if (sp >= 0) H5Sclose(sp);
    if (ft >= 0) H5Tclose(ft);
    if (d >= 0) H5Dclose(d);
    return rc;
}

int h5_attr_exists(hid_t obj, const char *name) { return H5Aexists(obj, name) > 0; }

int h5_attr_read_string(hid_t obj, const char *name, char *buf, size_t len) {
    hid_t a = H5I_INVALID_HID, ft = H5I_INVALID_HID, mt = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    int rc = -1;
    buf[0] = '\0';
    if ((a = H5Aopen(obj, name, H5P_DEFAULT)) < 0) {
        error_set_h5("cannot open attribute '%s'", name);
        goto cleanup;
    }
    ft = H5Aget_type(a);
    sp = H5Aget_space(a);
    if (ft < 0 || sp < 0 || H5Tget_class(ft) != H5T_STRING) {
        error_set("attribute '%s' is not a string", name);
        goto cleanup;
    }
    if (H5Sget_simple_extent_npoints(sp) != 1) {
        error_set("attribute '%s' is not a single string", name);
        goto cleanup;
    }
    mt = H5Tcopy(H5T_C_S1);
    // HDF5 converts no strings between character sets: read in the file's.
    H5Tset_cset(mt, H5Tget_cset(ft));
    if (H5Tis_variable_str(ft) > 0) {
        H5Tset_size(mt, H5T_VARIABLE);
        char *v = NULL;
        if (H5Aread(a, mt, &v) < 0) {
            error_set_h5("cannot read attribute '%s'", name);
            goto cleanup;
        }
        snprintf(buf, len, "%s", v ? v : "");
        H5free_memory(v);
    } else {
        size_t w = H5Tget_size(ft);
        if (w == 0 || w > (1u << 16)) {
            error_set("attribute '%s' has an implausible width", name);
            goto cleanup;
        }
        H5Tset_size(mt, w);
        H5Tset_strpad(mt, H5T_STR_NULLPAD);
        char *v = xcalloc(1, w + 1);
        if (H5Aread(a, mt, v) < 0) {
            free(v);
            error_set_h5("cannot read attribute '%s'", name);
            goto cleanup;
        }
        snprintf(buf, len, "%s", v);
        free(v);
    }
    rc = 0;
cleanup:
    if (mt >= 0) H5Tclose(mt);
    if (sp >= 0) H5Sclose(sp);
    if (ft >= 0) H5Tclose(ft);
    if (a >= 0) H5Aclose(a);
    return rc;
}

int h5_attr_read_i64s(hid_t obj, const char *name, int64_t *v, size_t n) {
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return error_set_h5("cannot open attribute '%s'", name);
    hid_t sp = H5Aget_space(a);
    hssize_t np = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    int rc = 0;
    if (np != (hssize_t)n)
        rc = error_set("attribute '%s' has %lld values, expected %zu", name, (long long)np, n);
    else if (H5Aread(a, H5T_NATIVE_INT64, v) < 0)
        rc = error_set_h5("cannot read attribute '%s'", name);
    if (sp >= 0) H5Sclose(sp);
    H5Aclose(a);
    return rc;
}

// Strings we write are fixed-length UTF-8 (NUL-padded to the longest): they
// live in the object header or the dataset's own storage, never in HDF5's
// global heap, which has no checksums and which HDF5 1.10 reads unchecked.
static hid_t fixed_utf8(size_t width) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, width ? width : 1);
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    H5Tset_cset(t, H5T_CSET_UTF8);
    return t;
}

char *h5_pack_strings(const char *const *v, size_t n, size_t *width) {
    size_t w = 1;
    for (size_t i = 0; i < n; i++) {
        size_t l = strlen(v[i]);
        if (l > w) w = l;
    }
    char *buf = xcalloc(n ? n : 1, w);
    for (size_t i = 0; i < n; i++) memcpy(buf + i * w, v[i], strlen(v[i]));
    *width = w;
    return buf;
}

static int attr_write(hid_t obj, const char *name, hid_t type, hid_t space, const void *buf) {
    if (H5Aexists(obj, name) > 0 && H5Adelete(obj, name) < 0)
        return error_set_h5("cannot replace attribute '%s'", name);
    hid_t a = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a < 0) return error_set_h5("cannot create attribute '%s'", name);
    herr_t e = H5Awrite(a, type, buf);
    H5Aclose(a);
    if (e < 0) return error_set_h5("cannot write attribute '%s'", name);
    return 0;
}

int h5_attr_write_string(hid_t obj, const char *name, const char *value) {
    size_t w;
    char *buf = h5_pack_strings(&value, 1, &w);
    hid_t t = fixed_utf8(w), s = H5Screate(H5S_SCALAR);
    int rc = attr_write(obj, name, t, s, buf);
    H5Sclose(s);
    H5Tclose(t);
    free(buf);
    return rc;
}

int h5_attr_write_strings(hid_t obj, const char *name, const char *const *v, size_t n) {
    hsize_t dim = n;
    if (n == 0) {
        // An empty list is an empty float64 array, as AnnData writes it.
        double none = 0.0;
        hid_t s0 = H5Screate_simple(1, &dim, NULL);
        int rc0 = attr_write(obj, name, H5T_IEEE_F64LE, s0, &none);
        H5Sclose(s0);
        return rc0;
    }
    size_t w;
    char *buf = h5_pack_strings(v, n, &w);
    hid_t t = fixed_utf8(w), s = H5Screate_simple(1, &dim, NULL);
    int rc = attr_write(obj, name, t, s, buf);
    H5Sclose(s);
    H5Tclose(t);
    free(buf);
    return rc;
}

int h5_attr_write_i64s(hid_t obj, const char *name, const int64_t *v, size_t n) {
    hsize_t dim = n;
    hid_t s = H5Screate_simple(1, &dim, NULL);
    int rc = attr_write(obj, name, H5T_STD_I64LE, s, v);
    H5Sclose(s);
    return rc;
}

int h5_attr_write_bool(hid_t obj, const char *name, int value) {
    // numpy's bool as h5py stores it: an int8 enum FALSE = 0, TRUE = 1.
    int8_t no = 0, yes = 1, v = value ? 1 : 0;
    hid_t t = H5Tenum_create(H5T_NATIVE_INT8), s = H5Screate(H5S_SCALAR);
    int rc = 0;
    if (t < 0 || H5Tenum_insert(t, "FALSE", &no) < 0 || H5Tenum_insert(t, "TRUE", &yes) < 0)
        rc = error_set_h5("cannot build the boolean type of attribute '%s'", name);
    else
        rc = attr_write(obj, name, t, s, &v);
    if (t >= 0) H5Tclose(t);
    H5Sclose(s);
    return rc;
}

int h5_write_strings(hid_t loc, const char *name, const char *const *v, size_t n) {
    hsize_t dim = n;
    size_t w;
    char *buf = h5_pack_strings(v, n, &w);
    hid_t t = fixed_utf8(w), s = H5Screate_simple(1, &dim, NULL);
    hid_t d = H5Dcreate2(loc, name, t, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (d < 0)
        rc = error_set_h5("cannot create string dataset '%s'", name);
    else if (n > 0 && H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        rc = error_set_h5("cannot write string dataset '%s'", name);
    if (d >= 0) H5Dclose(d);
    H5Sclose(s);
    H5Tclose(t);
    free(buf);
    return rc;
}

int h5_write_string_scalar(hid_t loc, const char *name, const char *value) {
    size_t w;
    char *buf = h5_pack_strings(&value, 1, &w);
    hid_t t = fixed_utf8(w), s = H5Screate(H5S_SCALAR);
    hid_t d = H5Dcreate2(loc, name, t, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (d < 0 || H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        rc = error_set_h5("cannot write string '%s'", name);
    if (d >= 0) H5Dclose(d);
    H5Sclose(s);
    H5Tclose(t);
    free(buf);
    return rc;
}

int h5_is_fixed_string_attr(hid_t obj, const char *name) {
    if (H5Aexists(obj, name) <= 0) return 0;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return 0;
    hid_t t = H5Aget_type(a);
    int ok = t >= 0 && H5Tget_class(t) == H5T_STRING && H5Tis_variable_str(t) == 0;
    if (t >= 0) H5Tclose(t);
    H5Aclose(a);
    return ok;
}

int h5_set_encoding(hid_t obj, const char *type, const char *version) {
    if (h5_attr_write_string(obj, "encoding-type", type) != 0) return -1;
    return h5_attr_write_string(obj, "encoding-version", version);
}

static pthread_mutex_t g_h5_lock = PTHREAD_MUTEX_INITIALIZER;

void h5_lock(void) { pthread_mutex_lock(&g_h5_lock); }
void h5_unlock(void) { pthread_mutex_unlock(&g_h5_lock); }

// Bob Jenkins' lookup3 hashlittle(), the checksum of HDF5 metadata (File
// Format Specification, "Checksums"), over the bytes as they lie in the file.
static uint32_t rotl32(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

static uint32_t load_le32(const unsigned char *p, size_t n) {
    uint32_t v = 0;
    for (size_t i = 0; i < n && i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}

uint32_t h5_checksum_lookup3(const void *data, size_t n) {
    const unsigned char *p = data;
    uint32_t a, b, c;
    a = b = c = 0xdeadbeefu + (uint32_t)n;
    while (n > 12) {
        a += load_le32(p, 4);
        b += load_le32(p + 4, 4);
        c += load_le32(p + 8, 4);
        a -= c; a ^= rotl32(c, 4);  c += b;
        b -= a; b ^= rotl32(a, 6);  a += c;
        c -= b; c ^= rotl32(b, 8);  b += a;
        a -= c; a ^= rotl32(c, 16); c += b;
        b -= a; b ^= rotl32(a, 19); a += c;
        c -= b; c ^= rotl32(b, 4);  b += a;
        p += 12;
        n -= 12;
    }
    if (n == 0) return c;
    a += load_le32(p, n);
    if (n > 4) b += load_le32(p + 4, n - 4);
    if (n > 8) c += load_le32(p + 8, n - 8);
    c ^= b; c -= rotl32(b, 14);
    a ^= c; a -= rotl32(c, 11);
    b ^= a; b -= rotl32(a, 25);
    c ^= b; c -= rotl32(b, 16);
    a ^= c; a -= rotl32(c, 4);
    b ^= a; b -= rotl32(a, 14);
    c ^= b; c -= rotl32(b, 24);
    return c;
}

int h5_image_seal(void *image, size_t n) {
    unsigned char *p = image;
    static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
    if (n < 12 || memcmp(p, sig, sizeof sig) != 0)
        return error_set("the file image does not start with an HDF5 superblock");
    if (p[8] < 2) return 0; // versions 0 and 1 carry neither status flags nor a checksum
    size_t so = p[9], at = 12 + 4 * so;
    if ((so != 4 && so != 8) || at + 4 > n)
        return error_set("the file image has a superblock HDF5 cannot have written");
    p[11] = 0;
    uint32_t sum = h5_checksum_lookup3(p, at);
    for (int i = 0; i < 4; i++) p[at + (size_t)i] = (unsigned char)(sum >> (8 * i));
    return 0;
}
