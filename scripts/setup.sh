#!/usr/bin/env bash
# Installs what pmvm's build, demo and tests need on a Debian or Ubuntu machine.
# Safe to run repeatedly: it installs only what is missing.
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have iasl || need_pkgs+=(acpica-tools)
have gcc || need_pkgs+=(gcc)
have objdump || need_pkgs+=(binutils)
have curl || need_pkgs+=(curl)
# mkfs.ext4 -d and debugfs: pmem format, the guest suite's tools image, the Linux tests' checks
{ have debugfs && have mkfs.ext4; } || need_pkgs+=(e2fsprogs)
# crash-test --fs xfs: mkfs.xfs, xfs_repair, xfs_db, and a user-mode Linux that replays logs
{ have mkfs.xfs && have xfs_repair && have xfs_db; } || need_pkgs+=(xfsprogs)
have linux.uml || need_pkgs+=(user-mode-linux)
# static glibc for guest-images/build-init.sh
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need_pkgs+=(libc6-dev)
# The fault-injection tests (tests/faults.rs): a FUSE file system that fails on command, and
# small loop-mounted ext4 images.
have pkg-config || need_pkgs+=(pkgconf)
{ have pkg-config && pkg-config --exists fuse3; } || need_pkgs+=(libfuse3-dev)
have fusermount3 || need_pkgs+=(fuse3)
have fallocate || need_pkgs+=(util-linux)
# ... and strace, which fails one sync_file_range of a writeback.
have strace || need_pkgs+=(strace)

apt_need setup "${need_pkgs[@]}"

if ! have cargo; then
  echo "setup: cargo is missing; install Rust from https://rustup.rs and rerun" >&2
  exit 1
fi
