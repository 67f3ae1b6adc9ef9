//! Keeps the probe guest runnable on this CI host: its kernel-mode code is emulated, and the
//! emulator fails on vector registers and on a handful of instructions. The probe's
//! disassembly must contain none of them, except the one `cmpxchg16b` that the `emufail` word
//! exists to execute, isolated in its own symbol.

use std::process::Command;

use pmvm_tests::probe_elf;

/// The function that implements `emufail`; the only place `cmpxchg16b` may appear.
const EMUFAIL_SYMBOL: &str = "probe_emufail_cmpxchg16b";

/// Instruction prefixes objdump prints before the mnemonic.
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repe", "repnz", "repne", "data16", "addr32", "notrack", "bnd", "cs",
    "ds", "es", "fs", "gs", "ss",
];

/// One offending disassembly line.
#[derive(Debug, PartialEq)]
struct Finding {
    symbol: String,
    line: String,
    reason: String,
}

/// Why an instruction (objdump's text after the address) is not allowed, if it is not.
fn forbidden(insn: &str) -> Option<String> {
    let code = insn.split('#').next().unwrap_or("");
    for reg in ["%xmm", "%ymm", "%zmm"] {
        if code.contains(reg) {
            return Some(format!("uses a vector register ({reg}..)"));
        }
    }
    let mut tokens = code
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .skip_while(|t| PREFIXES.contains(t) || t.starts_with("rex"));
    let mnemonic = tokens.next()?;
    let bad = match mnemonic {
        "(bad)" => true,
        "cmpxchg16b" | "clac" | "stac" | "fnclex" | "fwait" | "wait" | "verw" | "int3" => true,
        "int" => tokens.next() == Some("$0x3"),
        m => m.starts_with("xrstor") || m.starts_with("xsave") || m.starts_with("popcnt"),
    };
    bad.then(|| format!("instruction {mnemonic}"))
}

/// Scans `objdump -d` output and returns every forbidden line, with its function, except a
/// `cmpxchg16b` inside the function named `cmpxchg16b_allowed_in`.
fn scan(disassembly: &str, cmpxchg16b_allowed_in: Option<&str>) -> Vec<Finding> {
    let mut symbol = String::new();
    let mut findings = Vec::new();
    for line in disassembly.lines() {
        // "0000000000200de0 <probe_emufail_cmpxchg16b>:" starts a function.
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .filter(|(addr, _)| addr.chars().all(|c| c.is_ascii_hexdigit()))
            .map(|(_, name)| name)
        {
            symbol = name.to_string();
            continue;
        }
        // "  200de0:\tlock cmpxchg16b 0x5220(%rip)" is an instruction.
        let Some((addr, insn)) = line.split_once(':') else {
            continue;
        };
        let addr = addr.trim();
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let Some(reason) = forbidden(insn.trim()) else {
            continue;
        };
        if Some(symbol.as_str()) == cmpxchg16b_allowed_in && reason == "instruction cmpxchg16b" {
            continue;
        }
        findings.push(Finding {
            symbol: symbol.clone(),
            line: line.trim().to_string(),
            reason,
        });
    }
    findings
}

fn disassemble() -> String {
    let elf = probe_elf();
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "att"])
        .arg(&elf)
        .output()
        .unwrap_or_else(|e| panic!("cannot run objdump (install binutils): {e}"));
    assert!(
        out.status.success(),
        "objdump -d {} failed: {}",
        elf.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("objdump prints text")
}

#[test]
fn probe_has_no_instruction_the_ci_emulator_rejects() {
    let text = disassemble();
    assert!(
        text.contains("<_start>:") && text.contains("<probe_main>:"),
        "disassembly lacks the probe's entry points:\n{text}"
    );
    let findings = scan(&text, Some(EMUFAIL_SYMBOL));
    let report: Vec<String> = findings
        .iter()
        .map(|f| format!("  in {}: {} ({})", f.symbol, f.line, f.reason))
        .collect();
    assert!(
        findings.is_empty(),
        "probe.elf contains {} forbidden instruction(s):\n{}",
        findings.len(),
        report.join("\n")
    );
}

