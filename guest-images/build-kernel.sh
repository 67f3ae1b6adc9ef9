#!/usr/bin/env bash
# Builds the minimal x86-64 guest kernel for pmvm: an ELF vmlinux with the PVH note, everything
# built in, from Debian's linux-source-6.1 plus guest-images/kernel/pmvm.config and
# guest-images/kernel/patches/*.patch (see guest-images/kernel/README.md).
#
# Output: ${PMVM_CACHE:-$HOME/.cache/pmvm}/kernel/<hash>/vmlinux, where <hash> covers the source
# version, the fragment, the patches and this script. A cached kernel is reused; nothing is
# rebuilt while it exists. Progress goes to stderr; the vmlinux path is the last line of stdout.
#
# Environment:
#   PMVM_CACHE           cache root (default $HOME/.cache/pmvm)
#   PMVM_KERNEL_TARBALL  a linux-6.1 source tarball to use instead of the Debian package
#   PMVM_KERNEL_JOBS     make -j value (default: number of CPUs)
#   PMVM_KERNEL_KEEP     set to 1 to keep the build tree next to the vmlinux
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
kdir="$here/kernel"
. "$here/../scripts/lib/apt.sh"
fragment="$kdir/pmvm.config"
step() { echo "build-kernel: $*" >&2; }
die() { step "error: $*"; exit 1; }

[ -f "$fragment" ] || die "missing config fragment $fragment"
shopt -s nullglob
patches=("$kdir"/patches/*.patch)
shopt -u nullglob

# 1. The source and the build tools.
need_pkgs=()
tarball=${PMVM_KERNEL_TARBALL:-/usr/src/linux-source-6.1.tar.xz}
if [ -z "${PMVM_KERNEL_TARBALL:-}" ] && [ ! -f "$tarball" ]; then
  need_pkgs+=(linux-source-6.1)
fi
for tool in gcc:build-essential make:build-essential bc:bc flex:flex bison:bison cpio:cpio \
    xz:xz-utils perl:perl; do
  command -v "${tool%%:*}" >/dev/null || need_pkgs+=("${tool#*:}")
done
[ -f /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || need_pkgs+=(libssl-dev)
apt_need build-kernel "${need_pkgs[@]}"
[ -f "$tarball" ] || die "no kernel source tarball at $tarball"

if [ -n "${PMVM_KERNEL_TARBALL:-}" ]; then
  source_id="tarball $(sha256sum "$tarball" | cut -d' ' -f1)"
else
  source_id="linux-source-6.1 $(dpkg-query -W -f '${Version}' linux-source-6.1 2>/dev/null || echo unknown)"
fi

# 2. The cache key: everything that decides the bytes of the kernel.
hash=$( {
  echo "$source_id"
  sha256sum "$fragment" | cut -d' ' -f1
  for p in "${patches[@]}"; do echo "$(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"; done
  sha256sum "$0" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
cache_root="${PMVM_CACHE:-$HOME/.cache/pmvm}/kernel"
out="$cache_root/$hash"
if [ -s "$out/vmlinux" ]; then
  step "cached: $source_id, key $hash"
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache_root"
# One build per key at a time: a second caller waits and then finds the cached kernel.
exec 9>"$cache_root/.lock"
if ! flock -n 9; then
  step "another build holds $cache_root/.lock; waiting for it"
  flock 9
fi
if [ -s "$out/vmlinux" ]; then
  step "cached (built by another process): key $hash"
  echo "$out/vmlinux"
  exit 0
fi

started=$(date +%s)
build="$out/build"
rm -rf "$out"
mkdir -p "$build"
log="$out/build.log"
# A failed build leaves its log but not its tree (a gigabyte or more).
cleanup() { [ -s "$out/vmlinux" ] || [ "${PMVM_KERNEL_KEEP:-0}" = 1 ] || rm -rf "$build"; }
trap cleanup EXIT

# 3. Unpack and patch.
step "unpacking $source_id into $build"
tar -xf "$tarball" -C "$build" --strip-components=1 || die "cannot unpack $tarball"
for p in "${patches[@]}"; do
  step "applying $(basename "$p")"
  patch -p1 -d "$build" --forward --quiet < "$p" || die "$(basename "$p") does not apply to $source_id"
done

# 4. Configure: tinyconfig, then the fragment, then check that every line of it held.
step "configuring: tinyconfig + $(basename "$fragment")"
(
  cd "$build"
  make ARCH=x86_64 tinyconfig
  KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$fragment"
  make ARCH=x86_64 olddefconfig
) >>"$log" 2>&1 || { tail -n 30 "$log" >&2; die "configuration failed (log: $log)"; }

missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" "$build/.config" || {
        have=$(grep -E "^(# )?${line%%=*}[= ]" "$build/.config" || echo "${line%%=*} absent")
        step "config: wanted $line, got: $have"
        missing=1
      } ;;
    "# CONFIG_"*" is not set")
      opt=${line#\# }; opt=${opt%% *}
      if grep -qE "^$opt=" "$build/.config"; then
        step "config: wanted $opt off, got: $(grep -E "^$opt=" "$build/.config")"
        missing=1
      fi ;;
  esac
done < "$fragment"
[ "$missing" = 0 ] || die "the final .config does not honour $fragment (a dependency is missing?)"

# 5. Build.
jobs=${PMVM_KERNEL_JOBS:-$(nproc)}
step "make -j$jobs vmlinux (a few minutes cold; log: $log)"
(cd "$build" && make ARCH=x86_64 -j"$jobs" vmlinux) >>"$log" 2>&1 \
  || { tail -n 40 "$log" >&2; die "make vmlinux failed (log: $log)"; }

# 6. Check it is what pmvm boots: a 64-bit ELF with the PVH entry note (Xen note type 18).
[ "$(head -c4 "$build/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || die "vmlinux is not an ELF"
if command -v readelf >/dev/null; then
  readelf -n "$build/vmlinux" | grep -q 'Xen.*0x00000012' \
    || die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH set?"
fi

cp "$build/.config" "$out/config"
cp "$build/vmlinux" "$out/vmlinux.tmp"
mv "$out/vmlinux.tmp" "$out/vmlinux"
[ "${PMVM_KERNEL_KEEP:-0}" = 1 ] || rm -rf "$build"
step "built in $(( $(date +%s) - started )) s: $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))"
echo "$out/vmlinux"
