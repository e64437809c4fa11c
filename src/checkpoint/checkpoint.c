// Checkpoints: atomic HDF5 writes, validated reads, resume resolution, and
// copying tensors between parameter tables (layout in checkpoint.h).
//
// The reader treats the file as untrusted input: every rank, size, type and
// string length is checked before use, and arrays are allocated only after
// their sizes have been checked against what the file can hold.
#include "perfcell/checkpoint.h"

#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/log.h"
#include "perfcell/manifest.h"
#include "perfcell/util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PROJ_PREFIX "performer.net.layers."
#define PROJ_SUFFIX ".0.fn.fast_attention.projection_matrix"
#define STATE_REDRAW "redraw_index"
#define STATE_FEATURE_SEED "feature_seed"
#define SCALAR_KEY_MAX 64
#define DEPTH_MAX 4096
#define LINKS_MAX (1u << 20)
#define ATTRS_MAX 4096
// Every dataset costs at least this many bytes of the file (object header,
// link); bounds how many a file of a given size can hold.
#define DATASET_MIN_BYTES 64
#define OBJ_NAME_MAX (PARAM_NAME_MAX + 32)

// ---------------------------------------------------------------------------
// Shared helpers

// error_set() with the current message after a prefix (copied first: it lives
// in the buffer error_set() writes).
static int error_wrap(const char *fmt, ...) PC_PRINTF(1, 2);
static int error_wrap(const char *fmt, ...) {
    char last[1024], prefix[1024];
    snprintf(last, sizeof last, "%s", error_last());
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    return error_set("%s: %s", prefix, last);
}

// Take the HDF5 lock and silence HDF5's own error printing (we report errors
// ourselves); h5_leave() restores the caller's printing and releases the lock.
typedef struct {
    H5E_auto2_t func;
    void *data;
} H5Quiet;

static void h5_enter(H5Quiet *q) {
    h5_lock();
    H5Eget_auto2(H5E_DEFAULT, &q->func, &q->data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static void h5_leave(const H5Quiet *q) {
    H5Eset_auto2(H5E_DEFAULT, q->func, q->data);
    h5_unlock();
}

static void ckpt_file_name(char *buf, size_t len, int64_t step) {
    snprintf(buf, len, "ckpt-%08" PRId64 ".h5", step);
}

static void proj_name(char *buf, size_t len, size_t layer) {
    snprintf(buf, len, PROJ_PREFIX "%zu" PROJ_SUFFIX, layer);
}

static const char *shape_str(int ndim, const size_t *shape, char buf[64]) {
    if (ndim == 1)
        snprintf(buf, 64, "(%zu)", shape[0]);
    else
        snprintf(buf, 64, "(%zu, %zu)", shape[0], shape[1]);
    return buf;
}

// CRC-32 of strings, each followed by its NUL byte.
static uint32_t crc_strings(const char *const *v, size_t n) {
    uint32_t crc = 0;
    for (size_t i = 0; i < n; i++) crc = hash_crc32(crc, v[i], strlen(v[i]) + 1);
    return crc;
}

// ---------------------------------------------------------------------------
// The root checksum
//
// Tensors, the cursor and the string datasets carry their own CRC-32, but the
// numbers a resume depends on besides them (step, epoch, seed, kind, the
// /state attributes, each tensor's index and flags, which groups exist) have
// none: h5py rewrites an attribute and HDF5 recomputes its object header's
// checksum. The root attribute crc32 covers all of it: the CRC-32 of a text
// of one line per value, which holds the CRC-32 of every dataset, so that it
// covers the data too (see checkpoint.h for the lines).

static void digest_line(uint32_t *crc, const char *fmt, ...) PC_PRINTF(2, 3);
static void digest_line(uint32_t *crc, const char *fmt, ...) {
    char line[OBJ_NAME_MAX + 256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    size_t len = n < 0 ? 0 : (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    *crc = hash_crc32(*crc, line, len);
}

static uint32_t crc_floats(const float *x, size_t n) { return hash_crc32(0, x, n * sizeof *x); }

static int scalar_by_key(const void *a, const void *b) {
    const CkptScalar *const *x = a, *const *y = b;
    return strcmp((*x)->key, (*y)->key);
}

static void digest_shape(char buf[64], const ParamEntry *e) {
    if (e->ndim == 2)
        snprintf(buf, 64, "%zux%zu", e->shape[0], e->shape[1]);
    else
        snprintf(buf, 64, "%zu", e->shape[0]);
}

// The root checksum of a full state; `created` is the root attribute of that name.
static uint32_t state_digest(const CkptState *s, const char *created) {
    uint32_t crc = 0;
    char hash[17], shape[64];
    vocab_hash_format(s->vocab_hash, hash);
    digest_line(&crc, "format=%s format_version=%d\n", CKPT_FORMAT, CKPT_FORMAT_VERSION);
    digest_line(&crc, "kind=%s step=%" PRId64 " epoch=%" PRId64 " seed=%" PRIu64 " vocab_hash=%s created=%s\n",
                s->kind, s->step, s->epoch, s->seed, hash, created);
    for (size_t i = 0; i < s->table.n; i++) {
        const ParamEntry *e = &s->table.e[i];
        digest_shape(shape, e);
        digest_line(&crc, "/model/%s index=%zu trainable=%d decay=%d shape=%s crc32=%08" PRIx32 "\n", e->name, i,
                    e->trainable != 0, e->decay != 0, shape, crc_floats(s->params + e->offset, e->size));
    }
    digest_line(&crc, "/optim %d\n", s->exp_avg != NULL);
    for (int k = 0; k < 2 && s->exp_avg; k++) {
        const float *m = k == 0 ? s->exp_avg : s->exp_avg_sq;
        for (size_t i = 0; i < s->table.n; i++) {
            const ParamEntry *e = &s->table.e[i];
            if (e->trainable)
                digest_line(&crc, "/optim/%s/%s crc32=%08" PRIx32 "\n", k == 0 ? "exp_avg" : "exp_avg_sq", e->name,
                            crc_floats(m + e->offset, e->size));
        }
    }
    size_t per = s->n_features * s->dim_head;
    digest_line(&crc, "/buffers depth=%zu shape=%zux%zu\n", s->depth, s->n_features, s->dim_head);
    for (size_t l = 0; l < s->depth; l++)
        digest_line(&crc, "/buffers/%zu crc32=%08" PRIx32 "\n", l, crc_floats(s->proj + l * per, per));
    digest_line(&crc, "/state " STATE_REDRAW "=%" PRId64 " " STATE_FEATURE_SEED "=%" PRIu64 "\n", s->redraw_index,
                s->feature_seed);
    const CkptScalar **sc = xcalloc(s->n_scalars ? s->n_scalars : 1, sizeof *sc);
    for (size_t i = 0; i < s->n_scalars; i++) sc[i] = &s->scalars[i];
    if (s->n_scalars > 1) qsort(sc, s->n_scalars, sizeof *sc, scalar_by_key);
    for (size_t i = 0; i < s->n_scalars; i++) {
        uint64_t bits;
        memcpy(&bits, &sc[i]->value, sizeof bits);
        digest_line(&crc, "/state %s=%016" PRIx64 "\n", sc[i]->key, bits);
    }
    free(sc);
    digest_line(&crc, "/state/cursor n=%zu crc32=%08" PRIx32 "\n", s->cursor_len,
                s->cursor_len ? hash_crc32(0, s->cursor, s->cursor_len * sizeof *s->cursor) : 0u);
    const char *config = s->config_ini ? s->config_ini : "", *vocab = s->vocab_tsv ? s->vocab_tsv : "";
    digest_line(&crc, "/config crc32=%08" PRIx32 "\n", crc_strings(&config, 1));
    digest_line(&crc, "/vocab crc32=%08" PRIx32 "\n", crc_strings(&vocab, 1));
    if (s->n_labels > 0)
        digest_line(&crc, "/labels n=%zu crc32=%08" PRIx32 "\n", s->n_labels,
                    crc_strings((const char *const *)s->labels, s->n_labels));
    return crc;
}

// Names we store as HDF5 link or attribute names: no path separators, no
// "." or "..", printable ASCII.
static int name_ok(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n == 0 || n >= max || strcmp(s, ".") == 0 || strcmp(s, "..") == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '/' || s[i] <= ' ' || s[i] > '~') return 0;
    return 1;
}

static int kind_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n >= sizeof((CkptState *)0)->kind) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_' || s[i] == '-'))
            return 0;
    return 1;
}

// "ckpt-<digits>.h5" -> step.
static int parse_ckpt_name(const char *name, int64_t *step) {
    if (strncmp(name, "ckpt-", 5) != 0 || !str_ends_with(name, ".h5")) return -1;
    const char *d = name + 5;
    size_t nd = strlen(d) - 3;
    if (nd == 0 || nd > 18) return -1;
    int64_t v = 0;
    for (size_t i = 0; i < nd; i++) {
        if (d[i] < '0' || d[i] > '9') return -1;
        v = v * 10 + (d[i] - '0');
    }
    *step = v;
    return 0;
}

typedef struct {
    int64_t step;
    char *name;
} CkptFile;

static int ckpt_file_newer_first(const void *a, const void *b) {
    const CkptFile *x = a, *y = b;
    return x->step < y->step ? 1 : x->step > y->step ? -1 : strcmp(x->name, y->name);
}

static void ckpt_files_free(CkptFile *f, size_t n) {
    for (size_t i = 0; i < n; i++) free(f[i].name);
    free(f);
}

// The ckpt-<step>.h5 files of `dir`, newest first.
static int ckpt_files_list(const char *dir, CkptFile **out, size_t *n_out) {
    DIR *d = opendir(dir);
    if (!d) return error_set("cannot list checkpoint folder '%s': %s", dir, strerror(errno));
    CkptFile *f = NULL;
    size_t n = 0, cap = 0;
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        int64_t step;
        if (parse_ckpt_name(e->d_name, &step) != 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            f = xrealloc(f, cap * sizeof *f);
        }
        f[n].step = step;
        f[n].name = xstrdup(e->d_name);
        n++;
    }
    closedir(d);
    if (n > 1) qsort(f, n, sizeof *f, ckpt_file_newer_first);
    *out = f;
    *n_out = n;
    return 0;
}

// ---------------------------------------------------------------------------
// Writing

// A failed HDF5 write step (h5_lock held). `err` is the errno the failing
// call left: a full disk or a file size limit shows up at H5Dwrite or only at
// flush/close time, and the OS reason is what the user needs; without one,
// HDF5's description.
static int write_fail(const char *path, int err, const char *fmt, ...) PC_PRINTF(3, 4);
static int write_fail(const char *path, int err, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (err) return error_set("cannot write checkpoint '%s': %s: %s", path, what, strerror(err));
    return error_set_h5("cannot write checkpoint '%s': %s", path, what);
}

