#!/usr/bin/env bash
# Fetches Debian's cloud kernel with apt-get download (no system-wide install), unpacks it and
# extracts the uncompressed ELF vmlinux from the bzImage, so a guest can skip the decompressor.
# Output: guest-images/out/debian/{bzImage,vmlinux}. Prints the directory as the last line.
# Cached: nothing is fetched again while both files exist.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/out/debian"
mkdir -p "$out"
if [ -s "$out/bzImage" ] && [ -s "$out/vmlinux" ]; then
  echo "$out"
  exit 0
fi
step() { echo "fetch-debian-kernel: $*" >&2; }

command -v apt-get >/dev/null || { step "needs apt-get (Debian or Ubuntu)"; exit 1; }
if ! command -v lz4 >/dev/null || ! command -v xz >/dev/null; then
  [ "$(id -u)" = 0 ] || { step "needs lz4 and xz-utils: apt-get install lz4 xz-utils"; exit 1; }
  step "installing lz4 and xz-utils"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lz4 xz-utils >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
step "resolving linux-image-cloud-amd64"
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  [ "$(id -u)" = 0 ] && apt-get update -qq >&2
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { step "cannot resolve linux-image-cloud-amd64 (no Debian archive?)"; exit 1; }
step "downloading $pkg"
apt-get download "$pkg" >&2
step "unpacking"
dpkg-deb -x ./*.deb root
cp root/boot/vmlinuz-* "$out/bzImage.tmp"

step "extracting vmlinux"
# The protected-mode payload: setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c.
python3 - "$out/bzImage.tmp" payload <<'PY'
import struct, sys
b = open(sys.argv[1], 'rb').read()
sects = b[0x1f1] or 4
off, length = struct.unpack_from('<II', b, 0x248)
start = (sects + 1) * 512 + off
open(sys.argv[2], 'wb').write(b[start:start + length])
PY
magic=$(od -An -tx1 -N4 payload | tr -d ' ')
case "$magic" in
  02214c18) lz4 -dc payload > vmlinux 2>/dev/null || true ;;
  fd377a58) xz -dc payload > vmlinux 2>/dev/null || true ;;
  1f8b08*) gzip -dc payload > vmlinux 2>/dev/null || true ;;
  *) step "unknown kernel compression (magic $magic)"; exit 1 ;;
esac
[ "$(head -c4 vmlinux | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { step "extracted payload is not an ELF"; exit 1; }
mv vmlinux "$out/vmlinux"
mv "$out/bzImage.tmp" "$out/bzImage"
echo "$pkg" > "$out/package"
step "done: $pkg"
echo "$out"
