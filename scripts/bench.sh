#!/usr/bin/env bash
# Regenerates docs/benchmarks.md and docs/bench/*.svg: builds the release pmvm and the probe
# guest, then runs the flush benchmark on /dev/kvm (about 40 minutes on 2 cores). Arguments go to
# the benchmark: `scripts/bench.sh --quick` is a smoke run that prints results and writes no docs.
# `--nested` (opt-in, not run by CI) also runs the guest-side benchmark on a hardware-like KVM
# last: `scripts/test-nested.sh --bench` inside its L1 under QEMU TCG (a few minutes more).
set -euo pipefail
cd "$(dirname "$0")/.."

write_docs=--write-docs
nested=0
args=()
for a in "$@"; do
  case "$a" in
    --quick) write_docs= args+=("$a") ;;
    --nested) nested=1 ;;
    *) args+=("$a") ;;
  esac
done

probe=$(bash guest-images/build-probe.sh | tail -n 1)
cargo build --release --locked -p pmvm
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
cargo bench --locked -p pmvm --bench flush -- \
  --pmvm "$target/release/pmvm" --probe "$probe" $write_docs "${args[@]}"
# Then the guest-side benchmark, which writes its own section of docs/benchmarks.md (with
# --quick, a smoke run that writes nothing).
bash scripts/bench-guest.sh "${write_docs:---quick}"
if [ $nested = 1 ]; then
  # Its nested section, from inside L1.
  bash scripts/test-nested.sh --bench "${write_docs:---quick}"
fi
