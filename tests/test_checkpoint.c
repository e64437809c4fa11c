// Checkpoint tests: round trip, keep-K and `latest`, resume resolution over
// corrupt, truncated and missing files, malformed files, a writer killed in
// the middle of a write, and full disks (file size limit; a 1 MiB tmpfs).
//
//   test_checkpoint            run the tests
//   test_checkpoint --sample D write D/ckpt/ and D/expect_* for tests/py/ckpt_h5py_check.py
#include "perfcell/checkpoint.h"
#include "perfcell/error.h"
#include "perfcell/h5util.h"
#include "perfcell/util.h"
#include "testlib.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

// ---------------------------------------------------------------------------
// Fixtures

static const char *CONFIG = "[model]\ndim = 8\ndepth = 2\n\n[optim]\nlr = 0.0001\n";
static const char *VOCAB = "CD3E\tENSG00000198851\nMS4A1\tENSG00000156738\nGNLY\n\xce\xb2-actin\n";

// A state of five tensors (1-D and 2-D, one frozen); the last matrix has
// `wide` columns so that tests can make the file as large as they need.
static void make_state(CkptState *s, size_t wide, int64_t step) {
    memset(s, 0, sizeof *s);
    snprintf(s->kind, sizeof s->kind, "pretrain");
    s->step = step;
    s->epoch = 2;
    s->seed = 0xfedcba9876543210ull;
    s->vocab_hash = 0x0123456789abcdefull;
    param_table_init(&s->table);
    param_table_add(&s->table, "token_emb.weight", 2, 7, 8, 1, 0, INIT_NORMAL, 0.02f);
    param_table_add(&s->table, "pos_emb.emb.weight", 2, 11, 8, 0, 0, INIT_NORMAL, 0.02f);
    param_table_add(&s->table, "performer.net.layers.0.0.norm.weight", 1, 8, 0, 1, 0, INIT_ONES, 0);
    param_table_add(&s->table, "performer.net.layers.0.0.fn.to_out.weight", 2, 8, wide, 1, 1, INIT_NORMAL,
                    0.02f);
    param_table_add(&s->table, "norm.bias", 1, 8, 0, 1, 0, INIT_ZEROS, 0);
    s->params = floats_alloc(s->table.total);
    s->exp_avg = floats_alloc(s->table.total);
    s->exp_avg_sq = floats_alloc(s->table.total);
    for (size_t i = 0; i < s->table.n; i++) {
        const ParamEntry *e = &s->table.e[i];
        for (size_t j = 0; j < e->size; j++) {
            float x = (float)((double)(i + 1) * 0.37 + (double)j * 0.011 - (double)step);
            s->params[e->offset + j] = x;
            if (e->trainable) {
                s->exp_avg[e->offset + j] = 0.1f * x;
                s->exp_avg_sq[e->offset + j] = x * x + 1e-3f;
            }
        }
    }
    s->depth = 2;
    s->n_features = 6;
    s->dim_head = 4;
    s->proj = floats_alloc(s->depth * s->n_features * s->dim_head);
    for (size_t i = 0; i < s->depth * s->n_features * s->dim_head; i++) s->proj[i] = (float)i - 7.25f;
    s->redraw_index = 3;
    s->feature_seed = 99;
    s->cursor_len = 5;
    s->cursor = xmalloc(s->cursor_len * sizeof *s->cursor);
    const int64_t cur[5] = {3, 1, 4, 1, (int64_t)1 << 40};
    memcpy(s->cursor, cur, sizeof cur);
    s->config_ini = xstrdup(CONFIG);
    s->vocab_tsv = xstrdup(VOCAB);
    s->n_labels = 3;
    s->labels = xmalloc(3 * sizeof *s->labels);
    s->labels[0] = xstrdup("B cell");
    s->labels[1] = xstrdup("T cell");
    s->labels[2] = xstrdup("NK");
    s->n_scalars = 2;
    s->scalars = xmalloc(2 * sizeof *s->scalars);
    s->scalars[0] = (CkptScalar){xstrdup("sched.step"), 12.5};
    s->scalars[1] = (CkptScalar){xstrdup("early_stop.best_f1"), 0.75};
}

