// The error sink, the per-thread last-error message and allocation wrappers.
#include "perfcell/error.h"

#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <mpi.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int g_rank = -1;

void error_set_rank(int rank) { g_rank = rank; }

// ---------------------------------------------------------------------------
// Output files removed on a fatal error

#define CLEANUP_MAX 64
static char *g_cleanup[CLEANUP_MAX];
static pthread_mutex_t g_cleanup_lock = PTHREAD_MUTEX_INITIALIZER;

void error_cleanup_add(const char *path) {
    pthread_mutex_lock(&g_cleanup_lock);
    for (int i = 0; i < CLEANUP_MAX; i++) {
        if (!g_cleanup[i]) {
            g_cleanup[i] = strdup(path);
            pthread_mutex_unlock(&g_cleanup_lock);
            return;
        }
    }
    pthread_mutex_unlock(&g_cleanup_lock);
    DIE("internal: more than %d output files registered for cleanup", CLEANUP_MAX);
}

void error_cleanup_remove(const char *path) {
    pthread_mutex_lock(&g_cleanup_lock);
    for (int i = 0; i < CLEANUP_MAX; i++) {
        if (g_cleanup[i] && strcmp(g_cleanup[i], path) == 0) {
            free(g_cleanup[i]);
            g_cleanup[i] = NULL;
        }
    }
    pthread_mutex_unlock(&g_cleanup_lock);
}

// A folder: the files directly inside it, then the folder (no recursion).
static void cleanup_folder(const char *path) {
    DIR *d = opendir(path);
    if (d) {
        char buf[4096];
        for (struct dirent *e = readdir(d); e; e = readdir(d)) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            if ((size_t)snprintf(buf, sizeof buf, "%s/%s", path, e->d_name) < sizeof buf) unlink(buf);
        }
        closedir(d);
    }
    rmdir(path);
}

static void cleanup_files(void) {
    // Best effort and lock-free on purpose: we may be dying while holding the lock.
    // Twice: a folder registered before another folder made inside it (a
    // checkpoint.dir inside a new run.dir) is empty only on the second pass.
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < CLEANUP_MAX; i++) {
            if (g_cleanup[i] && unlink(g_cleanup[i]) != 0 && errno == EISDIR)
                cleanup_folder(g_cleanup[i]);
        }
    }
}

// ---------------------------------------------------------------------------
// The sink

static _Noreturn void finish(void) {
    cleanup_files();
    fflush(stdout);
    fflush(stderr);
    int up = 0, down = 0, size = 1;
    MPI_Initialized(&up);
    if (up) MPI_Finalized(&down);
    if (up && !down) MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (up && !down && size > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    _exit(1);
}

static void print_prefix(const char *file, int line) {
    if (g_rank >= 0)
        fprintf(stderr, "[rank %d] %s:%d: ", g_rank, file, line);
    else
        fprintf(stderr, "%s:%d: ", file, line);
}

void error_die(const char *file, int line, const char *hint, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    print_prefix(file, line);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (hint) fprintf(stderr, "  HINT: %s\n", hint);
    finish();
}

void error_die_mpi(const char *file, int line, const char *call, int rc) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "code %d", rc);
    error_die(file, line, NULL, "MPI call failed: %s: %s", call, msg);
}

// ---------------------------------------------------------------------------
// HDF5 error text: the innermost (first pushed) description of the default stack.

static herr_t h5_walk_cb(unsigned n, const H5E_error2_t *e, void *data) {
    char *out = data;
    if (n == 0 && e->desc) snprintf(out, 256, "%s (in %s)", e->desc, e->func_name);
    return 0;
}

static void h5_innermost(char out[256]) {
    out[0] = '\0';
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, h5_walk_cb, out);
    if (!out[0]) snprintf(out, 256, "unknown HDF5 error");
}

void error_h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

void error_die_h5(const char *file, int line, const char *fmt, ...) {
    char inner[256];
    h5_innermost(inner);
    va_list ap;
    va_start(ap, fmt);
    print_prefix(file, line);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, ": %s\n", inner);
    finish();
}

// ---------------------------------------------------------------------------
// Per-thread last error

static _Thread_local char t_last[1024];
static _Thread_local char t_hint[1024];

int error_set(const char *fmt, ...) {
    t_hint[0] = '\0';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_last, sizeof t_last, fmt, ap);
    va_end(ap);
    return -1;
}

int error_set_h5(const char *fmt, ...) {
    t_hint[0] = '\0';
    char inner[256];
    h5_innermost(inner);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t_last, sizeof t_last, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof t_last)
        snprintf(t_last + n, sizeof t_last - (size_t)n, ": %s", inner);
    return -1;
}

const char *error_last(void) { return t_last[0] ? t_last : "unknown error"; }

int error_set_hint(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_hint, sizeof t_hint, fmt, ap);
    va_end(ap);
    return -1;
}

const char *error_last_hint(void) { return t_hint[0] ? t_hint : NULL; }

// ---------------------------------------------------------------------------
// Allocation and files

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) DIE("out of memory allocating %zu bytes", n);
    return p;
}

void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) DIE("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) DIE("out of memory reallocating to %zu bytes", n);
    return q;
}

char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = xmalloc(n);
    memcpy(d, s, n);
    return d;
}

FILE *xfopen(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (!f)
        error_die(__FILE__, __LINE__, NULL, "cannot open '%s' (mode %s): %s", path, mode,
                  strerror(errno));
    return f;
}
