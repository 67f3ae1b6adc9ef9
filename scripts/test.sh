#!/usr/bin/env bash
# Runs every check pmvm has: formatting, lints, unit tests, the integration tests that boot
# the probe guest (and a Linux kernel) on /dev/kvm, and then the KVM-facing ones again on
# hardware-like KVM inside a QEMU guest (scripts/test-nested.sh). CI runs exactly this.
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
# The integration tests again on hardware-like KVM: inside a QEMU TCG guest with nested SVM.
# Its own closing line is added into this run's; PMVM_NESTED=0 leaves it out (not under CI).
echo "== nested KVM (scripts/test-nested.sh)" >&2
nested=$(mktemp)
trap 'rm -f "$log" "$nested"' EXIT
if [ "${PMVM_NESTED:-1}" = 0 ] && [ -z "${CI:-}" ]; then
  echo "0 passed, 0 failed, 1 skipped" >"$nested"
  echo "SKIP: nested KVM run: PMVM_NESTED=0" >&2
else
  bash scripts/test-nested.sh | tee "$nested" || status=1
fi
# One closing line for the whole run: every test binary's counts added up, each fuzz target as
# one test, the skips (tests that print "SKIP: <reason>" where this host cannot run them), and
# the nested run's closing line (counted as one failure if it has none).
awk -v nested="$(tail -n 1 "$nested")" '/^test result:/ { p += $4; f += $6 }
  /^fuzz [a-z_]+: ok/ { p++ } /^fuzz [a-z_]+: FAILED/ { f++ } /SKIP: / { s++ }
  END {
    if (nested ~ /^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$/) {
      split(nested, n, /[ ,]+/); p += n[1]; f += n[3]; s += n[5]
    } else f++
    printf "%d passed, %d failed, %d skipped\n", p, f, s
  }' "$log"
exit "$status"
