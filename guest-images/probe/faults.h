/* Words that are meant to stop the VM: a triple fault and an instruction this CI host's
 * emulator cannot run. */
#ifndef PROBE_FAULTS_H
#define PROBE_FAULTS_H

/* Loads a zero-limit IDT and touches a non-canonical address: #GP with no IDT, then #DF,
 * then shutdown. Returns only if the CPU somehow survived. */
void triple_fault(void);
/* The only function allowed to contain cmpxchg16b (tests/probe_insns.rs whitelists it by
 * name). Returns 1 when the exchange happened. */
int probe_emufail_cmpxchg16b(void);

#endif
