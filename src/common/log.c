// Rank-aware logging.
#include "perfcell/log.h"

#include <stdarg.h>
#include <stdio.h>

static int g_rank = 0;
static int g_size = 1;
static LogLevel g_level = LOG_NORMAL;

void log_init(int rank, int size) {
    g_rank = rank;
    g_size = size;
}

void log_set_level(LogLevel level) { g_level = level; }
LogLevel log_level(void) { return g_level; }
int log_rank(void) { return g_rank; }

void log_info(const char *fmt, ...) {
    if (g_rank != 0 || g_level < LOG_NORMAL) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

void log_verbose(const char *fmt, ...) {
    if (g_rank != 0 || g_level < LOG_VERBOSE) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

void log_warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (g_size > 1) fprintf(stderr, "[rank %d] ", g_rank);
    fputs("warning: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
}

void log_all(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (g_size > 1) fprintf(stdout, "[rank %d] ", g_rank);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}