// An attribute of n values (n = 0: a scalar).
static int attr_put(hid_t obj, const char *path, const char *objname, const char *attr, hid_t ftype,
                    hid_t mtype, size_t n, const void *v) {
    hsize_t dim = n;
    hid_t sp = H5I_INVALID_HID, a = H5I_INVALID_HID;
    int rc = -1;
    errno = 0;
    if ((sp = n ? H5Screate_simple(1, &dim, NULL) : H5Screate(H5S_SCALAR)) < 0 ||
        (a = H5Acreate2(obj, attr, ftype, sp, H5P_DEFAULT, H5P_DEFAULT)) < 0) {
        write_fail(path, errno, "creating attribute '%s' of '%s'", attr, objname);
        goto cleanup;
    }
    errno = 0;
    if (H5Awrite(a, mtype, v) < 0) {
        write_fail(path, errno, "writing attribute '%s' of '%s'", attr, objname);
        goto cleanup;
    }
    rc = 0;
cleanup:
    if (a >= 0) H5Aclose(a);
    if (sp >= 0) H5Sclose(sp);
    return rc;
}

static hid_t vlen_utf8(void) {
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t < 0) return t;
    if (H5Tset_size(t, H5T_VARIABLE) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0) {
        H5Tclose(t);
        return H5I_INVALID_HID;
    }
    return t;
}

// A string attribute of fixed length: it lives in the object header, which
// the 1.8 format checksums (variable-length strings live in the global heap,
// which has no checksum).
static int attr_put_str(hid_t obj, const char *path, const char *objname, const char *attr,
                        const char *value) {
    size_t n = strlen(value);
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t < 0 || H5Tset_size(t, n ? n : 1) < 0 || H5Tset_strpad(t, H5T_STR_NULLPAD) < 0 ||
        H5Tset_cset(t, H5T_CSET_UTF8) < 0) {
        if (t >= 0) H5Tclose(t);
        return write_fail(path, 0, "creating a string type");
    }
    char *buf = xcalloc(1, n + 1);
    memcpy(buf, value, n);
    int rc = attr_put(obj, path, objname, attr, t, t, 0, buf);
    free(buf);
    H5Tclose(t);
    return rc;
}

static int attr_put_i64(hid_t obj, const char *path, const char *objname, const char *attr, int64_t v) {
    return attr_put(obj, path, objname, attr, H5T_STD_I64LE, H5T_NATIVE_INT64, 0, &v);
}

static int attr_put_u64(hid_t obj, const char *path, const char *objname, const char *attr, uint64_t v) {
    return attr_put(obj, path, objname, attr, H5T_STD_U64LE, H5T_NATIVE_UINT64, 0, &v);
}

static int attr_put_crc(hid_t obj, const char *path, const char *objname, uint32_t crc) {
    return attr_put(obj, path, objname, "crc32", H5T_STD_U32LE, H5T_NATIVE_UINT32, 0, &crc);
}

// What /model tensors carry besides data, crc32 and shape.
typedef struct {
    int64_t index;
    int trainable, decay;
} TensorMeta;

// A dataset of n elements (ndim dimensions) written from `buf` with its crc32
// (and shape for float tensors); meta adds the /model attributes.
static int dataset_put(hid_t loc, const char *path, const char *objname, const char *name, hid_t ftype,
                       hid_t mtype, int ndim, const size_t *shape, const void *buf, size_t bytes,
                       const TensorMeta *meta) {
    hsize_t dims[2] = {shape[0], ndim == 2 ? shape[1] : 1};
    hid_t sp = H5I_INVALID_HID, dcpl = H5I_INVALID_HID, d = H5I_INVALID_HID;
    int rc = -1;
    errno = 0;
    if ((sp = H5Screate_simple(ndim, dims, NULL)) < 0 || (dcpl = H5Pcreate(H5P_DATASET_CREATE)) < 0 ||
        H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) < 0 ||
        (d = H5Dcreate2(loc, name, ftype, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT)) < 0) {
        write_fail(path, errno, "creating dataset '%s'", objname);
        goto cleanup;
    }
    errno = 0;
    if (bytes > 0 && H5Dwrite(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
        write_fail(path, errno, "writing '%s'", objname);
        goto cleanup;
    }
    if (attr_put_crc(d, path, objname, hash_crc32(0, buf, bytes)) != 0) goto cleanup;
    if (mtype == H5T_NATIVE_FLOAT) {
        int64_t sh[2] = {(int64_t)shape[0], ndim == 2 ? (int64_t)shape[1] : 0};
        if (attr_put(d, path, objname, "shape", H5T_STD_I64LE, H5T_NATIVE_INT64, (size_t)ndim, sh) != 0)
            goto cleanup;
    }
    if (meta && (attr_put_i64(d, path, objname, "index", meta->index) != 0 ||
                 attr_put_i64(d, path, objname, "trainable", meta->trainable) != 0 ||
                 attr_put_i64(d, path, objname, "decay", meta->decay) != 0))
        goto cleanup;
    rc = 0;
cleanup:
    if (d >= 0) H5Dclose(d);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (sp >= 0) H5Sclose(sp);
    return rc;
}

static int tensor_put(hid_t loc, const char *path, const char *group, const char *name, int ndim,
                      const size_t *shape, const float *x, const TensorMeta *meta) {
    char objname[OBJ_NAME_MAX + 32];
    snprintf(objname, sizeof objname, "/%s/%s", group, name);
    size_t n = shape[0] * (ndim == 2 ? shape[1] : 1);
    return dataset_put(loc, path, objname, name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, ndim, shape, x,
                       n * sizeof(float), meta);
}

// A string dataset: scalar when `scalar`, else 1-D of n strings; crc32 attr.
static int strings_put(hid_t loc, const char *path, const char *name, const char *const *v, size_t n,
                       int scalar) {
    char objname[64];
    snprintf(objname, sizeof objname, "/%s", name);
    hsize_t dim = n;
    hid_t t = H5I_INVALID_HID, sp = H5I_INVALID_HID, d = H5I_INVALID_HID;
    int rc = -1;
    errno = 0;
    if ((t = vlen_utf8()) < 0 ||
        (sp = scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &dim, NULL)) < 0 ||
        (d = H5Dcreate2(loc, name, t, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0) {
        write_fail(path, errno, "creating string dataset '%s'", objname);
        goto cleanup;
    }
    errno = 0;
    if (n > 0 && H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, v) < 0) {
        write_fail(path, errno, "writing '%s'", objname);
        goto cleanup;
    }
    if (attr_put_crc(d, path, objname, crc_strings(v, n)) != 0) goto cleanup;
    rc = 0;
cleanup:
    if (d >= 0) H5Dclose(d);
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    return rc;
}

// Groups keep their links in the (checksummed) object header: compact link
// storage up to 65535 links. Dense storage (a fractal heap and a B-tree
// without checksums) can crash HDF5 when damaged, so readers refuse it.
static hid_t group_create(hid_t loc, const char *name) {
    hid_t gcpl = H5Pcreate(H5P_GROUP_CREATE), g = H5I_INVALID_HID;
    if (gcpl >= 0 && H5Pset_link_phase_change(gcpl, 65535, 65535) >= 0)
        g = H5Gcreate2(loc, name, H5P_DEFAULT, gcpl, H5P_DEFAULT);
    if (gcpl >= 0) H5Pclose(gcpl);
    return g;
}

static hid_t group_put(hid_t loc, const char *path, const char *name) {
    errno = 0;
    hid_t g = group_create(loc, name);
    if (g < 0) write_fail(path, errno, "creating group '/%s'", name);
    return g;
}

static int write_root_attrs(hid_t file, const char *path, const CkptState *s, const char *created) {
    char hash[17];
    vocab_hash_format(s->vocab_hash, hash);
    if (attr_put_str(file, path, "/", "format", CKPT_FORMAT) != 0 ||
        attr_put_i64(file, path, "/", "format_version", CKPT_FORMAT_VERSION) != 0 ||
        attr_put_str(file, path, "/", "kind", s->kind) != 0 ||
        attr_put_i64(file, path, "/", "step", s->step) != 0 ||
        attr_put_i64(file, path, "/", "epoch", s->epoch) != 0 ||
        attr_put_u64(file, path, "/", "seed", s->seed) != 0 ||
        attr_put_str(file, path, "/", "vocab_hash", hash) != 0 ||
        attr_put_str(file, path, "/", "created", created) != 0 ||
        attr_put_crc(file, path, "/", state_digest(s, created)) != 0)
        return -1;
    return 0;
}

static int write_model(hid_t file, const char *path, const CkptState *s) {
    hid_t g = group_put(file, path, "model");
    if (g < 0) return -1;
    int rc = 0;
    for (size_t i = 0; i < s->table.n && rc == 0; i++) {
        const ParamEntry *e = &s->table.e[i];
        TensorMeta meta = {(int64_t)i, e->trainable != 0, e->decay != 0};
        rc = tensor_put(g, path, "model", e->name, e->ndim, e->shape, s->params + e->offset, &meta);
    }
    H5Gclose(g);
    return rc;
}

static int write_optim(hid_t file, const char *path, const CkptState *s) {
    hid_t g = H5I_INVALID_HID, m = H5I_INVALID_HID;
    int rc = -1;
    if ((g = group_put(file, path, "optim")) < 0) goto cleanup;
    for (int k = 0; k < 2; k++) {
        const char *gname = k == 0 ? "exp_avg" : "exp_avg_sq";
        const float *buf = k == 0 ? s->exp_avg : s->exp_avg_sq;
        char full[32];
        snprintf(full, sizeof full, "optim/%s", gname);
        errno = 0;
        if ((m = group_create(g, gname)) < 0) {
            write_fail(path, errno, "creating group '/%s'", full);
            goto cleanup;
        }
        for (size_t i = 0; i < s->table.n; i++) {
            const ParamEntry *e = &s->table.e[i];
            if (!e->trainable) continue;
            if (tensor_put(m, path, full, e->name, e->ndim, e->shape, buf + e->offset, NULL) != 0)
                goto cleanup;
        }
        H5Gclose(m);
        m = H5I_INVALID_HID;
    }
    rc = 0;
cleanup:
    if (m >= 0) H5Gclose(m);
    if (g >= 0) H5Gclose(g);
    return rc;
}

static int write_buffers(hid_t file, const char *path, const CkptState *s) {
    hid_t g = group_put(file, path, "buffers");
    if (g < 0) return -1;
    int rc = 0;
    size_t shape[2] = {s->n_features, s->dim_head};
    for (size_t l = 0; l < s->depth && rc == 0; l++) {
        char name[PARAM_NAME_MAX];
        proj_name(name, sizeof name, l);
        rc = tensor_put(g, path, "buffers", name, 2, shape, s->proj + l * shape[0] * shape[1], NULL);
    }
    H5Gclose(g);
    return rc;
}

