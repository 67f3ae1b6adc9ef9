// pmvm-init: a small static /init for Linux guests of pmvm's tests.
//
// The kernel passes unknown `KEY=value` command-line words to init as its environment, so the
// mode comes from PMVM_INIT:
//   checks     (default) every system-call path a guest kernel must get right: one line per check,
//              "pmvm-init: check NAME ok" or "pmvm-init: check NAME FAIL: why", then
//              "pmvm-init: checks done: N ok, M failed", then power off
//   dax-fsync  write PMVM_PROOF_PATH (default /proof.bin; PMVM_PROOF_BYTES bytes, default 16384,
//              of a fixed pattern), fsync it and its directory, print "pmvm-init: proof ...",
//              then power off when it is init
//   pause      print "pmvm-init: user space runs" and wait forever (the host inspects the guest)
//   exec-child what the execve check runs: print a line and exit 7
// With PMVM_WAIT_HOST=1 it first waits for a line on the console.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "console.h"

static int passed, failed;
static const char *self = "/init";

static void result(const char *name, const char *why) {
  if (why) {
    failed++;
    say("pmvm-init: check %s FAIL: %s", name, why);
  } else {
    passed++;
    say("pmvm-init: check %s ok", name);
  }
}

static char why_buf[256];
static const char *why(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why_buf, sizeof why_buf, fmt, ap);
  va_end(ap);
  return why_buf;
}

// ---- registers across a system call --------------------------------------------------------

// Loads known values into every register the syscall ABI preserves, runs getpid, and stores
// what came back: out[0..12] the preserved registers, [12] rcx, [13] r11, [14] rax, [15] the
// address right after the syscall instruction.
void regs_around_syscall(uint64_t *out);
__asm__(".text\n"
        ".globl regs_around_syscall\n"
        "regs_around_syscall:\n"
        "  push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15\n"
        "  push %rdi\n"
        "  mov $39, %eax\n"
        "  movabs $0x1111111111111101, %rbx\n"
        "  movabs $0x2222222222222202, %rbp\n"
        "  movabs $0x3333333333333303, %r12\n"
        "  movabs $0x4444444444444404, %r13\n"
        "  movabs $0x5555555555555505, %r14\n"
        "  movabs $0x6666666666666606, %r15\n"
        "  movabs $0x7777777777777707, %rdi\n"
        "  movabs $0x8888888888888808, %rsi\n"
        "  movabs $0x9999999999999909, %rdx\n"
        "  movabs $0xaaaaaaaaaaaaaa0a, %r10\n"
        "  movabs $0xbbbbbbbbbbbbbb0b, %r8\n"
        "  movabs $0xcccccccccccccc0c, %r9\n"
        "  syscall\n"
        "1:\n"
        "  push %rax\n"
        "  mov 8(%rsp), %rax\n"
        "  mov %rbx, 0(%rax); mov %rbp, 8(%rax); mov %r12, 16(%rax); mov %r13, 24(%rax)\n"
        "  mov %r14, 32(%rax); mov %r15, 40(%rax); mov %rdi, 48(%rax); mov %rsi, 56(%rax)\n"
        "  mov %rdx, 64(%rax); mov %r10, 72(%rax); mov %r8, 80(%rax); mov %r9, 88(%rax)\n"
        "  mov %rcx, 96(%rax); mov %r11, 104(%rax)\n"
        "  pop %rcx; mov %rcx, 112(%rax)\n"
        "  lea 1b(%rip), %rcx; mov %rcx, 120(%rax)\n"
        "  add $8, %rsp\n"
        "  pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx\n"
        "  ret\n");

