#!/usr/bin/env bash
# Builds the guest image of the fsync/msync suite into guest-images/out/suite/ from Debian
# packages (apt-get download + dpkg-deb -x: nothing is installed system-wide) and this repo:
#   initramfs.cpio  busybox, the suite, /init, the NVDIMM/xfs modules of a modular kernel, and
#                   links from /usr, /sbin, /lib64 and /lib/x86_64-linux-gnu into /tools
#   tools.img       an ext4 image the guest gets as a read-only NVDIMM and mounts on /tools:
#                   mkfs.ext4, mkfs.xfs, xfs_io, fio, ndctl with their libraries and loader,
#                   and pmvm-init (build-init.sh). Reading it costs only the pages a program
#                   touches, where unpacking the same 90 MB in the initramfs takes many minutes
#                   on hosts that emulate guest kernel code
#   preflight.cpio  the suite alone as /init: proves user space runs and lists the NVDIMMs
#   image.env       what was built: kernels, initramfs paths, input hash
# Kernels: Debian's cloud kernel (fetch-debian-kernel.sh: bzImage and uncompressed vmlinux)
# and the minimal kernel (build-kernel.sh, when it exists), or --kernel PATH instead.
# Uncompressed cpio: unpacking gzip is too slow on hosts that emulate guest kernel code.
# Cached by input hash: a warm run prints "up to date" within seconds. The last line of
# stdout is the path of image.env; progress goes to stderr, one line per step.
#
# Usage: build.sh [--kernel PATH [--modules DIR]] [--gzip] [--check] [--refresh]
#   --kernel PATH   boot your own kernel (bzImage or ELF vmlinux) instead of Debian's
#   --modules DIR   its lib/modules/<release> directory, when its NVDIMM drivers are modules
#   --gzip          also write initramfs.cpio.gz
#   --check         build nothing; exit 0 if the image is up to date, 3 if missing or stale
#   --refresh       forget downloaded packages and rebuild everything
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out="$here/out/suite"
cache="$here/out/cache"
step() { echo "build: $*" >&2; }
die() { echo "build: error: $*" >&2; exit 1; }

user_kernel="" user_modules="" gzip=0 check=0 refresh=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) [ $# -ge 2 ] || die "--kernel needs a path"; user_kernel=$(realpath -e -- "$2" 2>/dev/null) || die "--kernel $2: no such file"; shift 2 ;;
    --modules) [ $# -ge 2 ] || die "--modules needs a directory"; user_modules=$(realpath -e -- "$2" 2>/dev/null) || die "--modules $2: no such directory"; shift 2 ;;
    --gzip) gzip=1; shift ;;
    --check) check=1; shift ;;
    --refresh) refresh=1; shift ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ -z "$user_modules" ] || [ -n "$user_kernel" ] || die "--modules only goes with --kernel"
[ -z "$user_modules" ] || [ -d "$user_modules" ] || die "--modules $user_modules is not a directory"
# One build at a time (the suite and the ndctl test ask for the image at once); --check only
# reads, and may run where the tree is read-only.
if [ $check = 0 ]; then
  mkdir -p "$here/out"
  exec 9>"$here/out/.build.lock"
  flock 9
fi
if [ -n "$user_kernel" ]; then
  magic=$(head -c4 "$user_kernel" | od -An -tx1 | tr -d ' \n')
  hdrs=$(dd if="$user_kernel" bs=1 skip=514 count=4 2>/dev/null)
  [ "$magic" = 7f454c46 ] || [ "$hdrs" = HdrS ] ||
    die "--kernel $user_kernel is neither an ELF vmlinux nor a bzImage"
fi

# The third-party programs in the image, by Debian package.
TOOL_PACKAGES=(busybox-static e2fsprogs xfsprogs ndctl)
# Binaries taken from them (paths in the packages), and where their libraries are resolved.
TOOL_BINARIES=(usr/sbin/xfs_io sbin/mkfs.xfs sbin/mke2fs usr/bin/ndctl)
# fio comes from Debian's source package, built statically (build-fio.sh).
# Modules the suite needs from a modular kernel; their dependencies are added from .modinfo.
# The NVDIMM drivers go into the initramfs; xfs into tools.img, loaded once /init mounted it.
MODULE_ROOTS_EARLY=(nfit nd_pmem)
MODULE_ROOTS_TOOLS=(xfs)

