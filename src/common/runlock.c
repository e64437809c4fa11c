// One writer per folder: flock() on a lock file holding "HOST PID".
#include "perfcell/runlock.h"

#include "perfcell/error.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

// ---------------------------------------------------------------------------
// Locks held by this process, released at exit() (the trainer's agreed errors
// end with exit(1)); a fatal error goes through error_cleanup_add() instead.

#define HELD_MAX 4
static RunLock *g_held[HELD_MAX];
static int g_atexit_done;

// Newest first: a folder made inside an earlier lock's folder goes first.
static void release_all(void) {
    for (int i = HELD_MAX - 1; i >= 0; i--)
        if (g_held[i]) runlock_release(g_held[i]);
}

// A termination signal before the command installs its own handlers (mpirun
// sends SIGTERM to every rank when one rank aborts, e.g. on a refused start):
// remove the lock file and the folder made for the command, then die of the
// signal. unlink() and rmdir() are async-signal-safe.
static void on_signal(int sig) {
    for (int i = HELD_MAX - 1; i >= 0; i--) {
        if (!g_held[i]) continue;
        unlink(g_held[i]->path);
        for (size_t k = 0; k < g_held[i]->n_made; k++) rmdir(g_held[i]->made[k]);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void handlers_install(void) {
    const int sigs[3] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++) {
        struct sigaction old;
        if (sigaction(sigs[i], NULL, &old) != 0 || old.sa_handler != SIG_DFL) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(sigs[i], &sa, NULL);
    }
}

static void held_add(RunLock *l) {
    if (!g_atexit_done) {
        atexit(release_all);
        handlers_install();
        g_atexit_done = 1;
    }
    for (int i = 0; i < HELD_MAX; i++) {
        if (!g_held[i]) {
            g_held[i] = l;
            return;
        }
    }
    DIE("internal: more than %d run locks held", HELD_MAX);
}

static void held_remove(RunLock *l) {
    for (int i = 0; i < HELD_MAX; i++)
        if (g_held[i] == l) g_held[i] = NULL;
}

// ---------------------------------------------------------------------------

void runlock_init(RunLock *l) {
    l->fd = -1;
    l->path = NULL;
    l->made = NULL;
    l->n_made = 0;
}

// The holder's "HOST PID" text, or "" while the holder has not written it yet
// (it writes right after locking: try a few times).
static void read_holder(const char *path, char *host, size_t host_len, long *pid) {
    host[0] = '\0';
    *pid = -1;
    for (int attempt = 0; attempt < 20 && *pid < 0; attempt++) {
        if (attempt > 0) nanosleep(&(struct timespec){0, 25 * 1000 * 1000}, NULL);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        char line[512] = "";
        if (fgets(line, sizeof line, f)) {
            char h[256];
            long p;
            if (sscanf(line, "%255s %ld", h, &p) == 2 && p > 0) {
                snprintf(host, host_len, "%s", h);
                *pid = p;
            }
        }
        fclose(f);
    }
}

int runlock_acquire(RunLock *l, const char *path, const char *what) {
    runlock_init(l);
    for (;;) {
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) {
            error_set("cannot create the lock file '%s' of '%s': %s", path, what, strerror(errno));
            return error_set_hint("check that the folder exists and can be written");
        }
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            int e = errno;
            close(fd);
            if (e != EWOULDBLOCK) {
                error_set("cannot lock '%s' (for '%s'): %s", path, what, strerror(e));
                return error_set_hint("on NFS the lock needs the server's lock service (NFSv4, or "
                                      "NFSv3 with lockd) and a mount without -o nolock");
            }
            char host[256];
            long pid;
            read_holder(path, host, sizeof host, &pid);
            if (pid > 0)
                error_set("'%s' is in use by another perfcell command: pid %ld on host %s holds %s",
                          what, pid, host, path);
            else
                error_set("'%s' is in use by another perfcell command, which holds %s", what, path);
            return error_set_hint("wait for that command to finish (or stop it), or choose another "
                                  "folder; a lock left by a killed command does not block, so the "
                                  "holder is running");
        }
        // The holder before us may have removed the file between our open and
        // our lock: then we locked an unlinked file, and must start again.
        struct stat a, b;
        if (fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
            l->fd = fd;
            break;
        }
        close(fd);
    }
    l->path = xstrdup(path);
    char host[256] = "unknown";
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = '\0';
    char text[320];
    int n = snprintf(text, sizeof text, "%s %ld\n", host, (long)getpid());
    // The text only names the holder in messages: a failure to write it (a full
    // disk) leaves the lock held and the file empty.
    if (ftruncate(l->fd, 0) == 0 && pwrite(l->fd, text, (size_t)n, 0) == n) fsync(l->fd);
    error_cleanup_add(l->path);
    held_add(l);
    return 0;
}

void runlock_own_folder(RunLock *l, const char *folder, const char *top) {
    if (l->fd < 0 || !top) return;
    // The prefixes of `folder` from `top` down to it, deepest first.
    size_t n = strlen(folder), t = strlen(top);
    while (n > 1 && folder[n - 1] == '/') n--;
    while (t > 1 && top[t - 1] == '/') t--;
    if (t > n || strncmp(folder, top, t) != 0) return;
    size_t count = 1;
    for (size_t i = t; i < n; i++) count += folder[i] == '/' && folder[i - 1] != '/';
    l->made = xcalloc(count, sizeof *l->made);
    for (size_t i = n; i >= t && l->n_made < count; i--) {
        if (i == n || (folder[i] == '/' && folder[i - 1] != '/')) {
            char *d = xmalloc(i + 1);
            memcpy(d, folder, i);
            d[i] = '\0';
            l->made[l->n_made++] = d;
            // Registered after the lock file and deepest first, so a fatal
            // error removes the lock file and then each (then empty) folder.
            error_cleanup_add(d);
        }
        if (i == 0) break;
    }
}

void runlock_keep_folder(RunLock *l) {
    for (size_t k = 0; k < l->n_made; k++) {
        error_cleanup_remove(l->made[k]);
        free(l->made[k]);
    }
    free(l->made);
    l->made = NULL;
    l->n_made = 0;
}

void runlock_release(RunLock *l) {
    if (l->fd < 0) return;
    held_remove(l);
    // Removed while still locked: a command waiting on the old file sees that
    // it no longer is the one at the path and starts again.
    unlink(l->path);
    error_cleanup_remove(l->path);
    close(l->fd);
    l->fd = -1;
    for (size_t k = 0; k < l->n_made; k++) rmdir(l->made[k]);
    runlock_keep_folder(l);
    free(l->path);
    l->path = NULL;
}
