// Errors: one noreturn sink for fatal errors, and a per-thread "last error"
// message for code that must report a fault without dying (readers used by
// --verify, the fuzzers and the prefetch thread).
//
// Fatal errors print "[rank r] file:line: message" (and "  HINT: ..." for user
// errors: what was expected, what was found, what to do), remove any output
// file registered with error_cleanup_add(), and end the process: MPI_Abort
// when MPI is up with more than one rank, exit(1) otherwise.
#ifndef PERFCELL_ERROR_H
#define PERFCELL_ERROR_H

#include <stddef.h>
#include <stdio.h>

#define PC_PRINTF(a, b) __attribute__((format(printf, a, b)))

_Noreturn void error_die(const char *file, int line, const char *hint, const char *fmt, ...)
    PC_PRINTF(4, 5);

// Set the rank printed in messages (called once MPI is up).
void error_set_rank(int rank);

// Files that must not survive a fatal error (partial outputs). Paths are copied.
// A registered folder is removed together with the files directly inside it.
void error_cleanup_add(const char *path);
void error_cleanup_remove(const char *path);

// Per-thread last error, for functions that return -1 on failure.
// error_set() formats the message and returns -1 so that `return error_set(...)`
// reads naturally. error_set_h5() appends the innermost HDF5 error description.
int error_set(const char *fmt, ...) PC_PRINTF(1, 2);
int error_set_h5(const char *fmt, ...) PC_PRINTF(1, 2);
const char *error_last(void);
// A HINT for the last error (user errors: what was expected, what was found,
// what to do); error_set() clears it, error_set_hint() sets it after the
// message and returns -1. error_last_hint() is NULL when there is none.
int error_set_hint(const char *fmt, ...) PC_PRINTF(1, 2);
const char *error_last_hint(void);

// Turn off HDF5's automatic error-stack printing (we report errors ourselves).
void error_h5_quiet(void);

#define DIE(...) error_die(__FILE__, __LINE__, NULL, __VA_ARGS__)
#define DIE_HINT(hint, ...) error_die(__FILE__, __LINE__, (hint), __VA_ARGS__)
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) error_die(__FILE__, __LINE__, NULL, __VA_ARGS__);                             \
    } while (0)
// For functions that returned -1 after error_set(): die with that message.
#define CHECK_OK(call)                                                                             \
    do {                                                                                           \
        if ((call) != 0) error_die(__FILE__, __LINE__, NULL, "%s", error_last());                  \
    } while (0)
// The same, printing the HINT the failing function left (if any).
#define CHECK_OK_USER(call)                                                                        \
    do {                                                                                           \
        if ((call) != 0) error_die(__FILE__, __LINE__, error_last_hint(), "%s", error_last());     \
    } while (0)
#define CHECK_OK_HINT(call, hint)                                                                  \
    do {                                                                                           \
        if ((call) != 0) error_die(__FILE__, __LINE__, (hint), "%s", error_last());                \
    } while (0)

// MPI calls: dies with the MPI error string. Collective errors abort every rank.
void error_die_mpi(const char *file, int line, const char *call, int rc) __attribute__((noreturn));
#define CHECK_MPI(call)                                                                            \
    do {                                                                                           \
        int rc_mpi_ = (call);                                                                      \
        if (rc_mpi_ != 0) error_die_mpi(__FILE__, __LINE__, #call, rc_mpi_);                       \
    } while (0)

// HDF5 calls that return hid_t or herr_t (< 0 fails); the message names what was
// being done (and the file), the innermost HDF5 error is appended.
void error_die_h5(const char *file, int line, const char *fmt, ...) __attribute__((noreturn))
PC_PRINTF(3, 4);
#define CHECK_H5(call, ...)                                                                        \
    do {                                                                                           \
        if ((call) < 0) error_die_h5(__FILE__, __LINE__, __VA_ARGS__);                             \
    } while (0)

// Zstandard calls that return a size_t code.
#define CHECK_ZSTD(call, what)                                                                     \
    do {                                                                                           \
        size_t rc_zstd_ = (call);                                                                  \
        if (ZSTD_isError(rc_zstd_))                                                                \
            error_die(__FILE__, __LINE__, NULL, "%s: %s", (what), ZSTD_getErrorName(rc_zstd_));    \
    } while (0)

void *xmalloc(size_t n);
void *xcalloc(size_t count, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
FILE *xfopen(const char *path, const char *mode);

#endif
