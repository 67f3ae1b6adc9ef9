/* The probe's own identity-mapped page tables, 2 MiB pages only. The first 1 GiB is mapped
 * write-back at start; everything else is mapped on demand by map_phys(). */
#ifndef PROBE_PAGING_H
#define PROBE_PAGING_H

#include "types.h"

enum map_cache {
	MAP_WRITEBACK,
	/* PCD|PWT: for MMIO such as flush hints, so every store leaves the CPU at once. */
	MAP_UNCACHED,
};

void paging_init(void);
/* Identity-maps [phys, phys+len) (len 0 counts as 1 byte). On failure prints
 * "probe: error ..." and returns -1. */
int map_phys(u64 phys, u64 len, enum map_cache cache);
/* 1 << MAXPHYADDR, from CPUID. */
u64 phys_limit(void);

#endif