// A state read back equals the one written: bitwise for every array.
static void check_equal(const CkptState *a, const CkptState *b, const char *what) {
    T_CHECK(strcmp(a->kind, b->kind) == 0 && a->step == b->step && a->epoch == b->epoch &&
                a->seed == b->seed && a->vocab_hash == b->vocab_hash,
            "%s: header fields", what);
    T_CHECK(a->table.n == b->table.n && a->table.total == b->table.total, "%s: table size %zu/%zu, %zu/%zu",
            what, a->table.n, b->table.n, a->table.total, b->table.total);
    for (size_t i = 0; i < a->table.n && i < b->table.n; i++) {
        const ParamEntry *x = &a->table.e[i], *y = &b->table.e[i];
        T_CHECK(strcmp(x->name, y->name) == 0 && x->ndim == y->ndim && x->shape[0] == y->shape[0] &&
                    x->shape[1] == y->shape[1] && x->offset == y->offset && x->size == y->size &&
                    x->trainable == y->trainable && x->decay == y->decay,
                "%s: table entry %zu (%s vs %s)", what, i, x->name, y->name);
        if (strcmp(x->name, y->name) != 0 || x->size != y->size) continue;
        T_CHECK(memcmp(a->params + x->offset, b->params + y->offset, x->size * sizeof(float)) == 0,
                "%s: values of %s", what, x->name);
        T_CHECK(!a->exp_avg == !b->exp_avg, "%s: moments present in one only", what);
        if (a->exp_avg && b->exp_avg && x->trainable) {
            T_CHECK(memcmp(a->exp_avg + x->offset, b->exp_avg + y->offset, x->size * sizeof(float)) == 0 &&
                        memcmp(a->exp_avg_sq + x->offset, b->exp_avg_sq + y->offset,
                               x->size * sizeof(float)) == 0,
                    "%s: moments of %s", what, x->name);
        }
    }
    T_CHECK(a->depth == b->depth && a->n_features == b->n_features && a->dim_head == b->dim_head,
            "%s: projection shape", what);
    size_t np = a->depth * a->n_features * a->dim_head;
    T_CHECK(np == 0 || (a->proj && b->proj && memcmp(a->proj, b->proj, np * sizeof(float)) == 0),
            "%s: projections", what);
    T_CHECK(a->redraw_index == b->redraw_index && a->feature_seed == b->feature_seed, "%s: feature counters",
            what);
    T_CHECK(a->cursor_len == b->cursor_len &&
                (a->cursor_len == 0 || memcmp(a->cursor, b->cursor, a->cursor_len * sizeof(int64_t)) == 0),
            "%s: cursor", what);
    T_CHECK(strcmp(a->config_ini ? a->config_ini : "", b->config_ini) == 0, "%s: config", what);
    T_CHECK(strcmp(a->vocab_tsv ? a->vocab_tsv : "", b->vocab_tsv) == 0, "%s: vocab", what);
    T_CHECK(a->n_labels == b->n_labels, "%s: %zu labels, %zu read", what, a->n_labels, b->n_labels);
    for (size_t i = 0; i < a->n_labels && i < b->n_labels; i++)
        T_CHECK(strcmp(a->labels[i], b->labels[i]) == 0, "%s: label %zu", what, i);
    T_CHECK(a->n_scalars == b->n_scalars, "%s: %zu scalars, %zu read", what, a->n_scalars, b->n_scalars);
    for (size_t i = 0; i < a->n_scalars; i++)
        T_CHECK(ckpt_scalar(b, a->scalars[i].key, -1.0) == a->scalars[i].value, "%s: scalar %s", what,
                a->scalars[i].key);
}

// ---------------------------------------------------------------------------
// Helpers

static char *tmp_path(const char *name) { return path_join(t_tmpdir(), name); }

static char *ckpt_path(const char *dir, int64_t step) {
    char name[64];
    snprintf(name, sizeof name, "ckpt-%08" PRId64 ".h5", step);
    return path_join(dir, name);
}

static int has(const char *msg, const char *part) { return strstr(msg, part) != NULL; }

// The names in a folder, sorted, joined with spaces.
static char *list_dir(const char *dir) {
    char *names[256];
    size_t n = 0;
    DIR *d = opendir(dir);
    if (!d) return xstrdup("(no folder)");
    for (struct dirent *e = readdir(d); e && n < 256; e = readdir(d))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) names[n++] = xstrdup(e->d_name);
    closedir(d);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char *t = names[j];
            names[j] = names[j - 1];
            names[j - 1] = t;
        }
    size_t len = 1;
    for (size_t i = 0; i < n; i++) len += strlen(names[i]) + 1;
    char *out = xcalloc(1, len);
    for (size_t i = 0; i < n; i++) {
        if (i) strcat(out, " ");
        strcat(out, names[i]);
        free(names[i]);
    }
    return out;
}

static char *read_text(const char *path) {
    char *t = file_read_all(path, NULL);
    return t ? t : xstrdup("(unreadable)");
}

static void write_text(const char *path, const char *text) {
    FILE *f = xfopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void copy_file(const char *from, const char *to) {
    size_t n = 0;
    char *b = file_read_all(from, &n);
    CHECK(b, "%s", error_last());
    FILE *f = xfopen(to, "wb");
    CHECK(fwrite(b, 1, n, f) == n, "cannot write %s", to);
    fclose(f);
    free(b);
}

static void flip_byte(const char *path, int64_t off) {
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0, "cannot open %s", path);
    unsigned char c;
    CHECK(pread(fd, &c, 1, off) == 1, "cannot read %s", path);
    c ^= 0x5a;
    CHECK(pwrite(fd, &c, 1, off) == 1, "cannot write %s", path);
    close(fd);
}

static void set_byte(const char *path, int64_t off, unsigned char v) {
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0 && pwrite(fd, &v, 1, off) == 1, "cannot write %s", path);
    close(fd);
}

// Where the data of a dataset starts in the file.
static int64_t data_offset(const char *path, const char *dataset) {
    h5_lock();
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(f >= 0, "cannot open %s", path);
    hid_t d = H5Dopen2(f, dataset, H5P_DEFAULT);
    CHECK(d >= 0, "no %s in %s", dataset, path);
    haddr_t a = H5Dget_offset(d);
    H5Dclose(d);
    H5Fclose(f);
    h5_unlock();
    CHECK(a != HADDR_UNDEF, "no contiguous data for %s", dataset);
    return (int64_t)a;
}

// Run `fn` on stderr redirected to a file; returns what it printed.
static char *capture_stderr(char *(*fn)(const char *, const char *), const char *a, const char *b,
                            char **result) {
    char *log = tmp_path("stderr.txt");
    fflush(stderr);
    int saved = dup(2);
    int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(saved >= 0 && fd >= 0, "cannot redirect stderr");
    dup2(fd, 2);
    close(fd);
    *result = fn(a, b);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char *text = read_text(log);
    free(log);
    return text;
}

static size_t count_fds(void) {
    size_t n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d) return 0;
    for (struct dirent *e = readdir(d); e; e = readdir(d)) n++;
    closedir(d);
    return n;
}

// ckpt_resolve(dir, "auto") must give `want` (a step; -1: an error), with or
// without a warning.
static void check_resolve(const char *dir, int64_t want, int warn, const char *what) {
    char *got = NULL;
    char *err = capture_stderr(ckpt_resolve, dir, "auto", &got);
    if (want < 0) {
        T_CHECK(got == NULL, "%s: resolved to %s", what, got);
    } else {
        char *p = ckpt_path(dir, want);
        T_CHECK(got && strcmp(got, p) == 0, "%s: resolved to %s, expected %s (%s)", what,
                got ? got : "nothing", p, got ? "" : error_last());
        free(p);
    }
    T_CHECK(warn == (strstr(err, "warning") != NULL), "%s: warning %s expected, stderr: %s", what,
            warn ? "" : "not", err);
    free(err);
    free(got);
}

