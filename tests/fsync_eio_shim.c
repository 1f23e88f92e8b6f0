/* LD_PRELOAD shim for the tests: fsync/fdatasync fail with EIO on files whose path
 * contains $EIO_SHIM_MATCH. Everything else goes to the real libc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int matches(int fd) {
    const char *want = getenv("EIO_SHIM_MATCH");
    char link[64], path[4096];
    ssize_t n;
    if (!want || !*want) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strstr(path, want) != NULL;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (matches(fd)) { errno = EIO; return -1; }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (matches(fd)) { errno = EIO; return -1; }
    return real(fd);
}
