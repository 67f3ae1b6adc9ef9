/* Identity page tables built from a fixed pool in .bss. No 1 GiB pages: the host CPU may not
 * offer them. */
#include "paging.h"
#include "console.h"
#include "cpu.h"

#define PTE_PRESENT 0x1ull
#define PTE_WRITE 0x2ull
#define PTE_PWT 0x8ull
#define PTE_PCD 0x10ull
#define PTE_HUGE 0x80ull
#define PTE_ADDR_MASK 0x000ffffffffff000ull
#define PAGE_2M (1ull << 21)
#define ENTRIES 512
/* PML4, one PDPT and one PD for the first 1 GiB, then one PD per further GiB touched and one
 * PDPT per further 512 GiB. */
#define TABLE_POOL_PAGES 64

static u64 table_pool[TABLE_POOL_PAGES][ENTRIES] __attribute__((aligned(4096)));
static u32 tables_used;
static u64 *pml4;
static u64 max_phys;

static u64 *table_alloc(void)
{
	if (tables_used == TABLE_POOL_PAGES)
		return NULL;
	/* .bss is zeroed by start.S, so a fresh table has no present entries. */
	return table_pool[tables_used++];
}

/* The table that entry idx of table points to, created if absent. */
static u64 *next_table(u64 *table, u32 idx)
{
	u64 e = table[idx];
	if (e & PTE_PRESENT)
		return (u64 *)(usize)(e & PTE_ADDR_MASK);
	u64 *t = table_alloc();
	if (t)
		table[idx] = (u64)(usize)t | PTE_PRESENT | PTE_WRITE;
	return t;
}

static void invlpg(u64 addr)
{
	__asm__ volatile("invlpg (%0)" : : "r"(addr) : "memory");
}

u64 phys_limit(void)
{
	return max_phys;
}

void paging_init(void)
{
	u32 a, b, c, d;
	u32 bits = 36; /* the architectural default when CPUID cannot tell */
	cpuid(0x80000000, &a, &b, &c, &d);
	if (a >= 0x80000008) {
		cpuid(0x80000008, &a, &b, &c, &d);
		if ((a & 0xff) >= 32 && (a & 0xff) <= 52)
			bits = a & 0xff;
	}
	max_phys = 1ull << bits;

	/* The first three pool pages: PML4, PDPT 0 and the PD of the first 1 GiB. */
	pml4 = table_pool[0];
	u64 *pdpt = table_pool[1];
	u64 *pd = table_pool[2];
	tables_used = 3;
	pml4[0] = (u64)(usize)pdpt | PTE_PRESENT | PTE_WRITE;
	pdpt[0] = (u64)(usize)pd | PTE_PRESENT | PTE_WRITE;
	for (u32 i = 0; i < ENTRIES; i++)
		pd[i] = (u64)i * PAGE_2M | PTE_PRESENT | PTE_WRITE | PTE_HUGE;
	__asm__ volatile("mov %0, %%cr3" : : "r"((u64)(usize)pml4) : "memory");
}

int map_phys(u64 phys, u64 len, enum map_cache cache)
{
	u64 end = phys + (len ? len : 1);
	if (end < phys || end > max_phys) {
		error_begin("cannot map ");
		out_hex(phys);
		out_str(" len ");
		out_hex(len);
		out_str(": beyond the physical address limit ");
		out_hex(max_phys);
		line_end();
		return -1;
	}
	u64 flags = PTE_PRESENT | PTE_WRITE | PTE_HUGE;
	if (cache == MAP_UNCACHED)
		flags |= PTE_PCD | PTE_PWT;
	for (u64 page = phys & ~(PAGE_2M - 1); page < end; page += PAGE_2M) {
		u64 *pdpt = next_table(pml4, (page >> 39) & (ENTRIES - 1));
		u64 *pd = pdpt ? next_table(pdpt, (page >> 30) & (ENTRIES - 1)) : NULL;
		if (!pd) {
			error_begin("cannot map ");
			out_hex(page);
			out_str(": all ");
			out_dec(TABLE_POOL_PAGES);
			out_str(" page-table pages are in use");
			line_end();
			return -1;
		}
		u32 idx = (page >> 21) & (ENTRIES - 1);
		u64 want = page | flags;
		if (pd[idx] != want) {
			pd[idx] = want;
			invlpg(page);
		}
	}
	return 0;
}
