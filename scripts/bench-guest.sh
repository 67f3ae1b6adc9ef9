#!/usr/bin/env bash
# The guest-side flush benchmark: the minimal kernel on a DAX ext4 root runs
# guest-images/linux-init/guest-bench.c on pmvm, on QEMU's nvdimm and on QEMU's virtio-pmem-pci,
# one after the other, and reports what the guest waited for each sync, pmvm's part of it and
# what each left dirty in the host page cache (tests/bench_guest/). scripts/bench.sh runs it
# last. A few minutes on hardware KVM; on an emulating host (nested PVM) about half an hour.
#
#   scripts/bench-guest.sh [--write-docs] [--quick] [--reps N] [--max-pages K]
#     --write-docs  replace its section of docs/benchmarks.md and docs/bench/guest-msync.svg
#     --quick       3 repetitions up to 64 pages: a smoke run
#     --reps N, --max-pages K  repetitions per series (default 8) and the largest msync set
#                   (default 4096 pages; each of its repetitions stores to every page)
# Any failing step ends the script with one line: "bench-guest: <step> failed: <why>".
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/apt.sh

docs=()
reps=8
max_pages=4096
while (($#)); do
  case $1 in
    --write-docs) docs=(--write-docs "$PWD/docs") ;;
    --quick) reps=3 max_pages=64 ;;
    --reps) reps=${2:?--reps needs a number}; shift ;;
    --max-pages) max_pages=${2:?--max-pages needs a number}; shift ;;
    *) echo "bench-guest: unknown argument $1 (--write-docs, --quick, --reps N, --max-pages K)" >&2; exit 2 ;;
  esac
  shift
done
bench_args=(--reps "$reps" --max-pages "$max_pages")

logdir=$(mktemp -d /tmp/bench-guest.XXXXXX)
# Runs one step, its stdout in $logdir/NAME.out and its stderr in $logdir/NAME.log; on failure
# prints the step, its last error line and where the log is.
step() {
  local name=$1
  shift
  echo "bench-guest: $name" >&2
  if ! "$@" >"$logdir/$name.out" 2>"$logdir/$name.log"; then
    local why
    why=$(grep -E 'error|Error|failed' "$logdir/$name.log" | tail -n 1)
    [ -n "$why" ] || why=$(tail -n 1 "$logdir/$name.log")
    echo "bench-guest: $name failed: ${why:-no output} (log: $logdir/$name.log)" >&2
    exit 1
  fi
}

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
apt_need bench-guest "${need[@]}"

step kernel bash guest-images/build-kernel.sh
kernel=$(tail -n 1 "$logdir/kernel.out")
step init bash guest-images/build-init.sh
init=$(dirname "$(tail -n 1 "$logdir/init.out")")/pmvm-guest-bench
step build cargo build --release --locked -p pmvm -p pmvm-tests --bin pmvm --bin bench-guest
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac

echo "bench-guest: running (log: $logdir/run.log)" >&2
if ! "$target/release/bench-guest" --pmvm "$target/release/pmvm" \
    --qemu "$(command -v qemu-system-x86_64)" --kernel "$kernel" --init "$init" \
    "${bench_args[@]}" "${docs[@]}" 2>"$logdir/run.err" | tee "$logdir/run.log"; then
  why=$(grep -m1 'bench-guest: error' "$logdir/run.err" || tail -n 1 "$logdir/run.err")
  echo "bench-guest: run failed: ${why:-no output} (log: $logdir/run.log, $logdir/run.err)" >&2
  exit 1
fi