static int write_state(hid_t file, const char *path, const CkptState *s) {
    hid_t g = group_put(file, path, "state");
    if (g < 0) return -1;
    int rc = -1;
    if (attr_put_i64(g, path, "/state", STATE_REDRAW, s->redraw_index) != 0 ||
        attr_put_u64(g, path, "/state", STATE_FEATURE_SEED, s->feature_seed) != 0)
        goto cleanup;
    for (size_t i = 0; i < s->n_scalars; i++)
        if (attr_put(g, path, "/state", s->scalars[i].key, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 0,
                     &s->scalars[i].value) != 0)
            goto cleanup;
    size_t len = s->cursor_len;
    if (dataset_put(g, path, "/state/cursor", "cursor", H5T_STD_I64LE, H5T_NATIVE_INT64, 1, &len, s->cursor,
                    len * sizeof(int64_t), NULL) != 0)
        goto cleanup;
    rc = 0;
cleanup:
    H5Gclose(g);
    return rc;
}

// The whole checkpoint as an HDF5 file image in memory (h5_lock held). The
// file is built with the core driver and no backing store, so HDF5 never
// touches the disk: a full disk or a file size limit meets our own write()
// (file_write_synced) and its error, and a failed write leaves nothing open
// inside the library. Returns the image (free() it) or NULL with error_set().
static void *build_image(const char *path, const CkptState *s, size_t *len) {
    hid_t fapl = H5I_INVALID_HID, file = H5I_INVALID_HID;
    void *image = NULL;
    // The 1.8 file format: checksummed metadata, readable by HDF5 >= 1.8.
    if ((fapl = H5Pcreate(H5P_FILE_ACCESS)) < 0 || H5Pset_fapl_core(fapl, (size_t)4 << 20, 0) < 0 ||
        H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18) < 0 ||
        H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG) < 0) {
        write_fail(path, 0, "setting up file access");
        goto cleanup;
    }
    if ((file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl)) < 0) {
        write_fail(path, 0, "creating the file in memory");
        goto cleanup;
    }
    const char *config = s->config_ini ? s->config_ini : "";
    const char *vocab = s->vocab_tsv ? s->vocab_tsv : "";
    char created[40];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    if (write_root_attrs(file, path, s, created) != 0 || write_model(file, path, s) != 0 ||
        (s->exp_avg && write_optim(file, path, s) != 0) || write_buffers(file, path, s) != 0 ||
        write_state(file, path, s) != 0 || strings_put(file, path, "config", &config, 1, 1) != 0 ||
        strings_put(file, path, "vocab", &vocab, 1, 1) != 0 ||
        (s->n_labels > 0 &&
         strings_put(file, path, "labels", (const char *const *)s->labels, s->n_labels, 0) != 0))
        goto cleanup;
    // The metadata lives in HDF5's cache until a flush writes it into the
    // image; without it the image holds the raw data and a stale superblock.
    if (H5Fflush(file, H5F_SCOPE_GLOBAL) < 0) {
        write_fail(path, 0, "flushing the file in memory");
        goto cleanup;
    }
    ssize_t n = H5Fget_file_image(file, NULL, 0);
    if (n <= 0) {
        write_fail(path, 0, "sizing the file image");
        goto cleanup;
    }
    image = xmalloc((size_t)n);
    if (H5Fget_file_image(file, image, (size_t)n) != n) {
        write_fail(path, 0, "copying the file image");
        free(image);
        image = NULL;
        goto cleanup;
    }
    if (h5_image_seal(image, (size_t)n) != 0) {
        error_wrap("cannot write checkpoint '%s'", path);
        free(image);
        image = NULL;
        goto cleanup;
    }
    *len = (size_t)n;
cleanup:
    if (file >= 0 && H5Fclose(file) < 0 && image) {
        write_fail(path, 0, "closing the file in memory");
        free(image);
        image = NULL;
    }
    if (fapl >= 0) H5Pclose(fapl);
    return image;
}

// Programming errors in the state handed to ckpt_write.
static void check_state(const CkptState *s) {
    CHECK(kind_ok(s->kind), "internal: checkpoint kind '%.16s' is not a short lower-case word", s->kind);
    CHECK(s->step >= 0 && s->epoch >= 0, "internal: negative checkpoint step or epoch");
    CHECK(s->table.n > 0 && s->params, "internal: checkpoint without parameters");
    for (size_t i = 0; i < s->table.n; i++) {
        const ParamEntry *e = &s->table.e[i];
        CHECK(name_ok(e->name, PARAM_NAME_MAX), "internal: tensor name '%s' cannot be stored", e->name);
        CHECK((e->ndim == 1 || e->ndim == 2) && e->size > 0, "internal: tensor '%s' has no shape", e->name);
    }
    CHECK(!s->exp_avg == !s->exp_avg_sq, "internal: only one of the Adam moments given");
    CHECK(s->depth == 0 || (s->proj && s->n_features > 0 && s->dim_head > 0),
          "internal: projection matrices without data or shape");
    CHECK(s->depth <= DEPTH_MAX, "internal: %zu layers of projection matrices", s->depth);
    CHECK(s->cursor_len == 0 || s->cursor, "internal: cursor length without data");
    CHECK(s->n_labels == 0 || s->labels, "internal: labels count without labels");
    for (size_t i = 0; i < s->n_labels; i++) CHECK(s->labels[i], "internal: label %zu is NULL", i);
    CHECK(s->n_scalars == 0 || s->scalars, "internal: scalars count without scalars");
    CHECK(s->n_scalars <= ATTRS_MAX, "internal: %zu checkpoint scalars", s->n_scalars);
    for (size_t i = 0; i < s->n_scalars; i++) {
        const char *k = s->scalars[i].key;
        CHECK(k && name_ok(k, SCALAR_KEY_MAX) && strcmp(k, STATE_REDRAW) != 0 &&
                  strcmp(k, STATE_FEATURE_SEED) != 0,
              "internal: checkpoint scalar key '%s' cannot be stored", k ? k : "(null)");
        for (size_t j = 0; j < i; j++)
            CHECK(strcmp(s->scalars[j].key, k) != 0, "internal: checkpoint scalar '%s' given twice", k);
    }
}

// Whether process pid runs on this host: a zombie (killed, not yet reaped by
// its parent) writes nothing more.
static int pid_alive(pid_t pid) {
    if (kill(pid, 0) != 0 && errno == ESRCH) return 0;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *state = strrchr(buf, ')'); // after "pid (comm)"
    return !(state && state[1] == ' ' && state[2] == 'Z');
}

// Temporary files of writers in this folder that no longer run (killed while
// writing): .ckpt-STEP.h5.tmp-PID (they can be as large as a checkpoint) and
// latest.tmp.PID. Readers never take them for checkpoints (see
// ckpt_files_list); they are removed here, before the next checkpoint.
static void remove_stale_temps(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    const size_t nl = strlen(CKPT_LATEST ".tmp.");
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        const char *t = strstr(e->d_name, ".h5.tmp-"), *pid_text = NULL;
        if (strncmp(e->d_name, ".ckpt-", 6) == 0 && t) pid_text = t + 8;
        else if (strncmp(e->d_name, CKPT_LATEST ".tmp.", nl) == 0) pid_text = e->d_name + nl;
        if (!pid_text) continue;
        long pid;
        if (str_to_long(pid_text, &pid) != 0 || pid <= 0 || pid == (long)getpid()) continue;
        if (pid_alive((pid_t)pid)) continue;
        char *p = path_join(dir, e->d_name);
        if (unlink(p) == 0) log_warn("removed '%s', left by a checkpoint writer that died", p);
        free(p);
    }
    closedir(d);
}

// Delete checkpoints older than `step` beyond the newest `keep` (this one included).
static void prune(const char *dir, int64_t step, int keep) {
    CkptFile *f = NULL;
    size_t n = 0;
    if (keep <= 0 || ckpt_files_list(dir, &f, &n) != 0) return;
    int kept = 1;
    for (size_t i = 0; i < n; i++) {
        if (f[i].step >= step) continue;
        if (kept < keep) {
            kept++;
            continue;
        }
        char *p = path_join(dir, f[i].name);
        if (unlink(p) != 0) log_warn("cannot delete old checkpoint '%s': %s", p, strerror(errno));
        free(p);
    }
    ckpt_files_free(f, n);
}

int ckpt_write(const char *dir, const CkptState *s, int keep) {
    check_state(s);
    if (path_mkdir_p(dir) != 0) return error_wrap("cannot write checkpoints");
    char name[64], tmpname[96];
    ckpt_file_name(name, sizeof name, s->step);
    snprintf(tmpname, sizeof tmpname, ".ckpt-%" PRId64 ".h5.tmp-%ld", s->step, (long)getpid());
    char *path = path_join(dir, name);
    char *tmp = path_join(dir, tmpname);
    char *latest = path_join(dir, CKPT_LATEST);
    int rc = -1;
    remove_stale_temps(dir);

    error_cleanup_add(tmp);
    H5Quiet q;
    size_t image_len = 0;
    h5_enter(&q);
    void *image = build_image(path, s, &image_len);
    h5_leave(&q);
    int written = image ? file_write_synced(tmp, image, image_len) : -1;
    if (image && written != 0) error_wrap("cannot write checkpoint '%s'", path);
    free(image);
    if (written != 0) {
        unlink(tmp);
        error_cleanup_remove(tmp);
        goto done;
    }
    if (rename(tmp, path) != 0) {
        error_set("cannot write checkpoint '%s': renaming '%s' into place: %s", path, tmp, strerror(errno));
        unlink(tmp);
        error_cleanup_remove(tmp);
        goto done;
    }
    error_cleanup_remove(tmp);
    if (path_fsync(dir) != 0) {
        error_wrap("checkpoint '%s' written, but its folder could not be synced; '%s' not updated", path,
                   latest);
        goto done;
    }
    size_t len = strlen(name);
    name[len] = '\n';
    int updated = file_write_atomic(latest, name, len + 1);
    name[len] = '\0';
    if (updated != 0) {
        error_wrap("checkpoint '%s' written, but '%s' could not be updated", path, latest);
        goto done;
    }
    prune(dir, s->step, keep);
    rc = 0;
done:
    free(latest);
    free(tmp);
    free(path);
    return rc;
}

// ---------------------------------------------------------------------------
// Reading

