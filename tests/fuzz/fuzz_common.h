// Shared pieces of the libFuzzer harnesses (tests/fuzz/fuzz_*.c).
//
// Every reader under fuzz promises: on bad input, return -1 (or NULL) with
// error_set(), never crash, never exit, never abort, allocate no more than the
// input can justify, and close every HDF5 object it opened. The harnesses turn
// each broken promise into a crash that libFuzzer reports and saves:
//   - the error sink's _exit() is wrapped (-Wl,--wrap=_exit in the Makefile)
//     into abort(), so a reader that dies with a message is a crash;
//   - after each input, HDF5 objects still open are a crash (fuzz_h5_done);
//   - a failed call must leave a message (fuzz_expect_message; the harnesses
//     clear the last error before each call), and a successful read must
//     give consistent results (checked per harness).
//
// Inputs are written to a file of their own (HDF5 and our readers open paths),
// in a private folder under $TMPDIR (default /dev/shm when it exists: no disk
// traffic), removed at exit.
#ifndef PERFCELL_FUZZ_COMMON_H
#define PERFCELL_FUZZ_COMMON_H

#include "perfcell/error.h"
#include "perfcell/zstd_filter.h"

#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// The error sink ends the process with _exit(1); in a harness that is a bug
// of the reader (it must return an error instead), so make it an abort with
// the message already printed by the sink.
void __wrap__exit(int status);
void __wrap__exit(int status) {
    fprintf(stderr, "fuzz: the library called _exit(%d) (a fatal error; readers must return -1)\n",
            status);
    abort();
}

static char fuzz_dir[4096];

// Fail loudly in the harness itself (not a finding in the code under test).
#define FUZZ_REQUIRE(cond, ...)                                                                    \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz: " __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static inline void fuzz_rm_tree(const char *path) {
    DIR *d = opendir(path);
    if (d) {
        char buf[4096 + 256];
        for (struct dirent *e = readdir(d); e; e = readdir(d)) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            snprintf(buf, sizeof buf, "%s/%s", path, e->d_name);
            fuzz_rm_tree(buf);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

static inline void fuzz_cleanup(void) {
    if (fuzz_dir[0]) fuzz_rm_tree(fuzz_dir);
}

// The harness's private folder (created on first use).
static inline const char *fuzz_tmp(void) {
    if (!fuzz_dir[0]) {
        const char *base = getenv("TMPDIR");
        struct stat st;
        if (!base || !*base) base = stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) ? "/dev/shm" : "/tmp";
        snprintf(fuzz_dir, sizeof fuzz_dir, "%s/perfcell-fuzz-XXXXXX", base);
        FUZZ_REQUIRE(mkdtemp(fuzz_dir), "cannot create a folder in %s: %s", base, strerror(errno));
        atexit(fuzz_cleanup);
    }
    return fuzz_dir;
}

// Path of `name` inside the private folder, into buf.
static inline void fuzz_path(char *buf, size_t len, const char *name) {
    snprintf(buf, len, "%s/%s", fuzz_tmp(), name);
}

// Write `data` to `path`, replacing it.
static inline void fuzz_write(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    FUZZ_REQUIRE(f, "cannot write %s: %s", path, strerror(errno));
    FUZZ_REQUIRE(n == 0 || fwrite(data, 1, n, f) == n, "short write to %s", path);
    FUZZ_REQUIRE(fclose(f) == 0, "cannot close %s", path);
}

// HDF5 set-up for a harness: no error printing, our filter, small free lists
// (HDF5 keeps freed blocks for reuse; bounded, so RSS stays flat).
static inline void fuzz_h5_init(void) {
    static int done;
    if (done) return;
    done = 1;
    FUZZ_REQUIRE(H5open() >= 0, "H5open failed");
    error_h5_quiet();
    FUZZ_REQUIRE(zstd_filter_register() == 0, "%s", error_last());
    H5set_free_list_limits(1 << 20, 1 << 16, 1 << 20, 1 << 16, 1 << 20, 1 << 16);
}

// After each input: every object the reader opened is closed (a reader that
// leaves a file open also keeps its next open of the same path on the stale
// file), and HDF5's free lists are returned.
static inline void fuzz_h5_done(const char *what) {
    ssize_t open = H5Fget_obj_count((hid_t)H5F_OBJ_ALL, H5F_OBJ_ALL);
    if (open != 0) {
        fprintf(stderr, "fuzz: %s left %zd HDF5 object(s) open:\n", what, open);
        hid_t ids[16];
        ssize_t k = H5Fget_obj_ids((hid_t)H5F_OBJ_ALL, H5F_OBJ_ALL, 16, ids);
        for (ssize_t i = 0; i < k; i++) {
            char name[256] = "";
            H5Iget_name(ids[i], name, sizeof name);
            fprintf(stderr, "  id %lld type %d name '%s'\n", (long long)ids[i], (int)H5Iget_type(ids[i]),
                    name);
        }
        abort();
    }
    H5garbage_collect();
}

