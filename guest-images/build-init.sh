#!/usr/bin/env bash
# Builds pmvm-init (guest-images/linux-init/pmvm-init.c), a static /init for Linux guests of
# the tests, and an initramfs holding it as /init with /dev/console:
#   guest-images/out/pmvm-init        the static x86-64 ELF (glibc, gcc -static)
#   guest-images/out/pmvm-init.cpio   newc cpio: /init, /dev, dev/console
#   guest-images/out/pmvm-crash-workload  the guest side of `pmvm crash-test`
#                                     (guest-images/linux-init/crash-workloads.c)
#   guest-images/out/pmvm-guest-bench  the guest side of scripts/bench-guest.sh
#                                     (guest-images/linux-init/guest-bench.c)
# Rebuilds only when the source, this script or the compiler changed. Progress goes to stderr;
# the last line of stdout is the absolute path of pmvm-init.cpio. Works from any cwd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src="$here/linux-init/pmvm-init.c"
wl_src="$here/linux-init/crash-workloads.c"
gb_src="$here/linux-init/guest-bench.c"
out="$here/out"
wl_elf="$out/pmvm-crash-workload"
gb_elf="$out/pmvm-guest-bench"
elf="$out/pmvm-init"
cpio="$out/pmvm-init.cpio"
stamp="$out/pmvm-init.stamp"
step() { echo "build-init: $*" >&2; }

. "$here/../scripts/lib/apt.sh"
need_pkgs=()
command -v gcc >/dev/null || need_pkgs+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need_pkgs+=(libc6-dev) # static glibc
apt_need build-init "${need_pkgs[@]}"
command -v python3 >/dev/null || { step "missing python3 (for initramfs/mkcpio.py)"; exit 1; }

mkdir -p "$out"
exec 9>"$out/.pmvm-init.lock"
flock 9

CFLAGS=(-std=gnu11 -O2 -g -Wall -Wextra -Werror -static -pthread)
hash=$( {
  gcc --version | head -1
  printf '%s\n' "${CFLAGS[@]}"
  cat "$0" "$src" "$wl_src" "$gb_src" "$here/linux-init/console.h" "$here/initramfs/mkcpio.py"
} | sha256sum | cut -d' ' -f1)
if [ -s "$elf" ] && [ -s "$cpio" ] && [ -s "$wl_elf" ] && [ -s "$gb_elf" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
  step "up to date"
  echo "$cpio"
  exit 0
fi

work=$(mktemp -d "$out/.pmvm-init.XXXXXX")
trap 'rm -rf "$work"' EXIT
step "cc pmvm-init.c"
gcc "${CFLAGS[@]}" -o "$work/pmvm-init" "$src"
step "cc crash-workloads.c"
gcc "${CFLAGS[@]}" -o "$work/pmvm-crash-workload" "$wl_src"
step "cc guest-bench.c"
gcc "${CFLAGS[@]}" -o "$work/pmvm-guest-bench" "$gb_src"
mkdir -p "$work/root/dev"
cp "$work/pmvm-init" "$work/root/init"
python3 "$here/initramfs/mkcpio.py" "$work/root" "$work/pmvm-init.cpio" dev/console:c:5:1:600
mv -f "$work/pmvm-init" "$elf"
mv -f "$work/pmvm-crash-workload" "$wl_elf"
mv -f "$work/pmvm-guest-bench" "$gb_elf"
mv -f "$work/pmvm-init.cpio" "$cpio"
echo "$hash" >"$stamp"
step "built $elf, $wl_elf, $gb_elf and $cpio"
echo "$cpio"
