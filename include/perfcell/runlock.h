// One writer per folder: a lock file, held for the life of a command, that
// refuses a second pretrain / finetune run in the same run folder and a second
// `perfcell-shard build` into the same --out.
//
// The lock is an flock() on the lock file, which holds the text "HOST PID" of
// its holder. flock() locks vanish with the process that took them, so a lock
// file left behind by a killed command (kill -9, a node lost) blocks nothing:
// the next command takes it over. On NFS, Linux implements flock() with
// fcntl() byte-range locks (NFSv4 locks; NFSv3 needs the NLM lock service,
// and a mount with -o local_lock=flock or =all makes the lock local to one
// machine). The holder removes the file when it releases the lock; a taker
// checks after locking that the file it locked is still the one at the path,
// so that removal never lets two commands hold the lock at once.
//
// Not collective: the caller (rank 0) takes the lock and agrees on the result
// with the other ranks.
#ifndef PERFCELL_RUNLOCK_H
#define PERFCELL_RUNLOCK_H

#include <stddef.h>

// The name of the lock file inside a run folder.
#define RUNLOCK_FILE "perfcell.lock"

typedef struct {
    int fd;         // -1 while not held
    char *path;     // the lock file
    char **made;    // folders made for this command, deepest first, removed with the lock until kept
    size_t n_made;
} RunLock;

void runlock_init(RunLock *l);
// Take the lock file `path` for `what` (the folder it protects, named in
// messages). Returns 0, or -1 with error_set() and a HINT naming the holder's
// host and pid when another command holds it. The lock is released by
// runlock_release(), and also when the process exits or dies on an error.
int runlock_acquire(RunLock *l, const char *path, const char *what);
// `folder` was created by this command just before the lock was taken, and
// with it every folder from `top` (path_first_missing() before the folder was
// made; NULL: nothing was made) down: until runlock_keep_folder(), releasing
// the lock (or dying) removes them again, so a refused start leaves no trace.
// They must hold nothing but the lock file.
void runlock_own_folder(RunLock *l, const char *folder, const char *top);
// The command starts writing into its folder: keep it whatever happens next.
void runlock_keep_folder(RunLock *l);
// Remove the lock file and release the lock (a no-op when not held).
void runlock_release(RunLock *l);

#endif
