#!/usr/bin/env bash
# Builds tests/faultfs (the FUSE file system the fault-injection tests mount) and prints the
# path of the binary as the last line. Needs gcc, pkg-config and libfuse3-dev (scripts/setup.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/tests/faultfs/faultfs.c"
out="${CARGO_TARGET_DIR:-$root/target}/faultfs"
mkdir -p "$out"
bin="$out/faultfs"
if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
  # shellcheck disable=SC2046
  gcc -O2 -Wall -Wextra -Werror -o "$bin.tmp" "$src" $(pkg-config --cflags --libs fuse3)
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
