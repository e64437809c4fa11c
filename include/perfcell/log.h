// Rank-aware logging. log_info prints on rank 0 only (progress, summaries);
// log_warn and log_all print on any rank, prefixed with the rank.
#ifndef PERFCELL_LOG_H
#define PERFCELL_LOG_H

#include "perfcell/error.h"

typedef enum { LOG_QUIET = 0, LOG_NORMAL = 1, LOG_VERBOSE = 2 } LogLevel;

void log_init(int rank, int size);
void log_set_level(LogLevel level);
LogLevel log_level(void);
int log_rank(void);

void log_info(const char *fmt, ...) PC_PRINTF(1, 2);    // rank 0, to stdout
void log_verbose(const char *fmt, ...) PC_PRINTF(1, 2); // rank 0, only at LOG_VERBOSE
void log_warn(const char *fmt, ...) PC_PRINTF(1, 2);    // any rank, to stderr
void log_all(const char *fmt, ...) PC_PRINTF(1, 2);     // any rank, to stdout

#endif