typedef struct {
    const char *path;
    hid_t file;
    int fd;         // the same file, for the global heap (see read_vlen_strings)
    int64_t budget; // bytes of array and string data the file can still hold
    int64_t file_size;
    int data; // read the arrays and check their CRCs (0: structure and sizes)
    int has_optim;
    int sealed;        // the root has a crc32 attribute (root_crc)
    uint32_t root_crc;
    char created[40];
    size_t sizeof_addr, sizeof_size; // of the file's addresses and lengths
    uint64_t heap_addr;              // the global heap collection last read
    unsigned char *heap;
    uint64_t heap_size;
} Reader;

static int rfail(const Reader *r, const char *fmt, ...) PC_PRINTF(2, 3);
static int rfail(const Reader *r, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return error_set("corrupt checkpoint '%s': %s", r->path, msg);
}

static int rfail_h5(const Reader *r, const char *fmt, ...) PC_PRINTF(2, 3);
static int rfail_h5(const Reader *r, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return error_set_h5("corrupt checkpoint '%s': %s", r->path, msg);
}

// Claim `bytes` of the file for an array or strings: the sum of all of them
// cannot exceed the file's size (we store them uncompressed), which bounds
// every allocation by the size of the file.
static int too_big(const Reader *r, const char *objname) {
    return rfail(r,
                 "'%s' claims more data than the file holds (%" PRId64 " bytes): the file is "
                 "truncated or corrupt",
                 objname, r->file_size);
}

static int budget_take(Reader *r, uint64_t bytes, const char *objname) {
    if (bytes > (uint64_t)r->budget) return too_big(r, objname);
    r->budget -= (int64_t)bytes;
    return 0;
}

// Open `name` below `loc` (objname for messages): it must be reached through a
// hard link (soft and external links could point anywhere) and be of `type`.
// Returns -2 without an error message when it does not exist and !required.
static hid_t obj_open(const Reader *r, hid_t loc, const char *name, const char *objname, H5O_type_t type,
                      int required) {
    htri_t e = H5Lexists(loc, name, H5P_DEFAULT);
    if (e < 0) return rfail_h5(r, "cannot look up '%s'", objname);
    if (e == 0) {
        if (!required) return -2;
        return rfail(r, "'%s' is missing", objname);
    }
    H5L_info_t li;
    if (H5Lget_info(loc, name, &li, H5P_DEFAULT) < 0) return rfail_h5(r, "cannot read link '%s'", objname);
    if (li.type != H5L_TYPE_HARD) return rfail(r, "'%s' is a link, not stored in the file", objname);
    H5O_info_t oi;
    if (H5Oget_info_by_name2(loc, name, &oi, H5O_INFO_BASIC, H5P_DEFAULT) < 0)
        return rfail_h5(r, "cannot read object '%s'", objname);
    if (oi.type != type)
        return rfail(r, "'%s' is not a %s", objname, type == H5O_TYPE_GROUP ? "group" : "dataset");
    hid_t id = type == H5O_TYPE_GROUP ? H5Gopen2(loc, name, H5P_DEFAULT) : H5Dopen2(loc, name, H5P_DEFAULT);
    if (id < 0) return rfail_h5(r, "cannot open '%s'", objname);
    return id;
}

// A single number attribute of class `cls`, converted to `mtype`.
static int attr_num(const Reader *r, hid_t obj, const char *objname, const char *attr, H5T_class_t cls,
                    hid_t mtype, void *v) {
    hid_t a = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    int rc = -1;
    htri_t e = H5Aexists(obj, attr);
    if (e <= 0) {
        if (e < 0)
            rfail_h5(r, "cannot look up attribute '%s' of '%s'", attr, objname);
        else
            rfail(r, "'%s' has no '%s' attribute", objname, attr);
        goto cleanup;
    }
    if ((a = H5Aopen(obj, attr, H5P_DEFAULT)) < 0 || (t = H5Aget_type(a)) < 0 || (sp = H5Aget_space(a)) < 0) {
        rfail_h5(r, "cannot open attribute '%s' of '%s'", attr, objname);
        goto cleanup;
    }
    if (H5Tget_class(t) != cls || H5Sget_simple_extent_npoints(sp) != 1) {
        rfail(r, "attribute '%s' of '%s' is not a single %s", attr, objname,
              cls == H5T_FLOAT ? "floating-point number" : "integer");
        goto cleanup;
    }
    if (H5Aread(a, mtype, v) < 0) {
        rfail_h5(r, "cannot read attribute '%s' of '%s'", attr, objname);
        goto cleanup;
    }
    rc = 0;
cleanup:
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    if (a >= 0) H5Aclose(a);
    return rc;
}

static int attr_i64(const Reader *r, hid_t obj, const char *objname, const char *attr, int64_t *v) {
    return attr_num(r, obj, objname, attr, H5T_INTEGER, H5T_NATIVE_INT64, v);
}

static int attr_u64(const Reader *r, hid_t obj, const char *objname, const char *attr, uint64_t *v) {
    return attr_num(r, obj, objname, attr, H5T_INTEGER, H5T_NATIVE_UINT64, v);
}

static int attr_flag(const Reader *r, hid_t obj, const char *objname, const char *attr, int *v) {
    int64_t x;
    if (attr_i64(r, obj, objname, attr, &x) != 0) return -1;
    if (x != 0 && x != 1)
        return rfail(r, "attribute '%s' of '%s' is %" PRId64 ", not 0 or 1", attr, objname, x);
    *v = (int)x;
    return 0;
}

static int attr_crc(const Reader *r, hid_t obj, const char *objname, uint32_t *crc) {
    uint64_t x;
    if (attr_u64(r, obj, objname, "crc32", &x) != 0) return -1;
    if (x > UINT32_MAX) return rfail(r, "attribute 'crc32' of '%s' is not a 32-bit value", objname);
    *crc = (uint32_t)x;
    return 0;
}

// A fixed-length string attribute into buf (len bytes); longer strings are
// refused, and so are variable-length ones: HDF5 would read them from the
// global heap, which it does not check (see read_vlen_strings).
static int attr_str(const Reader *r, hid_t obj, const char *objname, const char *attr, char *buf,
                    size_t len) {
    hid_t a = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID, mt = H5I_INVALID_HID;
    int rc = -1;
    buf[0] = '\0';
    htri_t e = H5Aexists(obj, attr);
    if (e <= 0) {
        if (e < 0)
            rfail_h5(r, "cannot look up attribute '%s' of '%s'", attr, objname);
        else
            rfail(r, "'%s' has no '%s' attribute", objname, attr);
        goto cleanup;
    }
    if ((a = H5Aopen(obj, attr, H5P_DEFAULT)) < 0 || (t = H5Aget_type(a)) < 0 || (sp = H5Aget_space(a)) < 0) {
        rfail_h5(r, "cannot open attribute '%s' of '%s'", attr, objname);
        goto cleanup;
    }
    if (H5Tget_class(t) != H5T_STRING || H5Sget_simple_extent_npoints(sp) != 1) {
        rfail(r, "attribute '%s' of '%s' is not a single string", attr, objname);
        goto cleanup;
    }
    if (H5Tis_variable_str(t) != 0) {
        rfail(r, "attribute '%s' of '%s' is a variable-length string; checkpoints hold fixed-length ones",
              attr, objname);
        goto cleanup;
    }
    size_t w = H5Tget_size(t);
    if (w == 0 || w >= len) {
        rfail(r, "attribute '%s' of '%s' is too long (%zu bytes)", attr, objname, w);
        goto cleanup;
    }
    // The memory type takes the file's character set: HDF5 does not convert
    // between ASCII and UTF-8.
    memset(buf, 0, len);
    if ((mt = H5Tcopy(H5T_C_S1)) < 0 || H5Tset_cset(mt, H5Tget_cset(t)) < 0 || H5Tset_size(mt, w) < 0 ||
        H5Tset_strpad(mt, H5T_STR_NULLPAD) < 0 || H5Aread(a, mt, buf) < 0) {
        rfail_h5(r, "cannot read attribute '%s' of '%s'", attr, objname);
        goto cleanup;
    }
    buf[w] = '\0';
    rc = 0;
cleanup:
    if (mt >= 0) H5Tclose(mt);
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    if (a >= 0) H5Aclose(a);
    return rc;
}

// Number of links of a group, bounded by what the file can hold.
static int group_count(const Reader *r, hid_t g, const char *objname, size_t max, size_t *n) {
    H5G_info_t info;
    if (H5Gget_info(g, &info) < 0) return rfail_h5(r, "cannot read group '%s'", objname);
    if (info.storage_type != H5G_STORAGE_TYPE_COMPACT)
        return rfail(r, "group '%s' does not keep its links in its object header (dense or old-style "
                        "storage); perfcell writes compact groups (h5py: see tools/scbert_interop.py)",
                     objname);
    uint64_t cap = (uint64_t)r->file_size / DATASET_MIN_BYTES;
    if (cap > max) cap = max;
    if ((uint64_t)info.nlinks > cap)
        return rfail(r, "group '%s' claims %llu entries, more than the file can hold", objname,
                     (unsigned long long)info.nlinks);
    *n = (size_t)info.nlinks;
    return 0;
}

// The name of link i (name order) of a group into buf.
static int link_name(const Reader *r, hid_t g, const char *objname, size_t i, char *buf, size_t len) {
    ssize_t n = H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, (hsize_t)i, buf, len, H5P_DEFAULT);
    if (n < 0) return rfail_h5(r, "cannot read entry %zu of '%s'", i, objname);
    if ((size_t)n >= len)
        return rfail(r, "entry %zu of '%s' has a name of %zd bytes, too long", i, objname, n);
    if (!name_ok(buf, len)) return rfail(r, "entry %zu of '%s' has an unusable name", i, objname);
    return 0;
}

// The `shape` attribute of a tensor: nd integers.
static int attr_shape(hid_t d, int nd, int64_t *v) {
    hid_t a = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    int rc = -1;
    if (H5Aexists(d, "shape") > 0 && (a = H5Aopen(d, "shape", H5P_DEFAULT)) >= 0 &&
        (t = H5Aget_type(a)) >= 0 && (sp = H5Aget_space(a)) >= 0 && H5Tget_class(t) == H5T_INTEGER &&
        H5Sget_simple_extent_npoints(sp) == nd && H5Aread(a, H5T_NATIVE_INT64, v) >= 0)
        rc = 0;
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    if (a >= 0) H5Aclose(a);
    return rc;
}

typedef struct {
    int ndim;
    size_t shape[2];
    uint32_t crc;
} TensorInfo;

