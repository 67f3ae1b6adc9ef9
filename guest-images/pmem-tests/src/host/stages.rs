//! How far a guest got, read from its console and pmvm's stderr, so that a run that cannot
//! finish says exactly where it stopped and why.

use std::fmt;

/// Boot stages in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Nothing from the kernel.
    NoOutput,
    /// `Linux version ...`.
    KernelBanner,
    /// The kernel listed pmvm's NFIT.
    AcpiNfit,
    /// The nfit driver bound the ACPI0012 device (built in, or loaded from the initramfs).
    NfitBound,
    /// `Run /init as init process`.
    InitStarted,
    /// The suite (or the preflight init) printed a line: user space runs.
    UserSpace,
    /// The suite found its NVDIMMs and set them up.
    NvdimmReady,
    /// At least one case ran.
    CasesRunning,
    /// The summary line.
    SuiteDone,
}

impl Stage {
    const MARKERS: [(Stage, &'static str); 8] = [
        (Stage::KernelBanner, "Linux version "),
        (Stage::AcpiNfit, "ACPI: NFIT 0x"),
        (Stage::NfitBound, "nfit ACPI0012:"),
        (Stage::InitStarted, "Run /init as init process"),
        (Stage::UserSpace, "PMEMSUITE "),
        (Stage::NvdimmReady, "PMEMSUITE info nvdimm "),
        (Stage::CasesRunning, "PMEMWAIT "),
        (Stage::SuiteDone, "PMEMSUITE done:"),
    ];

    /// The furthest stage the console shows.
    pub fn reached<S: AsRef<str>>(console: &[S]) -> Stage {
        let mut stage = Stage::NoOutput;
        for line in console {
            for (s, marker) in Stage::MARKERS {
                if s > stage && line.as_ref().contains(marker) {
                    stage = s;
                }
            }
        }
        stage
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::NoOutput => "no kernel output",
            Stage::KernelBanner => "kernel banner",
            Stage::AcpiNfit => "ACPI tables with the NFIT",
            Stage::NfitBound => "nfit driver bound",
            Stage::InitStarted => "kernel ran /init",
            Stage::UserSpace => "guest user space",
            Stage::NvdimmReady => "fsdax namespaces ready",
            Stage::CasesRunning => "cases running",
            Stage::SuiteDone => "suite finished",
        })
    }
}

/// Console lines that say the guest died, and what they mean.
const DEATHS: [(&str, &str); 6] = [
    ("Kernel panic", "the guest kernel panicked"),
    ("Attempted to kill init", "init died"),
    (" segfault at ", "a guest process segfaulted"),
    ("traps: ", "a guest process trapped"),
    ("BUG: ", "the guest kernel hit a BUG"),
    ("Oops", "the guest kernel oopsed"),
];

