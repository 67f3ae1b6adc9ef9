//! The guest fsync/msync suite, verified end to end from the host.
//!
//! pmvm boots a Linux guest with two NVDIMMs and the suite's initramfs
//! (guest-images/build.sh). For every `PMEMTEST` line, before acknowledging it, this harness
//! checks that the device's flush counter advanced during the case, that the backing file
//! holds the reported bytes, and that cachestat(2) shows those host pages clean; then it
//! prints a case x filesystem table (and saves it when PMVM_SUITE_RESULTS is set).
//!
//! Where guest user space may not run (a kernel without the system-call patch on a host whose
//! KVM emulates guest kernel code), a preflight boot finds out first and the test ends with
//! `SKIP: <stage reached> <reason>`, never a pass; anywhere else a guest that stops short of
//! the suite fails, naming the stage it reached. Environment: PMVM_SUITE_KERNEL / PMVM_SUITE_MODULES (your own kernel),
//! PMVM_SUITE_CMDLINE (extra kernel options), PMVM_SUITE_EMULATED=0|1 (override host
//! detection), PMVM_SUITE_NO_BUILD=1 (use the built image, fail if stale),
//! PMVM_SUITE_RESULTS=1|PATH (save the results), PMVM_SUITE_CPUS=N (vCPUs, default 1). See
//! docs/guest-suite.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pmem_tests::host::api::{ApiCounters, CounterSource};
use pmem_tests::host::session::Session;
use pmem_tests::host::stages::{self, Stage};
use pmem_tests::host::table;
use pmvm_tests::linux::{emulating_host, parse_env, EmulatedProfile};
use pmvm_tests::{in_ci, kvm_or_skip, repo_root, Pmvm};

const TEST: &str = "guest suite";
/// The NVDIMMs: ext4 and the raw cases on the first, xfs (which needs 300 MB) on the second.
const PMEM_SIZES: [&str; 2] = ["256M", "512M"];
/// The full initramfs is about 100 MB and unpacks into guest RAM.
const MEMORY: &str = "1536M";
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// What build.sh built, from its image.env.
#[derive(Clone, Debug, PartialEq)]
struct Image {
    kernel: PathBuf,
    kind: String,
    minimal: Option<PathBuf>,
    initramfs: PathBuf,
    preflight: PathBuf,
    tools: PathBuf,
}

impl Image {
    fn from_env(path: &Path, text: &str) -> Result<Image, String> {
        let map = parse_env(text).map_err(|e| format!("{}: {e}", path.display()))?;
        let get = |k: &str| {
            map.get(k)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "{} has no {k}: rebuild it with guest-images/build.sh",
                        path.display()
                    )
                })
        };
        let file = |k: &str| -> Result<PathBuf, String> {
            let p = PathBuf::from(get(k)?);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "{} names {k}={} but that file is missing: run guest-images/build.sh",
                    path.display(),
                    p.display()
                ))
            }
        };
        Ok(Image {
            kernel: file("PMEMTESTS_KERNEL")?,
            kind: get("PMEMTESTS_KERNEL_KIND")?,
            minimal: match map.get("PMEMTESTS_KERNEL_MINIMAL") {
                Some(v) if !v.is_empty() => Some(file("PMEMTESTS_KERNEL_MINIMAL")?),
                _ => None,
            },
            initramfs: file("PMEMTESTS_INITRAMFS")?,
            preflight: file("PMEMTESTS_PREFLIGHT")?,
            tools: file("PMEMTESTS_TOOLS")?,
        })
    }
}

/// Runs guest-images/build.sh (or only checks the image with PMVM_SUITE_NO_BUILD=1).
fn build_image() -> Result<Image, String> {
    // Once per test process: the suite and the ndctl test share the image.
    static IMAGE: std::sync::OnceLock<Result<Image, String>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(run_build_sh).clone()
}

