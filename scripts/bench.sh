#!/usr/bin/env bash
# Regenerates docs/benchmarks.md and docs/bench/*.svg: builds the release pmvm and the probe
# guest, then runs the flush benchmark on /dev/kvm (a few minutes on 2 cores). Arguments go to
# the benchmark: `scripts/bench.sh --quick` is a smoke run that prints results and writes no docs.
set -euo pipefail
cd "$(dirname "$0")/.."

write_docs=--write-docs
for a in "$@"; do
  [ "$a" = --quick ] && write_docs=
done

probe=$(bash guest-images/build-probe.sh | tail -n 1)
cargo build --release --locked -p pmvm
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
cargo bench --locked -p pmvm --bench flush -- \
  --pmvm "$target/release/pmvm" --probe "$probe" $write_docs "$@"
# Last, the guest-side benchmark, which writes its own section of docs/benchmarks.md (with
# --quick, a smoke run that writes nothing).
bash scripts/bench-guest.sh "${write_docs:---quick}"