static const char *check_registers(void) {
  static const uint64_t want[12] = {
      0x1111111111111101, 0x2222222222222202, 0x3333333333333303, 0x4444444444444404,
      0x5555555555555505, 0x6666666666666606, 0x7777777777777707, 0x8888888888888808,
      0x9999999999999909, 0xaaaaaaaaaaaaaa0a, 0xbbbbbbbbbbbbbb0b, 0xcccccccccccccc0c};
  static const char *names[12] = {"rbx", "rbp", "r12", "r13", "r14", "r15",
                                   "rdi", "rsi", "rdx", "r10", "r8",  "r9"};
  uint64_t out[16];
  regs_around_syscall(out);
  for (int i = 0; i < 12; i++)
    if (out[i] != want[i]) return why("%s came back %#lx, not %#lx", names[i], out[i], want[i]);
  if (out[14] != (uint64_t)getpid()) return why("getpid returned %ld", (long)out[14]);
  if (out[12] != out[15]) return why("rcx %#lx is not the return address %#lx", out[12], out[15]);
  if (!(out[13] & 0x200)) return why("r11 %#lx (the flags) has IF clear", out[13]);
  return NULL;
}

static const char *check_enosys(void) {
  long r = syscall(100000);
  if (r != -1 || errno != ENOSYS) return why("syscall 100000 returned %ld errno %d", r, errno);
  return NULL;
}

// ---- signals ---------------------------------------------------------------------------------

static volatile sig_atomic_t usr1_seen, alarm_seen;
static void on_usr1(int sig) { usr1_seen = sig; }
static void on_alarm(int sig) { (void)sig; alarm_seen++; }

static const char *check_signal_handler(void) {
  struct sigaction sa = {.sa_handler = on_usr1};
  if (sigaction(SIGUSR1, &sa, NULL)) return why("sigaction: %s", strerror(errno));
  volatile uint64_t canary = 0x5eed5eed5eed5eedull;
  if (kill(getpid(), SIGUSR1)) return why("kill: %s", strerror(errno));
  if (usr1_seen != SIGUSR1) return why("the handler did not run");
  // rt_sigreturn restored the interrupted context: the stack and its locals are intact.
  if (canary != 0x5eed5eed5eed5eedull) return why("a local changed across the handler");
  return NULL;
}

static const char *arm_alarm(int flags) {
  struct sigaction sa = {.sa_handler = on_alarm, .sa_flags = flags};
  if (sigaction(SIGALRM, &sa, NULL)) return why("sigaction: %s", strerror(errno));
  struct itimerval it = {.it_value = {.tv_usec = 100000}};
  if (setitimer(ITIMER_REAL, &it, NULL)) return why("setitimer: %s", strerror(errno));
  return NULL;
}

// A signal without SA_RESTART interrupts a blocking call, which fails with EINTR.
static const char *check_eintr(void) {
  const char *e = arm_alarm(0);
  if (e) return e;
  alarm_seen = 0;
  struct timespec ts = {.tv_sec = 30};
  int r = nanosleep(&ts, &ts);
  if (r != -1 || errno != EINTR) return why("nanosleep returned %d errno %d", r, errno);
  if (alarm_seen != 1) return why("the handler ran %d times", (int)alarm_seen);
  return NULL;
}

// The alarm handler of check_restart tells the child to write, through this pipe.
static int restart_go = -1;

static void on_alarm_go(int sig) {
  on_alarm(sig);
  (void)!write(restart_go, "G", 1);
}

// With SA_RESTART the kernel re-runs the interrupted read: its return address moves back
// over the syscall instruction and rax gets the number again. The child writes only after
// the alarm: with a timed write instead, a slow guest (emulated kernel code on a busy host)
// sometimes reached the read after the byte and before the alarm.
static const char *check_restart(void) {
  int p[2], go[2];
  if (pipe(p) || pipe(go)) return why("pipe: %s", strerror(errno));
  pid_t pid = fork();
  if (pid < 0) return why("fork: %s", strerror(errno));
  if (pid == 0) {
    char g;
    if (read(go[0], &g, 1) == 1) (void)!write(p[1], "R", 1);
    _exit(0);
  }
  restart_go = go[1];
  alarm_seen = 0;
  struct sigaction sa = {.sa_handler = on_alarm_go, .sa_flags = SA_RESTART};
  if (sigaction(SIGALRM, &sa, NULL)) return why("sigaction: %s", strerror(errno));
  struct itimerval it = {.it_value = {.tv_usec = 100000}};
  if (setitimer(ITIMER_REAL, &it, NULL)) return why("setitimer: %s", strerror(errno));
  char c = 0;
  ssize_t n = read(p[0], &c, 1);
  int err = errno;
  waitpid(pid, NULL, 0);
  for (int i = 0; i < 2; i++) {
    close(p[i]);
    close(go[i]);
  }
  if (n != 1 || c != 'R') return why("read returned %zd (%s), byte %#x", n, strerror(err), c);
  if (alarm_seen != 1) return why("the alarm handler ran %d times", (int)alarm_seen);
  return NULL;
}