fn run_build_sh() -> Result<Image, String> {
    let script = repo_root().join("guest-images/build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if let Some(k) = env("PMVM_SUITE_KERNEL") {
        cmd.args(["--kernel", &k]);
        if let Some(m) = env("PMVM_SUITE_MODULES") {
            cmd.args(["--modules", &m]);
        }
    }
    if env("PMVM_SUITE_NO_BUILD").as_deref() == Some("1") {
        cmd.arg("--check");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let env_path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    let text = std::fs::read_to_string(&env_path).map_err(|e| {
        format!(
            "build.sh printed {}, which cannot be read: {e}",
            env_path.display()
        )
    })?;
    Image::from_env(&env_path, &text)
}

/// How the guest is booted.
#[derive(Debug, PartialEq)]
struct Boot {
    kernel: PathBuf,
    /// Which kernel, in words, for reports.
    label: String,
    /// Whether the kernel carries guest-images/kernel/patches/0003 (the minimal kernel does),
    /// without which user space cannot run where KVM delivers SYSCALL as a page fault.
    syscall_patch: bool,
    pmvm_args: Vec<String>,
    cmdline: String,
}

fn choose_boot(
    image: &Image,
    emulated: Option<&EmulatedProfile>,
    user: bool,
    extra: Option<&str>,
) -> Boot {
    let (kernel, label, syscall_patch) = match (user, emulated, &image.minimal) {
        (true, _, _) => (image.kernel.clone(), "your kernel".to_string(), false),
        (false, Some(e), Some(min)) if e.kernel == "minimal" => (
            min.clone(),
            "the minimal kernel of build-kernel.sh".to_string(),
            true,
        ),
        _ => (
            image.kernel.clone(),
            format!("the {} kernel", image.kind),
            false,
        ),
    };
    let mut cmdline = BASE_CMDLINE.to_string();
    if let Some(e) = emulated {
        cmdline = format!("{cmdline} {}", e.cmdline);
    }
    if let Some(x) = extra {
        cmdline = format!("{cmdline} {x}");
    }
    Boot {
        kernel,
        label: match emulated {
            Some(_) => format!("{label} with the emulated-KVM options"),
            None => label,
        },
        syscall_patch,
        pmvm_args: emulated.map(|e| e.pmvm_args.clone()).unwrap_or_default(),
        cmdline,
    }
}

/// What one boot of the image gets besides the kernel.
struct Launch<'a> {
    initrd: &'a Path,
    /// tools.img, given as a read-only NVDIMM after the suite's two.
    tools: Option<&'a Path>,
    cmdline_extra: &'a str,
    /// `persist=` for the suite's NVDIMMs, when not the default.
    persist: Option<&'a str>,
    api: Option<&'a Path>,
}

/// pmvm's arguments for a boot with two NVDIMMs in `dir` (and the tools, when given).
fn pmvm_args(boot: &Boot, launch: &Launch, dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        boot.kernel.display().to_string(),
        "--initrd".into(),
        launch.initrd.display().to_string(),
        "--memory".into(),
        MEMORY.into(),
        "--cpus".into(),
        env("PMVM_SUITE_CPUS").unwrap_or_else(|| "1".into()),
        "--cmdline".into(),
        format!("{} {}", boot.cmdline, launch.cmdline_extra),
    ];
    args.extend(boot.pmvm_args.iter().cloned());
    for (i, size) in PMEM_SIZES.iter().enumerate() {
        args.push("--pmem".into());
        let mut spec = format!(
            "path={},size={size},id=pmem{i}",
            dir.join(format!("pmem{i}.img")).display()
        );
        if let Some(p) = launch.persist {
            spec.push_str(&format!(",persist={p}"));
        }
        args.push(spec);
    }
    if let Some(tools) = launch.tools {
        args.push("--pmem".into());
        args.push(format!("path={},readonly=on,id=tools", tools.display()));
    }
    if let Some(sock) = launch.api {
        args.push("--api-sock".into());
        args.push(sock.display().to_string());
    }
    args
}

fn pmvm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

/// Scratch space for backing files: on a disk, since tmpfs pages are never clean.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch directory")
}

/// What a boot that ran to its end (or was stopped) showed.
struct Seen {
    console: Vec<String>,
    stderr: String,
    exited: bool,
}

impl Seen {
    fn stage(&self) -> Stage {
        Stage::reached(&self.console)
    }

