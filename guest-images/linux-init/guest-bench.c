// pmvm-guest-bench: the guest side of scripts/bench-guest.sh. Runs as /init on a DAX root and
// times, with the guest's own clock, what an application pays to make data durable:
//   write-fsync  k=1     pwrite 4 KiB over allocated blocks, then fsync
//   msync        k=1..   store one byte to each of k pages of a mapping, then msync(MS_SYNC)
//   fdatasync    k=0     fdatasync with nothing dirty
// Environment (kernel command line): PMVM_BENCH_REPS (repetitions of each series, default
// 12; large msync series run fewer), PMVM_BENCH_MAX_PAGES (largest k, default 4096).
//
// Console lines, each followed by a wait for one byte from the host (so the host can sample
// its own counters at exactly that point, and nothing of the next step runs meanwhile):
//   guest-bench: start dax=<0|1> reps=<n> max_pages=<k>
//   guest-bench: ready <series> k=<k>           the series' setup is done, its timing not begun
//   guest-bench: done <series> k=<k> us=<t1>,<t2>,...   right after the last sync returned
//   guest-bench: all done
//   guest-bench: FAIL <why>                     and no more lines
// Then it powers off.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "console.h"

#define PAGE 4096
#define MAX_REPS 40

static const char *path = "/guest-bench.dat";

static void power_off(void) {
  sync();
  reboot(RB_POWER_OFF);
  for (;;) pause();
}

static void fail(const char *what) {
  say("guest-bench: FAIL %s: %s", what, strerror(errno));
  if (getpid() == 1) power_off();
  exit(1);
}

// One byte from the host, unechoed and without waiting for a newline.
static void wait_host(void) {
  char c;
  if (read(0, &c, 1) != 1) fail("reading the host's answer");
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static unsigned long env_num(const char *name, unsigned long dflt) {
  const char *v = getenv(name);
  return v ? strtoul(v, NULL, 10) : dflt;
}

// Prints the samples of one series and waits for the host.
static void done(const char *series, unsigned k, const uint64_t *ns, unsigned n) {
  char list[MAX_REPS * 12] = "";
  size_t at = 0;
  for (unsigned i = 0; i < n && at < sizeof list - 12; i++)
    at += snprintf(list + at, sizeof list - at, "%s%llu", i ? "," : "",
                   (unsigned long long)(ns[i] / 1000));
  say("guest-bench: done %s k=%u us=%s", series, k, list);
  wait_host();
}

static void ready(const char *series, unsigned k) {
  say("guest-bench: ready %s k=%u", series, k);
  wait_host();
}

// Fewer repetitions where one takes long: the host emulates guest kernel code on some hosts.
static unsigned reps_for(unsigned k, unsigned reps) {
  unsigned r = k >= 1024 ? reps / 4 : k >= 256 ? reps / 2 : reps;
  return r < 3 ? 3 : r;
}

int main(void) {
  raw_console();
  unsigned reps = env_num("PMVM_BENCH_REPS", 12);
  unsigned max_pages = env_num("PMVM_BENCH_MAX_PAGES", 4096);
  if (reps > MAX_REPS) reps = MAX_REPS;
  if (reps < 1) reps = 1;
  if (max_pages < 1) max_pages = 1;
  size_t len = (size_t)max_pages * PAGE;

  // Allocated, written and synced blocks, so the timed syncs make data durable, not extents.
  int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0644);
  if (fd < 0) fail("open");
  if (fallocate(fd, 0, 0, len)) fail("fallocate");
  char *page = malloc(PAGE);
  if (!page) fail("malloc");
  memset(page, 0x5a, PAGE);
  for (size_t off = 0; off < len; off += PAGE)
    if (pwrite(fd, page, PAGE, off) != PAGE) fail("pwrite (setup)");
  if (fsync(fd)) fail("fsync (setup)");
  struct statx sx;
  int dax = statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &sx) == 0 &&
            (sx.stx_attributes & STATX_ATTR_DAX) != 0;
  char *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) fail("mmap");
  say("guest-bench: start dax=%d reps=%u max_pages=%u", dax, reps, max_pages);
  wait_host();

  uint64_t ns[MAX_REPS];
  uint8_t gen = 0;

  ready("write-fsync", 1);
  for (unsigned i = 0; i < reps; i++) {
    page[0] = ++gen;
    uint64_t t = now_ns();
    if (pwrite(fd, page, PAGE, (off_t)(i % max_pages) * PAGE) != PAGE) fail("pwrite");
    if (fsync(fd)) fail("fsync");
    ns[i] = now_ns() - t;
  }
  done("write-fsync", 1, ns, reps);

  for (unsigned k = 1; k <= max_pages; k *= 4) {
    unsigned n = reps_for(k, reps);
    ready("msync", k);
    for (unsigned i = 0; i < n; i++) {
      gen++;
      uint64_t t = now_ns();
      for (unsigned p = 0; p < k; p++) map[(size_t)p * PAGE] = (char)gen;
      if (msync(map, (size_t)k * PAGE, MS_SYNC)) fail("msync");
      ns[i] = now_ns() - t;
    }
    done("msync", k, ns, n);
  }

  ready("fdatasync", 0);
  for (unsigned i = 0; i < reps; i++) {
    uint64_t t = now_ns();
    if (fdatasync(fd)) fail("fdatasync");
    ns[i] = now_ns() - t;
  }
  done("fdatasync", 0, ns, reps);

  munmap(map, len);
  close(fd);
  unlink(path);
  say("guest-bench: all done");
  if (getpid() == 1) power_off();
  return 0;
}
