/* Finding and reading ACPI tables the way Linux does: RSDP from boot_params or the BIOS
 * scan, then the XSDT (or the RSDT on ACPI 1.0 firmware). */
#ifndef PROBE_ACPI_H
#define PROBE_ACPI_H

#include "types.h"

#define ACPI_HEADER_LEN 36

/* Locates the RSDP. Prints "probe: error ..." and returns -1 when there is none. */
int acpi_init(const u8 *boot_params);
/* The "acpi" word: one "probe: table SIG len=N checksum=ok|BAD" line per table. */
int acpi_list_tables(void);
/* Maps the table at phys whole and returns it, or prints an error and returns NULL. */
const u8 *acpi_map_table(u64 phys);
/* The first table with this signature listed in the root table (or the DSDT through the
 * FADT), mapped whole; NULL if absent. Prints nothing when absent. */
const u8 *acpi_find_table(const char *sig);
int acpi_checksum_ok(const u8 *p, u32 len);

#endif
