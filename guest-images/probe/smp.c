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
/* How long an AP may take to report in: far longer than a present AP takes, even when its
 * host runs it in an emulator or a nested hypervisor. */
#define START_WAIT_MS 5000u

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

/* Real time from the PIT's channel 2, gated through port 0x61 as Linux calibrates the TSC:
 * spin counts mean nothing across hosts (an emulator runs a pause loop 100 times slower than
 * hardware). One countdown of PIT_TICKS_1MS ticks is a millisecond. */
#define PIT_HZ 1193182u
#define PIT_TICKS_1MS ((PIT_HZ + 999u) / 1000u)
#define PORT_PIT_CH2 0x42
#define PORT_PIT_MODE 0x43
#define PORT_SYS_CTRL_B 0x61
#define SYS_CTRL_B_GATE2 0x01
#define SYS_CTRL_B_SPEAKER 0x02
#define SYS_CTRL_B_OUT2 0x20

static void pit_arm_1ms(void)
{
	outb(PORT_SYS_CTRL_B, (u8)((inb(PORT_SYS_CTRL_B) & ~SYS_CTRL_B_SPEAKER) | SYS_CTRL_B_GATE2));
	outb(PORT_PIT_MODE, 0xb0); /* channel 2, low then high byte, mode 0: out rises at 0 */
	outb(PORT_PIT_CH2, PIT_TICKS_1MS & 0xff);
	outb(PORT_PIT_CH2, PIT_TICKS_1MS >> 8);
}

/* Waits up to `ms` milliseconds, less if *flag leaves `off` first; returns nonzero then. */
static int wait_ms_while(u32 ms, volatile u32 *flag, u32 off)
{
	for (u32 i = 0; i < ms; i++) {
		pit_arm_1ms();
		while (!(inb(PORT_SYS_CTRL_B) & SYS_CTRL_B_OUT2)) {
			if (flag && *flag != off)
				return 1;
			cpu_relax_barrier();
		}
	}
	return flag && *flag != off;
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
	/* The delays of the MP specification: 10 ms after INIT, 200 us after each SIPI. */
	wait_ms_while(10, 0, 0);
	for (int i = 0; i < 2; i++) {
		lapic_write(LAPIC_ICR_HIGH, cpu << 24);
		lapic_write(LAPIC_ICR_LOW, ICR_STARTUP | (TRAMPOLINE >> 12));
		wait_ms_while(1, 0, 0);
	}
	if (!wait_ms_while(START_WAIT_MS, &box->state, AP_OFF)) {
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