    fn reason(&self, waited: Duration) -> String {
        let died = stages::death(&self.console, &self.stderr);
        if stages::userspace_blocked(&self.console) {
            format!(
                "guest user space cannot run on this host's KVM: the first system call of \
                 /init faults (kernel without the system-call patch, \
                 guest-images/kernel/patches/0003): {}",
                died.unwrap_or_default()
            )
        } else if let Some(d) = died {
            d
        } else if self.exited {
            "pmvm exited without a reason on the console".to_string()
        } else {
            format!("no further progress within {waited:?}")
        }
    }
}

/// Boots the preflight image: the suite alone as /init, listing the NVDIMMs.
fn preflight(boot: &Boot, image: &Image, timeout: Duration) -> Seen {
    let dir = scratch();
    let launch = Launch {
        initrd: &image.preflight,
        tools: None,
        cmdline_extra: "pmemtests.preflight=1",
        persist: None,
        api: None,
    };
    let args = pmvm_args(boot, &launch, dir.path());
    let mut vm = Pmvm::spawn(&pmvm_bin(), &args);
    let exited = vm.wait_exit(timeout).ok();
    Seen {
        console: vm.lines(),
        stderr: exited.as_ref().map(|(_, e)| e.clone()).unwrap_or_default(),
        exited: exited.is_some(),
    }
}

/// The outcome of a full run.
struct SuiteRun {
    table: String,
    problems: Vec<String>,
    info: Vec<String>,
}

