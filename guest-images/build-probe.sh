#!/usr/bin/env bash
# Builds the probe guest (guest-images/probe/*.c, *.S) into guest-images/out/probe.elf with the
# system gcc: freestanding, general-purpose registers only, linked at 2 MiB.
# Rebuilds only when the sources, this script or the compiler changed. Progress goes to
# stderr; the last line of stdout is the absolute path of probe.elf. Works from any cwd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src="$here/probe"
out="$here/out"
elf="$out/probe.elf"
stamp="$out/probe.stamp"
step() { echo "build-probe: $*" >&2; }

. "$here/../scripts/lib/apt.sh"
need_pkgs=()
command -v gcc >/dev/null || need_pkgs+=(gcc)
{ command -v ld && command -v objcopy && command -v objdump; } >/dev/null || need_pkgs+=(binutils)
apt_need build-probe "${need_pkgs[@]}"

CFLAGS=(
  -std=gnu11 -O2 -g -Wall -Wextra
  -ffreestanding -fno-builtin -nostdlib -static -fno-pic -fno-pie -no-pie
  -march=x86-64 -mtune=generic -mcmodel=small
  # No SSE/x87 registers at all: this CI host's emulator may not run vector instructions.
  -mgeneral-regs-only -mno-red-zone
  -fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables
  -fcf-protection=none -fno-tree-loop-distribute-patterns -fno-stack-clash-protection
  # gcc 12 warns on reads of fixed low addresses such as the BIOS data area.
  --param=min-pagesize=0
)
LDFLAGS=(-Wl,-T,"$src/probe.ld" -Wl,--build-id=none -Wl,-z,noexecstack -Wl,-z,max-page-size=4096)

sources=$(cd "$src" && ls -- *.c *.S *.h *.ld | LC_ALL=C sort)
hash=$( {
  gcc --version | head -1
  printf '%s\n' "${CFLAGS[@]}" "${LDFLAGS[@]}"
  cat "$0"
  for f in $sources; do echo "== $f"; cat "$src/$f"; done
} | sha256sum | cut -d' ' -f1)

up_to_date() {
  if [ -s "$elf" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
    step "up to date"
    echo "$elf"
    exit 0
  fi
}
# Checked before taking the lock, so an up-to-date probe also works from a read-only checkout
# (as inside scripts/test-nested.sh's L1 guest).
up_to_date
mkdir -p "$out"
# Test processes may build at the same time; one builds, the others wait and reuse it.
exec 9>"$out/.probe.lock"
if command -v flock >/dev/null; then flock 9; fi
up_to_date

work=$(mktemp -d "$out/.probe-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
objs=()
for f in $sources; do
  case "$f" in
    *.c | *.S)
      o="$work/$(basename "${f%.*}").o"
      step "cc $f"
      gcc "${CFLAGS[@]}" -c "$src/$f" -o "$o"
      objs+=("$o")
      ;;
  esac
done
step "ld probe.elf"
gcc "${CFLAGS[@]}" "${LDFLAGS[@]}" -o "$work/probe.elf" "${objs[@]}"
mv -f "$work/probe.elf" "$elf"
echo "$hash" >"$stamp"
step "built $elf"
echo "$elf"