need() { command -v "$1" >/dev/null || die "needs $1: $2"; }
need python3 "install python3"
need sha256sum "install coreutils"

# ---- inputs and their hash ------------------------------------------------------------
kernel_pkg=""
debian_dir=""
if [ -z "$user_kernel" ] && [ $check = 1 ]; then
  # Check only: no downloads; a missing kernel makes the image missing.
  debian_dir="$here/out/debian"
  kernel_pkg=$(cat "$debian_dir/package" 2>/dev/null) || {
    echo "build: the Debian kernel is missing: run guest-images/build.sh" >&2
    exit 3
  }
elif [ -z "$user_kernel" ]; then
  step "debian kernel (fetch-debian-kernel.sh)"
  debian_dir=$(bash "$here/fetch-debian-kernel.sh" | tail -1) || die "fetch-debian-kernel.sh failed"
  kernel_pkg=$(cat "$debian_dir/package")
fi
minimal=""
if [ $check = 1 ]; then
  minimal=$(sed -n 's/^PMEMTESTS_KERNEL_MINIMAL=//p' "$out/image.env" 2>/dev/null || true)
elif [ -z "$user_kernel" ]; then
  if [ -f "$here/build-kernel.sh" ]; then
    step "minimal kernel (build-kernel.sh)"
    if minimal=$(bash "$here/build-kernel.sh" | tail -1) && [ -s "$minimal" ]; then
      :
    else
      step "build-kernel.sh failed; continuing without the minimal kernel"
      minimal=""
    fi
  else
    step "minimal kernel: guest-images/build-kernel.sh does not exist yet; skipping it"
  fi
fi

versions=$(apt-cache policy "${TOOL_PACKAGES[@]}" fio $kernel_pkg 2>/dev/null | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p, $2}')
[ -n "$versions" ] || die "apt-cache knows none of ${TOOL_PACKAGES[*]}: is this a Debian (or Ubuntu) host with its archive configured?"
kernel_id=""
if [ -n "$user_kernel" ]; then
  kernel_id="user $(sha256sum "$user_kernel" | cut -d' ' -f1) modules ${user_modules:-none}"
  [ -z "$user_modules" ] || kernel_id+=" $(cd "$user_modules" && find . -name '*.ko*' | LC_ALL=C sort | sha256sum | cut -d' ' -f1)"
else
  kernel_id="debian $kernel_pkg"
fi
h() { sha256sum | cut -c1-16; }
part_script=$(cat "$0" "$here/initramfs/mkcpio.py" "$here/build-fio.sh" | h)
part_init=$(cat "$here/initramfs/init" "$here/initramfs/ndctl-check" "$here/linux-init/pmvm-init.c" "$here/build-init.sh" | h)
part_suite=$( (cd "$repo" && find guest-images/pmem-tests/src guest-images/pmem-tests/Cargo.toml -type f | LC_ALL=C sort | xargs sha256sum; sha256sum Cargo.lock Cargo.toml) | h)
part_packages=$(echo "$versions" | h)
part_kernel=$(echo "$kernel_id gzip=$gzip" | h)
inputs=$(printf 'script %s\ninit %s\nsuite %s\npackages %s\nkernel %s\n' \
  "$part_script" "$part_init" "$part_suite" "$part_packages" "$part_kernel")
hash=$(echo "$inputs" | h)

stamp="$out/inputs"
if [ -s "$out/initramfs.cpio" ] && [ -s "$out/preflight.cpio" ] && [ -s "$out/tools.img" ] && [ -s "$out/image.env" ] &&
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && [ $refresh = 0 ]; then
  # The minimal kernel may appear after the image was built: refresh only its line, and only
  # when it changed (a check from a read-only checkout writes nothing).
  if ! grep -qxF "PMEMTESTS_KERNEL_MINIMAL=$minimal" "$out/image.env"; then
    sed -i "s|^PMEMTESTS_KERNEL_MINIMAL=.*|PMEMTESTS_KERNEL_MINIMAL=$minimal|" "$out/image.env"
  fi
  step "up to date ($hash)"
  echo "$out/image.env"
  exit 0