// Forget the last error, so that a failure without a message shows.
static inline void fuzz_clear_error(void) { error_set("%s", ""); }

// A failed read must say why.
static inline void fuzz_expect_message(const char *what) {
    const char *m = error_last();
    FUZZ_REQUIRE(m && *m && strcmp(m, "unknown error") != 0, "%s failed without a message", what);
}

// Known open defect, filtered out of the HDF5 harnesses so that fuzzing goes
// on past it: HDF5 1.10 does not check the global heap collections that hold
// variable-length strings (string attributes such as AnnData's encoding-type,
// string datasets). An object of size 0 in the free-space slot makes the
// collection parser loop forever, and an object larger than its collection
// makes H5HG_read copy out of bounds. Our readers read such strings through
// HDF5, so a file with a damaged collection hangs or crashes them; the
// reproducers are tests/fuzz/crashers/*-gheap-*, run by tests/suite_fuzz.sh
// (they fail until the readers validate heaps before HDF5 reads them). Inputs
// with such a collection are skipped unless FUZZ_KEEP_BAD_GHEAP=1.
//
// Collection layout (HDF5 File Format Specification, Global Heap): "GCOL",
// version 1, 3 reserved bytes, collection size (8 bytes, little-endian), then
// objects: index (2), reference count (2), reserved (4), size (8), data padded
// to 8 bytes; index 0 is the free space, whose size counts its header.
static inline uint64_t fuzz_le(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static inline int fuzz_gheap_ok(const uint8_t *data, size_t size) {
    static int keep = -1;
    if (keep < 0) keep = getenv("FUZZ_KEEP_BAD_GHEAP") && strcmp(getenv("FUZZ_KEEP_BAD_GHEAP"), "1") == 0;
    if (keep) return 1;
    for (size_t at = 0; at + 16 <= size; at++) {
        if (memcmp(data + at, "GCOL", 4) != 0) continue;
        uint64_t csize = fuzz_le(data + at + 8, 8);
        if (data[at + 4] != 1) continue; // HDF5 refuses other versions itself
        if (csize < 16 || csize > size - at) return 0;
        uint64_t p = 16;
        while (p < csize) {
            if (csize - p < 16) break; // a tail too small for an object is free space
            uint64_t idx = fuzz_le(data + at + p, 2), osize = fuzz_le(data + at + p + 8, 8);
            uint64_t need;
            if (idx > 0) {
                if (osize > csize - p - 16) return 0;
                need = 16 + (osize + 7) / 8 * 8;
            } else {
                need = osize;
            }
            if (need == 0 || need > csize - p) return 0;
            p += need;
        }
    }
    return 1;
}

// ---------------------------------------------------------------------------
// Two modes for the HDF5 harnesses (FUZZ_HDF5_MODE):
//
//   raw   the input is the file, every byte as the fuzzer made it. This also
//         fuzzes libhdf5's own metadata parsing, where HDF5 1.10 has defects
//         we cannot fix (see tests/fuzz/crashers/README.md): a run in this
//         mode soon stops on one of them.
//   data  (default) the input is the file, but only the bytes of the stored
//         values of datasets of numbers and fixed-length strings (contiguous
//         storage and chunks, compressed or not) are taken from it; all other
//         bytes come from the seed of the same size (an input of another size
//         is skipped). The file therefore stays a well-formed HDF5 file whose
//         contents are fuzzed: the checks our readers make (shapes, offsets,
//         indices, counts, codes, checksums, filters) are exercised without
//         tripping HDF5's metadata defects.
//
// The seeds (the templates of data mode) are the files of FUZZ_TEMPLATES
// (run_smoke.sh sets it to tests/fuzz/corpus/NAME).

typedef struct {
    uint8_t *bytes;
    size_t size;
    size_t n_ranges;
    uint64_t (*range)[2]; // (n_ranges) [offset, length) of stored values
} FuzzTemplate;

static FuzzTemplate fuzz_templates[64];
static size_t fuzz_n_templates;
static int fuzz_data_mode = -1;

static inline void fuzz_template_add_range(FuzzTemplate *t, uint64_t off, uint64_t len) {
    if (len == 0 || off > t->size || len > t->size - off) return;
    t->range = realloc(t->range, (t->n_ranges + 1) * sizeof *t->range);
    FUZZ_REQUIRE(t->range, "out of memory");
    t->range[t->n_ranges][0] = off;
    t->range[t->n_ranges][1] = len;
    t->n_ranges++;
}

// Datasets whose stored bytes are plain values (no heap references). A
// harness whose reader reads variable-length strings without HDF5 (the
// checkpoint reader does) defines FUZZ_OWN_HEAP: then the heap references and
// the global heap collections are fuzzed too.
static inline int fuzz_plain_type(hid_t type) {
    H5T_class_t c = H5Tget_class(type);
#ifdef FUZZ_OWN_HEAP
    if (c == H5T_STRING) return 1;
#else
    if (c == H5T_STRING) return H5Tis_variable_str(type) == 0;
#endif
    return c == H5T_INTEGER || c == H5T_FLOAT || c == H5T_ENUM || c == H5T_BITFIELD || c == H5T_OPAQUE;
}

static inline herr_t fuzz_visit_cb(hid_t root, const char *name, const H5O_info_t *info, void *data) {
    FuzzTemplate *t = data;
    if (info->type != H5O_TYPE_DATASET) return 0;
    hid_t d = H5Dopen2(root, name, H5P_DEFAULT);
    FUZZ_REQUIRE(d >= 0, "seed dataset %s does not open", name);
    hid_t type = H5Dget_type(d), dcpl = H5Dget_create_plist(d);
    if (fuzz_plain_type(type)) {
        H5D_layout_t layout = H5Pget_layout(dcpl);
        if (layout == H5D_CONTIGUOUS) {
            haddr_t a = H5Dget_offset(d);
            if (a != HADDR_UNDEF) fuzz_template_add_range(t, a, H5Dget_storage_size(d));
        } else if (layout == H5D_CHUNKED) {
            // (HDF5 1.10.8 refuses H5S_ALL here: pass the dataset's space.)
            hsize_t n = 0;
            hid_t space = H5Dget_space(d);
            if (space >= 0 && H5Dget_num_chunks(d, space, &n) >= 0) {
                for (hsize_t i = 0; i < n; i++) {
                    hsize_t coords[H5S_MAX_RANK];
                    unsigned mask = 0;
                    haddr_t a = HADDR_UNDEF;
                    hsize_t sz = 0;
                    if (H5Dget_chunk_info(d, space, i, coords, &mask, &a, &sz) >= 0 && a != HADDR_UNDEF)
                        fuzz_template_add_range(t, a, sz);
                }
            }
            if (space >= 0) H5Sclose(space);
        }
    }
    H5Pclose(dcpl);
    H5Tclose(type);
    H5Dclose(d);
    return 0;
}

static inline int fuzz_range_cmp(const void *a, const void *b) {
    uint64_t x = ((const uint64_t *)a)[0], y = ((const uint64_t *)b)[0];
    return x < y ? -1 : x > y;
}

// Load the seeds of FUZZ_TEMPLATES once (data mode only).
static inline void fuzz_templates_load(void) {
    const char *mode = getenv("FUZZ_HDF5_MODE");
    fuzz_data_mode = !(mode && strcmp(mode, "raw") == 0);
    if (!fuzz_data_mode) return;
    fuzz_h5_init();
    const char *dir = getenv("FUZZ_TEMPLATES");
    FUZZ_REQUIRE(dir && *dir, "set FUZZ_TEMPLATES to the seed folder (or FUZZ_HDF5_MODE=raw)");
    struct dirent **names = NULL;
    int n = scandir(dir, &names, NULL, alphasort);
    FUZZ_REQUIRE(n >= 0, "cannot list %s: %s", dir, strerror(errno));
    for (int i = 0; i < n; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        free(names[i]);
        struct stat st;
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode) || H5Fis_hdf5(path) <= 0) continue;
        FUZZ_REQUIRE(fuzz_n_templates < sizeof fuzz_templates / sizeof *fuzz_templates, "too many seeds");
        FuzzTemplate *t = &fuzz_templates[fuzz_n_templates++];
        memset(t, 0, sizeof *t);
        t->size = (size_t)st.st_size;
        t->bytes = malloc(t->size);
        FILE *f = fopen(path, "rb");
        FUZZ_REQUIRE(t->bytes && f && fread(t->bytes, 1, t->size, f) == t->size, "cannot read %s", path);
        fclose(f);
        hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        FUZZ_REQUIRE(file >= 0, "seed %s does not open", path);
        FUZZ_REQUIRE(H5Ovisit(file, H5_INDEX_NAME, H5_ITER_INC, fuzz_visit_cb, t) >= 0, "cannot walk %s", path);
        H5Fclose(file);
#ifdef FUZZ_OWN_HEAP
        // The objects of each global heap collection (after its 16-byte header).
        for (size_t at = 0; at + 16 <= t->size; at++) {
            if (memcmp(t->bytes + at, "GCOL", 4) != 0 || t->bytes[at + 4] != 1) continue;
            uint64_t csize = fuzz_le(t->bytes + at + 8, 8);
            if (csize > 16 && csize <= t->size - at) fuzz_template_add_range(t, at + 16, csize - 16);
        }
#endif
        if (t->n_ranges > 1) qsort(t->range, t->n_ranges, sizeof *t->range, fuzz_range_cmp);
        uint64_t bytes = 0;
        for (size_t r = 0; r < t->n_ranges; r++) bytes += t->range[r][1];
        fprintf(stderr, "fuzz: seed %s: %zu bytes, %zu stored-value ranges of %llu bytes\n", path, t->size,
                t->n_ranges, (unsigned long long)bytes);
    }
    free(names);
    FUZZ_REQUIRE(fuzz_n_templates > 0, "no HDF5 seeds in %s", dir);
}