// ---------------------------------------------------------------------------
// Round trip

static void test_round_trip(void) {
    char *dir = tmp_path("roundtrip");
    CkptState s, r;
    make_state(&s, 5, 7);
    T_CHECK(ckpt_write(dir, &s, 0) == 0, "write: %s", error_last());
    char *p = ckpt_path(dir, 7);
    if (ckpt_read(p, &r) != 0) {
        T_CHECK(0, "read: %s", error_last());
        return;
    }
    check_equal(&s, &r, "full state");
    T_CHECK(r.table.e[1].trainable == 0 && r.exp_avg[r.table.e[1].offset] == 0.0f,
            "frozen tensor: no moments, zeros");
    T_CHECK(ckpt_scalar(&r, "absent", 4.5) == 4.5, "scalar default");
    ckpt_state_free(&r);
    T_CHECK(ckpt_verify(p) == 0, "verify: %s", error_last());
    char *latest = path_join(dir, CKPT_LATEST);
    char *text = read_text(latest);
    T_CHECK(strcmp(text, "ckpt-00000007.h5\n") == 0, "latest holds '%s'", text);
    free(text);

    // The summary names what is inside.
    char *sum = tmp_path("summary.txt");
    FILE *f = xfopen(sum, "w");
    T_CHECK(ckpt_summary(p, f) == 0, "summary: %s", error_last());
    fclose(f);
    text = read_text(sum);
    const char *want[] = {"kind         pretrain",    "step         7 (epoch 2)",
                          "0123456789abcdef",         "5 (1 frozen)",
                          "Adam moments present",     "2 layers x (6, 4)",
                          "cursor       5 positions", "labels       3: B cell, T cell, NK",
                          "vocabulary   4 genes",     "sched.step = 12.5"};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        T_CHECK(has(text, want[i]), "summary lacks '%s':\n%s", want[i], text);
    free(text);
    free(sum);
    free(p);

    // A minimal state: no moments, projections, cursor, labels, scalars, texts.
    CkptState m = s;
    m.step = 8;
    snprintf(m.kind, sizeof m.kind, "finetune");
    m.exp_avg = m.exp_avg_sq = NULL;
    m.depth = m.n_features = m.dim_head = 0;
    m.proj = NULL;
    m.cursor_len = 0;
    m.cursor = NULL;
    m.n_labels = 0;
    m.labels = NULL;
    m.n_scalars = 0;
    m.scalars = NULL;
    m.config_ini = NULL;
    m.vocab_tsv = NULL;
    T_CHECK(ckpt_write(dir, &m, 0) == 0, "write minimal: %s", error_last());
    p = ckpt_path(dir, 8);
    if (ckpt_read(p, &r) != 0) {
        T_CHECK(0, "read minimal: %s", error_last());
        return;
    }
    check_equal(&m, &r, "minimal state");
    T_CHECK(r.exp_avg == NULL && r.proj == NULL && r.labels == NULL && r.cursor == NULL,
            "minimal state has no arrays");
    T_CHECK(r.table.e[0].trainable == 1 && r.table.e[1].trainable == 0,
            "trainable flags without optimizer state");

    // Copying tensors by name into another table.
    ParamTable dst;
    param_table_init(&dst);
    param_table_add(&dst, "norm.bias", 1, 8, 0, 1, 0, INIT_ZEROS, 0);
    param_table_add(&dst, "classifier.weight", 2, 3, 8, 1, 1, INIT_NORMAL, 0.02f);
    param_table_add(&dst, "token_emb.weight", 2, 7, 8, 1, 0, INIT_NORMAL, 0.02f);
    float *dp = floats_alloc(dst.total);
    for (size_t i = 0; i < dst.total; i++) dp[i] = -1.0f;
    size_t missing = 99, unused = 99;
    T_CHECK(ckpt_copy_tensors(&r, &dst, dp, &missing, &unused) == 0, "copy: %s", error_last());
    T_CHECK(missing == 1 && unused == 3, "missing %zu (1), unused %zu (3)", missing, unused);
    const ParamEntry *a = param_table_find(&dst, "token_emb.weight");
    const ParamEntry *b = param_table_find(&r.table, "token_emb.weight");
    T_CHECK(memcmp(dp + a->offset, r.params + b->offset, a->size * sizeof(float)) == 0, "copied values");
    T_CHECK(dp[param_table_find(&dst, "classifier.weight")->offset] == -1.0f, "missing tensor untouched");
    param_table_free(&dst);
    free(dp);

    param_table_init(&dst);
    param_table_add(&dst, "norm.bias", 1, 8, 0, 1, 0, INIT_ZEROS, 0);
    param_table_add(&dst, "token_emb.weight", 2, 8, 8, 1, 0, INIT_NORMAL, 0.02f);
    dp = floats_alloc(dst.total);
    T_CHECK(ckpt_copy_tensors(&r, &dst, dp, NULL, NULL) == -1, "shape mismatch accepted");
    T_CHECK(has(error_last(), "token_emb.weight") && has(error_last(), "(7, 8)") &&
                has(error_last(), "(8, 8)"),
            "mismatch message: %s", error_last());
    T_CHECK(dp[0] == 0.0f, "nothing copied on a mismatch");
    param_table_free(&dst);
    free(dp);
    ckpt_state_free(&r);
    free(p);

    // Resolving a file path.
    p = ckpt_path(dir, 7);
    char *got = ckpt_resolve(dir, p);
    T_CHECK(got && strcmp(got, p) == 0, "resolve of a path: %s", got ? got : error_last());
    free(got);
    free(p);
    p = ckpt_path(dir, 99);
    got = ckpt_resolve(dir, p);
    T_CHECK(!got && has(error_last(), "ckpt-00000099.h5") && has(error_last(), "does not exist"),
            "resolve of a missing path: %s", error_last());
    free(p);
    got = ckpt_resolve(dir, dir);
    T_CHECK(!got && has(error_last(), "is a folder"), "resolve of a folder: %s", error_last());

    free(latest);
    ckpt_state_free(&s);
    free(dir);
}