fi
if [ $check = 1 ]; then
  if [ ! -f "$stamp" ]; then
    echo "build: the guest image is missing: run guest-images/build.sh" >&2
  else
    changed=$(diff <(cat "$stamp") <(echo "$inputs") | awk '/^>/ {print $2}' | paste -sd, - || true)
    echo "build: the guest image is stale (changed: ${changed:-outputs missing}): run guest-images/build.sh" >&2
  fi
  exit 3
fi

# ---- packages ---------------------------------------------------------------------------
need apt-get "a Debian or Ubuntu host"
need dpkg-deb "install dpkg"
need objcopy "install binutils (reads kernel module dependencies)"
need cargo "install Rust (rustup.rs)"
need readelf "install binutils"
libc_a=$(cc -print-file-name=libc.a 2>/dev/null || true)
[ -f "$libc_a" ] || die "the suite links glibc statically and no libc.a was found: apt-get install libc6-dev gcc"
[ $refresh = 0 ] || rm -rf "$cache"
debs="$cache/debs"
mkdir -p "$debs" "$out"
step "resolving the libraries of ${TOOL_PACKAGES[*]}"
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances "${TOOL_PACKAGES[@]}" 2>/dev/null |
  grep -v '^ ' | grep -v '^<' | LC_ALL=C sort -u |
  grep -E '^lib' | grep -vE '^(libpython|libperl|lib.*-perl$)' || true)
wanted=("${TOOL_PACKAGES[@]}" $closure $kernel_pkg)
missing=()
for p in "${wanted[@]}"; do
  compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "downloading ${#missing[@]} packages"
  sandbox=()
  [ "$(id -u)" != 0 ] || sandbox=(-o APT::Sandbox::User=root)
  (cd "$debs" && apt-get download "${sandbox[@]}" -q "${missing[@]}" >&2) ||
    die "apt-get download failed (is the Debian archive reachable? try apt-get update)"
fi
root="$cache/root"
rm -rf "$root"
mkdir -p "$root"
step "unpacking ${#wanted[@]} packages"
for p in "${wanted[@]}"; do
  for d in "$debs/${p}"_*.deb; do dpkg-deb -x "$d" "$root"; done
done

# ---- the suite --------------------------------------------------------------------------
step "building the suite (static, x86_64-unknown-linux-gnu)"
suite_target="$here/out/target"
(cd "$repo" && env -u RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
  CARGO_TARGET_DIR="$suite_target" \
  RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build -q --release -p pmem-tests --bin pmem-tests --no-default-features --target x86_64-unknown-linux-gnu >&2) ||
  die "cargo build of guest-images/pmem-tests failed"
suite_bin="$suite_target/x86_64-unknown-linux-gnu/release/pmem-tests"
file_info=$(od -An -tx1 -N4 "$suite_bin" | tr -d ' ')
[ "$file_info" = 7f454c46 ] || die "$suite_bin is not an ELF"
if readelf -l "$suite_bin" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  die "$suite_bin is dynamically linked; the guest has no loader for it"
fi

