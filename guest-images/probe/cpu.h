/* Port I/O and the few privileged instructions the probe uses. Every one of them is in the
 * plain instruction mix this CI host's emulator can run (see README.md). */
#ifndef PROBE_CPU_H
#define PROBE_CPU_H

#include "types.h"

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* The initial APIC id from CPUID leaf 1, EBX[31:24]. */
static inline u32 cpu_apic_id(void)
{
	u32 a, b, c, d;
	cpuid(1, &a, &b, &c, &d);
	return b >> 24;
}

static inline void sfence(void)
{
	__asm__ volatile("sfence" : : : "memory");
}

static inline void cpu_relax_barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Interrupts off, halted for good: other vCPUs and the VMM decide what happens next. */
__attribute__((noreturn)) void halt_forever(void);

#endif