// ---------------------------------------------------------------------------
// Keep-K, `latest`, and falling back over damaged checkpoints

static void test_keep_and_resolve(void) {
    char *dir = tmp_path("keep");
    CkptState s;
    make_state(&s, 5, 1);
    for (int64_t step = 1; step <= 5; step++) {
        s.step = step;
        T_CHECK(ckpt_write(dir, &s, 2) == 0, "write step %" PRId64 ": %s", step, error_last());
    }
    char *names = list_dir(dir);
    T_CHECK(strcmp(names, "ckpt-00000004.h5 ckpt-00000005.h5 latest") == 0, "folder holds: %s", names);
    free(names);
    char *latest = path_join(dir, CKPT_LATEST);
    char *text = read_text(latest);
    T_CHECK(strcmp(text, "ckpt-00000005.h5\n") == 0, "latest holds '%s'", text);
    free(text);
    check_resolve(dir, 5, 0, "clean folder");

    // A bit flip inside a tensor's data.
    char *p5 = ckpt_path(dir, 5);
    int64_t off = data_offset(p5, "/model/performer.net.layers.0.0.fn.to_out.weight");
    flip_byte(p5, off + 13);
    CkptState r;
    T_CHECK(ckpt_read(p5, &r) == -1, "bit flip not detected");
    T_CHECK(has(error_last(), p5) && has(error_last(), "to_out.weight") && has(error_last(), "corrupt"),
            "bit flip message: %s", error_last());
    check_resolve(dir, 4, 1, "newest corrupt");

    // A truncated file.
    s.step = 5;
    T_CHECK(ckpt_write(dir, &s, 2) == 0, "rewrite step 5: %s", error_last());
    check_resolve(dir, 5, 0, "rewritten");
    int64_t size = path_file_size(p5);
    T_CHECK(truncate(p5, size / 2) == 0, "truncate");
    T_CHECK(ckpt_read(p5, &r) == -1, "truncation not detected");
    T_CHECK(has(error_last(), p5) && has(error_last(), "truncated"), "truncation message: %s", error_last());
    check_resolve(dir, 4, 1, "newest truncated");

    // No `latest`: the newest checkpoint that reads back.
    T_CHECK(unlink(latest) == 0, "unlink latest");
    check_resolve(dir, 4, 1, "no latest, newest truncated");
    T_CHECK(ckpt_write(dir, &s, 2) == 0, "rewrite step 5: %s", error_last());
    T_CHECK(unlink(latest) == 0, "unlink latest");
    check_resolve(dir, 5, 1, "no latest");

    // `latest` naming a missing file, or holding something else than a name.
    write_text(latest, "ckpt-00000009.h5\n");
    check_resolve(dir, 5, 1, "latest names a missing file");
    write_text(latest, "../../etc/passwd\n");
    check_resolve(dir, 5, 1, "latest holds a path");
    write_text(latest, "ckpt-00000004.h5\n");
    check_resolve(dir, 4, 0, "latest names an older checkpoint");

    // Nothing usable.
    char *p4 = ckpt_path(dir, 4);
    T_CHECK(truncate(p4, 100) == 0 && truncate(p5, 100) == 0, "truncate both");
    check_resolve(dir, -1, 1, "all damaged");
    T_CHECK(has(error_last(), "no checkpoint to resume from") && has(error_last(), dir),
            "all damaged message: %s", error_last());
    T_CHECK(ckpt_any(dir), "damaged checkpoints are still checkpoints");
    char *empty = tmp_path("empty");
    T_CHECK(path_mkdir_p(empty) == 0, "mkdir");
    check_resolve(empty, -1, 0, "empty folder");
    T_CHECK(!ckpt_any(empty), "an empty folder holds checkpoints");
    T_CHECK(has(error_last(), "no checkpoint to resume from") && has(error_last(), empty) &&
                has(error_last(), "no ckpt-*.h5"),
            "empty folder message: %s", error_last());
    char *absent = tmp_path("absent");
    check_resolve(absent, -1, 0, "missing folder");
    T_CHECK(!ckpt_any(absent), "a missing folder holds checkpoints");
    T_CHECK(has(error_last(), absent) && has(error_last(), "does not exist"), "missing folder message: %s",
            error_last());

    // keep = 0 keeps everything; checkpoints of later steps are left alone.
    char *all = tmp_path("keepall");
    for (int64_t step = 1; step <= 3; step++) {
        s.step = step;
        T_CHECK(ckpt_write(all, &s, 0) == 0, "write: %s", error_last());
    }
    s.step = 2;
    T_CHECK(ckpt_write(all, &s, 1) == 0, "write: %s", error_last());
    names = list_dir(all);
    T_CHECK(strcmp(names, "ckpt-00000002.h5 ckpt-00000003.h5 latest") == 0, "folder holds: %s", names);
    free(names);

    free(all);
    free(absent);
    free(empty);
    free(p4);
    free(p5);
    free(latest);
    ckpt_state_free(&s);
    free(dir);
}

// ---------------------------------------------------------------------------
// Malformed files

typedef enum {
    EDIT_ATTR_I64,
    EDIT_ATTR_SHAPE,
    EDIT_ATTR_DELETE,
    EDIT_ATTR_VLEN,
    EDIT_LINK_DELETE,
    EDIT_INT_DATASET,
    EDIT_HUGE_TENSOR
} EditKind;

