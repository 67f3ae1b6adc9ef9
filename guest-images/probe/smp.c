/* Application processors. The boot CPU copies the trampoline (ap.S) below 1 MiB, fills in its
 * page-table root, a stack and the entry, and sends INIT, SIPI, SIPI through the local APIC
 * (xAPIC MMIO), as Linux does; the AP reports in through its mailbox, then waits there for
 * words. All sharing is through volatile mailboxes and one xchg spinlock for the console. */
#include "smp.h"
#include "console.h"
#include "cpu.h"
#include "mem.h"
#include "paging.h"
#include "power.h"
#include "words.h"

#define TRAMPOLINE 0x10000
#define LAPIC_BASE 0xfee00000ull
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define ICR_INIT 0x00004500u /* INIT, level assert */
#define ICR_STARTUP 0x00004600u /* Start-up, vector in bits 0-7 */
#define AP_STACK_BYTES 16384
/* Spin turns to wait for an AP to report in: about 5 s on the CI emulator (the counter word
 * measures 160000 turns at 0.2 s), far longer than a present AP takes. */
#define START_SPIN 4000000ull

enum ap_state { AP_OFF, AP_IDLE, AP_RUN, AP_DONE, AP_FAILED };

struct mailbox {
	volatile u32 state;
	const struct word_list *volatile list;
	volatile u32 at;
};

extern const u8 ap_trampoline_start[], ap_trampoline_end[];
extern u64 ap_tramp_cr3, ap_tramp_stack, ap_tramp_entry;

static struct mailbox boxes[MAX_CPUS];
static u8 stacks[MAX_CPUS][AP_STACK_BYTES] __attribute__((aligned(16)));
/* A test-and-set lock (xchg), re-entrant for its owner: an error line printed while a line
 * is open must not deadlock. */
static volatile u32 console_flag;
/* The holder's APIC id + 1, or 0; with the depth, written only by the holder. */
static volatile u32 console_owner;
static u32 console_depth;

void console_lock(void)
{
	u32 me = cpu_apic_id() + 1;
	if (console_owner == me) {
		console_depth++;
		return;
	}
	for (;;) {
		u32 taken = 1;
		__asm__ volatile("xchgl %0, %1" : "+r"(taken), "+m"(console_flag) : : "memory");
		if (!taken)
			break;
		while (console_flag)
			cpu_relax_barrier();
	}
	console_owner = me;
}

void console_unlock(void)
{
	if (console_depth) {
		console_depth--;
		return;
	}
	console_owner = 0;
	__asm__ volatile("" : : : "memory");
	console_flag = 0;
}

static void lapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)(usize)(LAPIC_BASE + reg) = v;
}

static void spin(u64 turns)
{
	for (u64 i = 0; i < turns; i++)
		cpu_relax_barrier();
}

static u64 read_cr3(void)
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

void ap_main(void);

__attribute__((noreturn)) void ap_main(void)
{
	struct mailbox *box = &boxes[cpu_apic_id() % MAX_CPUS];
	box->state = AP_IDLE;
	for (;;) {
		while (box->state != AP_RUN)
			cpu_relax_barrier();
		u32 at = box->at;
		if (run_one_word(box->list, &at)) {
			box->state = AP_FAILED;
			/* As on the boot CPU: the first error ends the run. */
			acpi_poweroff();
			halt_forever();
		}
		box->state = AP_DONE;
	}
}

static int start_ap(u32 cpu)
{
	struct mailbox *box = &boxes[cpu];
	if (map_phys(LAPIC_BASE, 0x1000, MAP_UNCACHED))
		return -1;
	/* The trampoline's data sits inside the copy: patch the copy, not the original. */
	usize len = (usize)(ap_trampoline_end - ap_trampoline_start);
	u8 *copy = (u8 *)(usize)TRAMPOLINE;
	memcpy(copy, ap_trampoline_start, len);
	*(u64 *)(copy + ((const u8 *)&ap_tramp_cr3 - ap_trampoline_start)) = read_cr3();
	*(u64 *)(copy + ((const u8 *)&ap_tramp_stack - ap_trampoline_start)) =
		(u64)(usize)(stacks[cpu] + AP_STACK_BYTES);
	*(u64 *)(copy + ((const u8 *)&ap_tramp_entry - ap_trampoline_start)) = (u64)(usize)ap_main;
	__asm__ volatile("" : : : "memory");
	lapic_write(LAPIC_ICR_HIGH, cpu << 24);
	lapic_write(LAPIC_ICR_LOW, ICR_INIT);
	spin(100000);
	for (int i = 0; i < 2; i++) {
		lapic_write(LAPIC_ICR_HIGH, cpu << 24);
		lapic_write(LAPIC_ICR_LOW, ICR_STARTUP | (TRAMPOLINE >> 12));
		spin(20000);
	}
	for (u64 i = 0; i < START_SPIN && box->state == AP_OFF; i++)
		cpu_relax_barrier();
	if (box->state == AP_OFF) {
		error_begin("on: cpu ");
		out_dec(cpu);
		out_str(" did not start (is there such a vCPU?)");
		line_end();
		return -1;
	}
	return 0;
}

int smp_run_on(u32 cpu, const struct word_list *list, u32 at)
{
	if (cpu == 0 || cpu >= MAX_CPUS || cpu == cpu_apic_id()) {
		error_begin("on: cpu ");
		out_dec(cpu);
		out_str(" is not an application processor this probe drives (1..7)");
		line_end();
		return -1;
	}
	struct mailbox *box = &boxes[cpu];
	if (box->state == AP_OFF && start_ap(cpu))
		return -1;
	if (box->state == AP_RUN) {
		error_begin("on: cpu ");
		out_dec(cpu);
		out_str(" is still running its last word; join it first");
		line_end();
		return -1;
	}
	box->list = list;
	box->at = at;
	__asm__ volatile("" : : : "memory");
	box->state = AP_RUN;
	return 0;
}

int smp_join(u32 cpu)
{
	if (cpu >= MAX_CPUS || boxes[cpu].state == AP_OFF) {
		error_begin("join: cpu ");
		out_dec(cpu);
		out_str(" was never started");
		line_end();
		return -1;
	}
	while (boxes[cpu].state == AP_RUN)
		cpu_relax_barrier();
	return boxes[cpu].state == AP_FAILED ? -1 : 0;
}
