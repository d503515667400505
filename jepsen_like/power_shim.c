/* Power-loss shim for the harness's `power` nemesis (jepsen_like/power.py builds and loads it).
 *
 * Preloaded into node processes (LD_PRELOAD), it keeps an undo log of every write that is not yet durable
 * to a regular file under $RAFTKV_POWER_ROOT, so that after the process is killed the harness can put each
 * file back as it was at its last fsync: what a power loss does to a page cache that never got flushed.
 *
 * The model (jepsen_like/power.py has the reasoning):
 *   - a write(2) family call to a file opened without O_SYNC/O_DSYNC is volatile until an fsync or
 *     fdatasync of that file starts; a write through an O_SYNC/O_DSYNC descriptor is durable when it returns;
 *   - the undo log of a file is dropped when an fsync/fdatasync of it STARTS, so a kill during the fsync
 *     leaves every write in place: one of the outcomes a power loss during an fsync may really have;
 *   - directory entries (create, rename, unlink) are durable at once: this shim does not model lost
 *     renames (a missing directory fsync goes unnoticed);
 *   - the undo record is appended before the write is done, both under one lock that fsync also takes, so
 *     an undo log never lacks a write that reached the file; a record cut short by a kill is ignored.
 *
 * Undo log: $RAFTKV_POWER_LOG/<dev>-<ino>.undo, little-endian records:
 *   'P' u32 n, n bytes          the file's path (the last one wins: renames append one)
 *   'W' u64 off, u64 old_size, u32 n, n bytes   a write at off; n old bytes at off (those below old_size)
 *   'T' u64 len, u64 old_size, u32 n, n bytes   a truncation to len; n old bytes at len when it shrank
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FILES 4096

struct tracked {
    dev_t dev;
    ino_t ino;
    int state; /* 0 unused, 1 tracked, 2 not tracked */
    int undo_fd;
    int read_fd;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct tracked files[MAX_FILES];
static char root[PATH_MAX];
static char logdir[PATH_MAX];
static int enabled = -1;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);

static void init(void) {
    if (enabled != -1) return;
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_pwritev64 = dlsym(RTLD_NEXT, "pwritev64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    real_rename = dlsym(RTLD_NEXT, "rename");
    real_renameat = dlsym(RTLD_NEXT, "renameat");
    const char *r = getenv("RAFTKV_POWER_ROOT"), *l = getenv("RAFTKV_POWER_LOG");
    if (!r || !l || !realpath(r, root) || !realpath(l, logdir)) {
        enabled = 0;
        return;
    }
    enabled = 1;
}

static int under_root(const char *path) {
    size_t n = strlen(root);
    return strncmp(path, root, n) == 0 && (path[n] == '/' || path[n] == 0);
}

static void put_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = real_write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return; /* the harness reads a short record as cut short */
        }
        p += w;
        n -= (size_t)w;
    }
}

static void log_path(int undo_fd, const char *path) {
    unsigned char t = 'P';
    uint32_t n = (uint32_t)strlen(path);
    char buf[PATH_MAX + 8];
    buf[0] = (char)t;
    memcpy(buf + 1, &n, 4);
    memcpy(buf + 5, path, n);
    put_all(undo_fd, buf, 5 + n);
}

static int fd_path(int fd, char *out) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n < 0) return -1;
    out[n] = 0;
    return 0;
}

static void undo_name(char *out, dev_t dev, ino_t ino) {
    snprintf(out, PATH_MAX, "%s/%llu-%llu.undo", logdir, (unsigned long long)dev, (unsigned long long)ino);
}

/* The tracked entry for fd's file, or NULL (not a regular file under the root, or writes to it are synchronous).
 * Called with the lock held; fills *st. */
