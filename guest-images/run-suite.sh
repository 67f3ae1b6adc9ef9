#!/usr/bin/env bash
# Runs the guest fsync/msync suite end to end: builds the guest image (build.sh), builds pmvm,
# boots the suite with two NVDIMMs, verifies every report from the host and prints the
# case x filesystem table. The work is done by tests/guest_suite.rs; this is its front door.
#
# Usage: run-suite.sh [--kernel PATH [--modules DIR]] [--cmdline "OPTS"] [--save [PATH]]
#                     [--emulated | --hardware]
#   --kernel PATH   your own kernel (bzImage or ELF vmlinux) instead of Debian's cloud kernel
#   --modules DIR   its lib/modules/<release> directory, if its NVDIMM drivers are modules
#   --cmdline OPTS  extra kernel options, e.g. "pmemtests.cases=fsync,map_sync pmemtests.fs=xfs"
#   --save [PATH]   write the results page (default docs/guest-suite-results.md)
#   --emulated      use the options of guest-images/suite-emulated.conf (detected by default)
#   --hardware      do not, even on an emulating host
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "run-suite: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) [ $# -ge 2 ] || die "--kernel needs a path"; export PMVM_SUITE_KERNEL=$(realpath -e -- "$2") || die "--kernel $2: no such file"; shift 2 ;;
    --modules) [ $# -ge 2 ] || die "--modules needs a directory"; export PMVM_SUITE_MODULES=$(realpath -e -- "$2") || die "--modules $2: no such directory"; shift 2 ;;
    --cmdline) [ $# -ge 2 ] || die "--cmdline needs options"; export PMVM_SUITE_CMDLINE=$2; shift 2 ;;
    --save)
      if [ $# -ge 2 ] && [ "${2#--}" = "$2" ]; then export PMVM_SUITE_RESULTS=$(realpath -m -- "$2"); shift 2
      else export PMVM_SUITE_RESULTS=1; shift; fi ;;
    --emulated) export PMVM_SUITE_EMULATED=1; shift ;;
    --hardware) export PMVM_SUITE_EMULATED=0; shift ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ -z "${PMVM_SUITE_MODULES:-}" ] || [ -n "${PMVM_SUITE_KERNEL:-}" ] || die "--modules only goes with --kernel"
[ -r /dev/kvm ] || die "/dev/kvm is not accessible: the suite needs KVM"

args=()
[ -z "${PMVM_SUITE_KERNEL:-}" ] || args+=(--kernel "$PMVM_SUITE_KERNEL")
[ -z "${PMVM_SUITE_MODULES:-}" ] || args+=(--modules "$PMVM_SUITE_MODULES")
bash "$here/build.sh" "${args[@]}" >/dev/null
cd "$here/.."
exec cargo test -p pmvm --test guest_suite guest_suite_end_to_end -- --nocapture
