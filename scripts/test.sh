#!/usr/bin/env bash
# Runs every check pmvm has: formatting, lints, unit tests, the integration tests that boot
# the probe guest (and a Linux kernel) on /dev/kvm, and then the KVM-facing ones again on
# hardware-like KVM inside a QEMU guest (scripts/test-nested.sh). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step's line says when it began (or, for those run beside another, when their output
# follows), in seconds since the run began: CI has 45 minutes for all of it.
phase() { echo "== $* (at ${SECONDS} s)" >&2; }

bash scripts/setup.sh
phase building the probe guest
bash guest-images/build-probe.sh >/dev/null
# The minimal guest kernel takes about 10 minutes to build where it is not cached, and the
# guest suite's end-to-end test, the run's longest, waits for it: its build starts now (after
# the other scripts' package installs), beside the lints and the test build. The tests that
# need it wait on its lock and find it built (or build it again and say why that failed).
kernel_log=$(mktemp) log=$(mktemp) suite_log=$(mktemp) ndctl_log=$(mktemp) fuzz_log=$(mktemp)
nested=$(mktemp)
trap 'rm -f "$kernel_log" "$log" "$suite_log" "$ndctl_log" "$fuzz_log" "$nested"' EXIT
bash guest-images/build-kernel.sh >"$kernel_log" 2>&1 &
kernel_pid=$!
phase cargo fmt --check
cargo fmt --all -- --check
phase cargo clippy
cargo clippy --workspace --all-targets --locked -- -D warnings
phase cargo test
# Libraries, binaries and tests; benchmarks are for `cargo bench` (clippy above still lints them).
status=0
# The guest suite's two Linux tests are the longest by far where KVM emulates guest kernel code
# (17 and 6 minutes, mostly one vCPU thread each), so each runs beside other work on the second
# core: the end-to-end test beside the tests below, the ndctl one beside the nested run (whose
# QEMU keeps one core busy), after the fuzz smoke run. Their binary runs directly: cargo holds
# the target directory's lock while it runs tests.
suite_test=guest_suite_end_to_end
ndctl_test=ndctl_converts_a_raw_namespace_and_a_file_fsynced_on_it_reaches_the_host
built=$(cargo test --locked -p pmvm --test guest_suite --no-run 2>&1) || { echo "$built" >&2; exit 1; }
suite_bin=$(sed -n 's/^ *Executable .* (\(.*\))$/\1/p' <<<"$built")
[ -x "$suite_bin" ] || { echo "$built" >&2; echo "test: no guest suite test binary in that" >&2; exit 1; }
suite_bin=$(realpath "$suite_bin")
(cd vmm && "$suite_bin" --exact "$suite_test" --show-output) >"$suite_log" 2>&1 &
suite_pid=$!
cargo test --workspace --lib --bins --tests --locked -- --test-threads=2 --show-output \
  --skip "$suite_test" --skip "$ndctl_test" 2>&1 | tee "$log" || status=$?
wait "$suite_pid" || status=1
wait "$kernel_pid" || echo "test: guest-images/build-kernel.sh failed: $(tail -n 1 "$kernel_log")" >&2
phase "$suite_test (beside the tests above)"
tee -a "$log" <"$suite_log"
# The fuzz smoke run, then the ndctl test, beside the integration tests again on hardware-like
# KVM (inside a QEMU TCG guest with nested SVM): each side keeps one core busy. The nested run's
# closing line is added into this run's; PMVM_NESTED=0 leaves it out (not under CI).
{
  bash scripts/fuzz-smoke.sh >"$fuzz_log" 2>&1 || fuzz_status=1
  (cd vmm && "$suite_bin" --exact "$ndctl_test" --show-output) >"$ndctl_log" 2>&1 || fuzz_status=1
  exit "${fuzz_status:-0}"
} &
fuzz_pid=$!
phase nested KVM "(scripts/test-nested.sh)"
if [ "${PMVM_NESTED:-1}" = 0 ] && [ -z "${CI:-}" ]; then
  echo "0 passed, 0 failed, 1 skipped" >"$nested"
  echo "SKIP: nested KVM run: PMVM_NESTED=0" >&2
else
  bash scripts/test-nested.sh | tee "$nested" || status=1
fi
wait "$fuzz_pid" || status=1
phase "fuzz smoke (fuzz/README.md) and $ndctl_test, beside the nested run"
tee -a "$log" <"$fuzz_log"
tee -a "$log" <"$ndctl_log"
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
phase done
exit "$status"