// The seed an input derives from: of the same size, and equal to it outside
// the stored values if one is (seeds of equal size differ in metadata).
static inline const FuzzTemplate *fuzz_template_of(const uint8_t *data, size_t size) {
    const FuzzTemplate *first = NULL;
    for (size_t i = 0; i < fuzz_n_templates; i++) {
        const FuzzTemplate *t = &fuzz_templates[i];
        if (t->size != size) continue;
        if (!first) first = t;
        uint64_t at = 0;
        int same = 1;
        for (size_t r = 0; r <= t->n_ranges && same; r++) {
            uint64_t end = r < t->n_ranges ? t->range[r][0] : size;
            if (end > at && memcmp(data + at, t->bytes + at, end - at) != 0) same = 0;
            if (r < t->n_ranges && t->range[r][0] + t->range[r][1] > at) at = t->range[r][0] + t->range[r][1];
        }
        if (same) return t;
    }
    return first;
}

// The file to write for an input: the input itself (raw mode), or its seed
// with the input's bytes in the stored values (data mode; NULL when no seed
// has that size). Free with free().
static inline uint8_t *fuzz_hdf5_file(const uint8_t *data, size_t size) {
    if (fuzz_data_mode < 0) fuzz_templates_load();
    uint8_t *out = malloc(size ? size : 1);
    FUZZ_REQUIRE(out, "out of memory");
    if (!fuzz_data_mode) {
        memcpy(out, data, size);
        return out;
    }
    const FuzzTemplate *t = fuzz_template_of(data, size);
    if (!t) {
        free(out);
        return NULL;
    }
    memcpy(out, t->bytes, size);
    for (size_t r = 0; r < t->n_ranges; r++) memcpy(out + t->range[r][0], data + t->range[r][0], t->range[r][1]);
    return out;
}

