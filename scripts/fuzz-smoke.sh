#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target in fuzz/ for FUZZ_SECS seconds (default 30), from the
# committed seeds plus seeds pmvm makes itself (an NFIT from --dump-acpi, a flush log from a
# probe guest). One line per target, then "N passed, N failed, N skipped" as the tests print.
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/ (see fuzz/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."

secs=${FUZZ_SECS:-30}
targets=(http_request pmem_option flush_log nfit)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io" >&2
  cargo install --locked cargo-fuzz >&2 || { echo "0 passed, 1 failed, 0 skipped"; exit 1; }
fi

# cargo-fuzz needs unstable compiler flags: a nightly toolchain if there is one, else the
# stable compiler with RUSTC_BOOTSTRAP.
if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

target_dir=${CARGO_TARGET_DIR:-target}
case $target_dir in /*) ;; *) target_dir=$PWD/$target_dir ;; esac
pmvm_bin=$target_dir/debug/pmvm
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds/nfit" "$seeds/flush_log"
if [ -x "$pmvm_bin" ]; then
  mkdir -p "$seeds/acpi"
  "$pmvm_bin" --dump-acpi "$seeds/acpi" --pmem "path=$seeds/a.img,size=2M" \
    --pmem "path=$seeds/b.img,size=4M,hints=4,readonly=off" >/dev/null 2>&1 &&
    cp "$seeds/acpi/NFIT.dat" "$seeds/nfit/pmvm" 2>/dev/null
  probe=guest-images/out/probe.elf
  if [ -r /dev/kvm ] && [ -f "$probe" ]; then
    "$pmvm_bin" --kernel "$probe" \
      --cmdline "console=ttyS0 -- write 0 0 0x2000 0xab flush 0 write 0 0x6000 0x1000 0xcd flush 0 poweroff" \
      --pmem "path=$seeds/l.img,size=2M,persist=flush,flush-log=$seeds/l.log" >/dev/null 2>&1 &&
      cp "$seeds/l.log" "$seeds/flush_log/pmvm"
  fi
fi

passed=0 failed=0 skipped=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  dirs=("fuzz/corpus/$t")
  [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
  [ -d "$seeds/$t" ] && dirs+=("$seeds/$t")
  log=$(mktemp)
  start=$(date +%s)
  if "${fuzz[@]}" run --target-dir "$target_dir/fuzz" "$t" "${dirs[@]}" -- \
    -max_total_time="$secs" -max_len=65536 >"$log" 2>&1; then
    runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1)
    echo "fuzz $t: ok (${runs:-no summary}, $(($(date +%s) - start)) s)"
    passed=$((passed + 1))
  elif grep -q "no such command: .fuzz" "$log" || grep -q "error: could not compile" "$log"; then
    echo "fuzz $t: FAILED to build"
    tail -n 20 "$log"
    failed=$((failed + 1))
  else
    echo "fuzz $t: FAILED"
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -n 10
    failed=$((failed + 1))
  fi
  rm -f "$log"
done
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
