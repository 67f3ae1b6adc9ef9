/* One handler per word. A handler takes its arguments from the cursor and returns 0, or -1
 * after printing "probe: error ...". */
#include "words.h"
#include "acpi.h"
#include "console.h"
#include "cpu.h"
#include "faults.h"
#include "mem.h"
#include "nfit.h"
#include "pmem.h"
#include "power.h"
#include "smp.h"

/* About 0.2 s per count on the CI emulator (measured: 100000 turns took 0.125 s). */
#define COUNTER_SPIN 160000

struct cursor {
	const struct word_list *list;
	u32 next;
	const char *word;
};

/* Decimal or 0x hex, the whole token, no overflow. */
static int parse_u64(const char *s, u64 *out)
{
	u64 v = 0;
	u32 base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return -1;
	for (; *s; s++) {
		u32 d;
		if (*s >= '0' && *s <= '9')
			d = (u32)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (u32)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (u32)(*s - 'A' + 10);
		else
			return -1;
		if (v > (~0ull - d) / base)
			return -1;
		v = v * base + d;
	}
	*out = v;
	return 0;
}

static const char *arg_text(struct cursor *c, const char *name)
{
	if (c->next < c->list->count)
		return c->list->words[c->next++];
	error_begin(c->word);
	out_str(" needs ");
	out_str(name);
	line_end();
	return NULL;
}

static int arg_num(struct cursor *c, const char *name, u64 *v)
{
	const char *t = arg_text(c, name);
	if (!t)
		return -1;
	if (!parse_u64(t, v))
		return 0;
	error_begin(c->word);
	out_char(' ');
	out_str(name);
	out_str(" \"");
	out_str(t);
	out_str("\" is not a decimal or 0x-hex number below 2^64");
	line_end();
	return -1;
}

/* DEV OFFSET LEN BYTE */
static int args4(struct cursor *c, u64 *dev, u64 *off, u64 *len, u64 *byte)
{
	return arg_num(c, "DEV", dev) || arg_num(c, "OFFSET", off) || arg_num(c, "LEN", len) ||
	       arg_num(c, "BYTE", byte);
}

static int w_acpi(struct cursor *c)
{
	(void)c;
	return acpi_list_tables();
}

static int w_mark(struct cursor *c)
{
	const char *t = arg_text(c, "TEXT");
	if (!t)
		return -1;
	line_begin();
	out_str("MARK ");
	out_str(t);
	line_end();
	return 0;
}

static int w_wait(struct cursor *c)
{
	(void)c;
	say("waiting");
	halt_forever();
}

static int w_poweroff(struct cursor *c)
{
	(void)c;
	say("poweroff");
	acpi_poweroff();
}

static int w_nfit(struct cursor *c)
{
	(void)c;
	return nfit_print();
}

static int w_write(struct cursor *c)
{
	u64 dev, off, len, byte;
	return args4(c, &dev, &off, &len, &byte) ? -1 : pmem_write(dev, off, len, byte);
}

static int w_check(struct cursor *c)
{
	u64 dev, off, len, byte;
	return args4(c, &dev, &off, &len, &byte) ? -1 : pmem_check(dev, off, len, byte);
}

static int w_flush(struct cursor *c)
{
	u64 dev;
	return arg_num(c, "DEV", &dev) ? -1 : pmem_flush(dev);
}

static int w_flushw(struct cursor *c)
{
	u64 dev, width;
	return arg_num(c, "DEV", &dev) || arg_num(c, "WIDTH", &width) ? -1
								   : pmem_flushw(dev, width);
}

static int w_flushes(struct cursor *c)
{
	u64 dev, n;
	return arg_num(c, "DEV", &dev) || arg_num(c, "N", &n) ? -1 : pmem_flushes(dev, n);
}

__attribute__((noreturn)) static void count_forever(void)
{
	for (u64 k = 0;; k++) {
		line_begin();
		out_str("counter ");
		out_dec(k);
		line_end();
		for (u32 i = 0; i < COUNTER_SPIN; i++)
			cpu_relax_barrier();
	}
}

static int w_counter(struct cursor *c)
{
	(void)c;
	count_forever();
}

static int w_triplefault(struct cursor *c)
{
	(void)c;
	say("triplefault");
	triple_fault();
	say("error triplefault: the CPU survived a #GP with no IDT");
	return -1;
}

static int w_emufail(struct cursor *c)
{
	(void)c;
	say("emufail trying lock cmpxchg16b");
	int swapped = probe_emufail_cmpxchg16b();
	line_begin();
	out_str("emufail survived swapped=");
	out_dec((u64)swapped);
	line_end();
	return 0;
}

/* Longest line readline keeps; the rest of a longer line is read and dropped. */
#define READLINE_MAX 120