// Open a float32 tensor: its type, its shape against its `shape` attribute,
// its crc32; claims its bytes from the budget.
static hid_t tensor_open(Reader *r, hid_t loc, const char *name, const char *objname, TensorInfo *ti) {
    hid_t d = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    int ok = 0;
    if ((d = obj_open(r, loc, name, objname, H5O_TYPE_DATASET, 1)) < 0) goto cleanup;
    if ((t = H5Dget_type(d)) < 0 || (sp = H5Dget_space(d)) < 0) {
        rfail_h5(r, "cannot read the type and shape of '%s'", objname);
        goto cleanup;
    }
    if (H5Tget_class(t) != H5T_FLOAT || H5Tget_size(t) != 4) {
        rfail(r, "tensor '%s' is not float32", objname);
        goto cleanup;
    }
    int nd = H5Sget_simple_extent_ndims(sp);
    hsize_t dims[2] = {0, 0};
    if (H5Sget_simple_extent_type(sp) != H5S_SIMPLE || nd < 1 || nd > 2) {
        rfail(r, "tensor '%s' is not 1-D or 2-D", objname);
        goto cleanup;
    }
    if (H5Sget_simple_extent_dims(sp, dims, NULL) != nd) {
        rfail_h5(r, "cannot read the shape of '%s'", objname);
        goto cleanup;
    }
    int64_t attr[2] = {0, 0};
    if (attr_shape(d, nd, attr) != 0) {
        rfail(r, "tensor '%s' has no valid 'shape' attribute of %d integers", objname, nd);
        goto cleanup;
    }
    for (int i = 0; i < nd; i++) {
        if (attr[i] < 0 || (uint64_t)attr[i] != (uint64_t)dims[i]) {
            char sd[64], sa[64];
            size_t s1[2] = {(size_t)dims[0], (size_t)dims[1]};
            if (nd == 1)
                snprintf(sa, sizeof sa, "(%" PRId64 ")", attr[0]);
            else
                snprintf(sa, sizeof sa, "(%" PRId64 ", %" PRId64 ")", attr[0], attr[1]);
            rfail(r, "tensor '%s' has shape %s, but its 'shape' attribute says %s", objname,
                  shape_str(nd, s1, sd), sa);
            goto cleanup;
        }
        if (dims[i] == 0) {
            rfail(r, "tensor '%s' is empty", objname);
            goto cleanup;
        }
    }
    // Sizes checked against the file before they are multiplied.
    uint64_t cap = (uint64_t)r->budget / sizeof(float);
    if (dims[0] > cap || (nd == 2 && dims[1] > cap / dims[0])) {
        too_big(r, objname);
        goto cleanup;
    }
    ti->ndim = nd;
    ti->shape[0] = (size_t)dims[0];
    ti->shape[1] = nd == 2 ? (size_t)dims[1] : 1;
    if (budget_take(r, (uint64_t)ti->shape[0] * ti->shape[1] * sizeof(float), objname) != 0) goto cleanup;
    if (attr_crc(r, d, objname, &ti->crc) != 0) goto cleanup;
    ok = 1;
cleanup:
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    if (!ok && d >= 0) {
        H5Dclose(d);
        d = H5I_INVALID_HID;
    }
    return ok ? d : -1;
}

// Read an opened tensor into dst and check its CRC.
static int tensor_read(const Reader *r, hid_t d, const char *objname, const TensorInfo *ti, float *dst) {
    if (H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, dst) < 0)
        return rfail_h5(r, "cannot read tensor '%s' (the file is truncated or damaged)", objname);
    uint32_t crc = hash_crc32(0, dst, ti->shape[0] * ti->shape[1] * sizeof(float));
    if (crc != ti->crc)
        return rfail(r, "tensor '%s' is corrupt: CRC-32 %08" PRIx32 ", stored %08" PRIx32, objname, crc,
                     ti->crc);
    // A NaN or an infinity passes the CRC when it was written (a diverged
    // run, an edited file) and poisons every output: refuse the tensor.
    const size_t n = ti->shape[0] * ti->shape[1];
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(dst[i]) && bad++ == 0) first = i;
    if (bad == 0) return 0;
    char at[64];
    if (ti->ndim == 2)
        snprintf(at, sizeof at, "[%zu, %zu]", first / ti->shape[1], first % ti->shape[1]);
    else
        snprintf(at, sizeof at, "[%zu]", first);
    return rfail(r, "tensor '%s' holds %zu non-finite value%s of %zu (the first at %s: %g)", objname, bad,
                 bad == 1 ? "" : "s", n, at, (double)dst[first]);
}

typedef struct {
    char name[PARAM_NAME_MAX];
    TensorInfo ti;
    int64_t index;
    int trainable, decay;
} ModelEntry;

static int model_entry_by_index(const void *a, const void *b) {
    const ModelEntry *x = a, *y = b;
    return x->index < y->index ? -1 : x->index > y->index;
}

// /model: the parameter table from the tensors' attributes, then their data.
static int read_model(Reader *r, CkptState *s) {
    hid_t g = H5I_INVALID_HID, d = H5I_INVALID_HID;
    ModelEntry *m = NULL;
    char *seen = NULL;
    size_t n = 0;
    int rc = -1;
    char objname[OBJ_NAME_MAX];
    if ((g = obj_open(r, r->file, "model", "/model", H5O_TYPE_GROUP, 1)) < 0) goto cleanup;
    if (group_count(r, g, "/model", LINKS_MAX, &n) != 0) goto cleanup;
    if (n == 0) {
        rfail(r, "'/model' holds no tensors");
        goto cleanup;
    }
    m = xcalloc(n, sizeof *m);
    seen = xcalloc(n, 1);
    for (size_t i = 0; i < n; i++) {
        ModelEntry *e = &m[i];
        if (link_name(r, g, "/model", i, e->name, sizeof e->name) != 0) goto cleanup;
        snprintf(objname, sizeof objname, "/model/%s", e->name);
        if ((d = tensor_open(r, g, e->name, objname, &e->ti)) < 0 ||
            attr_i64(r, d, objname, "index", &e->index) != 0 ||
            attr_flag(r, d, objname, "trainable", &e->trainable) != 0 ||
            attr_flag(r, d, objname, "decay", &e->decay) != 0)
            goto cleanup;
        H5Dclose(d);
        d = H5I_INVALID_HID;
        if (e->index < 0 || (uint64_t)e->index >= n || seen[e->index]) {
            rfail(r, "tensor '%s' has index %" PRId64 ": the indices of the %zu tensors are not 0..%zu",
                  objname, e->index, n, n - 1);
            goto cleanup;
        }
        seen[e->index] = 1;
    }
    qsort(m, n, sizeof *m, model_entry_by_index);
    for (size_t i = 0; i < n; i++)
        param_table_add(&s->table, m[i].name, m[i].ti.ndim, m[i].ti.shape[0], m[i].ti.shape[1],
                        m[i].trainable, m[i].decay, INIT_ZEROS, 0.0f);
    if (r->data) {
        s->params = floats_alloc(s->table.total);
        for (size_t i = 0; i < n; i++) {
            snprintf(objname, sizeof objname, "/model/%s", m[i].name);
            if ((d = obj_open(r, g, m[i].name, objname, H5O_TYPE_DATASET, 1)) < 0 ||
                tensor_read(r, d, objname, &m[i].ti, s->params + s->table.e[i].offset) != 0)
                goto cleanup;
            H5Dclose(d);
            d = H5I_INVALID_HID;
        }
    }
    rc = 0;
cleanup:
    if (d >= 0) H5Dclose(d);
    if (g >= 0) H5Gclose(g);
    free(seen);
    free(m);
    return rc;
}

// /optim/<which>: exactly the trainable tensors, with their shapes.
static int read_moments(Reader *r, hid_t optim, const char *which, const ParamTable *t, float **out) {
    hid_t g = H5I_INVALID_HID, d = H5I_INVALID_HID;
    int rc = -1;
    char gname[32], objname[OBJ_NAME_MAX], name[PARAM_NAME_MAX];
    snprintf(gname, sizeof gname, "/optim/%s", which);
    size_t n = 0, n_trainable = 0;
    float *buf = NULL;
    if ((g = obj_open(r, optim, which, gname, H5O_TYPE_GROUP, 1)) < 0) goto cleanup;
    if (group_count(r, g, gname, LINKS_MAX, &n) != 0) goto cleanup;
    for (size_t i = 0; i < n; i++) {
        if (link_name(r, g, gname, i, name, sizeof name) != 0) goto cleanup;
        const ParamEntry *e = param_table_find(t, name);
        if (!e || !e->trainable) {
            rfail(r, "'%s/%s' is an optimizer moment of %s", gname, name,
                  e ? "a tensor marked frozen" : "no tensor of /model");
            goto cleanup;
        }
    }
    if (r->data) buf = floats_alloc(t->total);
    for (size_t i = 0; i < t->n; i++) {
        const ParamEntry *e = &t->e[i];
        if (!e->trainable) continue;
        n_trainable++;
        snprintf(objname, sizeof objname, "%s/%s", gname, e->name);
        TensorInfo ti;
        if ((d = tensor_open(r, g, e->name, objname, &ti)) < 0) goto cleanup;
        if (ti.ndim != e->ndim || ti.shape[0] != e->shape[0] || ti.shape[1] != e->shape[1]) {
            char a[64], b[64];
            rfail(r, "'%s' has shape %s, its tensor %s", objname, shape_str(ti.ndim, ti.shape, a),
                  shape_str(e->ndim, e->shape, b));
            goto cleanup;
        }
        if (buf && tensor_read(r, d, objname, &ti, buf + e->offset) != 0) goto cleanup;
        H5Dclose(d);
        d = H5I_INVALID_HID;
    }
    if (n != n_trainable) {
        rfail(r, "'%s' holds %zu tensors, /model has %zu trainable ones", gname, n, n_trainable);
        goto cleanup;
    }
    *out = buf;
    buf = NULL;
    rc = 0;
cleanup:
    free(buf);
    if (d >= 0) H5Dclose(d);
    if (g >= 0) H5Gclose(g);
    return rc;
}

static int read_optim(Reader *r, CkptState *s) {
    hid_t g = obj_open(r, r->file, "optim", "/optim", H5O_TYPE_GROUP, 0);
    if (g == -2) return 0;
    if (g < 0) return -1;
    r->has_optim = 1;
    int rc = read_moments(r, g, "exp_avg", &s->table, &s->exp_avg) != 0 ||
                     read_moments(r, g, "exp_avg_sq", &s->table, &s->exp_avg_sq) != 0
                 ? -1
                 : 0;
    H5Gclose(g);
    return rc;
}

