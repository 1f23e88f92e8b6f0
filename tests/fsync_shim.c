/* LD_PRELOAD shim for the tests: a disk that fails or is slow, for files only.
 * fsync/fdatasync fail with EIO on files whose path contains $EIO_SHIM_MATCH, and take
 * $SLOW_SHIM_MS milliseconds longer on files whose path contains $SLOW_SHIM_MATCH (a
 * network filesystem's fsync). Everything else goes to the real libc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int matches(int fd, const char *var) {
    const char *want = getenv(var);
    char link[64], path[4096];
    ssize_t n;
    if (!want || !*want) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strstr(path, want) != NULL;
}

static void slow(int fd) {
    const char *ms = getenv("SLOW_SHIM_MS");
    if (ms && matches(fd, "SLOW_SHIM_MATCH")) {
        long n = atol(ms);
        struct timespec ts = {n / 1000, (n % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (matches(fd, "EIO_SHIM_MATCH")) { errno = EIO; return -1; }
    slow(fd);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (matches(fd, "EIO_SHIM_MATCH")) { errno = EIO; return -1; }
    slow(fd);
    return real(fd);
}
