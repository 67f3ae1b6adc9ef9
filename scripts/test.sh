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
log=$(mktemp) suite_log=$(mktemp) fuzz_log=$(mktemp) nested=$(mktemp)
trap 'rm -f "$log" "$suite_log" "$fuzz_log" "$nested"' EXIT
status=0
# The guest suite's end-to-end test is the longest by far where KVM emulates guest kernel code
# (13 minutes, mostly one vCPU thread), so it runs beside the other tests on the second core.
# Its binary runs directly: cargo holds the target directory's lock while it runs tests.
suite_test=guest_suite_end_to_end
built=$(cargo test --locked -p pmvm --test guest_suite --no-run 2>&1) || { echo "$built" >&2; exit 1; }
suite_bin=$(sed -n 's/^ *Executable .* (\(.*\))$/\1/p' <<<"$built")
[ -x "$suite_bin" ] || { echo "$built" >&2; echo "test: no guest suite test binary in that" >&2; exit 1; }
suite_bin=$(realpath "$suite_bin")
(cd vmm && "$suite_bin" --exact "$suite_test" --show-output) >"$suite_log" 2>&1 &
suite_pid=$!
cargo test --workspace --lib --bins --tests --locked -- --test-threads=2 --show-output \
  --skip "$suite_test" 2>&1 | tee "$log" || status=$?
wait "$suite_pid" || status=1
echo "== $suite_test (beside the tests above)" >&2
tee -a "$log" <"$suite_log"
# The fuzz smoke run and the integration tests again on hardware-like KVM (inside a QEMU TCG
# guest with nested SVM) side by side: each keeps one core busy. The nested run's closing line
# is added into this run's; PMVM_NESTED=0 leaves it out (not under CI).
bash scripts/fuzz-smoke.sh >"$fuzz_log" 2>&1 &
fuzz_pid=$!
echo "== nested KVM (scripts/test-nested.sh)" >&2
if [ "${PMVM_NESTED:-1}" = 0 ] && [ -z "${CI:-}" ]; then
  echo "0 passed, 0 failed, 1 skipped" >"$nested"
  echo "SKIP: nested KVM run: PMVM_NESTED=0" >&2
else
  bash scripts/test-nested.sh | tee "$nested" || status=1
fi
wait "$fuzz_pid" || status=1
echo "== fuzz smoke (fuzz/README.md; beside the nested run)" >&2
tee -a "$log" <"$fuzz_log"
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