// /buffers: one projection matrix per layer, all of one shape.
static int read_buffers(Reader *r, CkptState *s) {
    hid_t g = H5I_INVALID_HID, d = H5I_INVALID_HID;
    int rc = -1;
    size_t n = 0;
    char name[PARAM_NAME_MAX], objname[OBJ_NAME_MAX];
    TensorInfo *ti = NULL;
    if ((g = obj_open(r, r->file, "buffers", "/buffers", H5O_TYPE_GROUP, 1)) < 0) goto cleanup;
    if (group_count(r, g, "/buffers", DEPTH_MAX, &n) != 0) goto cleanup;
    ti = xcalloc(n ? n : 1, sizeof *ti);
    for (size_t l = 0; l < n; l++) {
        proj_name(name, sizeof name, l);
        snprintf(objname, sizeof objname, "/buffers/%s", name);
        if ((d = tensor_open(r, g, name, objname, &ti[l])) < 0) goto cleanup;
        H5Dclose(d);
        d = H5I_INVALID_HID;
        if (ti[l].ndim != 2 || ti[l].shape[0] != ti[0].shape[0] || ti[l].shape[1] != ti[0].shape[1]) {
            char a[64], b[64];
            rfail(r, "projection matrix '%s' has shape %s, layer 0's is %s", objname,
                  shape_str(ti[l].ndim, ti[l].shape, a), shape_str(ti[0].ndim, ti[0].shape, b));
            goto cleanup;
        }
    }
    s->depth = n;
    s->n_features = n ? ti[0].shape[0] : 0;
    s->dim_head = n ? ti[0].shape[1] : 0;
    if (r->data && n > 0) {
        size_t per = s->n_features * s->dim_head;
        s->proj = floats_alloc(n * per);
        for (size_t l = 0; l < n; l++) {
            proj_name(name, sizeof name, l);
            snprintf(objname, sizeof objname, "/buffers/%s", name);
            if ((d = obj_open(r, g, name, objname, H5O_TYPE_DATASET, 1)) < 0 ||
                tensor_read(r, d, objname, &ti[l], s->proj + l * per) != 0)
                goto cleanup;
            H5Dclose(d);
            d = H5I_INVALID_HID;
        }
    }
    rc = 0;
cleanup:
    free(ti);
    if (d >= 0) H5Dclose(d);
    if (g >= 0) H5Gclose(g);
    return rc;
}

static int read_cursor(Reader *r, hid_t state, CkptState *s) {
    hid_t d = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    const char *objname = "/state/cursor";
    int rc = -1;
    if ((d = obj_open(r, state, "cursor", objname, H5O_TYPE_DATASET, 1)) < 0) goto cleanup;
    if ((t = H5Dget_type(d)) < 0 || (sp = H5Dget_space(d)) < 0) {
        rfail_h5(r, "cannot read the type and shape of '%s'", objname);
        goto cleanup;
    }
    hsize_t dim = 0;
    if (H5Tget_class(t) != H5T_INTEGER || H5Tget_size(t) != 8 ||
        H5Sget_simple_extent_type(sp) != H5S_SIMPLE || H5Sget_simple_extent_ndims(sp) != 1 ||
        H5Sget_simple_extent_dims(sp, &dim, NULL) != 1) {
        rfail(r, "'%s' is not a 1-D array of 64-bit integers", objname);
        goto cleanup;
    }
    if (dim > (uint64_t)r->budget / sizeof(int64_t)) {
        too_big(r, objname);
        goto cleanup;
    }
    uint32_t crc = 0;
    if (budget_take(r, dim * sizeof(int64_t), objname) != 0 || attr_crc(r, d, objname, &crc) != 0)
        goto cleanup;
    s->cursor_len = (size_t)dim;
    if (r->data && dim > 0) {
        s->cursor = xmalloc(s->cursor_len * sizeof(int64_t));
        if (H5Dread(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, s->cursor) < 0) {
            rfail_h5(r, "cannot read '%s'", objname);
            goto cleanup;
        }
        uint32_t have = hash_crc32(0, s->cursor, s->cursor_len * sizeof(int64_t));
        if (have != crc) {
            rfail(r, "'%s' is corrupt: CRC-32 %08" PRIx32 ", stored %08" PRIx32, objname, have, crc);
            goto cleanup;
        }
    } else if (r->data && crc != 0) {
        rfail(r, "'%s' is empty but its CRC-32 is %08" PRIx32, objname, crc);
        goto cleanup;
    }
    rc = 0;
cleanup:
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    if (d >= 0) H5Dclose(d);
    return rc;
}

// /state: feature counters, the named scalars (the other attributes), the cursor.
static int read_state(Reader *r, CkptState *s) {
    hid_t g = H5I_INVALID_HID;
    int rc = -1;
    if ((g = obj_open(r, r->file, "state", "/state", H5O_TYPE_GROUP, 1)) < 0) goto cleanup;
    if (attr_i64(r, g, "/state", STATE_REDRAW, &s->redraw_index) != 0 ||
        attr_u64(r, g, "/state", STATE_FEATURE_SEED, &s->feature_seed) != 0)
        goto cleanup;
    H5O_info_t oi;
    if (H5Oget_info2(g, &oi, H5O_INFO_NUM_ATTRS) < 0) {
        rfail_h5(r, "cannot read the attributes of '/state'");
        goto cleanup;
    }
    if (oi.num_attrs > ATTRS_MAX) {
        rfail(r, "'/state' has %llu attributes, more than %d", (unsigned long long)oi.num_attrs, ATTRS_MAX);
        goto cleanup;
    }
    s->scalars = xcalloc(oi.num_attrs ? (size_t)oi.num_attrs : 1, sizeof *s->scalars);
    for (hsize_t i = 0; i < oi.num_attrs; i++) {
        char key[SCALAR_KEY_MAX];
        ssize_t len = H5Aget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, key, sizeof key, H5P_DEFAULT);
        if (len < 0) {
            rfail_h5(r, "cannot read attribute %llu of '/state'", (unsigned long long)i);
            goto cleanup;
        }
        if ((size_t)len >= sizeof key || !name_ok(key, sizeof key)) {
            rfail(r, "attribute %llu of '/state' has an unusable name", (unsigned long long)i);
            goto cleanup;
        }
        if (strcmp(key, STATE_REDRAW) == 0 || strcmp(key, STATE_FEATURE_SEED) == 0) continue;
        double v;
        if (attr_num(r, g, "/state", key, H5T_FLOAT, H5T_NATIVE_DOUBLE, &v) != 0) goto cleanup;
        s->scalars[s->n_scalars].key = xstrdup(key);
        s->scalars[s->n_scalars].value = v;
        s->n_scalars++;
    }
    if (read_cursor(r, g, s) != 0) goto cleanup;
    rc = 0;
cleanup:
    if (g >= 0) H5Gclose(g);
    return rc;
}

// ---------------------------------------------------------------------------
// Variable-length strings, read without HDF5
//
// HDF5 1.10 trusts the global heap that holds variable-length data: a damaged
// heap collection or heap id makes H5Dread read out of bounds (it only
// asserts). So we take the heap ids from the dataset's contiguous storage and
// the strings from their heap collection ourselves, checking every size
// against the collection and the file. Formats (HDF5 File Format
// Specification): a stored element is a 4-byte length, then the collection's
// address and a 4-byte object index; a collection is "GCOL", version 1, three
// reserved bytes, its size, then objects of a 2-byte index (0: free space), a
// 2-byte reference count, 4 reserved bytes, their size, and their data padded
// to 8 bytes. All integers little-endian.

static uint64_t le_decode(const unsigned char *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = n; i > 0; i--) v = v << 8 | p[i - 1];
    return v;
}