static struct tracked *lookup(int fd, struct stat *st) {
    init();
    if (enabled != 1) return NULL;
    if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) return NULL;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & (O_SYNC | O_DSYNC))) return NULL;
    struct tracked *free_slot = NULL;
    for (int i = 0; i < MAX_FILES; i++) {
        if (files[i].state == 0) {
            if (!free_slot) free_slot = &files[i];
            continue;
        }
        if (files[i].dev == st->st_dev && files[i].ino == st->st_ino)
            return files[i].state == 1 ? &files[i] : NULL;
    }
    if (!free_slot) return NULL;
    char path[PATH_MAX];
    free_slot->dev = st->st_dev;
    free_slot->ino = st->st_ino;
    free_slot->state = 2;
    if (fd_path(fd, path) != 0 || !under_root(path)) return NULL;
    char name[PATH_MAX], proc[64];
    undo_name(name, st->st_dev, st->st_ino);
    free_slot->undo_fd = open(name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    free_slot->read_fd = open(proc, O_RDONLY | O_CLOEXEC);
    if (free_slot->undo_fd < 0 || free_slot->read_fd < 0) {
        fprintf(stderr, "power shim: cannot track %s: %s\n", path, strerror(errno));
        abort(); /* an untracked write would make the power fault lie */
    }
    log_path(free_slot->undo_fd, path);
    free_slot->state = 1;
    return free_slot;
}

static void forget(struct tracked *t) {
    char name[PATH_MAX];
    undo_name(name, t->dev, t->ino);
    close(t->undo_fd);
    close(t->read_fd);
    real_unlink(name);
    t->state = 0;
}

/* Append one undo record: kind, off, the file's size, and the n bytes the file holds at off now. */
static void log_record(struct tracked *t, char kind, off_t off, off_t size, size_t n) {
    char *buf = malloc(21 + n);
    if (!buf) abort();
    uint64_t o = (uint64_t)off, s = (uint64_t)size;
    uint32_t n32 = (uint32_t)n;
    buf[0] = kind;
    memcpy(buf + 1, &o, 8);
    memcpy(buf + 9, &s, 8);
    memcpy(buf + 17, &n32, 4);
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(t->read_fd, buf + 21 + got, n - got, off + (off_t)got);
        if (r <= 0) break;
        got += (size_t)r;
    }
    if (got < n) memset(buf + 21 + got, 0, n - got);
    put_all(t->undo_fd, buf, 21 + n);
    free(buf);
}

/* Before a write of len bytes at off: the old bytes there (those below the size). */
static void log_write(struct tracked *t, off_t off, size_t len, off_t size) {
    size_t n = 0;
    if (off < size) n = (size_t)(size - off) < len ? (size_t)(size - off) : len;
    log_record(t, 'W', off, size, n);
}

/* Before a truncation to len: the bytes it cuts off, if it shrinks the file. */
static void log_truncate(struct tracked *t, off_t len, off_t size) {
    log_record(t, 'T', len, size, len < size ? (size_t)(size - len) : 0);
}

static size_t iov_len(const struct iovec *iov, int cnt) {
    size_t n = 0;
    for (int i = 0; i < cnt; i++) n += iov[i].iov_len;
    return n;
}

/* A positional write: off >= 0; a write at the file offset: off == -1. */
static void before_write(int fd, off_t off, size_t len) {
    struct stat st;
    struct tracked *t = lookup(fd, &st);
    if (!t) return;
    if (off < 0) off = (fcntl(fd, F_GETFL) & O_APPEND) ? st.st_size : lseek(fd, 0, SEEK_CUR);
    if (off >= 0) log_write(t, off, len, st.st_size);
}

ssize_t write(int fd, const void *buf, size_t n) {
    init();
    pthread_mutex_lock(&lock);
    before_write(fd, -1, n);
    ssize_t r = real_write(fd, buf, n);
    pthread_mutex_unlock(&lock);
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    init();
    pthread_mutex_lock(&lock);
    before_write(fd, off, n);
    ssize_t r = real_pwrite(fd, buf, n, off);
    pthread_mutex_unlock(&lock);
    return r;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    init();
    pthread_mutex_lock(&lock);
    before_write(fd, off, n);
    ssize_t r = real_pwrite64(fd, buf, n, off);
    pthread_mutex_unlock(&lock);
    return r;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    init();
    pthread_mutex_lock(&lock);
    before_write(fd, -1, iov_len(iov, cnt));
    ssize_t r = real_writev(fd, iov, cnt);
    pthread_mutex_unlock(&lock);
    return r;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    init();
    pthread_mutex_lock(&lock);
    before_write(fd, off, iov_len(iov, cnt));
    ssize_t r = real_pwritev(fd, iov, cnt, off);
    pthread_mutex_unlock(&lock);
    return r;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    init();
    pthread_mutex_lock(&lock);
    before_write(fd, off, iov_len(iov, cnt));
    ssize_t r = real_pwritev64(fd, iov, cnt, off);
    pthread_mutex_unlock(&lock);
    return r;
}

