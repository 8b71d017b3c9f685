#!/usr/bin/env bash
# Check fxquant's arm-sve2 target on ARM64 (issue #24, item 7): an emulated Debian arm64 guest (QEMU user mode
# through binfmt_misc, a root file system made by mmdebstrap) with torch's aarch64 wheel, in which this checkout
# is installed and checked:
#   (a) the tests that touch the arm-sve2 target and the CPU int8 backends (tests/test_heuristics.py,
#       tests/test_numerics.py) and tests/test_kernels.py under TRITON_INTERPRET=1 (Triton has no CPU backend on
#       aarch64);
#   (b) bench/check_arm.py: a LayerNorm->Linear->GELU->Linear MLP and the real all-MiniLM-L6-v2 compiled for
#       arm-sve2 (and for cpu, for the comparison), every int8 GEMM checked against an int32 reference.
# Emulation checks what runs and what it computes; its timings say nothing about ARM's speed.
#
# Usage (as root, on an x86-64 or ARM64 Linux host):
#   bench/check_arm.sh [DIR]          DIR (or FXQUANT_ARM_DIR): where the guest lives, default /var/tmp/fxquant-arm64
# The first run builds DIR/rootfs (mmdebstrap, ~3 min) and installs the pinned wheels of
# bench/check_arm-requirements.txt (~2.9 GB downloaded once into DIR/wheelhouse; ~5.6 GB of guest in all); later
# runs reuse both and only reinstall this checkout. Environment:
#   FXQUANT_ARM_VL="16 32"     SVE vector lengths in bytes to run under (QEMU_CPU=$FXQUANT_ARM_CPU,sve-default-vector-length=VL;
#                              "none": $FXQUANT_ARM_CPU alone, where torch falls back to its default kernels)
#   FXQUANT_ARM_CPU=max,sme=off   QEMU's CPU model and options (see QCPU_BASE below for why SME is off)
#   FXQUANT_ARM_TESTS=all      run the pytest part at every vector length (all), the first only (first) or not at
#                              all (none); bench/check_arm.py runs at every vector length
#   FXQUANT_ARM_PYTEST="..."   pytest's arguments (default: the three files named at PYTEST_ARGS below)
#   FXQUANT_ARM_SENTENCES=16   sentences of the MiniLM check
#   FXQUANT_ARM_SETUP_ONLY=1   build or update the guest and stop
#   FXQUANT_ARM_SUITE=bookworm, FXQUANT_ARM_MIRROR=http://deb.debian.org/debian   the Debian release and mirror
# Needs: root (chroot and mounts), binfmt_misc with a qemu-aarch64 handler (Debian/Ubuntu: qemu-user-static
# binfmt-support), mmdebstrap and arch-test for the first run (mmdebstrap recommends arch-test; installed without
# recommends it stops with "E: install arch-test for foreign architecture support"), python3 with pip on the host
# (else the guest downloads), network for the first run (Debian mirror, PyPI). Exits non-zero when anything fails.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE=${1:-${FXQUANT_ARM_DIR:-/var/tmp/fxquant-arm64}}
ROOT=$BASE/rootfs
WHEELS=$BASE/wheelhouse
VLS=${FXQUANT_ARM_VL:-16 32}
# sme=off: QEMU 7.2's "max" CPU has SME but not SME2, and the Arm Compute Library in torch 2.13 then runs an SME2
# kernel for some int8 GEMMs (oneDNN's lowp_gemm:acl, e.g. N = 1): SIGILL on `ptrue pn9.b` after `smstart`. The
# arm-sve2 target is for SVE2 CPUs (Neoverse N2 / V2 class), which have no SME.
QCPU_BASE=${FXQUANT_ARM_CPU:-max,sme=off}
TESTS=${FXQUANT_ARM_TESTS:-all}
SENTENCES=${FXQUANT_ARM_SENTENCES:-16}
SUITE=${FXQUANT_ARM_SUITE:-bookworm}
MIRROR=${FXQUANT_ARM_MIRROR:-http://deb.debian.org/debian}
REQS=bench/check_arm-requirements.txt
# the tests that touch the arm-sve2 target (test_heuristics), the CPU int8 backends (test_numerics: aten and oneDNN,
# exact at full range) and the Triton kernels under the interpreter (test_kernels): ~4 min per vector length here
PYTEST_ARGS=${FXQUANT_ARM_PYTEST:-tests/test_heuristics.py tests/test_numerics.py tests/test_kernels.py}
HOST_ARCH=$(uname -m)
T0=$SECONDS

say() { printf '[check_arm %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf 'check_arm: %s\n' "$*" >&2; exit 2; }

# ------------------------------------------------------------------------------------------------ preflight
[ "$(id -u)" = 0 ] || die "needs root (chroot and bind mounts): run it with sudo"
command -v unshare >/dev/null && command -v chroot >/dev/null || die "needs unshare and chroot (util-linux, coreutils)"
if [ "$HOST_ARCH" != aarch64 ]; then
  BM=/proc/sys/fs/binfmt_misc
  [ -e $BM/status ] || die "binfmt_misc is not mounted at $BM. Fix: mount -t binfmt_misc binfmt_misc $BM
  (in a container: the container needs CAP_SYS_ADMIN, e.g. docker run --privileged)"
  HANDLER=$(grep -l 'magic 7f454c460201010000000000000000000200b700' $BM/* 2>/dev/null | head -n1 || true)
  [ -n "$HANDLER" ] || die "no binfmt_misc handler for aarch64 ELF binaries. Fix (Debian/Ubuntu):
  apt-get install qemu-user-static binfmt-support && update-binfmts --enable qemu-aarch64"
  grep -qx enabled "$HANDLER" || die "the binfmt_misc handler $HANDLER is disabled. Fix: echo 1 > $HANDLER"
  INTERP=$(sed -n 's/^interpreter //p' "$HANDLER")
  # without the F flag the kernel opens the interpreter inside the chroot: it must be there
  grep -q '^flags:.*F' "$HANDLER" && INTERP_IN_ROOT=0 || INTERP_IN_ROOT=1
  QEMU_VERSION=$("$(readlink -f "$INTERP")" --version 2>/dev/null | head -n1 || true)
  say "host $HOST_ARCH; binfmt handler $(basename "$HANDLER") -> $INTERP ($QEMU_VERSION)"
fi

# guest: run "$@" in the arm64 root file system, in a mount namespace of its own (the mounts vanish with it):
# /proc with an ARM /proc/cpuinfo over the host's (trap 1: torch reads the host's x86 file and segfaults in
# `import torch`), /dev, /sys, a fresh /tmp, the wheelhouse. QEMU_CPU in the guest's environment sets the CPU
# (trap 2: without a vector length torch's SVE kernels are not chosen).
guest() {
  local qemu_cpu=$1; shift
  unshare --mount --propagation private --fork /bin/bash -s -- "$ROOT" "$BASE" "$HOST_ARCH" "$qemu_cpu" "$@" <<'EOS'
set -e
R=$1 B=$2 ARCH=$3 QCPU=$4; shift 4
mount -t proc proc "$R/proc"
[ "$ARCH" = aarch64 ] || mount --bind "$B/cpuinfo" "$R/proc/cpuinfo"
mount --rbind /dev "$R/dev"
mount --rbind /sys "$R/sys"
mount -t tmpfs tmpfs "$R/tmp"
mkdir -p "$R/opt/wheelhouse" && mount --bind "$B/wheelhouse" "$R/opt/wheelhouse"
exec chroot "$R" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ${QCPU:+QEMU_CPU=$QCPU} "$@"
EOS
}

write_cpuinfo() {  # a plausible aarch64 /proc/cpuinfo: QEMU's "max" CPU (implementer 0, part 0x051), one entry per host CPU
  local n i
  n=$(nproc)
  : > "$BASE/cpuinfo"
  for ((i = 0; i < n; i++)); do
    cat >> "$BASE/cpuinfo" <<EOF
processor	: $i
BogoMIPS	: 2000.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 dgh rng bti
CPU implementer	: 0x00
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0x051
CPU revision	: 0

EOF
  done
}

# ------------------------------------------------------------------------------------------------ root file system
mkdir -p "$BASE" "$WHEELS"
if [ ! -e "$ROOT/.fxquant-rootfs" ]; then
  command -v mmdebstrap >/dev/null || die "$ROOT does not exist and mmdebstrap is missing. Fix: apt-get install mmdebstrap arch-test"
  say "building $ROOT: Debian $SUITE arm64, minbase + python3 (mmdebstrap)"
  rm -rf "$ROOT.partial"
  mmdebstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOT.partial" "$MIRROR"
  touch "$ROOT.partial/.fxquant-rootfs"
  rm -rf "$ROOT" && mv "$ROOT.partial" "$ROOT"
fi
[ "$HOST_ARCH" = aarch64 ] || [ "$INTERP_IN_ROOT" = 0 ] || install -D -m 755 "$INTERP" "$ROOT$INTERP"
write_cpuinfo
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

# ------------------------------------------------------------------------------------------------ this checkout
# tracked and untracked-but-not-ignored files (what `git status` shows), so uncommitted work is checked too
say "copying $SRC into the guest (/opt/fxquant-src)"
rm -rf "$ROOT/opt/fxquant-src" && mkdir -p "$ROOT/opt/fxquant-src"
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$SRC" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -C "$ROOT/opt/fxquant-src" -xf -
else
  tar -C "$SRC" --exclude=.git --exclude='*.egg-info' --exclude=build --exclude=__pycache__ -cf - . \
    | tar -C "$ROOT/opt/fxquant-src" -xf -
fi

# ------------------------------------------------------------------------------------------------ Python packages
want=$(sha256sum "$SRC/$REQS" | cut -d' ' -f1)
if [ "$(cat "$ROOT/opt/venv/.fxquant-reqs" 2>/dev/null)" != "$want" ]; then
  say "installing $REQS into the guest's /opt/venv (pinned, --no-deps)"
  [ -x "$ROOT/opt/venv/bin/python" ] || guest "" python3 -m venv /opt/venv
  plat="--platform manylinux2014_aarch64"  # pip takes the tags literally: every manylinux level the guest's glibc 2.36 runs
  for v in $(seq 17 36); do plat="$plat --platform manylinux_2_${v}_aarch64"; done
  # download on the host where it has pip (native speed; --no-deps, so the host's markers never apply) ...
  if [ "$HOST_ARCH" != aarch64 ] && python3 -m pip --version >/dev/null 2>&1; then
    env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
      python3 -m pip download --quiet --no-deps --only-binary=:all: $plat --python-version 3.11 --implementation cp \
      --abi cp311 -d "$WHEELS" -r "$SRC/$REQS"
  else  # ... else in the guest
    guest "" pip download --quiet --no-deps --only-binary=:all: -d /opt/wheelhouse -r "/opt/fxquant-src/$REQS"
  fi
  guest "" pip install --quiet --no-index --find-links /opt/wheelhouse --no-deps -r "/opt/fxquant-src/$REQS"
  echo "$want" > "$ROOT/opt/venv/.fxquant-reqs"
fi
say "installing fxquant from the copy (pip install --no-deps --no-build-isolation)"
guest "" pip install --quiet --no-index --no-deps --no-build-isolation /opt/fxquant-src
[ "${FXQUANT_ARM_SETUP_ONLY:-0}" = 1 ] && { say "setup done ($ROOT)"; exit 0; }

# ------------------------------------------------------------------------------------------------ the checks
declare -a RESULTS=()
failed=0
step() {  # step NAME CMD...: run, time, record PASS / FAIL
  local name=$1 t=$SECONDS rc=0; shift
  say "== $name"
  "$@" || rc=$?
  if [ "$rc" = 0 ]; then RESULTS+=("PASS  $name ($((SECONDS - t)) s)"); else RESULTS+=("FAIL  $name (exit $rc, $((SECONDS - t)) s)"); failed=1; fi
}
first=1
for vl in $VLS; do
  if [ "$vl" = none ]; then qcpu=$QCPU_BASE; else qcpu=$QCPU_BASE,sve-default-vector-length=$vl; fi
  if [ "$TESTS" = all ] || { [ "$TESTS" = first ] && [ "$first" = 1 ]; }; then
    step "pytest $PYTEST_ARGS, TRITON_INTERPRET=1 (QEMU_CPU=$qcpu)" \
      guest "$qcpu" /bin/sh -c "cd /opt/fxquant-src && TRITON_INTERPRET=1 python -P -m pytest -q $PYTEST_ARGS"
  fi
  step "bench/check_arm.py (QEMU_CPU=$qcpu)" \
    guest "$qcpu" python -P /opt/fxquant-src/bench/check_arm.py --sentences "$SENTENCES"
  first=0
done

say "summary ($(uname -m) host, guest Debian $SUITE arm64, ${QEMU_VERSION:-native})"
printf '%s\n' "${RESULTS[@]}"
say "total $((SECONDS - T0)) s"
exit $failed
