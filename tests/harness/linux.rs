//! What the tests that boot Linux share: the minimal kernel, the small static init, and the
//! options that let a Linux guest run on a host whose KVM emulates guest kernel code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{in_ci, repo_root, Pmvm};

/// Whether this host's KVM emulates guest kernel code (nested PVM). `PMVM_SUITE_EMULATED=1|0`
/// overrides the detection.
pub fn emulating_host() -> bool {
    match std::env::var("PMVM_SUITE_EMULATED").ok().as_deref() {
        Some("1") => true,
        Some("0") => false,
        _ => Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// `KEY=value` and `KEY="value"` lines; `#` starts a comment line.
pub fn parse_env(text: &str) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: {line:?} is not KEY=value", n + 1))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        map.insert(k.trim().to_string(), v.to_string());
    }
    Ok(map)
}

/// The options that let Linux run where KVM emulates guest kernel code
/// (guest-images/suite-emulated.conf, the one definition of them).
#[derive(Debug, PartialEq)]
pub struct EmulatedProfile {
    /// Which kernel: "minimal" or "debian".
    pub kernel: String,
    pub pmvm_args: Vec<String>,
    pub cmdline: String,
}

impl EmulatedProfile {
    pub fn parse(text: &str) -> Result<EmulatedProfile, String> {
        let map = parse_env(text)?;
        let get = |k: &str| {
            map.get(k)
                .cloned()
                .ok_or_else(|| format!("suite-emulated.conf has no {k}"))
        };
        Ok(EmulatedProfile {
            kernel: get("KERNEL")?,
            pmvm_args: get("PMVM_ARGS")?
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            cmdline: get("KERNEL_CMDLINE")?,
        })
    }

    pub fn load() -> EmulatedProfile {
        let path = repo_root().join("guest-images/suite-emulated.conf");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        EmulatedProfile::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

/// Runs a guest-images build script and returns the path on the last line of its stdout.
fn build(script: &str) -> Result<PathBuf, String> {
    let script = repo_root().join("guest-images").join(script);
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        println!("{line}");
    }
    let name = script.file_name().unwrap_or_default().to_string_lossy();
    if !out.status.success() {
        let last = stderr.lines().last().unwrap_or("no message");
        return Err(format!("{name} failed: {last}"));
    }
    let path = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim(),
    );
    if !path.is_file() {
        return Err(format!("{name} printed {path:?}, not a file"));
    }
    println!(
        "{name}: ready after {:.1} s: {}",
        start.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(path)
}

/// The minimal kernel of guest-images/build-kernel.sh, built (or found in the cache) once per
/// test process.
pub fn minimal_kernel() -> &'static Result<PathBuf, String> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL.get_or_init(|| build("build-kernel.sh"))
}

/// The minimal kernel, or None after printing why the test cannot run (a failure under CI).
pub fn minimal_kernel_or_skip(test: &str) -> Option<PathBuf> {
    match minimal_kernel() {
        Ok(p) => Some(p.clone()),
        Err(why) if in_ci() => panic!("{test}: the minimal kernel is required under CI: {why}"),
        Err(why) => {
            println!("SKIP: {test}: kernel build: {why}");
            None
        }
    }
}

/// The initramfs of guest-images/build-init.sh (pmvm-init as /init); the static binary itself
/// sits beside it as `pmvm-init`.
pub fn init_cpio() -> PathBuf {
    static CPIO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match CPIO.get_or_init(|| build("build-init.sh")) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The static pmvm-init binary, to be copied into a guest's root filesystem as /init.
pub fn init_elf() -> PathBuf {
    init_cpio().with_file_name("pmvm-init")
}

/// How many bytes pmvm-init's dax-fsync mode writes (PMVM_PROOF_BYTES on the command line).
pub const PROOF_BYTES: usize = 16384;

/// Byte `i` of what pmvm-init's dax-fsync mode writes.
pub fn proof_byte(i: usize) -> u8 {
    (i.wrapping_mul(131) + i / 4096) as u8
}

/// Waits for pmvm-init's proof line: it wrote, fsynced, and the file is DAX.
pub fn wait_proof(vm: &Pmvm, from: usize) -> String {
    let line = vm
        .wait_for_from(from, "pmvm-init: proof ", Duration::from_secs(180))
        .map(|(_, l)| l)
        .unwrap_or_else(|e| {
            let died = vm.lines().into_iter().skip(from).find(|l| {
                ["segfault", "Kernel panic", "Failed to execute"]
                    .iter()
                    .any(|w| l.contains(w))
            });
            panic!("pmvm-init did not write its proof ({died:?}): {e}")
        });
    assert!(
        line.contains(&format!("bytes={PROOF_BYTES} ")) && line.contains(" dax=1 "),
        "pmvm-init's proof is not a DAX file of {PROOF_BYTES} bytes: {line}"
    );
    line
}

/// After the guest is gone: the file at `path` in the ext4 that starts `fs_offset` bytes into
/// the backing file `img` holds exactly what pmvm-init wrote. debugfs (on a copy of the
/// filesystem) names its blocks; their bytes are read from the backing file itself.
pub fn check_proof_in_backing_file(img: &Path, fs_offset: u64, path: &str) {
    let image = std::fs::read(img).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ext4 = dir.path().join("ext4.img");
    std::fs::write(&ext4, &image[fs_offset as usize..]).unwrap();
    let debugfs = |req: &str| {
        let out = Command::new("debugfs")
            .args(["-R", req])
            .arg(&ext4)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let block_size: u64 = debugfs("stats")
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("debugfs stats shows the block size");
    let blocks: Vec<u64> = debugfs(&format!("blocks {path}"))
        .split_whitespace()
        .map(|b| b.parse().expect("block numbers"))
        .collect();
    let needed = PROOF_BYTES.div_ceil(block_size as usize);
    assert_eq!(
        blocks.len(),
        needed,
        "{path} in the backing file has blocks {blocks:?}, expected {needed}: its size or \
         its extent did not reach the file"
    );
    for (n, blk) in blocks.iter().enumerate() {
        let at = (fs_offset + blk * block_size) as usize;
        let first = n * block_size as usize;
        let len = (block_size as usize).min(PROOF_BYTES - first);
        let got = &image[at..at + len];
        if let Some(bad) = (0..len).find(|&i| got[i] != proof_byte(first + i)) {
            panic!(
                "{path} byte {} (file offset {:#x}) is {:#04x}, the guest wrote {:#04x}: \
                 its fsync returned but the data is not in the backing file",
                first + bad,
                at + bad,
                got[bad],
                proof_byte(first + bad)
            );
        }
    }
    println!(
        "proof: {PROOF_BYTES} bytes of {path} found in {} at blocks {blocks:?} (filesystem at \
         {fs_offset:#x})",
        img.display()
    );
}
