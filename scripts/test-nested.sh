#!/usr/bin/env bash
# Runs pmvm's integration tests on a hardware-like KVM on any x86-64 Linux machine, with or
# without /dev/kvm: QEMU with pure TCG emulates an AMD CPU with SVM and nested paging, and the
# L1 guest it boots (Debian's stock kernel) loads kvm_amd and runs the test binaries that
# `cargo test` built on this host, through a read-only 9p share of this host's root, with
# their backing files on a real ext4 (a virtio-blk disk inside L1).
#
# Usage: scripts/test-nested.sh [TEST[:FILTER,...]...] [--compare] [--bench [BENCH_ARGS]]
#   TEST is an integration-test target (boot, pmem, kvm_flush, ...); each FILTER goes to its
#   binary as a libtest name filter, or with a leading ! as --skip (api:!load runs every api
#   test but those whose name contains "load"). Without arguments: $PMVM_NESTED_TESTS, else
#   the default list below. `--list` prints the test targets there are and exits;
#   `--compare` runs scripts/kvm-compare.sh inside L1 after the tests named, alone when none
#   are (the measurements in docs/testing.md). `--bench` runs the guest-side benchmark
#   (tests/bench_guest/, as scripts/bench-guest.sh does on this host) inside L1 last, pmvm and
#   QEMU with -accel kvm on L1's kvm_amd; the arguments after it are its own: --reps N
#   (default 40), --max-pages K (default 4096), --quick (3 and 64), --write-docs (its section of
#   docs/benchmarks.md and docs/bench/guest-msync-nested.svg, written back through a writable
#   9p share of target/nested/out).
# Environment:
#   PMVM_NESTED_TIMEOUT      seconds for the whole L1 run (default 900)
#   PMVM_NESTED_BIN_TIMEOUT  seconds for one test binary inside L1 (default 300; the
#                            benchmark gets the whole run's less a minute)
#   PMVM_NESTED_TCG_THREAD   single (default) or multi: QEMU 7.2's multi-threaded TCG broke
#                            L1 (an int3 oops in kernel text patching) and triple-faulted L2
#                            guests under load; single runs every vCPU on one host thread
#   PMVM_NESTED_L1_CPUS      L1's vCPUs (default 1): with 2, TCG's SVM delivered some timer
#                            interrupts twice, the second time with interrupts off, and Linux
#                            guests in L2 deadlocked in about half of their boots under pmvm and
#                            under QEMU-KVM alike (docs/testing.md); nor is TCG faster with 2
#   PMVM_CACHE               downloads and the L1 initramfs (default ~/.cache/pmvm)
# The last line of stdout is `N passed, N failed, N skipped`; the exit status is 0 only when
# nothing failed. A step that cannot be done says which in one line on stderr.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
here="$repo/scripts/nested"

# What proves pmvm on hardware KVM: boot path and serial, the NVDIMM's flushes and writeback,
# persistence, SMP, the API against a running guest, a stock kernel, the guest suite under that
# stock kernel, the seccomp filters, and the device's own KVM tests (dirty bitmap and dirty
# ring). Left out, as L1 runs user space about 20 times slower than the host: flush_storm
# (100,000 synchronous flushes, minutes there) and api's load test (10,000 requests under a
# 120 s limit). The rest (bad_input, pmem_format, probe_insns, linux_dax) test the host side or
# need the host's own kernel builds.
DEFAULT_TESTS="boot pmem persist smp api:!bad_input_and_load linux_early guest_suite seccomp kvm_flush kvm_dirty_ring"

total_timeout=${PMVM_NESTED_TIMEOUT:-900}
bin_timeout=${PMVM_NESTED_BIN_TIMEOUT:-300}
tcg_thread=${PMVM_NESTED_TCG_THREAD:-single}
l1_cpus=${PMVM_NESTED_L1_CPUS:-1}
cache_root="${PMVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pmvm}"
cache="$cache_root/nested"
work="$repo/target/nested"

step() { echo "test-nested: $*" >&2; }
# One line naming the step that failed, then the closing line counting it as a failure (on the
# script's stdout, fd 3, also from inside a redirected block).
exec 3>&1
die() {
  echo "test-nested: error: $*" >&2
  echo "0 passed, 1 failed, 0 skipped" >&3
  exit 1
}