/// Why the guest stopped, from its console and pmvm's stderr: the first sign of death, the
/// line that shows it, and pmvm's own report of a fatal exit.
pub fn death<S: AsRef<str>>(console: &[S], stderr: &str) -> Option<String> {
    let mut parts = Vec::new();
    if let Some((line, what)) = console.iter().find_map(|l| {
        let l = l.as_ref();
        DEATHS
            .iter()
            .find(|(m, _)| l.contains(m))
            .map(|(_, what)| (l.trim().to_string(), *what))
    }) {
        parts.push(format!("{what}: {line}"));
    }
    if let Some(l) = stderr
        .lines()
        .find(|l| l.starts_with("pmvm: vCPU ") || l.contains("KVM_EXIT_"))
    {
        let mut part = format!("pmvm: {}", l.trim().trim_start_matches("pmvm: "));
        if let Some(name) = instruction_bytes(l).and_then(|b| known_blocker(&b)) {
            part.push_str(&format!(" = {name}"));
        }
        parts.push(part);
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The bytes in pmvm's `instruction bytes [..]` report.
fn instruction_bytes(line: &str) -> Option<Vec<u8>> {
    let start = line.find("instruction bytes [")? + "instruction bytes [".len();
    let end = start + line[start..].find(']')?;
    line[start..end]
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect()
}

/// Instructions that emulating KVM hosts are known to fail on (docs/guest-suite.md), by
/// their leading bytes.
const BLOCKERS: [(&[u8], &str); 9] = [
    (&[0xcc], "int3 (the kernel's alternatives self-test)"),
    (&[0xf0, 0x48, 0x0f, 0xc7], "lock cmpxchg16b (hide cx16)"),
    (&[0x48, 0x0f, 0xc7], "cmpxchg16b (hide cx16)"),
    (&[0xf3, 0x0f, 0xb8], "popcnt (hide popcnt)"),
    (&[0x0f, 0x01, 0xca], "clac (hide smap)"),
    (&[0x0f, 0x01, 0xcb], "stac (hide smap)"),
    (&[0xdb, 0xe2], "fnclex (report an Intel CPU)"),
    (&[0x9b], "fwait"),
    (&[0x0f, 0x00], "verw (mitigations=off)"),
];

fn known_blocker(bytes: &[u8]) -> Option<&'static str> {
    BLOCKERS
        .iter()
        .find(|(prefix, _)| bytes.starts_with(prefix))
        .map(|(_, name)| *name)
}

/// Whether the console shows the failure this project's emulating KVM hosts are known for:
/// the kernel reaches /init, and the first system call of user space faults.
pub fn userspace_blocked<S: AsRef<str>>(console: &[S]) -> bool {
    console
        .iter()
        .any(|l| l.as_ref().contains("Run /init as init process"))
        && Stage::reached(console) < Stage::UserSpace
        && console.iter().any(|l| {
            let l = l.as_ref();
            l.contains("Attempted to kill init")
                || l.contains(" segfault at ")
                || l.contains("traps: init")
        })
}

/// The last `n` console lines, indented, for error messages.
pub fn tail<S: AsRef<str>>(console: &[S], n: usize) -> String {
    let start = console.len().saturating_sub(n);
    console[start..]
        .iter()
        .map(|l| format!("  | {}", l.as_ref()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The minimal kernel on an emulating host (measured): the nfit driver binds, /init runs,
    /// its first system call faults, init is killed.
    const EMULATED: [&str; 9] = [
        "[    0.000000] Linux version 6.1.192 (root@vm) (gcc (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP Mon Nov 23 21:48:50 UTC 2026",
        "[    3.629995] ACPI: NFIT 0x00000000000E0288 0001C8 (v01 PMVM   PMVMACPI 00000001 RVAT 01000000)",
        "[   46.721133] nfit ACPI0012:00: changing numa node from -1 to 0 for nfit region [0x0000000100000000-0x000000010fffffff]",
        "[   67.893480] Run /init as init process",
        "[   68.333162] init[1]: segfault at ffffffff81400040 ip ffffffff81400040 sp 00007ffd3bff5ac0 error 15 likely on CPU 0 (core 0, socket 0)",
        "[   68.363432] Code: Unable to access opcode bytes at 0xffffffff81400016.",
        "[   68.377071] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b",
        "[   68.385058] Kernel Offset: disabled",
        "[   68.390673] Rebooting in 1 seconds..",
    ];

    #[test]
    fn the_emulated_host_transcript_reaches_init_and_no_further() {
        assert_eq!(Stage::reached(&EMULATED), Stage::InitStarted);
        assert!(userspace_blocked(&EMULATED));
        let why = death(&EMULATED, "").unwrap();
        assert!(
            why.starts_with("a guest process segfaulted: [   68.333162] init[1]: segfault"),
            "{why}"
        );
    }

    #[test]
    fn stages_are_ordered_and_the_furthest_wins() {
        assert_eq!(Stage::reached::<&str>(&[]), Stage::NoOutput);
        assert_eq!(
            Stage::reached(&[
                "PMEMSUITE done: 1 passed, 0 failed, 0 skipped",
                "Linux version 6"
            ]),
            Stage::SuiteDone
        );
        assert_eq!(
            Stage::reached(&[
                "Linux version 6.1",
                "PMEMSUITE start cases=40",
                "PMEMSUITE info nvdimm dev=0"
            ]),
            Stage::NvdimmReady
        );
        assert!(Stage::KernelBanner < Stage::InitStarted);
        assert_eq!(Stage::InitStarted.to_string(), "kernel ran /init");
    }

    #[test]
    fn pmvm_fatal_exits_are_part_of_the_reason() {
        let stderr = "pmvm: vCPU 0: KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure) at RIP 0xffffffff81317850, instruction bytes [cc 90]\n";
        let why = death(&["Linux version 6.1"], stderr).unwrap();
        assert_eq!(
            why,
            "pmvm: vCPU 0: KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure) at RIP 0xffffffff81317850, instruction bytes [cc 90] = int3 (the kernel's alternatives self-test)"
        );
        let xrstors =
            "pmvm: vCPU 0: KVM_EXIT_INTERNAL_ERROR at RIP 0x1, instruction bytes [48 0f c7 0e]";
        assert!(death::<&str>(&[], xrstors)
            .unwrap()
            .ends_with("= cmpxchg16b (hide cx16)"));
        let unknown = "pmvm: vCPU 0: KVM_EXIT_INTERNAL_ERROR at RIP 0x1, instruction bytes [90 zz]";
        assert!(!death::<&str>(&[], unknown).unwrap().contains(" = "));
        assert_eq!(
            death(&["Linux version 6.1", "PMEMSUITE start cases=1"], ""),
            None
        );
        assert!(!userspace_blocked(&[
            "Linux version",
            "Run /init as init process"
        ]));
    }

    #[test]
    fn tail_shows_the_last_lines() {
        assert_eq!(tail(&["a", "b", "c"], 2), "  | b\n  | c");
        assert_eq!(tail(&["a"], 5), "  | a");
    }
}
