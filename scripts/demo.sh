#!/usr/bin/env bash
# The pmvm demo: builds pmvm and the probe guest, boots the probe with one NVDIMM backed by a
# sparse file, lets it walk the ACPI tables and the NFIT, write two pages and flush them
# through a flush hint, then prints the flush statistics from the control socket.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
echo "== building pmvm" >&2
cargo build --quiet -p pmvm
pmvm=target/debug/pmvm
echo "== building the probe guest" >&2
probe=$(bash guest-images/build-probe.sh)

work=$(mktemp -d)
cleanup() {
  [ -n "${vm:-}" ] && kill "$vm" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
img="$work/pmem0.img"
sock="$work/pmvm.sock"
console="$work/console.log"

words="acpi nfit write 0 0 0x2000 0xab flush 0 check 0 0 0x2000 0xab mark DEMO-DONE wait"
echo "== booting: pmvm --kernel $probe --pmem path=$img,size=64M --api-sock $sock" >&2
"$pmvm" --kernel "$probe" --cmdline "console=ttyS0 -- $words" \
  --pmem "path=$img,size=64M" --api-sock "$sock" --serial "file=$console" &
vm=$!

for _ in $(seq 600); do
  grep -q "probe: MARK DEMO-DONE" "$console" 2>/dev/null && break
  kill -0 "$vm" 2>/dev/null || { cat "$console"; echo "pmvm exited early" >&2; exit 1; }
  sleep 0.1
done
echo "== guest console" >&2
cat "$console"
echo "== host: first bytes of $img" >&2
od -An -tx1 -N16 "$img"
echo "== pmvm stats --api-sock $sock" >&2
"$pmvm" stats --api-sock "$sock"
"$pmvm" shutdown --api-sock "$sock"
wait "$vm"
vm=
