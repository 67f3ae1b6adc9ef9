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
cargo test --workspace --locked -- --test-threads=2
