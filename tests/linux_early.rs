//! Debian's stock cloud kernel under pmvm, as far as this host lets it go: the banner and the
//! kernel's own ACPI table list, with no checksum or parse warnings. On hardware KVM the kernel
//! then boots on, panics for want of a root file system and reboots, which ends pmvm with 0; on
//! a host whose KVM emulates guest kernel code it dies of an emulation failure first, which
//! pmvm must report on one line. PMVM_LINUX_CMDLINE adds kernel options (scripts/test-nested.sh
//! passes `noxsave`: QEMU's emulated SVM lets the guest change XCR0 behind its hypervisor).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pmvm_tests::linux::emulating_host;
use pmvm_tests::{kvm_or_skip, repo_root, Pmvm};

/// Fetches and unpacks the kernel; `None` (with the reason) where it cannot be fetched.
fn debian_kernel() -> Result<PathBuf, String> {
    let script = repo_root().join("guest-images/fetch-debian-kernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let dir = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(dir.lines().last().unwrap_or_default().trim()))
}

/// `base`, then the options in PMVM_LINUX_CMDLINE.
fn cmdline(base: &str) -> String {
    match std::env::var("PMVM_LINUX_CMDLINE") {
        Ok(extra) if !extra.trim().is_empty() => format!("{base} {}", extra.trim()),
        _ => base.to_string(),
    }
}

/// Tables pmvm gives a guest with an NVDIMM, as the kernel names them.
const TABLES: [&str; 6] = ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "NFIT"];

#[test]
fn debian_kernel_lists_every_acpi_table_cleanly() {
    if !kvm_or_skip("debian kernel early boot") {
        return;
    }
    let dir = match debian_kernel() {
        Ok(d) => d,
        Err(why) => {
            println!("SKIP: debian kernel early boot: kernel not fetched: {why}");
            return;
        }
    };
    let start = Instant::now();
    let vmlinux = dir.join("vmlinux");
    let scratch = tempfile::tempdir().unwrap();
    let pmem = format!(
        "path={},size=64M",
        scratch.path().join("pmem0.img").display()
    );
    // Table checksums are only verified early when forced.
    let cmdline = cmdline(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off \
         acpi_force_table_verification",
    );
    let mut vm = Pmvm::spawn(
        &PathBuf::from(env!("CARGO_BIN_EXE_pmvm")),
        &[
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--memory",
            "512M",
            "--pmem",
            &pmem,
            "--cmdline",
            &cmdline,
        ],
    );
    vm.wait_for("Linux version", Duration::from_secs(120))
        .unwrap();
    println!("banner after {:?}", start.elapsed());
    for t in TABLES {
        vm.wait_for(&format!("ACPI: {t} 0x"), Duration::from_secs(240))
            .unwrap();
    }
    // The table list is complete once the kernel reports what it does with it.
    let _ = vm.wait_for("ACPI: ", Duration::from_secs(5));
    println!("ACPI table list after {:?}", start.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    let lines = vm.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ACPI: Early table checksum verification enabled")),
        "the kernel did not verify table checksums\n{}",
        vm.transcript()
    );
    let acpi_problems: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("ACPI") && !l.contains("checksum verification enabled"))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            [
                "checksum",
                "warning",
                "bios bug",
                "invalid",
                "error",
                "firmware bug",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect();
    assert!(
        acpi_problems.is_empty(),
        "ACPI complaints: {acpi_problems:#?}\n{}",
        vm.transcript()
    );

    // With no root= and panic=1 reboot=k, a kernel that runs on panics, reboots through the
    // keyboard controller, and pmvm ends with 0. An emulating host stops it earlier.
    let (status, stderr) = vm.wait_exit(Duration::from_secs(400)).unwrap();
    let fatal = stderr
        .lines()
        .find(|l| l.starts_with("pmvm: vCPU "))
        .unwrap_or_default()
        .to_string();
    println!(
        "pmvm exited with {status} after {:?}: {}",
        start.elapsed(),
        if fatal.is_empty() {
            "no fatal exit"
        } else {
            &fatal
        }
    );
    if status.code() == Some(1) && fatal.contains("emulation failure") {
        assert!(
            emulating_host(),
            "an emulation failure on a KVM that runs guest kernels natively (no kvm_pvm): {}",
            vm.transcript()
        );
        assert!(fatal.contains("RIP 0x"), "{fatal}");
        assert!(fatal.contains("instruction bytes ["), "{fatal}");
        return;
    }
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    assert!(fatal.is_empty(), "{}", vm.transcript());
    let lines = vm.lines();
    for milestone in [
        "Kernel panic - not syncing: VFS: Unable to mount root fs",
        "Rebooting in 1 seconds",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(milestone)),
            "no {milestone:?} before pmvm exited\n{}",
            vm.transcript()
        );
    }
}

/// The bzImage path: linux-loader's setup header, the 64-bit entry at +0x200 and the kernel's own
/// decompressor. An emulating host takes three minutes over the decompressor, a hardware-like
/// KVM seconds, so there it runs only in the nested run, which covers the same path.
#[test]
fn debian_bzimage_boots_through_its_decompressor() {
    if !kvm_or_skip("debian bzImage boot") {
        return;
    }
    if emulating_host() {
        println!(
            "SKIP: debian bzImage boot: this KVM emulates guest kernel code (minutes for the \
             decompressor); `scripts/test-nested.sh linux_early` runs it on a hardware-like KVM"
        );
        return;
    }
    let dir = match debian_kernel() {
        Ok(d) => d,
        Err(why) => {
            println!("SKIP: debian bzImage boot: kernel not fetched: {why}");
            return;
        }
    };
    let start = Instant::now();
    let bz = dir.join("bzImage");
    let vm = Pmvm::spawn(
        &PathBuf::from(env!("CARGO_BIN_EXE_pmvm")),
        &[
            "--kernel",
            bz.to_str().unwrap(),
            "--cmdline",
            &cmdline("console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off"),
        ],
    );
    let banner = vm
        .wait_for("Linux version", Duration::from_secs(420))
        .unwrap();
    println!("bzImage banner after {:?}: {banner}", start.elapsed());
    // The decompressed kernel got pmvm's zero page: command line and e820 map.
    vm.wait_for(
        "Command line: console=ttyS0 earlyprintk=serial",
        Duration::from_secs(30),
    )
    .unwrap();
    vm.wait_for(
        "BIOS-e820: [mem 0x0000000000100000-",
        Duration::from_secs(30),
    )
    .unwrap();
    vm.wait_for("ACPI: RSDP 0x00000000000E0000", Duration::from_secs(60))
        .unwrap();
}