# ---- kernel modules ---------------------------------------------------------------------
moddir=""
release=""
if [ -n "$kernel_pkg" ]; then
  moddir=$(ls -d "$root"/lib/modules/* | head -1)
elif [ -n "$user_modules" ]; then
  moddir="$user_modules"
fi
[ -z "$moddir" ] || release=$(basename "$moddir")

# Prints the modules `$@` need, dependencies first, as paths relative to $moddir.
resolve_modules() {
  local -A seen=()
  local order=()
  visit() {
    # $2 = soft: a soft dependency, often an alias (crc32c) of a built-in module: optional.
    local name=$1 soft=${2:-} file deps dep info
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    file=$(cd "$moddir" && find kernel updates extra -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" 2>/dev/null | head -1)
    if [ -z "$file" ]; then
      name=${name//-/_}
      file=$(cd "$moddir" && find kernel -name "$name.ko*" 2>/dev/null | head -1)
    fi
    if [ -z "$file" ]; then
      grep -q "/${name}.ko" "$moddir/modules.builtin" 2>/dev/null && return 0
      [ -n "$soft" ] || step "module $name is neither a file under $moddir nor built in; leaving it out"
      return 0
    fi
    info=$(module_info "$moddir/$file")
    deps=$(echo "$info" | sed -n 's/^depends=//p' | tr ',' ' ')
    for dep in $deps; do visit "$dep"; done
    for dep in $(echo "$info" | sed -n 's/^softdep=pre: //p'); do visit "$dep" soft; done
    order+=("$file")
  }
  for m in "$@"; do visit "$m"; done
  printf '%s\n' "${order[@]}"
}
module_info() {
  local f=$1 tmp
  tmp=$(mktemp)
  case "$f" in
    *.xz) xz -dc "$f" >"$tmp" ;;
    *.zst) zstd -qdc "$f" >"$tmp" ;;
    *) cp "$f" "$tmp" ;;
  esac
  objcopy -O binary --only-section=.modinfo "$tmp" "$tmp.info" 2>/dev/null || true
  tr '\0' '\n' <"$tmp.info" 2>/dev/null || true
  rm -f "$tmp" "$tmp.info"
}
# Copies modules (decompressed, debug info stripped) into staging dir $1 and writes the list.
install_modules() {
  local stage=$1
  shift
  [ -n "$moddir" ] || return 0
  local list
  list=$(resolve_modules "$@")
  mkdir -p "$stage/lib/modules/$release"
  : >"$stage/lib/modules/pmemtests.load"
  local m dest
  for m in $list; do
    dest="$stage/lib/modules/$release/${m%.xz}"
    dest=${dest%.zst}
    mkdir -p "$(dirname "$dest")"
    case "$m" in
      *.xz) xz -dc "$moddir/$m" >"$dest" ;;
      *.zst) zstd -qdc "$moddir/$m" >"$dest" ;;
      *) cp "$moddir/$m" "$dest" ;;
    esac
    strip --strip-debug "$dest" 2>/dev/null || true
    echo "${dest#"$stage/lib/modules/$release/"}" >>"$stage/lib/modules/pmemtests.load"
  done
}

# ---- libraries --------------------------------------------------------------------------
loader="$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -f "$loader" ] || loader="$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -f "$loader" ] || die "libc6 unpacked without ld-linux-x86-64.so.2"
libpath=$(find "$root" -name '*.so*' -type f -printf '%h\n' 2>/dev/null | LC_ALL=C sort -u | paste -sd: -)
step "resolving libraries with Debian's loader (ldd)"
# Prints the libraries the unpacked binaries $@ load, one path a line, sorted.
libs_of() {
  local b listing
  for b in "$@"; do
    [ -f "$root/$b" ] || die "$b is not in the unpacked packages"
    listing=$("$loader" --library-path "$libpath" --list "$root/$b" 2>&1) || die "ldd $b failed: $listing"
    if grep -q 'not found' <<<"$listing"; then
      die "libraries of $b not in the downloaded packages: $(grep 'not found' <<<"$listing" | awk '{print $1}' | paste -sd' ' -)"
    fi
    awk '$2 == "=>" && $3 ~ /^\// {print $3}' <<<"$listing"
  done | LC_ALL=C sort -u
}
# Copies the binaries $2.. with their libraries and the loader into stage $1.
install_tools() {
  local stage=$1 b lib
  shift
  mkdir -p "$stage"/{sbin,usr/bin,usr/sbin,etc,lib/x86_64-linux-gnu,lib64}
  for b in "$@"; do install -m 755 "$root/$b" "$stage/$b"; done
  ln -sf mke2fs "$stage/sbin/mkfs.ext4"
  [ -f "$root/etc/mke2fs.conf" ] && install -m 644 "$root/etc/mke2fs.conf" "$stage/etc/mke2fs.conf"
  for lib in $(libs_of "$@"); do
    cp -L "$lib" "$stage/lib/x86_64-linux-gnu/$(basename "$lib")"
  done
  cp -L "$loader" "$stage/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
  ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$stage/lib64/ld-linux-x86-64.so.2"
}

# ---- staging: the tools image -------------------------------------------------------------
step "assembling tools.img"
init_cpio=$(bash "$here/build-init.sh" | tail -1) || die "build-init.sh failed"
tools="$cache/stage-tools"
rm -rf "$tools"
install_tools "$tools" "${TOOL_BINARIES[@]}"
install -m 755 "$(dirname "$init_cpio")/pmvm-init" "$tools/usr/bin/pmvm-init"
fio=$(bash "$here/build-fio.sh" | tail -1) || die "build-fio.sh failed"
install -m 755 "$fio" "$tools/usr/bin/fio"
install_modules "$tools" "${MODULE_ROOTS_TOOLS[@]}"
command -v mkfs.ext4 >/dev/null || need mke2fs "install e2fsprogs (builds tools.img)"
# Room for the files and ext4's own metadata, in the 2 MiB steps pmvm's devices come in.
mib=$(( ($(du -sm "$tools" | cut -f1) * 5 / 4 + 16 + 1) / 2 * 2 ))
rm -f "$out/tools.img.tmp"
truncate -s "${mib}M" "$out/tools.img.tmp"
mkfs.ext4 -q -F -b 4096 -L pmvmtools -O ^has_journal -d "$tools" "$out/tools.img.tmp" >&2 ||
  die "mkfs.ext4 -d could not build tools.img"
mv -f "$out/tools.img.tmp" "$out/tools.img"

# ---- staging: full image ------------------------------------------------------------------
stage="$cache/stage-full"
rm -rf "$stage"
mkdir -p "$stage"/{bin,etc,lib,proc,sys,dev,tmp,run,mnt,root,tools}
step "assembling initramfs.cpio"
install -m 755 "$here/initramfs/init" "$stage/init"
install -m 755 "$here/initramfs/ndctl-check" "$stage/bin/ndctl-check"
install -m 755 "$root/bin/busybox" "$stage/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
done
install -m 755 "$suite_bin" "$stage/bin/pmem-tests"
# The tools live on the read-only NVDIMM that /init mounts on /tools.
for d in usr sbin lib64 lib/x86_64-linux-gnu; do ln -s "/tools/$d" "$stage/$d"; done
ln -s /tools/etc/mke2fs.conf "$stage/etc/mke2fs.conf"
echo "root:x:0:0:root:/root:/bin/sh" >"$stage/etc/passwd"
install_modules "$stage" "${MODULE_ROOTS_EARLY[@]}"
NODES=(dev/console:c:5:1:600 dev/null:c:1:3:666 dev/ttyS0:c:4:64:600)
python3 "$here/initramfs/mkcpio.py" "$stage" "$out/initramfs.cpio" "${NODES[@]}"
if [ $gzip = 1 ]; then
  step "compressing initramfs.cpio.gz"
  gzip -9n <"$out/initramfs.cpio" >"$out/initramfs.cpio.gz"
else
  rm -f "$out/initramfs.cpio.gz"
fi

# ---- staging: preflight -------------------------------------------------------------------
step "assembling preflight.cpio"
pre="$cache/stage-preflight"
rm -rf "$pre"
mkdir -p "$pre"/{proc,sys,dev,mnt}
install -m 755 "$suite_bin" "$pre/init"
install_modules "$pre" "${MODULE_ROOTS_EARLY[@]}"
python3 "$here/initramfs/mkcpio.py" "$pre" "$out/preflight.cpio" "${NODES[@]}"

# ---- record -------------------------------------------------------------------------------
kernel="${user_kernel:-$debian_dir/vmlinux}"
kind=$([ -n "$user_kernel" ] && echo user || echo debian)
cat >"$out/image.env" <<EOF
# Written by guest-images/build.sh; read by tests/guest_suite.rs and run-suite.sh.
PMEMTESTS_KERNEL=$kernel
PMEMTESTS_KERNEL_KIND=$kind
PMEMTESTS_KERNEL_MINIMAL=$minimal
PMEMTESTS_MODULES_RELEASE=$release
PMEMTESTS_INITRAMFS=$out/initramfs.cpio
PMEMTESTS_PREFLIGHT=$out/preflight.cpio
PMEMTESTS_TOOLS=$out/tools.img
PMEMTESTS_INPUT_HASH=$hash
EOF
echo "$inputs" >"$stamp"
step "built $(du -h "$out/initramfs.cpio" | cut -f1) initramfs, $(du -h "$out/preflight.cpio" | cut -f1) preflight, $(du -h "$out/tools.img" | cut -f1) tools.img ($hash)"
echo "$out/image.env"
