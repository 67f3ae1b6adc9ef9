//! The three machines the guest benchmark runs on, each booting the same kernel from a copy of
//! the same fsdax ext4 image: pmvm, QEMU's `nvdimm` and QEMU's `virtio-pmem-pci`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pmvm_tests::linux::{emulating_host, EmulatedProfile};
use pmvm_tests::{wait_api, Client, Pmvm};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Machine {
    Pmvm,
    QemuNvdimm,
    QemuVirtioPmem,
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Pmvm => "pmvm",
            Machine::QemuNvdimm => "QEMU nvdimm",
            Machine::QemuVirtioPmem => "QEMU virtio-pmem",
        }
    }
}

/// What a machine needs to boot the benchmark.
pub struct Boot<'a> {
    pub pmvm: &'a Path,
    pub qemu: &'a Path,
    pub kernel: &'a Path,
    pub image: &'a Path,
    pub sock: &'a Path,
    /// The benchmark's own words for the kernel command line (`PMVM_BENCH_...=`), after any
    /// options added with `--append`.
    pub bench_env: &'a str,
}

fn cmdline(b: &Boot, pci: bool) -> String {
    let profile = if emulating_host() {
        EmulatedProfile::load().cmdline
    } else {
        String::new()
    };
    let pci = if pci { "" } else { "pci=off" };
    format!(
        "console=ttyS0 {profile} reboot=k {pci} root=/dev/pmem0 rootflags=dax rw \
         init=/init {}",
        b.bench_env
    )
}

/// Starts `machine`; QEMU with `accel` (`kvm` or `tcg`). For pmvm, waits until its control
/// socket answers.
pub fn start(machine: Machine, b: &Boot, accel: &str) -> Result<Pmvm, String> {
    if machine == Machine::Pmvm {
        let mut args: Vec<String> = vec!["--kernel".into(), b.kernel.display().to_string()];
        if emulating_host() {
            args.extend(EmulatedProfile::load().pmvm_args);
        }
        args.extend([
            "--memory=128M".into(),
            "--pmem".into(),
            format!("path={}", b.image.display()),
            "--cmdline".into(),
            cmdline(b, false),
            "--api-sock".into(),
            b.sock.display().to_string(),
        ]);
        let vm = Pmvm::spawn_with_input(b.pmvm, &args);
        wait_api(b.sock, Duration::from_secs(60))
            .map_err(|e| format!("pmvm's control socket: {e}"))?;
        return Ok(vm);
    }
    let size = std::fs::metadata(b.image)
        .map_err(|e| format!("{}: {e}", b.image.display()))?
        .len();
    // On an emulating (PVM) host QEMU's `-cpu host` asks for IA32_ARCH_CAPABILITIES, which
    // that KVM refuses ("failed to set MSR 0x10a").
    let cpu = match (accel, emulating_host()) {
        ("kvm", true) => "host,-arch-capabilities",
        ("kvm", false) => "host",
        _ => "max",
    };
    // q35 for both: virtio-pmem-pci has no MSI-X, so its interrupt is the INTx line that the
    // ACPI _PRT method routes. pc's _PRT builds its table in an AML loop, which on an emulating
    // host runs past ACPI's 30 s loop limit ("can't derive routing for PCI INT A"), and the
    // guest then waits forever for its first flush; q35's _PRT returns a fixed table.
    let (machine_opt, device, pci) = match machine {
        Machine::QemuNvdimm => ("q35,nvdimm=on", "nvdimm,id=nv0,memdev=pm0", false),
        _ => ("q35", "virtio-pmem-pci,id=vp0,memdev=pm0", true),
    };
    let args: Vec<String> = [
        "-accel",
        accel,
        "-machine",
        machine_opt,
        "-cpu",
        cpu,
        "-m",
        "128M,slots=2,maxmem=4G",
        "-object",
        &format!(
            "memory-backend-file,id=pm0,share=on,mem-path={},size={size}",
            b.image.display()
        ),
        "-device",
        device,
        "-kernel",
        &b.kernel.display().to_string(),
        "-append",
        &cmdline(b, pci),
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-nodefaults",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec();
    Ok(Pmvm::spawn_with_input(b.qemu, &args))
}

/// pmvm's counters of its one device: (flushes, pages written, latency histogram).
pub fn pmvm_stats(sock: &Path) -> Result<(u64, u64, Vec<u64>), String> {
    let list = Client::new(sock)
        .pmem_list()
        .map_err(|e| format!("GET /v1/pmem: {}", pmvm::api::error_chain(&e)))?;
    let dev = list
        .devices
        .into_iter()
        .next()
        .ok_or("GET /v1/pmem: pmvm lists no device")?;
    let s = dev.stats;
    Ok((s.flushes, s.pages_written, s.latency_us.histogram))
}

/// Makes the backing file's dirty host pages durable, so the next cachestat counts only what
/// the guest dirtied since.
pub fn host_fdatasync(path: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_data())
        .map_err(|e| format!("fdatasync {}: {e}", path.display()))
}

/// A fresh copy of `image` for one machine.
pub fn copy_image(image: &Path, dir: &Path, machine: Machine) -> Result<PathBuf, String> {
    let to = dir.join(format!("{}.img", machine.name().replace(' ', "-")));
    std::fs::copy(image, &to).map_err(|e| format!("copying {}: {e}", image.display()))?;
    Ok(to)
}