/// Boots the suite and answers it line by line until it powers off.
fn run_suite(boot: &Boot, image: &Image) -> SuiteRun {
    let dir = scratch();
    let sock = dir.path().join("api.sock");
    let launch = Launch {
        initrd: &image.initramfs,
        tools: Some(&image.tools),
        cmdline_extra: "",
        persist: None,
        api: Some(&sock),
    };
    let args = pmvm_args(boot, &launch, dir.path());
    let mut vm = Pmvm::spawn_with_input(&pmvm_bin(), &args);
    let mut session = Session::new(ApiCounters { sock: sock.clone() });
    let boot_timeout = Duration::from_secs(300);
    let quiet_timeout = Duration::from_secs(180);
    let started = Instant::now();
    // Progress: a console line, or pmvm's counters or dirty log moving (a loaded host can slow a
    // guest's mkfs past the limit without it printing; a hung guest neither prints nor stores).
    let mut last_line = Instant::now();
    let mut activity = ApiCounters { sock: sock.clone() };
    let mut last_counts = None;
    let mut next = 0;
    let mut problems = Vec::new();
    loop {
        match vm.wait_for_from(next, "", Duration::from_secs(2)) {
            Ok((i, line)) => {
                next = i + 1;
                last_line = Instant::now();
                match session.on_line(&line) {
                    Ok(Some(ack)) => {
                        if let Err(e) = vm.send(format!("{ack}\n").as_bytes()) {
                            problems.push(format!("cannot answer the guest: {e}"));
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        problems.push(format!(
                            "{e}\nlast console lines:\n{}",
                            stages::tail(&vm.lines(), 15)
                        ));
                        break;
                    }
                }
                if session.finished() {
                    break;
                }
            }
            Err(_) => {
                if let Ok((_, stderr)) = vm.wait_exit(Duration::ZERO) {
                    let console = vm.lines();
                    problems.push(format!(
                        "the guest stopped {}: {}\nlast console lines:\n{}",
                        session.position(),
                        stages::death(&console, &stderr)
                            .unwrap_or_else(|| "pmvm exited".to_string()),
                        stages::tail(&console, 15)
                    ));
                    break;
                }
                let limit = if session.planned().is_some() {
                    quiet_timeout
                } else {
                    boot_timeout
                };
                let counts = activity.sample().ok().map(|d| {
                    d.iter()
                        .map(|d| (d.flushes, d.pages_written, d.pending))
                        .collect::<Vec<_>>()
                });
                if counts.is_some() && counts != last_counts {
                    last_counts = counts;
                    last_line = Instant::now();
                }
                if last_line.elapsed() > limit && started.elapsed() > limit {
                    problems.push(format!(
                        "no console line and no store to pmem for {limit:?} while the guest was {} \
                         (stage: {})\n\
                         last console lines:\n{}",
                        session.position(),
                        Stage::reached(&vm.lines()),
                        stages::tail(&vm.lines(), 15)
                    ));
                    break;
                }
            }
        }
    }
    if session.finished() {
        match vm.wait_exit(Duration::from_secs(120)) {
            Ok((status, _)) if status.code() == Some(0) => {}
            Ok((status, stderr)) => problems.push(format!(
                "pmvm exited with {status} after the suite: {}",
                stderr.lines().last().unwrap_or_default()
            )),
            Err(_) => {
                problems.push("the guest did not power off within 120 s of the summary".into())
            }
        }
    }
    let nvdimms = session
        .info()
        .iter()
        .filter(|l| l.starts_with("nvdimm dev="))
        .count();
    if session.finished() && nvdimms != PMEM_SIZES.len() {
        problems.push(format!(
            "the guest sees {nvdimms} NVDIMMs, pmvm gave it {}",
            PMEM_SIZES.len()
        ));
    }
    problems.extend(session.problems());
    let failed = session.rows().iter().filter(|r| r.verdict.is_failure());
    problems.extend(failed.map(|r| format!("{} {}: {}", r.case, r.fs, r.verdict.detail())));
    problems.dedup();
    SuiteRun {
        table: table::render(session.rows()),
        problems,
        info: session.info().to_vec(),
    }
}

/// Saves a results page when PMVM_SUITE_RESULTS asks for one ("1": the docs page).
fn save_results(boot: &Boot, outcome: &str, body: &str) {
    let Some(dest) = env("PMVM_SUITE_RESULTS") else {
        return;
    };
    let path = if dest == "1" {
        repo_root().join("docs/guest-suite-results.md")
    } else {
        PathBuf::from(dest)
    };
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = if emulating_host() {
        "emulates guest kernel code (nested PVM)"
    } else {
        "hardware virtualization"
    };
    let text = format!(
        "# Guest suite results\n\n\
         Written by `tests/guest_suite.rs` (PMVM_SUITE_RESULTS) on {date}.\n\n\
         - Host: Linux {}, KVM {kvm}\n\
         - Guest kernel: {} (`{}`)\n\
         - pmvm options: `{}`\n\
         - Kernel command line: `{}`\n\n\
         **Outcome:** {outcome}\n\n{body}",
        host.trim(),
        boot.label,
        boot.kernel.display(),
        boot.pmvm_args.join(" "),
        boot.cmdline,
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    println!("results saved to {}", path.display());
}

/// The built image, the emulating host's profile (if this is one) and how to boot; None after
/// printing why the test cannot run (a failure under CI).
fn image_and_boot(test: &str) -> Option<(Image, Option<EmulatedProfile>, Boot)> {
    if !kvm_or_skip(test) {
        return None;
    }
    let image = match build_image() {
        Ok(i) => i,
        Err(e) if in_ci() => panic!("{test}: the guest image: {e}"),
        Err(e) => {
            println!("SKIP: {test}: stage reached: none (no guest image): {e}");
            return None;
        }
    };
    let emulated = emulating_host().then(EmulatedProfile::load);
    let boot = choose_boot(
        &image,
        emulated.as_ref(),
        env("PMVM_SUITE_KERNEL").is_some(),
        env("PMVM_SUITE_CMDLINE").as_deref(),
    );
    Some((image, emulated, boot))
}

#[test]
fn guest_suite_end_to_end() {
    let Some((image, emulated, boot)) = image_and_boot(TEST) else {
        return;
    };
    println!("booting {} ({})", boot.label, boot.kernel.display());

    let wait = if emulated.is_some() {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(120)
    };
    // Only a kernel without the system-call patch may stop short of user space on an emulating
    // host: a short boot tells that (a skip) from a failure. Any other kernel runs the suite
    // straight away, which on an emulating host saves a boot of over a minute.
    if emulated.is_some() && !boot.syscall_patch {
        let start = Instant::now();
        let pre = preflight(&boot, &image, wait);
        let stage = pre.stage();
        println!(
            "preflight: stage reached: {stage} after {:?}",
            start.elapsed()
        );
        if stage < Stage::UserSpace {
            let reason = pre.reason(wait);
            let tail = stages::tail(&pre.console, 12);
            if stages::userspace_blocked(&pre.console) {
                let line = format!("stage reached: {stage} ({}); {reason}", boot.label);
                save_results(
                    &boot,
                    &format!("SKIP: {line}"),
                    &format!(
                        "Last console lines:\n\n```\n{}\n```\n",
                        tail.replace("  | ", "")
                    ),
                );
                println!("SKIP: {TEST}: {line}");
                return;
            }
            panic!(
                "{TEST}: the guest never ran user space; stage reached: {stage}: {reason}\n{tail}"
            );
        }
    }

    let run = run_suite(&boot, &image);
    for i in &run.info {
        println!("guest: {i}");
    }
    println!("{}", run.table);
    let outcome = if run.problems.is_empty() {
        "pass".to_string()
    } else {
        format!("FAIL ({} problems)", run.problems.len())
    };
    let mut body = run.table.clone();
    if !run.problems.is_empty() {
        body.push_str("\nProblems:\n\n");
        for p in &run.problems {
            body.push_str(&format!("- {}\n", p.lines().next().unwrap_or_default()));
        }
    }
    save_results(&boot, &outcome, &body);
    assert!(
        run.problems.is_empty(),
        "{TEST}: {}",
        run.problems.join("\n")
    );
}

/// The console lines of one ndctl-check step, between its `NDCTL step` and `NDCTL rc` lines,
/// and its exit status.
fn ndctl_step(console: &[String], name: &str) -> (Vec<String>, Option<i32>) {
    let start = format!("NDCTL step {name}:");
    let end = format!("NDCTL rc {name} ");
    let mut out = Vec::new();
    let mut inside = false;
    for line in console {
        if line.starts_with(&start) {
            inside = true;
        } else if let Some(rc) = line.strip_prefix(&end) {
            return (out, rc.trim().parse().ok());
        } else if inside {
            out.push(line.clone());
        }
    }
    (out, None)
}

/// ndctl as users run it (guest-images/initramfs/ndctl-check): `ndctl list -N` shows the raw
/// namespace, `ndctl create-namespace -f -e namespace0.0 -m fsdax` converts it, ext4 mounted
/// with `-o dax` takes a file that pmvm-init fsyncs. pmvm's device is strict (`persist=flush`),
/// so after the guest powers off the host finds ndctl's info block and the file only if the
/// guest's flushes carried them.
#[test]
fn ndctl_converts_a_raw_namespace_and_a_file_fsynced_on_it_reaches_the_host() {
    let test = "guest ndctl";
    let Some((image, emulated, boot)) = image_and_boot(test) else {
        return;
    };
    let dir = scratch();
    let launch = Launch {
        initrd: &image.initramfs,
        tools: Some(&image.tools),
        cmdline_extra: "pmemtests.ndctl=1",
        persist: Some("flush"),
        api: None,
    };
    let start = Instant::now();
    let mut vm = Pmvm::spawn(&pmvm_bin(), &pmvm_args(&boot, &launch, dir.path()));
    let timeout = Duration::from_secs(if emulated.is_some() { 900 } else { 180 });
    if let Err(e) = vm.wait_for("NDCTL done", timeout) {
        let console = vm.lines();
        panic!(
            "{test}: ndctl-check did not finish (stage {}): {e}",
            Stage::reached(&console)
        );
    }
    println!("{test}: ndctl-check done after {:?}", start.elapsed());
    let console = vm.lines();
    for name in [
        "list-before",
        "create",
        "list-after",
        "mkfs",
        "mount",
        "proof",
    ] {
        let (out, rc) = ndctl_step(&console, name);
        assert_eq!(
            rc,
            Some(0),
            "{test}: step {name} failed:\n{}",
            out.join("\n")
        );
    }
    let listing = |name| {
        ndctl_step(&console, name)
            .0
            .join("")
            .replace([' ', '\n'], "")
    };
    let before = listing("list-before");
    assert!(
        before.contains(r#""dev":"namespace0.0","mode":"raw""#),
        "{test}: ndctl list -N before: {before}"
    );
    let after = listing("list-after");
    assert!(
        after.contains(r#""dev":"namespace0.0","mode":"fsdax""#),
        "{test}: ndctl list -N after create-namespace: {after}"
    );
    pmvm_tests::linux::wait_proof(&vm, 0);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{test}: the guest powered off: {stderr}"
    );

    // The host side: pmvm's own reader of the namespace finds ndctl's info block and the ext4
    // behind it; the file's bytes are there.
    let img = dir.path().join("pmem0.img");
    let out = Command::new(pmvm_bin())
        .args(["pmem", "info"])
        .arg(&img)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        info.contains("fsdax (NVDIMM_PFN_INFO)") && info.contains("linux:          accepts it"),
        "{test}: the backing file has no valid fsdax info block:\n{info}"
    );
    let fs_offset = info
        .lines()
        .find_map(|l| l.strip_prefix("filesystem:     ext4 at 0x"))
        .and_then(|rest| rest.split(',').next())
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("{test}: no ext4 in the backing file:\n{info}"));
    pmvm_tests::linux::check_proof_in_backing_file(&img, fs_offset, "/proof.bin");
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn env_files_parse_quotes_comments_and_reject_junk() {
        let m = parse_env("# c\nA=1\n B = \"x y\" \n\nC=\n").unwrap();
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "x y");
        assert_eq!(m["C"], "");
        let err = parse_env("A=1\nnonsense\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("nonsense"), "{err}");
    }

    #[test]
    fn the_checked_in_emulated_options_parse_and_hide_what_the_notes_say() {
        let e = EmulatedProfile::load();
        assert_eq!(e.kernel, "minimal");
        assert!(e.pmvm_args.contains(&"--cpu-vendor".to_string()));
        assert!(e
            .pmvm_args
            .iter()
            .any(|a| a.contains("-cx16") && a.contains("-popcnt") && a.contains("-clwb")));
        for word in [
            "mitigations=off",
            "noxsave",
            "clearcpuid=cx16,popcnt,smap,fsgsbase,clwb",
        ] {
            assert!(e.cmdline.split_whitespace().any(|w| w == word), "{word}");
        }
    }

    fn files(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
        names
            .iter()
            .map(|n| {
                let p = dir.join(n);
                std::fs::write(&p, b"x").unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn image_env_missing_or_stale_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(
            dir.path(),
            &[
                "vmlinux",
                "min",
                "initramfs.cpio",
                "preflight.cpio",
                "tools.img",
            ],
        );
        let text = format!(
            "PMEMTESTS_KERNEL={}\nPMEMTESTS_KERNEL_KIND=debian\nPMEMTESTS_KERNEL_MINIMAL=\n\
             PMEMTESTS_INITRAMFS={}\nPMEMTESTS_PREFLIGHT={}\nPMEMTESTS_TOOLS={}\n",
            f[0].display(),
            f[2].display(),
            f[3].display(),
            f[4].display()
        );
        let env_path = dir.path().join("image.env");
        let img = Image::from_env(&env_path, &text).unwrap();
        assert_eq!(img.minimal, None);
        assert_eq!(img.initramfs, f[2]);
        std::fs::remove_file(&f[2]).unwrap();
        let err = Image::from_env(&env_path, &text).unwrap_err();
        assert!(
            err.contains("PMEMTESTS_INITRAMFS=") && err.contains("run guest-images/build.sh"),
            "{err}"
        );
        let err = Image::from_env(&env_path, "PMEMTESTS_KERNEL_KIND=debian\n").unwrap_err();
        assert!(err.contains("has no PMEMTESTS_KERNEL"), "{err}");
    }

    #[test]
    fn the_minimal_kernel_and_options_are_used_only_on_emulating_hosts() {
        let image = Image {
            kernel: "/k/vmlinux".into(),
            kind: "debian".into(),
            minimal: Some("/k/minimal".into()),
            initramfs: "/i".into(),
            preflight: "/p".into(),
            tools: "/t".into(),
        };
        let e = EmulatedProfile::parse(
            "KERNEL=minimal\nPMVM_ARGS=\"--cpu-vendor intel\"\nKERNEL_CMDLINE=noxsave\n",
        )
        .unwrap();
        let hw = choose_boot(&image, None, false, None);
        assert_eq!(hw.kernel, PathBuf::from("/k/vmlinux"));
        assert_eq!(hw.cmdline, BASE_CMDLINE);
        assert!(hw.pmvm_args.is_empty());
        let emu = choose_boot(&image, Some(&e), false, Some("loglevel=8"));
        assert_eq!(emu.kernel, PathBuf::from("/k/minimal"));
        assert_eq!(emu.cmdline, format!("{BASE_CMDLINE} noxsave loglevel=8"));
        assert_eq!(emu.pmvm_args, vec!["--cpu-vendor", "intel"]);
        assert!(emu.syscall_patch && !hw.syscall_patch);
        // Your own kernel always wins, and may lack the system-call patch.
        let yours = choose_boot(&image, Some(&e), true, None);
        assert_eq!(yours.kernel, PathBuf::from("/k/vmlinux"));
        assert!(!yours.syscall_patch);
        let no_min = Image {
            minimal: None,
            ..image
        };
        assert_eq!(
            choose_boot(&no_min, Some(&e), false, None).kernel,
            PathBuf::from("/k/vmlinux")
        );
    }

    #[test]
    fn pmvm_gets_two_nvdimms_the_tools_the_initrd_and_the_socket() {
        let boot = Boot {
            kernel: "/k".into(),
            label: "k".into(),
            syscall_patch: true,
            pmvm_args: vec!["--cpu-vendor".into(), "intel".into()],
            cmdline: BASE_CMDLINE.into(),
        };
        let launch = Launch {
            initrd: Path::new("/i.cpio"),
            tools: Some(Path::new("/t.img")),
            cmdline_extra: "pmemtests.preflight=1",
            persist: Some("flush"),
            api: Some(Path::new("/d/s")),
        };
        let args = pmvm_args(&boot, &launch, Path::new("/d"));
        let joined = args.join(" ");
        assert!(
            joined.contains("--pmem path=/t.img,readonly=on,id=tools"),
            "{joined}"
        );
        assert!(joined.contains("--initrd /i.cpio"), "{joined}");
        assert!(
            joined.contains("--pmem path=/d/pmem0.img,size=256M,id=pmem0,persist=flush"),
            "{joined}"
        );
        assert!(
            joined.contains("--pmem path=/d/pmem1.img,size=512M,id=pmem1,persist=flush"),
            "{joined}"
        );
        assert!(joined.contains("--api-sock /d/s"), "{joined}");
        assert!(
            args.contains(&format!("{BASE_CMDLINE} pmemtests.preflight=1")),
            "{joined}"
        );
        assert!(joined.ends_with("--api-sock /d/s"));
    }

    #[test]
    fn a_blocked_guest_is_explained_with_its_stage() {
        let seen = Seen {
            console: [
                "Linux version 6.1.192",
                "ACPI: NFIT 0x00000000000E0288 0001C8",
                "Run /init as init process",
                "init[1]: segfault at 0 ip 401000 error 15",
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b",
            ]
            .map(String::from)
            .to_vec(),
            stderr: String::new(),
            exited: true,
        };
        assert_eq!(seen.stage(), Stage::InitStarted);
        let why = seen.reason(Duration::from_secs(1));
        assert!(
            why.starts_with("guest user space cannot run on this host's KVM"),
            "{why}"
        );
        assert!(why.contains("segfault"), "{why}");
        let early = Seen {
            console: vec!["Linux version 6.1.0-56-cloud-amd64".into()],
            stderr: "pmvm: vCPU 0: KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure) at RIP 0xffffffff8305e26c, instruction bytes [cc 90]\n".into(),
            exited: true,
        };
        assert_eq!(early.stage(), Stage::KernelBanner);
        assert!(early
            .reason(Duration::from_secs(1))
            .contains("emulation failure"));
        let hung = Seen {
            console: vec![],
            stderr: String::new(),
            exited: false,
        };
        assert_eq!(
            hung.reason(Duration::from_secs(5)),
            "no further progress within 5s"
        );
    }
}
