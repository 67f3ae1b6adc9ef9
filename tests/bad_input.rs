//! The bad-input table: wrong command lines, `--pmem` options, backing files, guest images,
//! subcommands and API requests. Each gets one clear message (naming the bad value) and a
//! non-zero exit, or a JSON error, and never a panic or a signal death. docs/bad-input.md lists
//! the same table; a test checks that every case here appears there.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use pmvm_tests::{kvm_or_skip, probe_elf, repo_root, wait_api, Client, Pmvm};

fn pmvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

/// One bad command line: `{K}` is the probe guest, `{D}` a scratch directory holding
/// `short.img` (1 MiB), `ok.img` (4 MiB), `junk` (not a kernel) and `fifo`.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    /// 1 for pmvm's own errors, 2 for command-line usage errors (clap's).
    code: i32,
    /// Found in the message's first line.
    says: &'static str,
}

const fn case(
    name: &'static str,
    args: &'static [&'static str],
    code: i32,
    says: &'static str,
) -> Case {
    Case {
        name,
        args,
        code,
        says,
    }
}

const CLI: &[Case] = &[
    case(
        "unknown option",
        &["--bogus"],
        2,
        "unexpected argument '--bogus'",
    ),
    case(
        "memory zero",
        &["--kernel", "{K}", "--memory", "0"],
        1,
        "--memory \"0\": a guest needs at least 64M",
    ),
    case(
        "memory unit",
        &["--kernel", "{K}", "--memory", "12Q"],
        1,
        "unknown unit \"Q\"",
    ),
    case(
        "memory too small",
        &["--kernel", "{K}", "--memory", "63M"],
        1,
        "at least 64M",
    ),
    case(
        "memory beyond the host",
        &["--kernel", "{K}", "--memory", "100T"],
        1,
        "exceeds the host's RAM",
    ),
    case(
        "no vCPUs",
        &["--kernel", "{K}", "--cpus", "0"],
        1,
        "--cpus 0",
    ),
    case(
        "too many vCPUs",
        &["--kernel", "{K}", "--cpus", "300"],
        1,
        "at most 254 vCPUs",
    ),
    case(
        "kernel missing",
        &["--kernel", "{D}/nope"],
        1,
        "cannot open",
    ),
    case(
        "kernel is a directory",
        &["--kernel", "{D}"],
        1,
        "not a Linux bzImage or ELF kernel",
    ),
    case(
        "kernel is not a kernel",
        &["--kernel", "{D}/junk"],
        1,
        "not a Linux bzImage or ELF kernel",
    ),
    case(
        "initrd missing",
        &["--kernel", "{K}", "--initrd", "{D}/nope"],
        1,
        "--initrd",
    ),
    case(
        "serial target",
        &["--kernel", "{K}", "--serial", "tcp:1"],
        1,
        "expected `stdio` or `file=PATH`",
    ),
    case(
        "api socket directory missing",
        &["--kernel", "{K}", "--api-sock", "{D}/nope/s"],
        1,
        "does not exist; create it first",
    ),
    case(
        "dirty tracking mode",
        &["--kernel", "{K}", "--dirty-tracking", "sometimes"],
        2,
        "invalid value 'sometimes'",
    ),
    case(
        "seccomp mode",
        &["--kernel", "{K}", "--seccomp", "maybe"],
        2,
        "invalid value 'maybe'",
    ),
    case(
        "no KVM device",
        &["--kernel", "{K}", "--kvm-device", "{D}/nope"],
        1,
        "is KVM enabled on this host",
    ),
    case(
        "dump-acpi into a file",
        &["--dump-acpi", "{D}/junk"],
        1,
        "not a directory",
    ),
    case(
        "pmem without path",
        &["--kernel", "{K}", "--pmem", "size=2M"],
        1,
        "no path=FILE",
    ),
    case(
        "pmem unknown key",
        &["--kernel", "{K}", "--pmem", "path={D}/ok.img,colour=red"],
        1,
        "unknown key \"colour\"",
    ),
    case(
        "pmem size not a size",
        &["--kernel", "{K}", "--pmem", "path={D}/ok.img,size=lots"],
        1,
        "is not a size",
    ),
    case(
        "pmem size not 2 MiB aligned",
        &["--kernel", "{K}", "--pmem", "path={D}/ok.img,size=3M"],
        1,
        "try size=2M or size=4M",
    ),
    case(
        "pmem size beyond the file",
        &["--kernel", "{K}", "--pmem", "path={D}/short.img,size=4M"],
        1,
        "exceeds file length 1M",
    ),
    case(
        "pmem readonly value",
        &[
            "--kernel",
            "{K}",
            "--pmem",
            "path={D}/ok.img,readonly=maybe",
        ],
        1,
        "must be on or off",
    ),
    case(
        "pmem zero hints",
        &["--kernel", "{K}", "--pmem", "path={D}/ok.img,hints=0"],
        1,
        "between 1 and 16",
    ),
    case(
        "pmem too many hints",
        &["--kernel", "{K}", "--pmem", "path={D}/ok.img,hints=99"],
        1,
        "between 1 and 16",
    ),
    case(
        "pmem duplicate id",
        &[
            "--kernel",
            "{K}",
            "--pmem",
            "path={D}/ok.img,id=a",
            "--pmem",
            "path={D}/n.img,size=2M,id=a",
        ],
        1,
        "both have id \"a\"",
    ),
    case(
        "pmem same file twice",
        &[
            "--kernel",
            "{K}",
            "--pmem",
            "path={D}/ok.img",
            "--pmem",
            "path={D}/./ok.img",
        ],
        1,
        "are the same file",
    ),
    case(
        "pmem persist value",
        &[
            "--kernel",
            "{K}",
            "--pmem",
            "path={D}/ok.img,persist=sometimes",
        ],
        1,
        "must be adr or flush",
    ),
    case(
        "pmem writeback interval value",
        &[
            "--kernel",
            "{K}",
            "--pmem",
            "path={D}/ok.img,writeback-interval=soon",
        ],
        1,
        "between 10 and 3600000",
    ),
    case(
        "pmem writeback interval with persist=flush",
        &[
            "--kernel",
            "{K}",
            "--pmem",
            "path={D}/ok.img,persist=flush,writeback-interval=10",
        ],
        1,
        "needs persist=adr",
    ),
    case(
        "pmem flush log unwritable",
        &[
            "--kernel",
            "{K}",
            "--pmem",
            "path={D}/ok.img,flush-log={D}/nope/x.log",
        ],
        1,
        "cannot create flush log",
    ),
    case(
        "pmem missing file without size",
        &["--kernel", "{K}", "--pmem", "path={D}/missing.img"],
        1,
        "add size=SIZE",
    ),
    case(
        "pmem empty id",
        &["--kernel", "{K}", "--pmem", "path={D}/ok.img,id="],
        1,
        "id= is empty",
    ),
    case(
        "backing file is a directory",
        &["--kernel", "{K}", "--pmem", "path={D},size=2M"],
        1,
        "is a directory, not a regular file",
    ),
    case(
        "backing file is a FIFO",
        &["--kernel", "{K}", "--pmem", "path={D}/fifo,size=2M"],
        1,
        "is a FIFO, not a regular file",
    ),
    case(
        "backing file is a device",
        &["--kernel", "{K}", "--pmem", "path=/dev/null,size=2M"],
        1,
        "is a character device",
    ),
    case(
        "backing file not a 2 MiB multiple",
        &["--kernel", "{K}", "--pmem", "path={D}/short.img"],
        1,
        "not a positive multiple of 2 MiB",
    ),
    case(
        "stats without a pmvm",
        &["stats", "--api-sock", "{D}/nope.sock"],
        1,
        "cannot connect to pmvm",
    ),
    case(
        "format a directory",
        &["pmem", "format", "--mode", "fsdax", "{D}"],
        1,
        "is not a regular file",
    ),
    case(
        "format a FIFO",
        &["pmem", "format", "--mode", "fsdax", "{D}/fifo"],
        1,
        "is not a regular file",
    ),
    case(
        "log that is not a log",
        &["log", "list", "{D}/ok.img"],
        1,
        "not a pmvm flush log",
    ),
];

fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("short.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::File::create(dir.path().join("ok.img"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    std::fs::write(dir.path().join("junk"), "not a kernel\n").unwrap();
    let fifo =
        std::ffi::CString::new(dir.path().join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    dir
}

/// Runs pmvm with `args` and checks the outcome against the case; returns stderr.
fn check(name: &str, args: &[String], code: i32, says: &str) -> String {
    let out = Command::new(pmvm())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name}: cannot run pmvm: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{name}: {:?}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains(says),
        "{name}: expected {says:?} in {first:?}"
    );
    if code == 1 {
        assert_eq!(
            stderr.lines().count(),
            1,
            "{name}: one line only:\n{stderr}"
        );
        assert!(first.starts_with("pmvm: "), "{name}: {first}");
    }
    stderr
}

#[test]
fn every_bad_command_line_gets_one_clear_line() {
    let dir = scratch();
    let d = dir.path().display().to_string();
    let k = probe_elf().display().to_string();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for c in CLI {
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| a.replace("{D}", &d).replace("{K}", &k))
            .collect();
        check(c.name, &args, c.code, c.says);
    }
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "a refused command line left files behind");
}

/// A backing file on a read-only filesystem, opened read-write: refused with advice. Needs a
/// private mount namespace (unshare -m) to make the read-only bind mount.
#[test]
fn a_backing_file_on_a_read_only_filesystem_is_refused() {
    let dir = scratch();
    let d = dir.path().display();
    let script = format!(
        "mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec {} --kernel {} --pmem path={d}/ok.img",
        pmvm().display(),
        probe_elf().display()
    );
    let probe = Command::new("unshare").args(["-m", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        println!("SKIP: cannot make a mount namespace here (unshare -m); read-only filesystem case not run");
        return;
    }
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("is on a read-only filesystem; add readonly=on"),
        "{stderr}"
    );
}