list_only=0
compare=0
bench=0
bench_reps=40
bench_pages=4096
bench_docs=0
specs=()
while (($#)); do
  a=$1
  shift
  if [ $bench = 1 ]; then
    case "$a" in
      --reps) bench_reps=${1:-} && shift $(($# > 0)) ;;
      --max-pages) bench_pages=${1:-} && shift $(($# > 0)) ;;
      --quick) bench_reps=3 bench_pages=64 ;;
      --write-docs) bench_docs=1 ;;
      *) die "arguments: --bench takes --reps N, --max-pages K, --quick, --write-docs (not $a)" ;;
    esac
    continue
  fi
  case "$a" in
    --list) list_only=1 ;;
    --compare) compare=1 ;;
    --bench) bench=1 ;;
    -h | --help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "arguments: unknown option $a (see --help)" ;;
    *) specs+=("$a") ;;
  esac
done
for n in "$bench_reps" "$bench_pages"; do
  case "$n" in '' | *[!0-9]* | 0) die "arguments: --bench needs numbers for --reps and --max-pages" ;; esac
done
case "$l1_cpus" in
  '' | *[!0-9]* | 0) die "arguments: PMVM_NESTED_L1_CPUS=$l1_cpus is not a vCPU count" ;;
esac
if [ ${#specs[@]} -eq 0 ] && [ $compare = 0 ] && [ $bench = 0 ]; then
  read -r -a specs <<<"${PMVM_NESTED_TESTS:-$DEFAULT_TESTS}"
fi

[ "$(uname -m)" = x86_64 ] || die "host: QEMU's TCG SVM guest needs an x86-64 host (this is $(uname -m))"
case "$repo" in
  /proc/* | /sys/* | /dev/*)
    die "host: the checkout is under ${repo%%/"${repo#/*/}"}, which L1 mounts over; move it" ;;
esac

# ---- tools ----------------------------------------------------------------------------------
. "$repo/scripts/lib/apt.sh"
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v depmod >/dev/null || need_pkgs+=(kmod)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
apt_need test-nested "${need_pkgs[@]}"
for t in python3 dpkg-deb apt-get cargo timeout; do
  command -v "$t" >/dev/null || die "tools: $t is missing"
done

# ---- the test binaries, built on this host --------------------------------------------------
mkdir -p "$work"
: >"$work/targets.tsv"
if [ ${#specs[@]} -gt 0 ] || [ $compare = 1 ] || [ $list_only = 1 ]; then
  step "building the test binaries (cargo test --no-run)"
  cargo test --workspace --tests --no-run --locked --message-format=json-render-diagnostics \
    >"$work/artifacts.json" 2>"$work/build.log" ||
    die "cargo: building the tests failed: $(grep -m1 '^error' "$work/build.log" || tail -1 "$work/build.log")"
  # name<TAB>executable<TAB>package directory, for every integration-test target.
  python3 - "$work/artifacts.json" >"$work/targets.tsv" <<'PY'
import json, os, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("kind") == ["test"] and m.get("executable"):
        print(f"{t['name']}\t{m['executable']}\t{os.path.dirname(m['manifest_path'])}")
PY
fi
if [ $list_only = 1 ]; then
  cut -f1 "$work/targets.tsv" | LC_ALL=C sort
  exit 0
fi

# The guest benchmark's kernel, guest program and release binaries, built here; L1 writes its
# results into $out, a writable share, from which they are copied into docs/ at the end.
out="$work/out"
rm -rf "$out"
mkdir -p "$out/docs/bench"
if [ $bench = 1 ]; then
  step "building the guest benchmark (minimal kernel, guest program, release pmvm and bench-guest)"
  bench_kernel=$(bash "$repo/guest-images/build-kernel.sh" 2>"$work/bench-build.log" | tail -n 1) ||
    die "bench: guest-images/build-kernel.sh failed ($(tail -1 "$work/bench-build.log"))"
  bench_init=$(bash "$repo/guest-images/build-init.sh" 2>>"$work/bench-build.log" | tail -n 1) ||
    die "bench: guest-images/build-init.sh failed ($(tail -1 "$work/bench-build.log"))"
  bench_init=$(dirname "$bench_init")/pmvm-guest-bench
  (cd "$repo" && cargo build --release --locked -p pmvm -p pmvm-tests --bin pmvm --bin bench-guest) \
    >>"$work/bench-build.log" 2>&1 || die "bench: cargo build --release failed (log: $work/bench-build.log)"
  release=${CARGO_TARGET_DIR:-$repo/target}
  case $release in /*) ;; *) release=$repo/$release ;; esac
  release=$release/release
  cp "$repo/docs/benchmarks.md" "$out/docs/benchmarks.md"
  docs_sum=$(sha256sum <"$repo/docs/benchmarks.md")
fi

plan="$work/plan.sh"
names=()
{
  echo "#!/bin/bash"
  echo "# The test binaries L1 runs, written by scripts/test-nested.sh."
  echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
  echo "export TMPDIR=/tmp RUST_BACKTRACE=1 CI=$(printf %q "${CI:-}")"
  # The guest suite uses the image built on this host as it is (L1 cannot write it). Linux
  # guests get noxsave: TCG's SVM does not intercept XSETBV, so a guest could change XCR0
  # behind its hypervisor.
  echo "export PMVM_SUITE_NO_BUILD=1 PMVM_SUITE_CMDLINE=noxsave PMVM_LINUX_CMDLINE=noxsave"
  # Tests that keep scratch files in cargo's target/tmp (CARGO_TARGET_TMPDIR) get the ext4.
  [ ! -s "$work/targets.tsv" ] || target_tmp=$(dirname "$(dirname "$(dirname "$(cut -f2 "$work/targets.tsv" | head -1)")")")/tmp
  if [ -n "${target_tmp:-}" ] && [ -d "$target_tmp" ]; then
    printf 'mkdir -p /tmp/.cargo-target-tmp && mount --bind /tmp/.cargo-target-tmp %q\n' "$target_tmp"
  fi
  cat <<EOF
limit=$bin_timeout
run() {
  local name=\$1 dir=\$2 t0 rc=0
  shift 2
  echo "nested: run \$name"
  t0=\$(date +%s%N)
  (cd "\$dir" && timeout -k 10 \$limit "\$@" </dev/null 2>&1) || rc=\$?
  echo "nested: exit \$name rc=\$rc ms=\$(( (\$(date +%s%N) - t0) / 1000000 ))"
}
EOF
  for spec in "${specs[@]}"; do
    name=${spec%%:*}
    filters=()
    if [ "$name" != "$spec" ]; then
      IFS=, read -r -a items <<<"${spec#*:}"
      for f in "${items[@]}"; do
        case "$f" in
          '!'*) filters+=(--skip "${f#!}") ;;
          ?*) filters+=("$f") ;;
        esac
      done
    fi
    row=$(awk -F'\t' -v n="$name" '$1 == n' "$work/targets.tsv")
    [ -n "$row" ] || die "arguments: no integration test named $name (--list shows them)"
    IFS=$'\t' read -r _ exe dir <<<"$row"
    printf 'run %q %q %q --test-threads=2 --show-output --color never' "$spec" "$dir" "$exe"
    [ ${#filters[@]} -eq 0 ] || printf ' %q' "${filters[@]}"
    echo
    names+=("$spec")
  done
  if [ $compare = 1 ]; then
    printf 'run kvm-compare %q bash %q\n' "$repo" "$repo/scripts/kvm-compare.sh"
    names+=(kvm-compare)
  fi
  if [ $bench = 1 ]; then
    # The minimal kernel as L2 gets noxsave: TCG's SVM does not intercept XSETBV.
    printf 'limit=%q run bench-guest %q %q' $((total_timeout - 60)) "$repo" "$release/bench-guest"
    printf ' %q' --pmvm "$release/pmvm" --qemu "$(command -v qemu-system-x86_64)" \
      --kernel "$bench_kernel" --init "$bench_init" --reps "$bench_reps" \
      --max-pages "$bench_pages" --append noxsave --nested
    [ $bench_docs = 0 ] || printf ' %q' --write-docs "$out/docs"
    echo
    names+=(bench-guest)
  fi
} >"$plan"

# What the tests read from the repository must be ready before L1 sees it read-only.
bash "$repo/guest-images/build-probe.sh" >/dev/null || die "probe: guest-images/build-probe.sh failed"
case " ${names[*]} " in
  *" linux_early"*)
    bash "$repo/guest-images/fetch-debian-kernel.sh" >/dev/null 2>&1 ||
      step "fetch-debian-kernel.sh failed; linux_early will say why inside L1" ;;
esac
case " ${names[*]} " in
  *" guest_suite"*)
    step "building the guest suite's image (guest-images/build.sh)"
    bash "$repo/guest-images/build.sh" >/dev/null 2>"$work/suite-build.log" ||
      step "guest-images/build.sh failed ($(tail -1 "$work/suite-build.log")); guest_suite will say why inside L1" ;;
esac

# ---- L1: Debian's stock kernel and a busybox initramfs ---------------------------------------
mkdir -p "$cache/debs"
debs="$cache/debs"
fetch() {
  local pkg=$1
  compgen -G "$debs/${pkg}_*.deb" >/dev/null && return 0
  step "downloading $pkg"
  local sandbox=()
  [ "$(id -u)" != 0 ] || sandbox=(-o APT::Sandbox::User=root)
  (cd "$debs" && apt-get download "${sandbox[@]}" -q "$pkg" >&2) ||
    die "packages: apt-get download $pkg failed (is the Debian archive reachable? try apt-get update)"
}
# Debian 12's 6.12 kernel: cachestat(2) (6.5+) makes the tests' page-cache checks real in L1.
meta=linux-image-6.12-amd64
kpkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >&2 || true
  kpkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kpkg" ] || die "packages: cannot resolve $meta (no Debian 12 archive in the apt sources?)"
fetch "$kpkg"
fetch busybox-static

l1="$cache/l1-${kpkg#linux-image-}"
inputs=$(cat "$0" "$here/l1-init" "$repo/guest-images/initramfs/mkcpio.py" "$debs/${kpkg}"_*.deb "$debs"/busybox-static_*.deb | sha256sum | cut -c1-16)
if [ ! -s "$l1/initramfs.cpio" ] || [ "$(cat "$l1/inputs" 2>/dev/null)" != "$inputs" ]; then
  step "assembling the L1 initramfs ($kpkg)"
  rm -rf "$l1"
  mkdir -p "$l1/root" "$l1/stage"/{bin,proc,sys,dev,host,lib/modules}
  dpkg-deb -x "$debs/${kpkg}"_*.deb "$l1/root"
  dpkg-deb -x "$debs"/busybox-static_*.deb "$l1/root"
  release=$(ls "$l1/root/lib/modules")
  depmod -b "$l1/root" "$release" || die "initramfs: depmod failed for $release"
  cp "$l1/root/boot/vmlinuz-$release" "$l1/vmlinuz"
  install -m 755 "$l1/root/bin/busybox" "$l1/stage/bin/busybox"
  install -m 755 "$here/l1-init" "$l1/stage/init"
  # KVM with nested paging, the scratch disk's ext4 and the 9p share, dependencies first.
  python3 - "$l1/root/lib/modules/$release" kvm-amd virtio_blk crc32c_generic ext4 9pnet_virtio 9p \
    >"$l1/modules.list" <<'PY' || die "initramfs: a module is missing from $kpkg"
import sys
base, wanted = sys.argv[1], sys.argv[2:]
deps = {}
for line in open(f"{base}/modules.dep"):
    mod, _, rest = line.partition(":")
    deps[mod.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")] = (mod, rest.split())
order = []
for name in wanted:
    key = name.replace("-", "_")
    if key not in deps:
        sys.exit(f"no module {name}")
    mod, needs = deps[key]
    # modules.dep lists a module's dependencies so that the last one loads first.
    for m in list(reversed(needs)) + [mod]:
        if m not in order:
            order.append(m)
print("\n".join(order))
PY
  : >"$l1/stage/lib/modules/load"
  while read -r m; do
    f=$(basename "${m%.xz}")
    xz -dc "$l1/root/lib/modules/$release/$m" >"$l1/stage/lib/modules/$f"
    echo "$f" >>"$l1/stage/lib/modules/load"
  done <"$l1/modules.list"
  python3 "$repo/guest-images/initramfs/mkcpio.py" "$l1/stage" "$l1/initramfs.cpio" \
    dev/console:c:5:1:600 dev/null:c:1:3:666 || die "initramfs: mkcpio.py failed"
  rm -rf "$l1/root" "$l1/stage"
  echo "$inputs" >"$l1/inputs"
fi

# ---- the scratch disk: a fresh ext4 for the tests' backing files ----------------------------
scratch="$work/scratch.img"
rm -f "$scratch"
truncate -s 6G "$scratch"
mkfs.ext4 -q -F -L pmvm-scratch -E lazy_itable_init=0,lazy_journal_init=0 "$scratch" ||
  die "scratch: mkfs.ext4 $scratch failed"

# ---- run ------------------------------------------------------------------------------------
log="$work/console.log"
step "booting L1 (QEMU TCG, EPYC +svm +npt, $l1_cpus vCPU(s)): ${names[*]}"
t0=$(date +%s)
set +e
timeout -k 10 "$total_timeout" qemu-system-x86_64 \
  -accel tcg,thread="$tcg_thread" -machine q35 -cpu EPYC,+svm,+npt -smp "$l1_cpus" -m 4096 \
  -kernel "$l1/vmlinuz" -initrd "$l1/initramfs.cpio" \
  -append "console=ttyS0 panic=-1 loglevel=4 pmvm_plan=$plan pmvm_out=$out pmvm_cache=$cache_root" \
  -nodefaults -display none -serial stdio -no-reboot \
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev local,id=out,path="$out",security_model=none \
  -device virtio-9p-pci,fsdev=out,mount_tag=pmvmout \
  -drive file="$scratch",if=virtio,format=raw,cache=unsafe \
  </dev/null 2>"$work/qemu.err" | sed -u 's/\r$//' | tee "$log"
qemu_rc=${PIPESTATUS[0]}
set -e
secs=$(($(date +%s) - t0))
rm -f "$scratch"

if ! grep -q '^nested: ready' "$log"; then
  why=$(grep -m1 '^nested: FAIL' "$log" | sed 's/^nested: FAIL //')
  [ -n "$why" ] || why="L1 stopped before its init was ready (QEMU status $qemu_rc; $(tail -1 "$work/qemu.err" 2>/dev/null || true); console in $log)"
  die "L1: $why"
fi
[ "$qemu_rc" != 124 ] || step "L1 ran out of its ${total_timeout}s (PMVM_NESTED_TIMEOUT)"
step "L1 ran ${secs}s"
if [ $bench = 1 ] && [ $bench_docs = 1 ]; then
  if ! grep -q '^nested: exit bench-guest rc=0 ' "$log"; then
    step "bench-guest did not finish inside L1; docs/ left as they were"
  elif [ "$(sha256sum <"$repo/docs/benchmarks.md")" != "$docs_sum" ]; then
    step "docs/benchmarks.md changed during the run; the nested section is in $out/docs/benchmarks.md"
  else
    cp "$out/docs/benchmarks.md" "$repo/docs/benchmarks.md"
    cp "$out/docs/bench/guest-msync-nested.svg" "$repo/docs/bench/"
    step "wrote the nested guest benchmark's section of docs/benchmarks.md"
  fi
fi
awk -v planned="${names[*]}" '
  /^nested: run / { cur = $3 }
  /^test result:/ { p += $4; f += $6; if ($6 > 0) failed[cur] = 1 }
  /SKIP: / { s++ }
  /^nested: exit / {
    split($4, rc, "="); done[$3] = 1
    if (rc[2] != 0 && !failed[$3]) {
      f++
      printf "test-nested: %s exited with status %s and no failing test (crashed, or timed out: 124)\n", $3, rc[2] > "/dev/stderr"
    }
  }
  END {
    n = split(planned, want, " ")
    for (i = 1; i <= n; i++) if (!done[want[i]]) {
      f++
      printf "test-nested: %s did not finish inside L1\n", want[i] > "/dev/stderr"
    }
    printf "%d passed, %d failed, %d skipped\n", p, f, s
    exit f > 0
  }' "$log"