// ---- processes -------------------------------------------------------------------------------

static const char *check_fork(void) {
  volatile int shared = 1;
  pid_t pid = fork();
  if (pid < 0) return why("fork: %s", strerror(errno));
  if (pid == 0) {
    shared = 2;  // the child's copy only
    _exit(shared == 2 ? 42 : 1);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return why("waitpid: %s", strerror(errno));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 42) return why("child status %#x", status);
  if (shared != 1) return why("the child's store reached the parent");
  return NULL;
}

static const char *check_vfork(void) {
  volatile int shared = 1;
  pid_t pid = vfork();
  if (pid < 0) return why("vfork: %s", strerror(errno));
  if (pid == 0) {
    shared = 2;  // the parent's memory: vfork shares it
    _exit(43);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return why("waitpid: %s", strerror(errno));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 43) return why("child status %#x", status);
  if (shared != 2) return why("the vfork child's store is not in the parent");
  return NULL;
}

static const char *check_execve(void) {
  int p[2];
  if (pipe(p)) return why("pipe: %s", strerror(errno));
  pid_t pid = fork();
  if (pid < 0) return why("fork: %s", strerror(errno));
  if (pid == 0) {
    dup2(p[1], 1);
    char *argv[] = {(char *)self, NULL};
    char *envp[] = {"PMVM_INIT=exec-child", NULL};
    execve(self, argv, envp);
    _exit(100 + errno);
  }
  close(p[1]);
  char buf[64] = {0};
  ssize_t n = read(p[0], buf, sizeof buf - 1);
  close(p[0]);
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return why("waitpid: %s", strerror(errno));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 7)
    return why("exec'd child status %#x (>100: execve errno + 100)", status);
  if (n <= 0 || strcmp(buf, "exec child runs\n") != 0) return why("exec'd child said %.40s", buf);
  return NULL;
}

// A signal that kills: the parent sees the signal, not an exit code.
static const char *check_killed_child(void) {
  pid_t pid = fork();
  if (pid < 0) return why("fork: %s", strerror(errno));
  if (pid == 0) {
    for (;;) pause();
  }
  kill(pid, SIGKILL);
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return why("waitpid: %s", strerror(errno));
  if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL) return why("status %#x", status);
  return NULL;
}

// ---- threads and futexes ---------------------------------------------------------------------

static uint32_t futex_word;
static void *waker(void *arg) {
  (void)arg;
  struct timespec ts = {.tv_nsec = 200000000};
  nanosleep(&ts, NULL);
  __atomic_store_n(&futex_word, 1, __ATOMIC_SEQ_CST);
  syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
  return (void *)0x77;
}

static const char *check_thread_futex(void) {
  pthread_t t;
  int r = pthread_create(&t, NULL, waker, NULL);
  if (r) return why("pthread_create: %s", strerror(r));
  int waits = 0;
  while (__atomic_load_n(&futex_word, __ATOMIC_SEQ_CST) == 0) {
    long w = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    if (w != 0 && errno != EAGAIN && errno != EINTR) return why("futex wait: %s", strerror(errno));
    waits++;
  }
  void *ret = NULL;
  r = pthread_join(t, &ret);  // a futex wait on the thread's tid word
  if (r) return why("pthread_join: %s", strerror(r));
  if (ret != (void *)0x77) return why("the thread returned %p", ret);
  if (waits == 0) return why("the main thread never waited");
  return NULL;
}