/// Without the whitelist the scan of the real disassembly must find the emufail instruction:
/// proof that it parses objdump's actual output rather than passing vacuously.
#[test]
fn scan_of_the_real_probe_sees_the_emufail_cmpxchg16b_when_not_whitelisted() {
    let found = scan(&disassemble(), None);
    let where_: Vec<(&str, &str)> = found
        .iter()
        .map(|f| (f.symbol.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(where_, vec![(EMUFAIL_SYMBOL, "instruction cmpxchg16b")]);
}

/// pmvm loads PT_LOAD segments at p_paddr (at or above 1 MiB) and enters at e_entry in long
/// mode; a PT_NOTE could be taken for a PVH entry note.
#[test]
fn probe_elf_loads_at_or_above_one_mib_without_notes() {
    let bytes = std::fs::read(probe_elf()).unwrap();
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(bytes[4], 2, "ELFCLASS64");
    assert_eq!(u16_at(18), 62, "EM_X86_64");
    let entry = u64_at(24);
    assert_eq!(entry, 0x20_0000, "linked at 2 MiB");
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    let mut loads = 0;
    for i in 0..phnum as usize {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(ph);
        assert_ne!(p_type, 4, "program header {i} is a PT_NOTE");
        if p_type == 1 {
            let (paddr, memsz) = (u64_at(ph + 24), u64_at(ph + 40));
            assert!(paddr >= 0x10_0000, "PT_LOAD {i} at {paddr:#x}, below 1 MiB");
            assert!(
                paddr + memsz <= 0x100_0000,
                "PT_LOAD {i} ends at {:#x}, beyond 16 MiB",
                paddr + memsz
            );
            loads += 1;
        }
    }
    assert!(loads >= 1, "no PT_LOAD segment");
}

#[test]
fn scanner_flags_vector_registers() {
    let text = "0000000000200000 <f>:\n  200000:\tpxor   %xmm0,%xmm0\n  200004:\tvmovdqu %ymm1,(%rax)\n  200008:\tmov    %rax,%rbx\n";
    let found = scan(text, Some(EMUFAIL_SYMBOL));
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].symbol, "f");
    assert!(found[0].reason.contains("%xmm"), "{found:?}");
    assert!(found[1].line.contains("vmovdqu"), "{found:?}");
}

#[test]
fn scanner_flags_each_forbidden_instruction() {
    for insn in [
        "lock cmpxchg16b (%rdi)",
        "xrstor64 (%rsp)",
        "xrstors64 (%rsp)",
        "xsaveopt (%rdi)",
        "xsave64 (%rdi)",
        "popcnt %rdi,%rax",
        "clac",
        "stac",
        "fnclex",
        "fwait",
        "wait",
        "verw   0x10(%rip)",
        "int3",
        "int    $0x3",
        "(bad)",
    ] {
        let text = format!("0000000000200000 <main>:\n  200000:\t{insn}\n");
        let found = scan(&text, Some(EMUFAIL_SYMBOL));
        assert_eq!(found.len(), 1, "{insn:?} not flagged: {found:?}");
        assert_eq!(found[0].symbol, "main");
    }
}

#[test]
fn scanner_passes_plain_code_and_names_that_only_look_alike() {
    let text = "0000000000200000 <stack_user>:\n\
                \x20 200000:\tlea    0x8000(%rip),%rsp        # 208000 <stac_wait_xmm>\n\
                \x20 200007:\tcall   200010 <popcnt_table>\n\
                \x20 20000c:\tint    $0x80\n\
                \x20 20000e:\trep stos %rax,%es:(%rdi)\n\
                \x20 200011:\tsfence\n";
    assert_eq!(scan(text, Some(EMUFAIL_SYMBOL)), vec![]);
}

#[test]
fn scanner_allows_cmpxchg16b_only_in_the_emufail_symbol() {
    let text = format!(
        "0000000000200000 <{EMUFAIL_SYMBOL}>:\n  200000:\tlock cmpxchg16b 0x10(%rip)\n  200008:\tpxor %xmm0,%xmm0\n\n\
         0000000000200010 <other>:\n  200010:\tlock cmpxchg16b (%rdi)\n"
    );
    let found = scan(&text, Some(EMUFAIL_SYMBOL));
    let where_: Vec<(&str, &str)> = found
        .iter()
        .map(|f| (f.symbol.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(
        where_,
        vec![
            (EMUFAIL_SYMBOL, "uses a vector register (%xmm..)"),
            ("other", "instruction cmpxchg16b"),
        ]
    );
}
