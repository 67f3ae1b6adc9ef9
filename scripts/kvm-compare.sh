#!/usr/bin/env bash
# Measures what differs between KVMs for pmvm, on this host's /dev/kvm: whether the dirty ring
# overflows when the guest dirties twice its size before one flush (and what that flush then
# writes), and the latency of single-page guest flushes against this host's own store +
# fdatasync of one mapped page on the same file system. docs/testing.md compares the results
# of this host's emulating KVM with hardware KVM (run inside scripts/test-nested.sh's L1 with
# --compare). Run after `cargo build`; DIR (default $TMPDIR or /tmp) must be on a disk.
# Usage: scripts/kvm-compare.sh [DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
pmvm="${CARGO_TARGET_DIR:-$repo/target}/debug/pmvm"
[ -x "$pmvm" ] || { echo "kvm-compare: $pmvm is missing: run cargo build first" >&2; exit 1; }
probe=$(bash "$repo/guest-images/build-probe.sh" | tail -1)
dir=$(mktemp -d "${1:-${TMPDIR:-/tmp}}/kvm-compare.XXXXXX")
trap 'rm -rf "$dir"' EXIT
say() { echo "compare: $*"; }

kvm=unknown
for m in kvm_pvm kvm_intel kvm_amd; do
  if [ -e "/sys/module/$m" ]; then kvm=$m; break; fi
done
say "host kvm module: $kvm, kernel $(uname -r), file system $(df -T "$dir" | awk 'NR == 2 {print $2}')"

# Runs the probe with WORDS on a 256 MiB persist=flush device; prints pmvm's device line and
# the wall time.
run() {
  local mode=$1 words=$2 t0 out
  rm -f "$dir/p.img"
  t0=$(date +%s%N)
  out=$("$pmvm" --kernel "$probe" --memory 512M --dirty-tracking "$mode" \
    --pmem "path=$dir/p.img,size=256M,persist=flush" \
    --cmdline "console=ttyS0 -- $words poweroff" 2>&1 >/dev/null) || {
    echo "kvm-compare: pmvm failed ($mode: $words): $out" >&2
    exit 1
  }
  local ms=$((($(date +%s%N) - t0) / 1000000))
  local overflow=no
  ! grep -q "dirty ring .* overflowed" <<<"$out" || overflow=yes
  say "$mode: $words: ${ms} ms, ring overflow: $overflow; $(grep -o 'pmem0: .*' <<<"$out" | head -1)"
}

# 32768 pages dirtied before one flush: twice the ring's 16384 entries per vCPU.
for mode in ring bitmap; do
  run "$mode" "write 0 0 0x8000000 0x5a flush 0"
done
for mode in ring bitmap; do
  run "$mode" "flushes 0 2000"
done

# This host's own cost of making one page durable as pmvm does: a store through a MAP_SHARED
# mapping of an allocated file, then fdatasync; 2000 times.
python3 - "$dir/host.img" <<'PY'
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, bytes(1 << 20))
os.fsync(fd)
m = mmap.mmap(fd, 1 << 20)
lat = []
for i in range(2000):
    t = time.perf_counter_ns()
    m[0] = i & 0xff
    os.fdatasync(fd)
    lat.append((time.perf_counter_ns() - t) // 1000)
lat.sort()
print(f"compare: host store + fdatasync of one mapped page: p50 {lat[1000]}us p99 {lat[1980]}us max {lat[-1]}us")
PY
