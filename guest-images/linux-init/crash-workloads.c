// pmvm-crash-workload: the guest side of `pmvm crash-test`. Runs as /init on a DAX root and
// runs the workloads named in PMVM_WORKLOADS (comma-separated, in order), then powers off.
//
// What it tells the host, one console line each (docs/crash-test.md has the model):
//   DURABLE <path> size=<n> crc32c=<hex>    a sync returned: <path> holds exactly these bytes
//   DURABLE <path> prefix=<n> crc32c=<hex>  a sync returned: <path>'s first n bytes are these
//   PENDING <path> size=<n> crc32c=<hex>    an atomic replacement starts: until the next DURABLE,
//                                           <path> may hold these bytes instead
//   CHANGING <path> prefix=<n> crc32c=<hex> an in-place change starts: until the next DURABLE,
//                                           only <path>'s first n bytes are promised
//   crash-workload: <name> start | done | FAIL: <why>, and "crash-workload: all done"
// After each such line it waits for one byte on the console: the host reads the
// flush log's length before it answers, so it knows which flushes came before the line, and
// nothing of the next operation can reach a flush it has already counted.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "console.h"

#define ACK_TIMEOUT_MS 120000

static char fail_buf[256];
// Records why a workload failed; returns -1 so callers can `return fail(...)`.
static int fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(fail_buf, sizeof fail_buf, fmt, ap);
  va_end(ap);
  if (n > 0 && errno) snprintf(fail_buf + strlen(fail_buf), sizeof fail_buf - strlen(fail_buf),
                               ": %s", strerror(errno));
  return -1;
}

// Byte j of the contents numbered `k`: different for every k, so a stale block shows.
static void fill(uint8_t *buf, size_t n, unsigned k) {
  for (size_t j = 0; j < n; j++) buf[j] = (uint8_t)(j * 31 + k * 77 + (j >> 8) + 1);
}

// Waits for the host's answer to a DURABLE or PENDING line.
static int wait_ack(void) {
  struct pollfd p = {.fd = 0, .events = POLLIN};
  int r = poll(&p, 1, ACK_TIMEOUT_MS);
  char c;
  if (r == 1 && read(0, &c, 1) == 1) return 0;
  errno = 0;
  return fail("no answer from the host within %d s on the console", ACK_TIMEOUT_MS / 1000);
}

static int tell(const char *kind, const char *path, const char *len_key, size_t n,
                const uint8_t *buf) {
  say("%s %s %s=%zu crc32c=%08x", kind, path, len_key, n, crc32c(buf, n));
  return wait_ack();
}

static int fsync_path(const char *path) {
  int fd = open(path, O_RDONLY | O_DIRECTORY);
  if (fd < 0) return fail("open %s", path);
  int r = fsync(fd);
  close(fd);
  return r ? fail("fsync %s", path) : 0;
}

// Creates `dir` (one level under an existing, durable parent) and makes the entry durable.
static int make_dir(const char *dir) {
  if (mkdir(dir, 0755) && errno != EEXIST) return fail("mkdir %s", dir);
  char parent[256];
  snprintf(parent, sizeof parent, "%s", dir);
  char *slash = strrchr(parent, '/');
  if (slash == parent) slash[1] = 0;
  else if (slash) *slash = 0;
  return fsync_path(dir) || fsync_path(parent) ? -1 : 0;
}

static int write_file(const char *path, const uint8_t *buf, size_t n, int flags) {
  int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | flags, 0644);
  if (fd < 0) return fail("open %s", path);
  if (write(fd, buf, n) != (ssize_t)n) return close(fd), fail("write %s", path);
  return fd;
}

static uint8_t big[65536];

// create + write + fsync (and the directory's fsync for the new name).
static int wl_create(void) {
  if (make_dir("/ct/create")) return -1;
  for (unsigned i = 0; i < 3; i++) {
    char path[64];
    snprintf(path, sizeof path, "/ct/create/f%u", i);
    size_t n = 4096 * i + 1000;
    fill(big, n, i);
    int fd = write_file(path, big, n, 0);
    if (fd < 0) return -1;
    if (fsync(fd)) return close(fd), fail("fsync %s", path);
    close(fd);
    if (fsync_path("/ct/create") || tell("DURABLE", path, "size", n, big)) return -1;
  }
  return 0;
}

// append + fdatasync: each returned fdatasync makes the file's prefix so far durable.
static int wl_append(void) {
  if (make_dir("/ct/append")) return -1;
  const char *path = "/ct/append/log";
  int fd = open(path, O_CREAT | O_WRONLY | O_APPEND | O_TRUNC, 0644);
  if (fd < 0) return fail("open %s", path);
  if (fsync(fd) || fsync_path("/ct/append")) return close(fd), fail("fsync %s", path);
  size_t len = 0;
  fill(big, sizeof big, 11);
  for (unsigned i = 0; i < 4; i++) {
    size_t n = 1500 + 700 * i;
    if (write(fd, big + len, n) != (ssize_t)n) return close(fd), fail("append to %s", path);
    len += n;
    if (fdatasync(fd)) return close(fd), fail("fdatasync %s", path);
    if (tell("DURABLE", path, "prefix", len, big)) return close(fd), -1;
  }
  close(fd);
  return 0;
}