static int do_ftruncate(int (*real)(int, off_t), int fd, off_t len) {
    init();
    pthread_mutex_lock(&lock);
    struct stat st;
    struct tracked *t = lookup(fd, &st);
    if (t) log_truncate(t, len, st.st_size);
    int r = real(fd, len);
    pthread_mutex_unlock(&lock);
    return r;
}

int ftruncate(int fd, off_t len) {
    init();
    return do_ftruncate(real_ftruncate, fd, len);
}

int ftruncate64(int fd, off_t len) {
    init();
    return do_ftruncate(real_ftruncate64, fd, len);
}

/* An fsync starting makes every write so far durable (see the model above): drop the undo log. */
static void synced(int fd) {
    pthread_mutex_lock(&lock);
    struct stat st;
    struct tracked *t = lookup(fd, &st);
    if (t) {
        char path[PATH_MAX];
        if (real_ftruncate(t->undo_fd, 0) == 0 && fd_path(fd, path) == 0) log_path(t->undo_fd, path);
    }
    pthread_mutex_unlock(&lock);
}

int fsync(int fd) {
    init();
    synced(fd);
    return real_fsync(fd);
}

int fdatasync(int fd) {
    init();
    synced(fd);
    return real_fdatasync(fd);
}

/* The tracked entry of the file at path (no new tracking), with the lock held. */
static struct tracked *by_path(int dirfd, const char *path) {
    struct stat st;
    if (enabled != 1 || fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) != 0) return NULL;
    for (int i = 0; i < MAX_FILES; i++)
        if (files[i].state == 1 && files[i].dev == st.st_dev && files[i].ino == st.st_ino) return &files[i];
    if (!S_ISREG(st.st_mode)) return NULL;
    /* A file another process wrote (a node before its restart): its undo log may exist without an entry. */
    char name[PATH_MAX];
    undo_name(name, st.st_dev, st.st_ino);
    if (access(name, F_OK) != 0) return NULL;
    for (int i = 0; i < MAX_FILES; i++) {
        if (files[i].state != 0) continue;
        files[i].dev = st.st_dev;
        files[i].ino = st.st_ino;
        files[i].undo_fd = open(name, O_WRONLY | O_APPEND | O_CLOEXEC);
        files[i].read_fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC);
        files[i].state = 1;
        return &files[i];
    }
    return NULL;
}

static void drop_slot_of(dev_t dev, ino_t ino) {
    for (int i = 0; i < MAX_FILES; i++)
        if (files[i].state == 2 && files[i].dev == dev && files[i].ino == ino) files[i].state = 0;
}

int unlinkat(int dirfd, const char *path, int flags) {
    init();
    pthread_mutex_lock(&lock);
    struct stat st;
    if (enabled == 1 && fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) == 0) drop_slot_of(st.st_dev, st.st_ino);
    struct tracked *t = (flags & AT_REMOVEDIR) ? NULL : by_path(dirfd, path);
    int r = real_unlinkat(dirfd, path, flags);
    if (r == 0 && t) forget(t); /* deletion is durable at once: its unsynced writes are moot */
    pthread_mutex_unlock(&lock);
    return r;
}

int unlink(const char *path) { return unlinkat(AT_FDCWD, path, 0); }

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    init();
    pthread_mutex_lock(&lock);
    struct stat st;
    if (enabled == 1 && fstatat(newdirfd, newpath, &st, AT_SYMLINK_NOFOLLOW) == 0) drop_slot_of(st.st_dev, st.st_ino);
    struct tracked *replaced = by_path(newdirfd, newpath);
    struct tracked *moved = by_path(olddirfd, oldpath);
    if (moved == replaced) replaced = NULL;
    int r = real_renameat(olddirfd, oldpath, newdirfd, newpath);
    if (r == 0) {
        if (replaced) forget(replaced);
        if (moved) {
            char full[PATH_MAX];
            int fd = openat(newdirfd, newpath, O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                if (fd_path(fd, full) == 0) log_path(moved->undo_fd, full);
                close(fd);
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return r;
}

int rename(const char *oldpath, const char *newpath) { return renameat(AT_FDCWD, oldpath, AT_FDCWD, newpath); }