static int pread_all(const Reader *r, void *buf, size_t n, uint64_t off, const char *what) {
    unsigned char *p = buf;
    while (n > 0) {
        ssize_t k = pread(r->fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return rfail(r, "cannot read %s: %s", what, strerror(errno));
        if (k == 0) return rfail(r, "%s lies past the end of the file: the file is truncated", what);
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

static uint64_t align8(uint64_t n) { return (n + 7) / 8 * 8; }

// Object `index` of the heap collection at `addr`: *data and *size.
static int heap_object(Reader *r, uint64_t addr, uint64_t index, const char *objname,
                       const unsigned char **data, uint64_t *size) {
    const uint64_t fsize = (uint64_t)r->file_size;
    const uint64_t hdr = align8(8 + r->sizeof_size), objhdr = 8 + r->sizeof_size;
    if (!r->heap || r->heap_addr != addr) {
        unsigned char h[16];
        if (addr > fsize || fsize - addr < hdr)
            return rfail(r, "the strings of '%s' point outside the file", objname);
        if (pread_all(r, h, 8 + r->sizeof_size, addr, "a global heap collection") != 0) return -1;
        uint64_t csize = le_decode(h + 8, r->sizeof_size);
        if (memcmp(h, "GCOL", 4) != 0 || h[4] != 1 || csize < hdr || csize > fsize - addr)
            return rfail(r, "the global heap collection holding '%s' is damaged", objname);
        free(r->heap);
        r->heap = xmalloc((size_t)csize);
        r->heap_addr = addr;
        r->heap_size = csize;
        if (pread_all(r, r->heap, (size_t)csize, addr, "a global heap collection") != 0) {
            free(r->heap);
            r->heap = NULL;
            return -1;
        }
    }
    uint64_t off = hdr;
    while (off + objhdr <= r->heap_size) {
        const unsigned char *o = r->heap + off;
        uint64_t idx = le_decode(o, 2), n = le_decode(o + 8, r->sizeof_size);
        if (idx == 0 || n > r->heap_size - off - objhdr) break;
        if (idx == index) {
            *data = o + objhdr;
            *size = n;
            return 0;
        }
        off += objhdr + align8(n);
    }
    return rfail(r, "the strings of '%s' are missing from their global heap collection", objname);
}

// The n strings of a contiguous variable-length string dataset into res.
static int read_vlen_strings(Reader *r, hid_t d, const char *objname, size_t n, char **res) {
    if (n == 0) return 0;
    hid_t dcpl = H5Dget_create_plist(d);
    H5D_layout_t layout = dcpl >= 0 ? H5Pget_layout(dcpl) : H5D_LAYOUT_ERROR;
    if (dcpl >= 0) H5Pclose(dcpl);
    const uint64_t el = 4 + r->sizeof_addr + 4;
    haddr_t at = H5Dget_offset(d);
    hsize_t stored = H5Dget_storage_size(d);
    if (layout != H5D_CONTIGUOUS || at == HADDR_UNDEF)
        return rfail(r, "'%s' is not stored contiguously, as checkpoints store strings", objname);
    if (n > (uint64_t)r->file_size / el || stored != n * el || at > (uint64_t)r->file_size ||
        stored > (uint64_t)r->file_size - at)
        return rfail(r, "the storage of '%s' does not fit the file", objname);
    if (budget_take(r, stored, objname) != 0) return -1;
    unsigned char *ids = xmalloc((size_t)stored);
    int rc = pread_all(r, ids, (size_t)stored, at, "string heap ids");
    for (size_t i = 0; i < n && rc == 0; i++) {
        const unsigned char *p = ids + i * el;
        uint64_t len = le_decode(p, 4);
        uint64_t addr = le_decode(p + 4, r->sizeof_addr), index = le_decode(p + 4 + r->sizeof_addr, 4);
        const unsigned char *data = NULL;
        uint64_t size = 0;
        if (len > 0 && (rc = heap_object(r, addr, index, objname, &data, &size)) != 0) break;
        if (len > size) {
            rc = rfail(r, "string %zu of '%s' is longer than its heap object", i, objname);
            break;
        }
        if ((rc = budget_take(r, len + 1, objname)) != 0) break;
        res[i] = xmalloc((size_t)len + 1);
        if (len > 0) memcpy(res[i], data, (size_t)len);
        res[i][len] = '\0';
    }
    free(ids);
    return rc;
}

// A string dataset: scalar (one string) or 1-D; variable or fixed length.
// Checks the crc32 attribute when reading data. Strings are read in both
// modes (the summary reports them).
static int read_strings(Reader *r, const char *name, int scalar, char ***out, size_t *n_out) {
    hid_t d = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID, mt = H5I_INVALID_HID;
    char objname[32];
    snprintf(objname, sizeof objname, "/%s", name);
    char **res = NULL;
    char *fixed = NULL;
    size_t n = 0;
    int rc = -1;
    if ((d = obj_open(r, r->file, name, objname, H5O_TYPE_DATASET, 1)) < 0) goto cleanup;
    if ((t = H5Dget_type(d)) < 0 || (sp = H5Dget_space(d)) < 0) {
        rfail_h5(r, "cannot read the type and shape of '%s'", objname);
        goto cleanup;
    }
    int nd = H5Sget_simple_extent_ndims(sp);
    hssize_t np = H5Sget_simple_extent_npoints(sp);
    if (H5Tget_class(t) != H5T_STRING || np < 0 || (scalar ? np != 1 : nd != 1)) {
        rfail(r, "'%s' is not %s", objname, scalar ? "a single string" : "a 1-D array of strings");
        goto cleanup;
    }
    if ((uint64_t)np > (uint64_t)r->file_size / 8) {
        rfail(r, "'%s' claims %lld strings, more than the file can hold", objname, (long long)np);
        goto cleanup;
    }
    n = (size_t)np;
    htri_t vlen = H5Tis_variable_str(t);
    if (vlen < 0 || (mt = H5Tcopy(H5T_C_S1)) < 0 || H5Tset_cset(mt, H5Tget_cset(t)) < 0) {
        rfail_h5(r, "cannot read the string type of '%s'", objname);
        goto cleanup;
    }
    res = xcalloc(n ? n : 1, sizeof *res);
    if (vlen) {
        if (read_vlen_strings(r, d, objname, n, res) != 0) goto cleanup;
    } else {
        size_t w = H5Tget_size(t);
        if (w == 0 || (n > 0 && w > (uint64_t)r->budget / n)) {
            too_big(r, objname);
            goto cleanup;
        }
        if (budget_take(r, (uint64_t)n * w, objname) != 0) goto cleanup;
        if (H5Tset_size(mt, w) < 0 || H5Tset_strpad(mt, H5T_STR_NULLPAD) < 0) {
            rfail_h5(r, "cannot read the strings of '%s'", objname);
            goto cleanup;
        }
        fixed = xmalloc(n * w + 1);
        if (n > 0 && H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, fixed) < 0) {
            rfail_h5(r, "cannot read the strings of '%s'", objname);
            goto cleanup;
        }
        for (size_t i = 0; i < n; i++) {
            size_t l = strnlen(fixed + i * w, w);
            res[i] = xmalloc(l + 1);
            memcpy(res[i], fixed + i * w, l);
            res[i][l] = '\0';
        }
    }
    uint32_t crc = 0;
    if (attr_crc(r, d, objname, &crc) != 0) goto cleanup;
    if (r->data && crc != crc_strings((const char *const *)res, n)) {
        rfail(r, "'%s' is corrupt: its CRC-32 does not match", objname);
        goto cleanup;
    }
    *out = res;
    *n_out = n;
    res = NULL;
    rc = 0;
cleanup:
    if (res) h5_free_strings(res, n);
    free(fixed);
    if (mt >= 0) H5Tclose(mt);
    if (sp >= 0) H5Sclose(sp);
    if (t >= 0) H5Tclose(t);
    if (d >= 0) H5Dclose(d);
    return rc;
}

static int read_text(Reader *r, const char *name, char **out) {
    char **v = NULL;
    size_t n = 0;
    if (read_strings(r, name, 1, &v, &n) != 0) return -1;
    *out = v[0];
    free(v);
    return 0;
}

static int read_root(Reader *r, CkptState *s) {
    hid_t f = r->file;
    char buf[64];
    htri_t e = H5Aexists(f, "format");
    if (e < 0)
        return rfail_h5(r, "the root group's attributes cannot be read (its object header is damaged: "
                           "HDF5 checks it against its checksum)");
    if (e == 0) return rfail(r, "not a perfcell checkpoint (no 'format' attribute on the root group)");
    if (attr_str(r, f, "/", "format", buf, sizeof buf) != 0) return -1;
    if (strcmp(buf, CKPT_FORMAT) != 0)
        return rfail(r, "not a perfcell checkpoint (format is '%s', expected '%s')", buf, CKPT_FORMAT);
    int64_t version;
    if (attr_i64(r, f, "/", "format_version", &version) != 0) return -1;
    if (version != CKPT_FORMAT_VERSION)
        return rfail(r, "checkpoint format version %" PRId64 "; this build reads version %d", version,
                     CKPT_FORMAT_VERSION);
    if (attr_str(r, f, "/", "kind", s->kind, sizeof s->kind) != 0) return -1;
    if (!kind_ok(s->kind))
        return rfail(r, "the checkpoint kind '%s' is not a short lower-case word", s->kind);
    if (attr_i64(r, f, "/", "step", &s->step) != 0 || attr_i64(r, f, "/", "epoch", &s->epoch) != 0 ||
        attr_u64(r, f, "/", "seed", &s->seed) != 0)
        return -1;
    if (s->step < 0 || s->epoch < 0)
        return rfail(r, "negative step (%" PRId64 ") or epoch (%" PRId64 ")", s->step, s->epoch);
    if (attr_str(r, f, "/", "vocab_hash", buf, sizeof buf) != 0) return -1;
    if (vocab_hash_parse(buf, &s->vocab_hash) != 0)
        return rfail(r, "the vocabulary hash '%s' is not 16 hexadecimal digits", buf);
    if (attr_str(r, f, "/", "created", r->created, sizeof r->created) != 0) return -1;
    // Files of perfcell before the root checksum lack it.
    htri_t sealed = H5Aexists(f, "crc32");
    if (sealed < 0) return rfail_h5(r, "cannot look up the root attribute 'crc32'");
    r->sealed = sealed > 0;
    return r->sealed ? attr_crc(r, f, "/", &r->root_crc) : 0;
}

// The root checksum against everything read (data read).
static int check_root_crc(const Reader *r, const CkptState *s) {
    if (!r->sealed) return 0;
    uint32_t have = state_digest(s, r->created);
    if (have == r->root_crc) return 0;
    return rfail(r,
                 "the root checksum does not match (CRC-32 %08" PRIx32 ", stored %08" PRIx32 "): a value "
                 "without a checksum of its own (the step, epoch, seed or kind, an attribute of /state or "
                 "of a tensor) was changed or damaged",
                 have, r->root_crc);
}

// Everything below the root, once the file is open (h5_lock held).
static int read_all(Reader *r, CkptState *s) {
    if (read_root(r, s) != 0 || read_model(r, s) != 0 || read_optim(r, s) != 0 || read_buffers(r, s) != 0 ||
        read_state(r, s) != 0 || read_text(r, "config", &s->config_ini) != 0 ||
        read_text(r, "vocab", &s->vocab_tsv) != 0)
        return -1;
    hid_t g = obj_open(r, r->file, "labels", "/labels", H5O_TYPE_DATASET, 0);
    if (g == -2) return 0;
    if (g < 0) return -1;
    H5Dclose(g);
    return read_strings(r, "labels", 0, &s->labels, &s->n_labels);
}

static int read_checked(Reader *r, CkptState *s) {
    if (read_all(r, s) != 0) return -1;
    s->sealed = r->sealed;
    return r->data ? check_root_crc(r, s) : 0;
}

// The file starts with the HDF5 signature and a superblock of version 2 or
// later, the 1.8 format: HDF5 checks its metadata against checksums before
// parsing it. Older superblocks (h5py's default) come with metadata that has
// none, and HDF5 1.10 does not survive every kind of damage to it.
static int check_superblock(const Reader *r) {
    static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
    unsigned char h[9];
    ssize_t k = pread(r->fd, h, sizeof h, 0);
    if (k < 0) return rfail(r, "cannot read: %s", strerror(errno));
    if (k < (ssize_t)sizeof h || memcmp(h, sig, sizeof sig) != 0) return rfail(r, "not an HDF5 file");
    if (h[8] < 2)
        return rfail(r,
                     "written in the HDF5 1.6 file format (superblock version %d), without metadata "
                     "checksums; checkpoints use the 1.8 format (h5py: libver='v108')",
                     h[8]);
    return 0;
}

// Open and read `path`; with data = 0 the arrays are sized but not read.
static int ckpt_load(const char *path, CkptState *s, int data, Reader *r) {
    memset(s, 0, sizeof *s);
    param_table_init(&s->table);
    memset(r, 0, sizeof *r);
    r->path = path;
    r->file = H5I_INVALID_HID;
    r->data = data;
    r->fd = open(path, O_RDONLY);
    if (r->fd < 0) return error_set("cannot read checkpoint '%s': %s", path, strerror(errno));
    struct stat st;
    H5Quiet q;
    h5_enter(&q);
    hid_t fapl = H5I_INVALID_HID, fcpl = H5I_INVALID_HID;
    int rc = -1;
    if (fstat(r->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rfail(r, "not a regular file");
        goto cleanup;
    }
    r->file_size = r->budget = (int64_t)st.st_size;
    if (check_superblock(r) != 0) goto cleanup;
    if ((fapl = H5Pcreate(H5P_FILE_ACCESS)) < 0 || H5Pset_fapl_sec2(fapl) < 0 ||
        H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG) < 0 || H5Pset_file_locking(fapl, 0, 1) < 0) {
        rfail_h5(r, "cannot set up file access");
        goto cleanup;
    }
    if ((r->file = H5Fopen(path, H5F_ACC_RDONLY, fapl)) < 0) {
        rfail_h5(r, "cannot open (the file is truncated or damaged)");
        goto cleanup;
    }
    hsize_t userblock = 1;
    if ((fcpl = H5Fget_create_plist(r->file)) < 0 ||
        H5Pget_sizes(fcpl, &r->sizeof_addr, &r->sizeof_size) < 0 || H5Pget_userblock(fcpl, &userblock) < 0) {
        rfail_h5(r, "cannot read the file's creation properties");
        goto cleanup;
    }
    if (userblock != 0 || r->sizeof_addr < 2 || r->sizeof_addr > 8 || r->sizeof_size < 2 ||
        r->sizeof_size > 8) {
        rfail(r, "unusual HDF5 file layout (user block %llu, %zu-byte addresses, %zu-byte lengths)",
              (unsigned long long)userblock, r->sizeof_addr, r->sizeof_size);
        goto cleanup;
    }
    rc = read_checked(r, s);
cleanup:
    if (r->file >= 0) H5Fclose(r->file);
    if (fcpl >= 0) H5Pclose(fcpl);
    if (fapl >= 0) H5Pclose(fapl);
    h5_leave(&q);
    close(r->fd);
    free(r->heap);
    r->heap = NULL;
    if (rc != 0) ckpt_state_free(s);
    return rc;
}

int ckpt_read(const char *path, CkptState *s) {
    Reader r;
    return ckpt_load(path, s, 1, &r);
}

int ckpt_verify(const char *path) {
    CkptState s;
    int rc = ckpt_read(path, &s);
    if (rc == 0) ckpt_state_free(&s);
    return rc;
}

void ckpt_state_free(CkptState *s) {
    param_table_free(&s->table);
    free(s->params);
    free(s->exp_avg);
    free(s->exp_avg_sq);
    free(s->proj);
    free(s->cursor);
    free(s->config_ini);
    free(s->vocab_tsv);
    h5_free_strings(s->labels, s->n_labels);
    for (size_t i = 0; i < s->n_scalars; i++) free((char *)s->scalars[i].key);
    free(s->scalars);
    memset(s, 0, sizeof *s);
}

double ckpt_scalar(const CkptState *s, const char *key, double def) {
    for (size_t i = 0; i < s->n_scalars; i++)
        if (strcmp(s->scalars[i].key, key) == 0) return s->scalars[i].value;
    return def;
}

// ---------------------------------------------------------------------------
// Summary

int ckpt_summary(const char *path, FILE *out) {
    CkptState s;
    Reader r;
    if (ckpt_load(path, &s, 0, &r) != 0) return -1;
    char hash[17], size[32], sh[64];
    vocab_hash_format(s.vocab_hash, hash);
    size_t n_params = 0, n_trainable = 0, n_frozen = 0;
    for (size_t i = 0; i < s.table.n; i++) {
        n_params += s.table.e[i].size;
        if (s.table.e[i].trainable)
            n_trainable += s.table.e[i].size;
        else
            n_frozen++;
    }
    size_t genes = 0;
    for (const char *p = s.vocab_tsv; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len > 0 && !(len == 1 && p[0] == '\r')) genes++;
        p += len + (nl != NULL);
    }
    fprintf(out, "checkpoint   %s (%s, created %s)\n", path, fmt_bytes((double)r.file_size, size), r.created);
    fprintf(out, "format       %s version %d\n", CKPT_FORMAT, CKPT_FORMAT_VERSION);
    fprintf(out, "kind         %s\n", s.kind);
    fprintf(out, "step         %" PRId64 " (epoch %" PRId64 ")\n", s.step, s.epoch);
    fprintf(out, "seed         %" PRIu64 "\n", s.seed);
    fprintf(out, "vocab hash   %s\n", hash);
    fprintf(out, "tensors      %zu (%zu frozen), %zu parameters (%zu trainable)\n", s.table.n, n_frozen,
            n_params, n_trainable);
    fprintf(out, "optimizer    %s\n", r.has_optim ? "Adam moments present" : "no optimizer state");
    if (r.sealed)
        fprintf(out, "checksum     root crc32 %08" PRIx32 "\n", r.root_crc);
    else
        fprintf(out, "checksum     none on the root (written before root checksums): step, cursor and "
                     "the other attributes are not covered\n");
    if (s.depth > 0) {
        size_t shp[2] = {s.n_features, s.dim_head};
        fprintf(out, "projections  %zu layers x %s, redraw index %" PRId64 ", feature seed %" PRIu64 "\n",
                s.depth, shape_str(2, shp, sh), s.redraw_index, s.feature_seed);
    } else {
        fprintf(out, "projections  none\n");
    }
    fprintf(out, "cursor       %zu positions\n", s.cursor_len);
    fprintf(out, "config       %zu bytes\n", strlen(s.config_ini));
    fprintf(out, "vocabulary   %zu genes (%zu bytes)\n", genes, strlen(s.vocab_tsv));
    fprintf(out, "labels       %zu", s.n_labels);
    for (size_t i = 0; i < s.n_labels && i < 20; i++) fprintf(out, "%s%s", i ? ", " : ": ", s.labels[i]);
    fprintf(out, "%s\n", s.n_labels > 20 ? ", ..." : "");
    fprintf(out, "scalars      %zu", s.n_scalars);
    for (size_t i = 0; i < s.n_scalars; i++)
        fprintf(out, "%s%s = %.17g", i ? ", " : ": ", s.scalars[i].key, s.scalars[i].value);
    fputc('\n', out);
    ckpt_state_free(&s);
    return 0;
}

// ---------------------------------------------------------------------------
// Resolving "auto"

// The file name `latest` holds, joined to dir; NULL with *why set otherwise.
static char *latest_target(const char *dir, char *why, size_t len) {
    char *latest = path_join(dir, CKPT_LATEST);
    char *res = NULL;
    if (!path_exists(latest)) {
        snprintf(why, len, "'%s' is missing", latest);
        free(latest);
        return NULL;
    }
    int64_t size = path_file_size(latest);
    size_t n = 0;
    char *text = size >= 0 && size <= 4096 ? file_read_all(latest, &n) : NULL;
    char *name = text ? str_trim(text) : NULL;
    if (!name)
        snprintf(why, len, "'%s' cannot be read or is not a file name", latest);
    else if (strchr(name, '/') || !name_ok(name, 256) || name[0] == '.')
        snprintf(why, len, "'%s' does not hold a checkpoint file name", latest);
    else
        res = path_join(dir, name);
    free(text);
    free(latest);
    return res;
}

static char *resolve_auto(const char *dir) {
    if (!path_is_dir(dir)) {
        error_set("no checkpoint to resume from: the checkpoint folder '%s' does not exist", dir);
        error_set_hint(
            "start without --resume, or point run.checkpoint_dir at the folder of the run to resume");
        return NULL;
    }
    char why[1024];
    char *named = latest_target(dir, why, sizeof why);
    if (named) {
        if (!path_exists(named)) {
            snprintf(why, sizeof why, "'latest' in '%s' names '%s', which does not exist", dir, named);
        } else if (ckpt_verify(named) == 0) {
            return named;
        } else {
            snprintf(why, sizeof why, "%s", error_last());
        }
    }
    CkptFile *f = NULL;
    size_t n = 0;
    if (ckpt_files_list(dir, &f, &n) != 0) {
        free(named);
        return NULL;
    }
    char *found = NULL;
    char last[1024] = "";
    for (size_t i = 0; i < n && !found; i++) {
        char *p = path_join(dir, f[i].name);
        if (named && strcmp(p, named) == 0) {
            free(p);
            continue;
        }
        if (ckpt_verify(p) == 0) {
            found = p;
        } else {
            snprintf(last, sizeof last, "%s", error_last());
            log_warn("skipping %s", last);
            free(p);
        }
    }
    if (found)
        log_warn("%s; resuming from '%s', the newest checkpoint that reads back", why, found);
    else if (n == 0 && !named)
        error_set("no checkpoint to resume from in '%s' (no ckpt-*.h5 files and no '%s')", dir, CKPT_LATEST);
    else
        error_set("no checkpoint to resume from in '%s': %s%s%s", dir, why, last[0] ? "; " : "", last);
    ckpt_files_free(f, n);
    free(named);
    return found;
}

int ckpt_any(const char *dir) {
    char *latest = path_join(dir, CKPT_LATEST);
    int any = path_exists(latest);
    free(latest);
    CkptFile *f = NULL;
    size_t n = 0;
    if (!any && path_is_dir(dir) && ckpt_files_list(dir, &f, &n) == 0) {
        any = n > 0;
        ckpt_files_free(f, n);
    }
    return any;
}

char *ckpt_resolve(const char *dir, const char *spec) {
    if (!spec || !*spec || strcmp(spec, "auto") == 0) return resolve_auto(dir);
    struct stat st;
    if (stat(spec, &st) != 0) {
        error_set("checkpoint '%s' does not exist: %s", spec, strerror(errno));
        return NULL;
    }
    if (S_ISDIR(st.st_mode)) {
        error_set("'%s' is a folder, not a checkpoint file", spec);
        error_set_hint(
            "give a ckpt-*.h5 file, or '--resume auto' to take the newest one of the run's folder");
        return NULL;
    }
    return xstrdup(spec);
}

// ---------------------------------------------------------------------------
// Copying tensors between tables

int ckpt_copy_tensors(const CkptState *src, const ParamTable *dst, float *dst_params, size_t *missing,
                      size_t *unused) {
    CHECK(src->params, "internal: copying tensors from a checkpoint without parameters");
    size_t n_missing = 0, n_unused = 0;
    for (size_t i = 0; i < dst->n; i++) {
        const ParamEntry *d = &dst->e[i];
        const ParamEntry *e = param_table_find(&src->table, d->name);
        if (!e) {
            n_missing++;
            continue;
        }
        if (e->ndim != d->ndim || e->shape[0] != d->shape[0] || e->shape[1] != d->shape[1]) {
            char a[64], b[64];
            return error_set("tensor '%s': the checkpoint has shape %s, the model expects %s", d->name,
                             shape_str(e->ndim, e->shape, a), shape_str(d->ndim, d->shape, b));
        }
    }
    for (size_t i = 0; i < dst->n; i++) {
        const ParamEntry *d = &dst->e[i];
        const ParamEntry *e = param_table_find(&src->table, d->name);
        if (e) memcpy(dst_params + d->offset, src->params + e->offset, d->size * sizeof(float));
    }
    for (size_t i = 0; i < src->table.n; i++)
        if (!param_table_find(dst, src->table.e[i].name)) n_unused++;
    if (missing) *missing = n_missing;
    if (unused) *unused = n_unused;
    return 0;
}
