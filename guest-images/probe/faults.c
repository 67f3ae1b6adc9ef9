#include "faults.h"
#include "types.h"

/* Bit 63 set, bits 62:47 clear: non-canonical with 4-level paging and with LA57. */
#define NON_CANONICAL 0x8000000000000000ull

struct __attribute__((packed)) idt_ptr {
	u16 limit;
	u64 base;
};

void triple_fault(void)
{
	static const struct idt_ptr empty = {0, 0};
	u64 v;
	__asm__ volatile("lidt %0" : : "m"(empty));
	__asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(NON_CANONICAL) : "memory");
}

static u64 slot[2] __attribute__((aligned(16)));

__attribute__((noinline)) int probe_emufail_cmpxchg16b(void)
{
	u64 lo = slot[0], hi = slot[1];
	u8 swapped;
	__asm__ volatile("lock cmpxchg16b %1\n\tsete %0"
			 : "=q"(swapped), "+m"(slot), "+a"(lo), "+d"(hi)
			 : "b"(lo + 1), "c"(hi + 1)
			 : "memory", "cc");
	return swapped;
}