// Apply one edit to a copy of a good checkpoint.
static void edit_file(const char *path, EditKind kind, const char *obj, const char *attr, int64_t v) {
    h5_lock();
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    CHECK(f >= 0, "cannot open %s", path);
    if (kind == EDIT_LINK_DELETE) {
        CHECK(H5Ldelete(f, obj, H5P_DEFAULT) >= 0, "cannot delete %s", obj);
    } else if (kind == EDIT_HUGE_TENSOR) {
        // A tensor of 2^40 floats with every attribute right, and no data.
        hsize_t dims[2] = {1 << 20, 1 << 20};
        int64_t shape[2] = {1 << 20, 1 << 20}, index = 5, zero = 0;
        hid_t sp = H5Screate_simple(2, dims, NULL);
        hid_t d = H5Dcreate2(f, obj, H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        CHECK(d >= 0, "huge dataset");
        hsize_t two = 2;
        hid_t s2 = H5Screate_simple(1, &two, NULL), s1 = H5Screate(H5S_SCALAR);
        const char *names[] = {"index", "trainable", "decay", "crc32"};
        const int64_t *vals[] = {&index, &zero, &zero, &zero};
        for (int i = 0; i < 4; i++) {
            hid_t a = H5Acreate2(d, names[i], H5T_STD_I64LE, s1, H5P_DEFAULT, H5P_DEFAULT);
            H5Awrite(a, H5T_NATIVE_INT64, vals[i]);
            H5Aclose(a);
        }
        hid_t a = H5Acreate2(d, "shape", H5T_STD_I64LE, s2, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_INT64, shape);
        H5Aclose(a);
        H5Sclose(s1);
        H5Sclose(s2);
        H5Dclose(d);
        H5Sclose(sp);
    } else if (kind == EDIT_INT_DATASET) {
        hsize_t dim = 4;
        int32_t x[4] = {1, 2, 3, 4};
        hid_t sp = H5Screate_simple(1, &dim, NULL);
        hid_t d = H5Dcreate2(f, obj, H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        CHECK(d >= 0 && H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, x) >= 0, "int dataset");
        H5Dclose(d);
        H5Sclose(sp);
    } else {
        hid_t o = H5Oopen(f, obj, H5P_DEFAULT);
        CHECK(o >= 0, "cannot open %s", obj);
        if (kind == EDIT_ATTR_DELETE) {
            CHECK(H5Adelete(o, attr) >= 0, "cannot delete %s", attr);
        } else if (kind == EDIT_ATTR_VLEN) {
            // What h5py writes for a str attribute.
            const char *value = "pretrain";
            hid_t t = H5Tcopy(H5T_C_S1);
            H5Tset_size(t, H5T_VARIABLE);
            hid_t sp = H5Screate(H5S_SCALAR);
            CHECK(H5Adelete(o, attr) >= 0, "cannot delete %s", attr);
            hid_t a = H5Acreate2(o, attr, t, sp, H5P_DEFAULT, H5P_DEFAULT);
            CHECK(a >= 0 && H5Awrite(a, t, &value) >= 0, "cannot write %s", attr);
            H5Aclose(a);
            H5Sclose(sp);
            H5Tclose(t);
        } else {
            int64_t vals[2] = {v, v};
            hid_t a = H5Aopen(o, attr, H5P_DEFAULT);
            CHECK(a >= 0 && H5Awrite(a, H5T_NATIVE_INT64, vals) >= 0, "cannot write %s", attr);
            H5Aclose(a);
        }
        H5Oclose(o);
    }
    H5Fclose(f);
    h5_unlock();
}

static void test_bad_files(void) {
    char *dir = tmp_path("bad");
    CkptState s, r;
    make_state(&s, 5, 3);
    T_CHECK(ckpt_write(dir, &s, 0) == 0, "write: %s", error_last());
    char *good = ckpt_path(dir, 3);
    char *p = tmp_path("bad/edited.h5");

    write_text(p, "this is not an HDF5 file\n");
    T_CHECK(ckpt_read(p, &r) == -1 && has(error_last(), p) && has(error_last(), "not an HDF5 file"),
            "text file: %s", error_last());
    write_text(p, "");
    T_CHECK(ckpt_read(p, &r) == -1 && has(error_last(), p), "empty file: %s", error_last());
    T_CHECK(ckpt_read(dir, &r) == -1 && has(error_last(), "not a regular file"), "folder: %s", error_last());
    char *missing = tmp_path("bad/missing.h5");
    T_CHECK(ckpt_read(missing, &r) == -1 && has(error_last(), missing) && has(error_last(), "No such file"),
            "missing file: %s", error_last());
    free(missing);

    // HDF5, but not a checkpoint: in the 1.8 format, and in the 1.6 format
    // (without metadata checksums) that the reader refuses outright.
    for (int v18 = 0; v18 < 2; v18++) {
        h5_lock();
        hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
        if (v18) H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18);
        hid_t f = H5Fcreate(p, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
        hid_t g = H5Gcreate2(f, "model", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        H5Gclose(g);
        H5Fclose(f);
        H5Pclose(fapl);
        h5_unlock();
        const char *want = v18 ? "no 'format' attribute" : "HDF5 1.6 file format";
        T_CHECK(ckpt_read(p, &r) == -1 && has(error_last(), p) && has(error_last(), want), "%s: %s", want,
                error_last());
    }

    struct {
        EditKind kind;
        const char *obj, *attr;
        int64_t v;
        const char *want1, *want2;
    } edits[] = {
        {EDIT_ATTR_I64, "/", "format_version", 2, "format version 2", "reads version 1"},
        {EDIT_ATTR_SHAPE, "/model/token_emb.weight", "shape", 9, "token_emb.weight",
         "'shape' attribute says (9, 9)"},
        {EDIT_ATTR_DELETE, "/model/norm.bias", "crc32", 0, "/model/norm.bias", "no 'crc32' attribute"},
        {EDIT_ATTR_DELETE, "/model/norm.bias", "shape", 0, "/model/norm.bias", "'shape' attribute"},
        {EDIT_ATTR_DELETE, "/state/cursor", "crc32", 0, "/state/cursor", "no 'crc32' attribute"},
        {EDIT_ATTR_DELETE, "/vocab", "crc32", 0, "/vocab", "no 'crc32' attribute"},
        {EDIT_ATTR_DELETE, "/", "step", 0, "'/' has no 'step'", ""},
        {EDIT_ATTR_VLEN, "/", "kind", 0, "'kind'", "variable-length string"},
        {EDIT_ATTR_I64, "/model/norm.bias", "index", 0, "index 0", "not 0..4"},
        {EDIT_ATTR_I64, "/model/norm.bias", "index", 7, "index 7", "norm.bias"},
        {EDIT_ATTR_I64, "/model/norm.bias", "trainable", 2, "'trainable' of '/model/norm.bias' is 2", ""},
        {EDIT_ATTR_I64, "/model/norm.bias", "trainable", 0, "exp_avg/norm.bias", "marked frozen"},
        {EDIT_ATTR_I64, "/model/pos_emb.emb.weight", "trainable", 1,
         "'/optim/exp_avg/pos_emb.emb.weight' is missing", ""},
        {EDIT_ATTR_I64, "/", "step", -4, "negative step", ""},
        {EDIT_LINK_DELETE, "/optim/exp_avg_sq/token_emb.weight", NULL, 0, "exp_avg_sq/token_emb.weight",
         "missing"},
        {EDIT_LINK_DELETE, "/buffers/performer.net.layers.0.0.fn.fast_attention.projection_matrix", NULL, 0,
         "/buffers/performer.net.layers.0.0.fn.fast_attention.projection_matrix", "is missing"},
        {EDIT_LINK_DELETE, "/config", NULL, 0, "'/config' is missing", ""},
        {EDIT_LINK_DELETE, "/state", NULL, 0, "'/state' is missing", ""},
        {EDIT_INT_DATASET, "/model/extra.weight", NULL, 0, "extra.weight", "not float32"},
        {EDIT_HUGE_TENSOR, "/model/huge.weight", NULL, 0, "huge.weight",
         "claims more data than the file holds"},
        {EDIT_INT_DATASET, "/optim/exp_avg/extra.weight", NULL, 0, "exp_avg/extra.weight",
         "no tensor of /model"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof *edits; i++) {
        copy_file(good, p);
        edit_file(p, edits[i].kind, edits[i].obj, edits[i].attr, edits[i].v);
        int rc = ckpt_read(p, &r);
        T_CHECK(rc == -1, "edit %zu (%s %s) accepted", i, edits[i].obj, edits[i].attr ? edits[i].attr : "");
        if (rc == 0) ckpt_state_free(&r);
        T_CHECK(has(error_last(), p) && has(error_last(), edits[i].want1) &&
                    has(error_last(), edits[i].want2),
                "edit %zu: message '%s' lacks '%s' / '%s'", i, error_last(), edits[i].want1, edits[i].want2);
        T_CHECK(r.params == NULL && r.table.n == 0, "edit %zu: state not cleared", i);
        // The summary checks the structure too.
        FILE *devnull = xfopen("/dev/null", "w");
        T_CHECK(ckpt_summary(p, devnull) == -1, "edit %zu: summary accepted the file", i);
        fclose(devnull);
    }

    // Damaged heap ids of the config string and a damaged heap collection:
    // HDF5 itself would read out of bounds; the reader checks them first.
    struct {
        int64_t at; // in the 16-byte heap id: length, collection address, object index
        unsigned char v;
        int collection; // write at the collection's address + at instead
        const char *want;
    } heap[] = {
        {12, 0x7f, 0, "missing from their global heap collection"},
        {1, 0x7f, 0, "longer than its heap object"},
        {10, 0x7f, 0, "point outside the file"},
        {0, 'X', 1, "global heap collection holding '/config' is damaged"},
        {10, 0x7f, 1, "global heap collection holding '/config' is damaged"},
    };
    for (size_t i = 0; i < sizeof heap / sizeof *heap; i++) {
        copy_file(good, p);
        int64_t id = data_offset(p, "/config");
        int64_t at = id + heap[i].at;
        if (heap[i].collection) {
            int fd = open(p, O_RDONLY);
            unsigned char addr[8];
            CHECK(fd >= 0 && pread(fd, addr, 8, id + 4) == 8, "cannot read the heap id");
            close(fd);
            int64_t coll = 0;
            for (int b = 7; b >= 0; b--) coll = coll << 8 | addr[b];
            at = coll + heap[i].at;
        }
        set_byte(p, at, heap[i].v);
        T_CHECK(ckpt_read(p, &r) == -1 && has(error_last(), p) && has(error_last(), heap[i].want),
                "heap damage %zu: %s", i, error_last());
    }

    // Every single-byte change anywhere in the file is either detected or
    // harmless (the state read back is the one written), and every truncation
    // is detected. Metadata carries HDF5 checksums, data our CRCs.
    size_t n = 0;
    char *bytes = file_read_all(good, &n);
    size_t changed_ok = 0, detected = 0;
    for (size_t off = 0; off < n; off += 11) {
        FILE *o = xfopen(p, "wb");
        bytes[off] ^= 0x20;
        fwrite(bytes, 1, n, o);
        bytes[off] ^= 0x20;
        fclose(o);
        if (ckpt_read(p, &r) == 0) {
            int before = t_failures;
            check_equal(&s, &r, "state after a harmless byte change");
            if (t_failures > before) fprintf(stderr, "  (byte %zu of %zu changed)\n", off, n);
            ckpt_state_free(&r);
            changed_ok++;
        } else {
            T_CHECK(has(error_last(), p), "message names the file: %s", error_last());
            detected++;
        }
    }
    printf("byte changes: %zu detected, %zu harmless, file of %zu bytes\n", detected, changed_ok, n);
    for (size_t len = 0; len < n; len += n / 41 + 1) {
        copy_file(good, p);
        T_CHECK(truncate(p, (off_t)len) == 0, "truncate");
        int rc = ckpt_read(p, &r);
        T_CHECK(rc == -1 && has(error_last(), p), "truncation to %zu bytes: rc %d: %s", len, rc,
                error_last());
        if (rc == 0) ckpt_state_free(&r);
    }
    free(bytes);
    free(p);
    free(good);
    ckpt_state_free(&s);
    free(dir);
}

// ---------------------------------------------------------------------------
// A writer killed in the middle of a write

// Every ckpt-*.h5 of the folder reads back; `latest` names one of them.
static void check_folder_intact(const char *dir, int64_t latest_step, const char *what) {
    DIR *d = opendir(dir);
    T_CHECK(d != NULL, "%s: no folder", what);
    if (!d) return;
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        if (strncmp(e->d_name, "ckpt-", 5) != 0) continue;
        char *p = path_join(dir, e->d_name);
        T_CHECK(ckpt_verify(p) == 0, "%s: %s", what, error_last());
        free(p);
    }
    closedir(d);
    char *latest = path_join(dir, CKPT_LATEST);
    char *text = read_text(latest);
    char want[64];
    snprintf(want, sizeof want, "ckpt-%08" PRId64 ".h5\n", latest_step);
    T_CHECK(strcmp(text, want) == 0, "%s: latest holds '%s'", what, text);
    free(text);
    free(latest);
}

static void test_interrupted(void) {
    char *dir = tmp_path("crash");
    CkptState small, big;
    make_state(&small, 5, 1);
    T_CHECK(ckpt_write(dir, &small, 3) == 0, "write: %s", error_last());
    // 3 x 8 Mi floats: about 100 MB to write, long enough to be caught at it.
    make_state(&big, (size_t)1 << 20, 2);
    int caught = 0;
    for (int attempt = 0; attempt < 5 && !caught; attempt++) {
        big.step = 2 + attempt;
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        CHECK(pid >= 0, "fork: %s", strerror(errno));
        if (pid == 0) _exit(ckpt_write(dir, &big, 3) == 0 ? 0 : 3);
        char name[96];
        snprintf(name, sizeof name, ".ckpt-%" PRId64 ".h5.tmp-%ld", big.step, (long)pid);
        char *tmp = path_join(dir, name);
        int status = 0, reaped = 0;
        double t0 = time_now();
        while (time_now() - t0 < 30 && path_file_size(tmp) < (1 << 20)) {
            if (waitpid(pid, &status, WNOHANG) == pid) {
                reaped = 1;
                break;
            }
        }
        kill(pid, SIGKILL);
        if (!reaped) waitpid(pid, &status, 0);
        char *final = ckpt_path(dir, big.step);
        caught = WIFSIGNALED(status) && !path_exists(final) && path_exists(tmp);
        printf("kill attempt %d: %s\n", attempt, caught ? "killed while writing" : "the write had finished");
        // Whatever the moment of the kill: every checkpoint present reads back.
        check_folder_intact(dir, caught ? 1 : big.step, "after a kill");
        free(final);
        free(tmp);
    }
    T_CHECK(caught, "never caught the writer in the middle of a write");
    check_resolve(dir, 1, 0, "after a kill");

    // The next write removes what the dead writer left.
    small.step = 10;
    T_CHECK(ckpt_write(dir, &small, 3) == 0, "write after a kill: %s", error_last());
    char *names = list_dir(dir);
    T_CHECK(!has(names, ".tmp"), "temporary files left: %s", names);
    free(names);
    ckpt_state_free(&big);
    ckpt_state_free(&small);
    free(dir);
}

// ---------------------------------------------------------------------------
// Full disks

// In a child process (its own limits and mounts): a small checkpoint fits, a
// big one fails with `want` in the message, leaving no temporary file, no
// open descriptor, and the small checkpoint and `latest` as they were.
static int full_disk_checks(const char *dir, const char *want, int check_space) {
    int before = t_failures;
    CkptState small, big;
    make_state(&small, 5, 1);
    make_state(&big, (size_t)1 << 17, 2); // 3 x 4 MiB
    T_CHECK(ckpt_write(dir, &small, 2) == 0, "small checkpoint: %s", error_last());
    struct statvfs v0, v1;
    statvfs(dir, &v0);
    size_t fds = count_fds();
    int rc = ckpt_write(dir, &big, 2);
    T_CHECK(rc == -1, "a big checkpoint was written to a full disk");
    char *p2 = ckpt_path(dir, 2);
    T_CHECK(has(error_last(), p2) && has(error_last(), want), "full disk message: %s", error_last());
    printf("full disk (%s): %s\n", want, error_last());
    T_CHECK(count_fds() == fds, "%zu descriptors open after the failure, %zu before", count_fds(), fds);
    statvfs(dir, &v1);
    T_CHECK(!check_space || v1.f_bfree == v0.f_bfree, "free blocks %lu after, %lu before",
            (unsigned long)v1.f_bfree, (unsigned long)v0.f_bfree);
    char *names = list_dir(dir);
    T_CHECK(strcmp(names, "ckpt-00000001.h5 latest") == 0, "folder holds: %s", names);
    free(names);
    check_folder_intact(dir, 1, "after a full disk");
    free(p2);
    ckpt_state_free(&big);
    ckpt_state_free(&small);
    return t_failures > before;
}

// Under file size limits from almost nothing to enough, the write fails at
// every stage (creating the file, attributes, datasets, flush, close); each
// time cleanly. Runs in the child that set up the limit handling.
static int fsize_sweep(const char *dir) {
    int before = t_failures;
    CkptState s;
    make_state(&s, 5, 1);
    T_CHECK(ckpt_write(dir, &s, 0) == 0, "first checkpoint: %s", error_last());
    int64_t full = path_file_size(ckpt_path(dir, 1));
    s.step = 2;
    struct rlimit rl, saved;
    getrlimit(RLIMIT_FSIZE, &saved);
    size_t fds = count_fds(), failures = 0;
    char stages[2048] = "";
    char *p2 = ckpt_path(dir, 2);
    for (int64_t limit = 0; limit <= full + 4096; limit += 97) {
        rl = saved;
        rl.rlim_cur = (rlim_t)limit;
        setrlimit(RLIMIT_FSIZE, &rl);
        int rc = ckpt_write(dir, &s, 0);
        setrlimit(RLIMIT_FSIZE, &saved);
        if (rc == 0) break;
        failures++;
        const char *m = error_last();
        T_CHECK(has(m, p2) && has(m, strerror(EFBIG)), "limit %" PRId64 ": %s", limit, m);
        // The stage: what follows the file name, up to the next quote.
        const char *st = strstr(m, "': ");
        if (st) {
            char stage[64];
            int len = (int)strcspn(st + 3, "'/:");
            while (len > 0 && st[3 + len - 1] == ' ') len--;
            snprintf(stage, sizeof stage, "%.*s", len, st + 3);
            if (!has(stages, stage) && strlen(stages) + strlen(stage) + 3 < sizeof stages) {
                strcat(stages, stages[0] ? ", " : "");
                strcat(stages, stage);
            }
        }
        T_CHECK(count_fds() == fds, "limit %" PRId64 ": descriptors left open", limit);
        char *names = list_dir(dir);
        T_CHECK(strcmp(names, "ckpt-00000001.h5 latest") == 0, "limit %" PRId64 ": folder holds %s", limit,
                names);
        free(names);
    }
    printf("file size limits: %zu failed writes, at: %s\n", failures, stages);
    T_CHECK(failures > 10 && path_exists(p2), "the sweep never reached a successful write");
    check_folder_intact(dir, 2, "after the sweep");
    free(p2);
    ckpt_state_free(&s);
    return t_failures > before;
}

static void test_full_disk(void) {
    // A file size limit: writes past it fail with EFBIG. Works anywhere.
    char *dir = tmp_path("fsize");
    T_CHECK(path_mkdir_p(dir) == 0, "mkdir");
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl;
        getrlimit(RLIMIT_FSIZE, &rl);
        rl.rlim_cur = 1 << 20;
        if (setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(2);
        int bad = full_disk_checks(dir, strerror(EFBIG), 0);
        char *sweep = path_join(dir, "sweep");
        bad |= fsize_sweep(sweep);
        free(sweep);
        fflush(stdout);
        _exit(bad);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    T_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "file size limit test failed (status %d)", status);
    free(dir);

    // A 1 MiB tmpfs, mounted in a private mount namespace of the child (gone
    // with it). Needs root (CAP_SYS_ADMIN); skipped with a message without.
    dir = tmp_path("tmpfs");
    T_CHECK(path_mkdir_p(dir) == 0, "mkdir");
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
            mount("tmpfs", dir, "tmpfs", 0, "size=1m") != 0) {
            printf("SKIP tmpfs full-disk test: cannot mount a tmpfs here (%s); the file size limit "
                   "test above covers the same paths\n",
                   strerror(errno));
            fflush(stdout);
            _exit(77);
        }
        int bad = full_disk_checks(dir, strerror(ENOSPC), 1);
        fflush(stdout);
        _exit(bad);
    }
    waitpid(pid, &status, 0);
    T_CHECK(WIFEXITED(status) && (WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 77),
            "tmpfs full-disk test failed (status %d)", status);
    free(dir);
}

