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
//   CLFLUSH <phys> <len> crc32c=<hex>       the program wrote these cache lines back itself
//                                           (CLWB, CLFLUSHOPT or CLFLUSH, then SFENCE): the
//                                           host makes exactly them durable
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
#include <cpuid.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
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

// The cache-line write-back instruction this CPU has: CLWB keeps the line cached, CLFLUSHOPT
// and CLFLUSH evict it; all three leave it in the persistence domain once an SFENCE retires.
enum wb_insn { WB_NONE, WB_CLFLUSH, WB_CLFLUSHOPT, WB_CLWB };
static enum wb_insn wb_insn(void) {
  unsigned a, b, c, d;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    if (b & (1u << 24)) return WB_CLWB;
    if (b & (1u << 23)) return WB_CLFLUSHOPT;
  }
  if (__get_cpuid(1, &a, &b, &c, &d) && (d & (1u << 19))) return WB_CLFLUSH;
  return WB_NONE;
}

#define LINE 64
#define PAGE 4096

// Writes the cache lines of [p, p + n) back to memory, as a MAP_SYNC program must.
static void write_back_lines(const volatile uint8_t *p, size_t n, enum wb_insn insn) {
  uintptr_t a = (uintptr_t)p & ~(uintptr_t)(LINE - 1), end = (uintptr_t)p + n;
  for (; a < end; a += LINE) {
    if (insn == WB_CLWB) __asm__ volatile(".byte 0x66, 0x0f, 0xae, 0x30" ::"a"(a) : "memory");
    else if (insn == WB_CLFLUSHOPT) __asm__ volatile(".byte 0x66; clflush (%0)" ::"r"(a) : "memory");
    else __asm__ volatile("clflush (%0)" ::"r"(a) : "memory");
  }
  __asm__ volatile("sfence" ::: "memory");
}

// The physical address of the page mapped at `p` (on DAX: the persistent memory page itself).
static int phys_page(const void *p, uint64_t *phys) {
  static int mounted;
  if (!mounted && mount("proc", "/proc", "proc", 0, NULL) && errno != EBUSY)
    return fail("mount /proc (for /proc/self/pagemap)");
  mounted = 1;
  int fd = open("/proc/self/pagemap", O_RDONLY);
  if (fd < 0) return fail("open /proc/self/pagemap");
  uint64_t entry = 0;
  ssize_t r = pread(fd, &entry, sizeof entry, (off_t)((uintptr_t)p / PAGE * sizeof entry));
  close(fd);
  if (r != (ssize_t)sizeof entry) return fail("read /proc/self/pagemap");
  uint64_t pfn = entry & ((1ull << 55) - 1);
  errno = 0;
  if (!(entry >> 63) || !pfn) return fail("pagemap has no frame for %p (entry %#llx)", p,
                                          (unsigned long long)entry);
  *phys = pfn * PAGE;
  return 0;
}

// Tells the host which lines of the page at `p` were written back: [p, p + n) rounded out to
// whole lines, by physical address, with the checksum of those lines as the program sees them.
static int tell_flushed(const uint8_t *p, size_t n) {
  uint64_t phys = 0;
  if (phys_page(p, &phys)) return -1;
  uintptr_t first = (uintptr_t)p & ~(uintptr_t)(LINE - 1);
  uintptr_t end = ((uintptr_t)p + n + LINE - 1) & ~(uintptr_t)(LINE - 1);
  say("CLFLUSH %#llx %zu crc32c=%08x", (unsigned long long)(phys + first % PAGE),
      (size_t)(end - first), crc32c((const uint8_t *)first, end - first));
  return wait_ack();
}

// MAP_SYNC store + cache flush, no system call: when a write fault on a MAP_SYNC mapping
// returns, the metadata that reaches the block (allocation, extent) is durable, so writing
// the stored lines back makes them durable. Each page of a sparse file is allocated by the
// first store into it, and is claimed durable right after its lines are written back, before
// the next page's fault can sync anything. With `sync` 0 the same stores go through a plain
// MAP_SHARED mapping: the negative control, whose allocations nothing makes durable.
static int map_store_flush(const char *dir, unsigned k, int sync) {
  if (make_dir(dir)) return -1;
  enum wb_insn insn = wb_insn();
  errno = 0;
  if (insn == WB_NONE) return fail("the CPU has no cache-line flush instruction");
  char path[64];
  snprintf(path, sizeof path, "%s/region", dir);
  size_t size = 3 * PAGE, n = 2 * PAGE + 1808;
  int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0644);
  if (fd < 0) return fail("open %s", path);
  if (ftruncate(fd, size) || fsync(fd) || fsync_path(dir)) return close(fd), fail("size %s", path);
  memset(big, 0, size);
  if (tell("DURABLE", path, "size", size, big)) return close(fd), -1;
  fill(big, n, k);
  if (tell("CHANGING", path, "prefix", 0, big)) return close(fd), -1;
  int flags = sync ? MAP_SHARED_VALIDATE | MAP_SYNC : MAP_SHARED;
  uint8_t *m = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, fd, 0);
  close(fd);
  if (m == MAP_FAILED) return fail("mmap %s%s", path, sync ? " with MAP_SYNC" : "");
  for (size_t at = 0; at < n; at += PAGE) {
    size_t len = n - at < PAGE ? n - at : PAGE;
    memcpy(m + at, big + at, len);
    write_back_lines(m + at, len, insn);
    if (tell_flushed(m + at, len) || tell("DURABLE", path, "prefix", at + len, big))
      return munmap(m, size), -1;
  }
  munmap(m, size);
  return 0;
}

static int wl_mapsync(void) { return map_store_flush("/ct/mapsync", 61, 1); }

// The control of mapsync: MAP_SHARED without MAP_SYNC, cache lines written back, no msync.
static int wl_nomapsync(void) { return map_store_flush("/ct/nomapsync", 71, 0); }

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
    {"mmap", wl_mmap},     {"mapsync", wl_mapsync},   {"truncate", wl_truncate},
    {"nosync", wl_nosync}, {"nomapsync", wl_nomapsync},
};

int main(void) {
  const char *list = getenv("PMVM_WORKLOADS");
  int failed = 0;
  raw_console();
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