static const char *check_memory(void) {
  size_t len = 1 << 20;
  char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return why("mmap: %s", strerror(errno));
  for (size_t i = 0; i < len; i += 4096) m[i] = (char)i;
  for (size_t i = 0; i < len; i += 4096)
    if (m[i] != (char)i) return why("byte %zu lost", i);
  if (munmap(m, len)) return why("munmap: %s", strerror(errno));
  char *heap = malloc(3 << 20);
  if (!heap) return why("malloc failed");
  memset(heap, 0xa5, 3 << 20);
  free(heap);
  return NULL;
}

// ---- modes -----------------------------------------------------------------------------------

static void power_off(void) {
  sync();
  reboot(RB_POWER_OFF);
  say("pmvm-init: power off failed: %s", strerror(errno));
  for (;;) pause();
}

static void run_checks(void) {
  struct {
    const char *name;
    const char *(*run)(void);
  } checks[] = {
      {"registers", check_registers},   {"enosys", check_enosys},
      {"signal", check_signal_handler}, {"eintr", check_eintr},
      {"restart", check_restart},       {"fork", check_fork},
      {"vfork", check_vfork},           {"execve", check_execve},
      {"kill", check_killed_child},     {"thread-futex", check_thread_futex},
      {"memory", check_memory},
  };
  say("pmvm-init: %zu checks", sizeof checks / sizeof checks[0]);
  for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++)
    result(checks[i].name, checks[i].run());
  say("pmvm-init: checks done: %d ok, %d failed", passed, failed);
}

// The pattern the host expects: byte i of the proof is (i * 131 + i / 4096) & 0xff.
static int dax_fsync(void) {
  const char *path = getenv("PMVM_PROOF_PATH");
  if (!path) path = "/proof.bin";
  char dir_path[256];
  snprintf(dir_path, sizeof dir_path, "%s", path);
  const char *bytes_env = getenv("PMVM_PROOF_BYTES");
  size_t n = bytes_env ? strtoul(bytes_env, NULL, 10) : 16384;
  uint8_t *buf = malloc(n);
  if (!buf) return say("pmvm-init: proof: no memory"), 1;
  for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)(i * 131 + i / 4096);
  int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
  if (fd < 0) return say("pmvm-init: proof: open: %s", strerror(errno)), 1;
  if (write(fd, buf, n) != (ssize_t)n) return say("pmvm-init: proof: write: %s", strerror(errno)), 1;
  if (fsync(fd)) return say("pmvm-init: proof: fsync: %s", strerror(errno)), 1;
  struct statx sx;
  int dax = statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &sx) == 0 &&
            (sx.stx_attributes & STATX_ATTR_DAX) != 0;
  close(fd);
  const char *parent = dirname(dir_path);
  int dir = open(parent, O_RDONLY | O_DIRECTORY);
  if (dir < 0 || fsync(dir))
    return say("pmvm-init: proof: fsync %s: %s", parent, strerror(errno)), 1;
  close(dir);
  say("pmvm-init: proof %s bytes=%zu crc32c=%08x dax=%d fsynced", path, n, crc32c(buf, n), dax);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 0 && argv[0][0] == '/') self = argv[0];
  const char *mode = getenv("PMVM_INIT");
  if (!mode) mode = "checks";
  if (!strcmp(mode, "exec-child")) {
    say("exec child runs");
    return 7;
  }
  // PMVM_WAIT_HOST=1: hold until the host sends a line on the console, so it can inspect the
  // guest before init changes anything (and before it powers off).
  if (getenv("PMVM_WAIT_HOST")) {
    say("pmvm-init: waiting for the host");
    char c = 0;
    while (read(0, &c, 1) == 1 && c != '\n') {
    }
  }
  if (!strcmp(mode, "pause")) {
    say("pmvm-init: user space runs");
    for (;;) pause();
  }
  if (!strcmp(mode, "dax-fsync")) {
    failed = dax_fsync();
  } else if (!strcmp(mode, "checks")) {
    run_checks();
  } else {
    say("pmvm-init: unknown PMVM_INIT=%s (checks, dax-fsync, pause)", mode);
  }
  if (getpid() == 1) power_off();
  return failed ? 1 : 0;
}