// ---------------------------------------------------------------------------
// A sample for the h5py check

static int write_sample(const char *out) {
    CkptState s;
    make_state(&s, 5, 12);
    char *dir = path_join(out, "ckpt");
    if (ckpt_write(dir, &s, 0) != 0) {
        fprintf(stderr, "%s\n", error_last());
        return 1;
    }
    char *p = path_join(out, "expect_tensors.tsv");
    FILE *f = xfopen(p, "w");
    for (size_t i = 0; i < s.table.n; i++) {
        const ParamEntry *e = &s.table.e[i];
        fprintf(f, "%s\t%zu", e->name, e->shape[0]);
        if (e->ndim == 2) fprintf(f, ",%zu", e->shape[1]);
        fprintf(f, "\t%d\t%d\t%.9g\n", e->trainable, e->decay, (double)s.params[e->offset + 1]);
    }
    fclose(f);
    free(p);
    p = path_join(out, "expect_meta.tsv");
    f = xfopen(p, "w");
    fprintf(f,
            "kind\t%s\nstep\t%" PRId64 "\nepoch\t%" PRId64 "\nseed\t%" PRIu64 "\nvocab_hash\t%016" PRIx64
            "\ndepth\t%zu\nn_features\t%zu\ndim_head\t%zu\nredraw_index\t%" PRId64 "\n",
            s.kind, s.step, s.epoch, s.seed, s.vocab_hash, s.depth, s.n_features, s.dim_head, s.redraw_index);
    for (size_t i = 0; i < s.cursor_len; i++) fprintf(f, "cursor\t%" PRId64 "\n", s.cursor[i]);
    for (size_t i = 0; i < s.n_labels; i++) fprintf(f, "label\t%s\n", s.labels[i]);
    for (size_t i = 0; i < s.n_scalars; i++)
        fprintf(f, "scalar\t%s\t%.17g\n", s.scalars[i].key, s.scalars[i].value);
    fclose(f);
    free(p);
    p = path_join(out, "expect_config.ini");
    write_text(p, s.config_ini);
    free(p);
    p = path_join(out, "expect_vocab.tsv");
    write_text(p, s.vocab_tsv);
    free(p);
    free(dir);
    ckpt_state_free(&s);
    return 0;
}

int main(int argc, char **argv) {
    error_h5_quiet();
    if (argc == 3 && strcmp(argv[1], "--sample") == 0) return write_sample(argv[2]);
    test_round_trip();
    test_keep_and_resolve();
    test_bad_files();
    test_interrupted();
    test_full_disk();
    return t_finish("test_checkpoint");
}
