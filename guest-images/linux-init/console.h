// What the static guest programs (pmvm-init.c, crash-workloads.c, guest-bench.c) share:
// console lines, the console's raw mode and the checksum the host verifies.
#ifndef PMVM_GUEST_CONSOLE_H
#define PMVM_GUEST_CONSOLE_H
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <termios.h>
#include <unistd.h>

__attribute__((format(printf, 1, 2))) static inline void say(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  // One write per line, so lines of different processes never interleave.
  (void)!write(1, buf, n);
}

// Console input byte by byte, unechoed: the host answers a line with one byte, and its
// answers must not show up in the output the host parses.
static inline void raw_console(void) {
  struct termios t;
  if (tcgetattr(0, &t)) return;
  t.c_lflag &= ~(ECHO | ICANON);
  t.c_cc[VMIN] = 1;
  t.c_cc[VTIME] = 0;
  tcsetattr(0, TCSANOW, &t);
}

// CRC-32C, bitwise: small and enough for a few pages.
static inline uint32_t crc32c(const uint8_t *p, size_t n) {
  uint32_t c = ~0u;
  while (n--) {
    c ^= *p++;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82f63b78 & -(c & 1));
  }
  return ~c;
}
#endif
