#!/usr/bin/env bash
# Builds fio statically from Debian's own source package, for the guest suite's tools image.
# Debian's binary fio loads 80 MB of libraries (librados, librbd, libicu); relocating them at
# every start took minutes per run where guest kernel code is emulated. Built here it needs
# none, and loads in a fraction of that.
#
# Output: guest-images/out/cache/fio-<version>/fio; its path is the last line of stdout.
# Cached by version: a second run prints it at once. Progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache="$here/out/cache"
step() { echo "build-fio: $*" >&2; }
die() { step "error: $*"; exit 1; }

version=$(apt-cache policy fio 2>/dev/null | awk '/Candidate:/ {print $2}')
[ -n "$version" ] && [ "$version" != "(none)" ] ||
  die "apt-cache knows no fio: is this a Debian host with its archive configured (apt-get update)?"
out="$cache/fio-$version"
if [ -x "$out/fio" ]; then
  step "up to date (fio $version)"
  echo "$out/fio"
  exit 0
fi
for tool in gcc make; do
  command -v "$tool" >/dev/null || die "needs $tool: apt-get install build-essential"
done

# Debian's source archive, with apt's own state kept out of the host's configuration.
apt_dir="$cache/apt-src"
mkdir -p "$apt_dir/lists/partial" "$out"
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
echo "deb-src http://deb.debian.org/debian $suite main" >"$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o APT::Sandbox::User=root)
work=$(mktemp -d "$cache/.fio-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
step "fetching Debian's fio $version source"
apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update of the source index failed"
(cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only "fio=$version" >&2) ||
  die "apt-get source fio=$version failed"
orig=$(ls "$work"/fio_*.orig.tar.* 2>/dev/null | head -1)
[ -n "$orig" ] || die "no fio source tarball in what apt-get source fetched"
tar -xf "$orig" -C "$work"
src=$(find "$work" -maxdepth 1 -type d -name 'fio-*' | head -1)
[ -n "$src" ] || die "the fio tarball unpacked into no fio-* directory"
step "building fio $version statically (about a minute)"
(cd "$src" && ./configure --build-static --disable-native && make -j"$(nproc)" fio) \
  >"$out/build.log" 2>&1 || { tail -n 20 "$out/build.log" >&2; die "fio build failed (log: $out/build.log)"; }
strip "$src/fio" -o "$out/fio.tmp"
mv -f "$out/fio.tmp" "$out/fio"
step "built $out/fio"
echo "$out/fio"