#[test]
fn every_bad_api_request_gets_a_json_error_and_the_guest_runs_on() {
    if !kvm_or_skip("bad API requests") {
        return;
    }
    let dir = scratch();
    let sock = dir.path().join("api.sock");
    let mut vm = Pmvm::spawn(
        &pmvm(),
        &[
            "--kernel".to_string(),
            probe_elf().display().to_string(),
            "--cmdline".into(),
            "console=ttyS0 -- counter".into(),
            "--pmem".into(),
            format!("path={}", dir.path().join("ok.img").display()),
            "--api-sock".into(),
            sock.display().to_string(),
        ],
    );
    wait_api(&sock, Duration::from_secs(60)).unwrap();
    let big_body = {
        let mut r = b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 70000\r\n\r\n".to_vec();
        r.resize(r.len() + 70000, b'x');
        r
    };
    let big_header = {
        let mut r = b"GET /v1/vm HTTP/1.1\r\nX-Pad: ".to_vec();
        r.resize(r.len() + 9000, b'a');
        r.extend_from_slice(b"\r\n\r\n");
        r
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "API unknown path",
            b"GET /v2/nothing HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
        (
            "API unknown device",
            b"GET /v1/pmem/nope HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
        (
            "API flush of an unknown device",
            b"PUT /v1/pmem/nope/flush HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
        (
            "API wrong method",
            b"DELETE /v1/vm HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        ("API malformed request line", b"HELLO\r\n\r\n".to_vec(), 400),
        (
            "API bad Content-Length",
            b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: many\r\n\r\n".to_vec(),
            400,
        ),
        ("API oversized body", big_body, 413),
        ("API oversized headers", big_header, 431),
        (
            "API resume while running",
            b"PUT /v1/vm/resume HTTP/1.1\r\n\r\n".to_vec(),
            409,
        ),
    ];
    let client = Client::new(&sock).with_timeout(Duration::from_secs(10));
    for (name, request, want) in &cases {
        let r = client
            .exchange(request)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status, *want, "{name}: {}", r.text());
        assert!(
            r.error_message().is_some_and(|e| !e.is_empty()),
            "{name}: not a JSON error: {}",
            r.text()
        );
    }
    // Still serving, the guest still running, then a clean stop.
    client.vm().unwrap();
    let seen = vm.lines().iter().filter(|l| l.contains("counter")).count();
    vm.wait_for(&format!("counter {}", seen + 1), Duration::from_secs(30))
        .unwrap();
    vm.signal(libc::SIGTERM);
    let (st, stderr) = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(st.code(), Some(0), "{stderr}");
    let doc = std::fs::read_to_string(repo_root().join("docs/bad-input.md")).unwrap();
    for (name, _, _) in &cases {
        assert!(
            doc.contains(name),
            "docs/bad-input.md does not list {name:?}"
        );
    }
}

#[test]
fn the_docs_list_every_case() {
    let doc = std::fs::read_to_string(repo_root().join("docs/bad-input.md")).unwrap();
    for c in CLI {
        assert!(
            doc.contains(c.name),
            "docs/bad-input.md does not list {:?}",
            c.name
        );
    }
    for name in ["read-only filesystem", "truncated while the guest runs"] {
        assert!(
            doc.contains(name),
            "docs/bad-input.md does not list {name:?}"
        );
    }
}
