/* Application processors: started on demand, each runs one word at a time that the boot CPU
 * hands it ("on CPU WORD ARGS..."), while the boot CPU goes on with the next words. */
#ifndef PROBE_SMP_H
#define PROBE_SMP_H

#include "cmdline.h"
#include "types.h"

/* Most CPUs (APIC ids 0..MAX_CPUS-1) the probe drives. */
#define MAX_CPUS 8

/* Starts CPU `cpu` if needed and has it run the word at index `at` of `list` (with its
 * arguments). Returns -1 after printing an error. */
int smp_run_on(u32 cpu, const struct word_list *list, u32 at);
/* Waits until CPU `cpu` has finished its word; -1 if it was never started or its word failed. */
int smp_join(u32 cpu);
/* Serialises output lines between CPUs. */
void console_lock(void);
void console_unlock(void);

#endif
