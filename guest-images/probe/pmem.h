/* The NVDIMM words: plain stores into the persistent-memory range and flush-hint writes. */
#ifndef PROBE_PMEM_H
#define PROBE_PMEM_H

#include "types.h"

int pmem_write(u64 dev, u64 off, u64 len, u64 byte);
/* A mismatch is reported on its line and is not an error. */
int pmem_check(u64 dev, u64 off, u64 len, u64 byte);
int pmem_flush(u64 dev);
int pmem_flushw(u64 dev, u64 width);
int pmem_flushes(u64 dev, u64 n);
/* n rounds of: store to page i % 16 of dev, flush. Each flush writes one page back. */
int pmem_storm(u64 dev, u64 n);
/* Forever: store k (1, 2, ...) as a u64 at the start of page k % pages of dev, then publish
 * k. Never exits to the host. */
int pmem_scribble(u64 dev, u64 pages);
/* n rounds of: wait for new scribbles, read the last number (before), flush, read it again
 * (after); prints the last round's two numbers. */
int pmem_flushseq(u64 dev, u64 n);

#endif
