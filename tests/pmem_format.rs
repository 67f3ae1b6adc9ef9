//! `pmvm pmem format` and `pmvm pmem info` as a user runs them: what a good format leaves in
//! the file, and for each bad input a clear message, a failing exit status and a file left
//! exactly as it was.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn pmvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pmvm"))
        .args(args)
        .output()
        .expect("run pmvm")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a format that must fail; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = pmvm(args);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "pmvm {args:?} succeeded: {stdout}{stderr}"
    );
    assert!(
        stderr.starts_with("pmvm: "),
        "errors are one pmvm: line: {stderr}"
    );
    stderr
}

/// The file's bytes and length, to prove a refused format changed nothing.
fn snapshot(path: &Path) -> Option<Vec<u8>> {
    fs::read(path).ok()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfs_available() -> bool {
    let found = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !found {
        assert!(
            !pmvm_tests::in_ci(),
            "mkfs.ext4 is required under CI (e2fsprogs)"
        );
        println!("SKIP: pmem format ext4: mkfs.ext4 not installed (e2fsprogs)");
    }
    found
}

fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::write(root.join("init"), b"#!/bin/sh\necho hello\n").unwrap();
    fs::write(root.join("hello.txt"), b"hello from the host\n").unwrap();
    root
}

#[test]
fn fsdax_with_ext4_is_what_info_and_debugfs_read_back() {
    if !mkfs_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let img = dir.path().join("p.img");
    let out = pmvm(&[
        "pmem",
        "format",
        s(&img),
        "--size",
        "64M",
        "--mode",
        "fsdax",
        "--ext4-from",
        s(&root),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("fsdax"), "{stdout}");
    assert!(stdout.contains("data at 0x200000"), "{stdout}");
    assert_eq!(fs::metadata(&img).unwrap().len(), 64 * MIB);

    let out = pmvm(&["pmem", "info", s(&img)]);
    let (info, stderr) = text(&out);
    assert!(out.status.success(), "{info}{stderr}");
    for want in [
        "info block:     fsdax (NVDIMM_PFN_INFO) at 0x1000, version 1.4",
        " ok\n",
        "parent uuid:    null",
        "mode:           pmem (memmap in the device)",
        "dataoff:        0x200000 (2M)",
        "npfns:          15872 (62M of data)",
        "align:          2M",
        "linux:          accepts it as fsdax",
        "filesystem:     ext4 at 0x200000, block size 4096, 15872 blocks (62M)",
    ] {
        assert!(info.contains(want), "missing {want:?} in\n{info}");
    }

    // The filesystem is a real ext4 holding the directory's files: read it back with
    // debugfs from a copy of the data area.
    let bytes = fs::read(&img).unwrap();
    let data = dir.path().join("data.img");
    fs::write(&data, &bytes[2 * MIB as usize..]).unwrap();
    let out = Command::new("debugfs")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-R", "cat /hello.txt", s(&data)])
        .output();
    if let Ok(out) = out {
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the host\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn raw_mode_leaves_no_info_block_and_ext4_at_the_start() {
    if !mkfs_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let img = dir.path().join("p.img");
    let out = pmvm(&[
        "pmem",
        "format",
        s(&img),
        "--size",
        "32M",
        "--mode",
        "raw",
        "--ext4-from",
        s(&root),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let (info, _) = text(&pmvm(&["pmem", "info", s(&img)]));
    assert!(info.contains("info block:     none"), "{info}");
    assert!(
        info.contains("filesystem:     ext4 at 0x0, block size 4096, 8192 blocks"),
        "{info}"
    );
}

#[test]
fn size_too_small_for_the_memmap_is_refused_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    let err = refused(&["pmem", "format", s(&img), "--size", "2M", "--mode", "fsdax"]);
    assert!(
        err.contains("too small") && err.contains("at least 4194304 bytes"),
        "{err}"
    );
    assert!(!img.exists(), "a refused format created {}", img.display());
}

#[test]
fn unaligned_size_is_refused_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    fs::write(&img, vec![7u8; 4096]).unwrap();
    let before = snapshot(&img);
    let err = refused(&[
        "pmem",
        "format",
        s(&img),
        "--size",
        "65M",
        "--mode",
        "fsdax",
    ]);
    assert!(
        err.contains("--size 65M is not a positive multiple of 2 MiB; try 66M"),
        "{err}"
    );
    assert_eq!(snapshot(&img), before);
    let err = refused(&["pmem", "format", s(&img), "--mode", "raw"]);
    assert!(
        err.contains(
            "is 4096 bytes long, not a positive multiple of 2 MiB; give --size (e.g. --size 2M)"
        ),
        "{err}"
    );
    let err = refused(&["pmem", "format", s(&img), "--size", "64Q", "--mode", "raw"]);
    assert!(err.contains("--size \"64Q\" is not a size"), "{err}");
    let err = refused(&[
        "pmem",
        "format",
        s(&img),
        "--size",
        "64M",
        "--mode",
        "fsdax",
        "--align",
        "8K",
    ]);
    assert!(err.contains("alignment 8192 is not supported"), "{err}");
    assert_eq!(snapshot(&img), before);
}

#[test]
fn existing_filesystem_or_info_block_needs_force() {
    if !mkfs_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let img = dir.path().join("p.img");
    let fmt = |mode: &str, force: bool| {
        let mut args = vec!["pmem", "format", s(&img), "--size", "32M", "--mode", mode];
        args.extend(["--ext4-from", s(&root)]);
        if force {
            args.push("--force");
        }
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: &[String]| pmvm(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // A raw ext4 filesystem.
    assert!(run(&fmt("raw", false)).status.success());
    let before = snapshot(&img);
    let err = refused(
        &fmt("fsdax", false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains("already holds an ext4 filesystem; add --force to overwrite it"),
        "{err}"
    );
    assert_eq!(snapshot(&img), before);

    // An fsdax info block with ext4 behind it.
    assert!(run(&fmt("fsdax", true)).status.success());
    let before = snapshot(&img);
    let err = refused(
        &fmt("raw", false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        err.contains("already holds an fsdax info block and an ext4 filesystem at 0x200000"),
        "{err}"
    );
    assert_eq!(snapshot(&img), before);
}

#[test]
fn read_only_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    fs::write(&img, vec![0u8; 2 * MIB as usize]).unwrap();
    fs::set_permissions(&img, fs::Permissions::from_mode(0o444)).unwrap();
    let before = snapshot(&img);
    let err = refused(&[
        "pmem",
        "format",
        s(&img),
        "--size",
        "64M",
        "--mode",
        "fsdax",
    ]);
    assert!(
        err.contains("is read-only (mode 444); make it writable"),
        "{err}"
    );
    assert_eq!(snapshot(&img), before);
    assert_eq!(fs::metadata(&img).unwrap().len(), 2 * MIB);
}

#[test]
fn ext4_image_that_does_not_fit_is_refused() {
    if !mkfs_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("big");
    fs::create_dir(&root).unwrap();
    // 8 MiB of incompressible-looking data into a 4 MiB device (2 MiB of data area).
    let chunk: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
    fs::write(root.join("blob"), chunk).unwrap();
    let img = dir.path().join("p.img");
    let err = refused(&[
        "pmem",
        "format",
        s(&img),
        "--size",
        "4M",
        "--mode",
        "fsdax",
        "--ext4-from",
        s(&root),
    ]);
    assert!(
        err.contains("do not fit in an ext4 filesystem of 2M") && err.contains("larger --size"),
        "{err}"
    );
    assert!(!img.exists(), "a refused format created {}", img.display());

    // The same with an existing file: unchanged.
    fs::write(&img, vec![0u8; 4 * MIB as usize]).unwrap();
    let before = snapshot(&img);
    refused(&[
        "pmem",
        "format",
        s(&img),
        "--mode",
        "fsdax",
        "--ext4-from",
        s(&root),
    ]);
    assert_eq!(snapshot(&img), before);
}

#[test]
fn a_file_in_use_by_pmvm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    fs::write(&img, vec![0u8; 4 * MIB as usize]).unwrap();
    let before = snapshot(&img);
    // pmvm holds an exclusive flock on a backing file while a guest runs.
    let holder = fs::File::open(&img).unwrap();
    // SAFETY: flock only reads its integer arguments; `holder` owns the descriptor.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&holder),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(rc, 0);
    let err = refused(&["pmem", "format", s(&img), "--mode", "fsdax"]);
    assert!(err.contains("is in use by another process"), "{err}");
    drop(holder);
    assert_eq!(snapshot(&img), before);
}

#[test]
fn missing_file_without_size_and_info_on_a_plain_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("nope.img");
    let err = refused(&["pmem", "format", s(&img), "--mode", "fsdax"]);
    assert!(
        err.contains("does not exist; give --size to create it"),
        "{err}"
    );
    assert!(!img.exists());

    let plain = dir.path().join("plain.img");
    fs::write(&plain, vec![0u8; 2 * MIB as usize]).unwrap();
    let out = pmvm(&["pmem", "info", s(&plain)]);
    let (info, _) = text(&out);
    assert!(out.status.success());
    assert!(info.contains("info block:     none"), "{info}");
    assert!(info.contains("filesystem:     none found at 0x0"), "{info}");
    let err = refused(&["pmem", "info", s(&img)]);
    assert!(err.contains("cannot open"), "{err}");
}
