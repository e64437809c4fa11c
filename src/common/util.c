// Small shared helpers.
#include "perfcell/util.h"

#include "perfcell/error.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

uint64_t hash_fnv64(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

uint32_t hash_crc32(uint32_t crc, const void *data, size_t n) {
    const unsigned char *p = data;
    // zlib takes a uInt length: feed large buffers in pieces.
    while (n > 0) {
        uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = (uint32_t)crc32(crc, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return crc;
}

double time_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

size_t mem_peak_rss(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
    return (size_t)ru.ru_maxrss * 1024;
}

int path_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int64_t path_file_size(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    return (int64_t)st.st_size;
}

// Free space below which a failed write is put down to a full file system: a
// write that fails leaves no more than a few blocks free.
#define WRITE_CAUSE_FREE_BYTES ((uint64_t)256 << 10)

const char *path_write_cause(const char *path, int err, char *buf, size_t len) {
    buf[0] = '\0';
    if (err == ENOSPC || err == EDQUOT || err == EFBIG || err == EIO || err == EROFS) {
        snprintf(buf, len, "%s", strerror(err));
        return buf;
    }
    // The file's folder, or the one above when another process removed it (a
    // failed parallel build removes its partial folder).
    char *dir = xstrdup(path);
    struct statvfs fs;
    int got = statvfs(dirname(dir), &fs) == 0 || statvfs(dirname(dir), &fs) == 0;
    if (got && (uint64_t)fs.f_bavail * fs.f_frsize < WRITE_CAUSE_FREE_BYTES)
        snprintf(buf, len, "%s (%llu bytes free on its file system)", strerror(ENOSPC),
                 (unsigned long long)fs.f_bavail * fs.f_frsize);
    free(dir);
    struct rlimit rl;
    int64_t size = path_file_size(path);
    if (!buf[0] && getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && size >= 0 &&
        (uint64_t)size + WRITE_CAUSE_FREE_BYTES >= (uint64_t)rl.rlim_cur)
        snprintf(buf, len, "%s (the file size limit, ulimit -f, is %llu bytes)", strerror(EFBIG),
                 (unsigned long long)rl.rlim_cur);
    return buf;
}

int path_out_check(const char *out, int force, const char *const *inputs, size_t n_inputs) {
    char *copy = xstrdup(out);
    char *dir = dirname(copy);
    int rc = 0;
    struct stat so, sd, si;
    if (stat(dir, &sd) != 0 || !S_ISDIR(sd.st_mode)) {
        rc = error_set("cannot write '%s': the output folder '%s' does not exist", out, dir);
        error_set_hint("create the folder first (mkdir -p '%s'), or correct the path", dir);
    } else if (stat(out, &so) == 0) {
        for (size_t i = 0; i < n_inputs && rc == 0; i++) {
            if (!inputs[i] || stat(inputs[i], &si) != 0) continue;
            if (si.st_dev == so.st_dev && si.st_ino == so.st_ino) {
                rc = error_set("output '%s' is the input '%s' (the same file); writing it would destroy "
                               "the input", out, inputs[i]);
            } else if (S_ISDIR(si.st_mode) && si.st_dev == sd.st_dev && si.st_ino == sd.st_ino) {
                rc = error_set("output '%s' is a file of the input folder '%s'; writing it would "
                               "damage the input", out, inputs[i]);
            }
            if (rc != 0) error_set_hint("choose another --out (--force never replaces an input)");
        }
        if (rc == 0 && S_ISDIR(so.st_mode)) {
            rc = error_set("output '%s' exists and is a folder", out);
            error_set_hint("give a file name to --out");
        } else if (rc == 0 && !force) {
            rc = error_set("output '%s' already exists", out);
            error_set_hint("pass --force to replace it, or choose another --out");
        }
    }
    free(copy);
    return rc;
}

char *path_first_missing(const char *path) {
    if (path_exists(path)) return NULL;
    char *tmp = xstrdup(path);
    size_t n = strlen(tmp);
    for (size_t i = 1; i < n; i++) {
        if (tmp[i] != '/' || tmp[i - 1] == '/') continue;
        tmp[i] = '\0';
        if (!path_exists(tmp)) return tmp;
        tmp[i] = '/';
    }
    return tmp;
}

int path_mkdir_p(const char *path) {
    char *tmp = xstrdup(path);
    size_t n = strlen(tmp);
    for (size_t i = 1; i <= n; i++) {
        if (tmp[i] == '/' || tmp[i] == '\0') {
            char c = tmp[i];
            tmp[i] = '\0';
            if (mkdir(tmp, 0777) != 0 && errno != EEXIST) {
                int e = errno;
                free(tmp);
                return error_set("cannot create folder '%s': %s", path, strerror(e));
            }
            tmp[i] = c;
        }
    }
    free(tmp);
    if (!path_is_dir(path)) return error_set("'%s' exists and is not a folder", path);
    return 0;
}

char *path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *s = xmalloc(a + b + 2);
    memcpy(s, dir, a);
    size_t k = a;
    if (a > 0 && dir[a - 1] != '/') s[k++] = '/';
    memcpy(s + k, name, b + 1);
    return s;
}

int path_fsync(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return error_set("cannot open '%s' to sync it: %s", path, strerror(errno));
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    // Some file systems refuse fsync on folders (EINVAL); that is not a data loss.
    if (rc != 0 && e != EINVAL) return error_set("fsync of '%s' failed: %s", path, strerror(e));
    return 0;
}

int file_write_synced(const char *path, const void *data, size_t n) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return error_set("cannot create '%s': %s", path, strerror(errno));
    const char *p = data;
    size_t left = n;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            unlink(path);
            return error_set("cannot write '%s': %s", path, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    int rc = fsync(fd);
    int e = errno;
    if (close(fd) != 0 && rc == 0) {
        rc = -1;
        e = errno;
    }
    if (rc != 0) {
        unlink(path);
        return error_set("cannot write '%s': flushing it to disk: %s", path, strerror(e));
    }
    return 0;
}

int file_write_atomic(const char *path, const void *data, size_t n) {
    size_t len = strlen(path);
    char *tmp = xmalloc(len + 32);
    snprintf(tmp, len + 32, "%s.tmp.%ld", path, (long)getpid());
    if (file_write_synced(tmp, data, n) != 0) {
        free(tmp);
        return -1;
    }
    if (rename(tmp, path) != 0) {
        error_set("cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
        unlink(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    char *d = xstrdup(path);
    int rc = path_fsync(dirname(d));
    free(d);
    return rc;
}

char *file_read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        error_set("cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        if (n + 1 >= cap) buf = xrealloc(buf, cap *= 2);
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        error_set("cannot read '%s'", path);
        return NULL;
    }
    buf[n] = '\0';
    if (len) *len = n;
    return buf;
}

size_t str_edit_distance(const char *a, const char *b) {
    size_t n = strlen(a), m = strlen(b);
    size_t *row = xmalloc((m + 1) * sizeof *row);
    for (size_t j = 0; j <= m; j++) row[j] = j;
    for (size_t i = 1; i <= n; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= m; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    size_t d = row[m];
    free(row);
    return d;
}

char *str_trim(char *s) {
    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        s[--n] = '\0';
    return s;
}

int str_ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

int str_to_long(const char *s, long *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

int str_to_double(const char *s, double *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

const char *fmt_bytes(double bytes, char buf[32]) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024.0 && u < 4) {
        bytes /= 1024.0;
        u++;
    }
    snprintf(buf, 32, u ? "%.1f %s" : "%.0f %s", bytes, unit[u]);
    return buf;
}