// Writes the file of an input (fuzz_hdf5_file) to `path` for a reader that
// may meet the global heap: 1 when written, 0 when the input is skipped (no
// seed of its size, or a heap libhdf5 1.10 mishandles, see fuzz_gheap_ok).
static inline int fuzz_hdf5_input(const uint8_t *data, size_t size, const char *path) {
    uint8_t *file = fuzz_hdf5_file(data, size);
    if (!file) return 0;
    int ok = fuzz_gheap_ok(file, size);
    if (ok) fuzz_write(path, file, size);
    free(file);
    return ok;
}

#ifdef FUZZ_HDF5
// Data mode mutates only stored values, in place, so that no execution is
// spent on bytes the harness would restore; raw mode mutates as libFuzzer does.
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    if (fuzz_data_mode < 0) fuzz_templates_load();
    if (!fuzz_data_mode) return LLVMFuzzerMutate(data, size, max_size);
    const FuzzTemplate *t = fuzz_template_of(data, size);
    if (!t) {
        t = &fuzz_templates[seed % fuzz_n_templates];
        if (t->size > max_size) return LLVMFuzzerMutate(data, size, max_size);
        memcpy(data, t->bytes, t->size);
        size = t->size;
    }
    if (t->n_ranges == 0) return size;
    // Mostly one range; sometimes several, for values that must agree.
    unsigned k = 1 + (seed >> 8) % 3 / 2;
    for (unsigned j = 0; j < k; j++) {
        const uint64_t *r = t->range[(seed >> (4 + 8 * j)) % t->n_ranges];
        (void)LLVMFuzzerMutate(data + r[0], r[1], r[1]);
    }
    return size;
}
#endif

// Leak checking: HDF5 1.10 leaks a little on some corrupt files; those leaks
// are HDF5's, not ours. Harnesses that parse HDF5 define FUZZ_HDF5 before
// including this header; LeakSanitizer then ignores allocations made inside
// libhdf5, and still reports ours.
#ifdef FUZZ_HDF5
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) { return "leak:libhdf5\n"; }
#endif

#endif