static int w_readline(struct cursor *c)
{
	char buf[READLINE_MAX];
	usize n = 0;
	(void)c;
	say("reading");
	for (;;) {
		u8 ch = in_char();
		if (ch == '\n' || ch == '\r')
			break;
		if (n < READLINE_MAX)
			buf[n++] = (char)ch;
	}
	line_begin();
	out_str("read ");
	out_strn(buf, n);
	line_end();
	return 0;
}

/* Pulses the CPU reset line through the keyboard controller, as Linux's reboot=k does. */
static int w_reboot(struct cursor *c)
{
	(void)c;
	say("reboot");
	outb(0x64, 0xfe);
	say("error reboot: the machine did not reset");
	return -1;
}

/* pmvm's test crash port (vmm/src/layout.rs TEST_CRASH_PORT): any byte written cuts the power. */
#define PMVM_TEST_CRASH_PORT 0x610

/* Asks pmvm for a power cut, as `PUT /v1/vm/power-cut` does: the VM ends without writing back
 * anything the guest did not flush. */
static int w_crash(struct cursor *c)
{
	(void)c;
	say("crash");
	outb(PMVM_TEST_CRASH_PORT, 1);
	say("error crash: the power is still on");
	return -1;
}

static int w_storm(struct cursor *c)
{
	u64 dev, n;
	return arg_num(c, "DEV", &dev) || arg_num(c, "N", &n) ? -1 : pmem_storm(dev, n);
}

static int w_scribble(struct cursor *c)
{
	u64 dev, pages;
	return arg_num(c, "DEV", &dev) || arg_num(c, "PAGES", &pages) ? -1
								   : pmem_scribble(dev, pages);
}

static int w_flushseq(struct cursor *c)
{
	u64 dev, n;
	return arg_num(c, "DEV", &dev) || arg_num(c, "N", &n) ? -1 : pmem_flushseq(dev, n);
}

static int w_on(struct cursor *c);
static int w_join(struct cursor *c);

/* `args`: how many arguments follow the word, so `on` can hand a word to another CPU and
 * skip it here. */
static const struct {
	const char *name;
	int (*run)(struct cursor *c);
	u32 args;
} word_table[] = {
	{"acpi", w_acpi, 0},
	{"mark", w_mark, 1},
	{"wait", w_wait, 0},
	{"poweroff", w_poweroff, 0},
	{"nfit", w_nfit, 0},
	{"write", w_write, 4},
	{"check", w_check, 4},
	{"flush", w_flush, 1},
	{"flushw", w_flushw, 2},
	{"flushes", w_flushes, 2},
	{"storm", w_storm, 2},
	{"scribble", w_scribble, 2},
	{"flushseq", w_flushseq, 2},
	{"counter", w_counter, 0},
	{"triplefault", w_triplefault, 0},
	{"emufail", w_emufail, 0},
	{"readline", w_readline, 0},
	{"reboot", w_reboot, 0},
	{"crash", w_crash, 0},
	{"on", w_on, 1},
	{"join", w_join, 1},
};

#define WORDS (sizeof(word_table) / sizeof(word_table[0]))

static u32 find_word(const char *word)
{
	u32 i = 0;
	while (i < WORDS && !streq(word_table[i].name, word))
		i++;
	if (i == WORDS) {
		error_begin("unknown word ");
		out_str(word);
		line_end();
	}
	return i;
}

/* on CPU WORD ARGS...: CPU runs WORD; this CPU goes on at once with what follows. */
static int w_on(struct cursor *c)
{
	u64 cpu;
	if (arg_num(c, "CPU", &cpu))
		return -1;
	if (c->next >= c->list->count) {
		error_begin("on needs a WORD");
		line_end();
		return -1;
	}
	u32 at = c->next;
	u32 i = find_word(c->list->words[at]);
	if (i == WORDS)
		return -1;
	if (word_table[i].run == w_on || word_table[i].run == w_join) {
		error_begin("on: only the boot CPU runs on and join");
		line_end();
		return -1;
	}
	c->next = at + 1 + word_table[i].args;
	if (c->next > c->list->count) {
		error_begin("on: ");
		out_str(c->list->words[at]);
		out_str(" is missing arguments");
		line_end();
		return -1;
	}
	return smp_run_on((u32)cpu, c->list, at);
}

static int w_join(struct cursor *c)
{
	u64 cpu;
	if (arg_num(c, "CPU", &cpu) || smp_join((u32)cpu))
		return -1;
	line_begin();
	out_str("joined cpu=");
	out_dec(cpu);
	line_end();
	return 0;
}

int run_one_word(const struct word_list *list, u32 *next)
{
	struct cursor c = {list, *next, NULL};
	c.word = list->words[c.next++];
	u32 i = find_word(c.word);
	int rc = i == WORDS ? -1 : word_table[i].run(&c);
	*next = c.next;
	return rc;
}

int run_words(const struct word_list *list)
{
	u32 next = 0;
	while (next < list->count)
		if (run_one_word(list, &next))
			return -1;
	return 0;
}
