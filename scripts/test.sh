#!/usr/bin/env bash
# Runs every check pmvm has: formatting, lints, unit tests, and the integration tests that
# boot the probe guest (and a Linux kernel) on /dev/kvm. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "== building the probe guest" >&2
bash guest-images/build-probe.sh >/dev/null
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
# Libraries, binaries and tests; benchmarks are for `cargo bench` (clippy above still lints them).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --lib --bins --tests --locked -- --test-threads=2 --show-output 2>&1 | tee "$log" || status=$?
echo "== fuzz smoke (fuzz/README.md)" >&2
bash scripts/fuzz-smoke.sh 2>&1 | tee -a "$log" || status=1
# One closing line for the whole run: every test binary's counts added up, each fuzz target as
# one test, and the skips (tests that print "SKIP: <reason>" where this host cannot run them).
awk '/^test result:/ { p += $4; f += $6 } /^fuzz [a-z_]+: ok/ { p++ } /^fuzz [a-z_]+: FAILED/ { f++ }
  /SKIP: / { s++ } END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
