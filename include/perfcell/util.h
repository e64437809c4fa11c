// Small shared helpers: hashing, clocks, files and strings.
#ifndef PERFCELL_UTIL_H
#define PERFCELL_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

// 64-bit FNV-1a; `h` is the running state (start with HASH_FNV_INIT).
#define HASH_FNV_INIT 0xcbf29ce484222325ull
uint64_t hash_fnv64(uint64_t h, const void *data, size_t n);
// CRC-32 (zlib polynomial); `crc` is the running value (start with 0).
uint32_t hash_crc32(uint32_t crc, const void *data, size_t n);

double time_now(void);      // monotonic seconds
size_t mem_peak_rss(void);  // peak resident set size of this process, bytes

// Filesystem. Return 0 on success, -1 with error_set() on failure.
int path_is_dir(const char *path);
int path_exists(const char *path);
int path_mkdir_p(const char *path);
// The shortest prefix of `path` (at a '/') that does not exist: the first
// folder path_mkdir_p() would make. NULL when `path` exists. Malloc'ed.
char *path_first_missing(const char *path);
int64_t path_file_size(const char *path); // -1 if missing
// Join two path parts into a new string.
char *path_join(const char *dir, const char *name);
// Create or truncate `path`, write `data` and fsync it; on failure the file
// is removed (no partial file is left).
int file_write_synced(const char *path, const void *data, size_t n);
// Write `data` to `path` atomically: temp file, fsync, rename, fsync of the folder.
int file_write_atomic(const char *path, const void *data, size_t n);
// The operating system's reason a write to `path` failed, for messages ("No
// space left on device"): `err` (errno right after the failure) when it is a
// write error, else what the file system and the limits show (the folder's file
// system full, the file at the size limit of ulimit -f); "" when none shows.
const char *path_write_cause(const char *path, int err, char *buf, size_t len);
// Before writing the output file `out` (and before any work): its folder must
// exist; it must not be one of the n_inputs files or folders the command reads
// (compared by device and inode, so another path to the same file, a symlink
// or a hard link, counts) nor a file inside an input folder; and an existing
// `out` is refused unless `force`. Returns 0, or -1 with error_set() and a
// HINT. The output itself is then written to a temporary file in the same
// folder and renamed over `out`.
int path_out_check(const char *out, int force, const char *const *inputs, size_t n_inputs);
// fsync a file or directory by path.
int path_fsync(const char *path);
// Read a whole file; returns NULL with error_set() on failure. Adds a NUL byte.
char *file_read_all(const char *path, size_t *len);

// Strings.
size_t str_edit_distance(const char *a, const char *b);
char *str_trim(char *s); // in place, returns s advanced past leading spaces
int str_ends_with(const char *s, const char *suffix);
// Parse a whole string as a number; return 0 on success, -1 otherwise.
int str_to_long(const char *s, long *out);
int str_to_double(const char *s, double *out);

// Human-readable byte counts ("12.3 MiB") into buf.
const char *fmt_bytes(double bytes, char buf[32]);

#endif
