/* ACPI S5 power-off, as Linux does it. */
#ifndef PROBE_POWER_H
#define PROBE_POWER_H

#include "types.h"

/* SLP_TYP from the DSDT's \_S5_ package, or -1 when the DSDT has none. Exposed for the AML
 * shapes documented in README.md. */
int s5_sleep_type(const u8 *dsdt);
/* Writes S5 to the FADT's sleep control register (HW-reduced) or PM1 control (legacy), then
 * halts. Prints "probe: error ..." first if the tables do not allow it. */
__attribute__((noreturn)) void acpi_poweroff(void);

#endif