// rename over an existing file + directory fsync: the name holds the old or the new file,
// never neither, and the new one once the directory's fsync returned.
static int wl_rename(void) {
  if (make_dir("/ct/rename")) return -1;
  const char *target = "/ct/rename/config", *tmp = "/ct/rename/config.tmp";
  size_t n = 6000;
  fill(big, n, 21);
  int fd = write_file(target, big, n, 0);
  if (fd < 0) return -1;
  if (fsync(fd)) return close(fd), fail("fsync %s", target);
  close(fd);
  if (fsync_path("/ct/rename") || tell("DURABLE", target, "size", n, big)) return -1;
  for (unsigned round = 0; round < 2; round++) {
    size_t m = 3000 + 5000 * round;
    fill(big, m, 22 + round);
    if (tell("PENDING", target, "size", m, big)) return -1;
    fd = write_file(tmp, big, m, 0);
    if (fd < 0) return -1;
    if (fsync(fd)) return close(fd), fail("fsync %s", tmp);
    close(fd);
    if (rename(tmp, target)) return fail("rename %s to %s", tmp, target);
    if (fsync_path("/ct/rename") || tell("DURABLE", target, "size", m, big)) return -1;
  }
  return 0;
}

// mmap store + msync(MS_SYNC). Stores reach the media line by line, so while they are under
// way nothing about the region is promised.
static int wl_mmap(void) {
  if (make_dir("/ct/mmap")) return -1;
  const char *path = "/ct/mmap/region";
  size_t n = 12288;
  int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0644);
  if (fd < 0) return fail("open %s", path);
  if (ftruncate(fd, n) || fsync(fd) || fsync_path("/ct/mmap")) return close(fd), fail("size %s", path);
  uint8_t *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) return fail("mmap %s", path);
  for (unsigned round = 0; round < 2; round++) {
    fill(big, n, 31 + round);
    if (tell("CHANGING", path, "prefix", 0, big)) return munmap(m, n), -1;
    memcpy(m, big, n);
    if (msync(m, n, MS_SYNC)) return munmap(m, n), fail("msync %s", path);
    if (tell("DURABLE", path, "size", n, big)) return munmap(m, n), -1;
  }
  munmap(m, n);
  return 0;
}

// truncate down, then fallocate past the end, each followed by fsync. Truncating zeroes the
// tail of the last block in place, so during each only the bytes that stay are promised.
static int wl_truncate(void) {
  if (make_dir("/ct/truncate")) return -1;
  const char *path = "/ct/truncate/data";
  size_t n = 12288;
  fill(big, n, 41);
  int fd = write_file(path, big, n, 0);
  if (fd < 0) return -1;
  if (fsync(fd) || fsync_path("/ct/truncate")) return close(fd), fail("fsync %s", path);
  if (tell("DURABLE", path, "size", n, big)) return close(fd), -1;
  size_t small = 5000;
  if (tell("CHANGING", path, "prefix", small, big)) return close(fd), -1;
  if (ftruncate(fd, small) || fsync(fd)) return close(fd), fail("truncate %s", path);
  if (tell("DURABLE", path, "size", small, big)) return close(fd), -1;
  size_t grown = 16384;
  memset(big + small, 0, grown - small);
  if (tell("CHANGING", path, "prefix", small, big)) return close(fd), -1;
  if (fallocate(fd, 0, 0, grown) || fsync(fd)) return close(fd), fail("fallocate %s", path);
  close(fd);
  return tell("DURABLE", path, "size", grown, big);
}

// The negative control: claims durability for data it never synced. A crash-test that does
// not report it is broken.
static int wl_nosync(void) {
  if (make_dir("/ct/nosync")) return -1;
  const char *path = "/ct/nosync/unsynced";
  size_t n = 9000;
  fill(big, n, 51);
  int fd = write_file(path, big, n, 0);
  if (fd < 0) return -1;
  close(fd);
  return tell("DURABLE", path, "size", n, big);
}

static const struct {
  const char *name;
  int (*run)(void);
} workloads[] = {
    {"create", wl_create}, {"append", wl_append},     {"rename", wl_rename},
    {"mmap", wl_mmap},     {"truncate", wl_truncate}, {"nosync", wl_nosync},
};

static void quiet_console(void) {
  struct termios t;
  if (tcgetattr(0, &t)) return;
  t.c_lflag &= ~(ECHO | ICANON);
  t.c_cc[VMIN] = 1;
  t.c_cc[VTIME] = 0;
  tcsetattr(0, TCSANOW, &t);
}

int main(void) {
  const char *list = getenv("PMVM_WORKLOADS");
  int failed = 0;
  quiet_console();
  if (!list) {
    say("crash-workload: FAIL: no PMVM_WORKLOADS= on the kernel command line");
    failed = 1;
  } else if (make_dir("/ct")) {
    say("crash-workload: FAIL: %s", fail_buf);
    failed = 1;
  }
  char names[256];
  snprintf(names, sizeof names, "%s", list ? list : "");
  for (char *save = NULL, *name = strtok_r(names, ",", &save); name && !failed;
       name = strtok_r(NULL, ",", &save)) {
    size_t i = 0;
    while (i < sizeof workloads / sizeof workloads[0] && strcmp(workloads[i].name, name)) i++;
    if (i == sizeof workloads / sizeof workloads[0]) {
      say("crash-workload: %s FAIL: unknown workload", name);
      failed = 1;
      break;
    }
    say("crash-workload: %s start", name);
    errno = 0;
    if (workloads[i].run()) {
      say("crash-workload: %s FAIL: %s", name, fail_buf);
      failed = 1;
    } else {
      say("crash-workload: %s done", name);
    }
  }
  if (!failed) say("crash-workload: all done");
  if (getpid() != 1) return failed;
  sync();
  reboot(RB_POWER_OFF);
  for (;;) pause();
}
