/* The NFIT: printing it, and resolving NVDIMM number DEV to its range and flush hints. */
#ifndef PROBE_NFIT_H
#define PROBE_NFIT_H

#include "types.h"

struct nvdimm {
	u64 base;
	u64 len;
	/* NFIT device handle of the range's memdev; has_memdev is 0 when no memdev names it. */
	u32 handle;
	int has_memdev;
	/* The matching flush structure's hint addresses (u64, unaligned) and their count. */
	const u8 *hints;
	u32 hint_count;
};

/* The "nfit" word. */
int nfit_print(void);
/* Fills *out for the dev-th persistent-memory SPA range (0-based, NFIT order). Prints
 * "probe: error ..." and returns -1 when there is no such device. */
int nfit_nvdimm(u64 dev, struct nvdimm *out);
/* Hint i of d. */
u64 nvdimm_hint(const struct nvdimm *d, u32 i);

#endif
