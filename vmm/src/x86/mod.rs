//! x86-64 vCPU state at boot: CPUID, MSRs, registers, page tables, FPU and local APIC.

pub mod cpu_model;
pub mod cpuid;
pub mod paging;
pub mod regs;
