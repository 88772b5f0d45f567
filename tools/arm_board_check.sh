#!/usr/bin/env bash
# The board runtime on the boards' own CPUs, emulated: `python -m semhinet_tf.board` with the real ARM wheels.
#
#   tools/arm_board_check.sh MODEL.tflite IMAGES_DIR OUT_DIR
#
# arm64 (i.MX 8M Plus): qemu-aarch64-static -cpu cortex-a53, Debian bookworm sysroot (python 3.11), numpy<2, Pillow
#   and tflite-runtime 2.14.0 wheels from PyPI (manylinux aarch64).
# armv7 (Cora Z7): qemu-arm-static -cpu cortex-a9, Debian bookworm armhf sysroot (python 3.11) with Debian's own numpy
#   1.24 and Pillow 9.4 (PyPI has no armv7 wheel of either; Debian armhf builds for VFPv3-D16, no FMA) and
#   tflite-runtime 2.14.0 cp311 manylinux_2_34_armv7l from PyPI. Nothing is compiled (a bullseye/Python 3.9 world
#   needed numpy built from source: 5-11 minutes, more than CI could afford on a cold machine).
# Then: host vs arm64 vs armv7 compared (tools/board_compare.py's rules for the host, bit for bit between the ARM
# runs), every instruction the A9 run executed scanned for ones the A9 lacks, and a float model must run on a
# Cortex-A15 (VFPv4; the scan must find its FMA there: the scan's negative control) and die with SIGILL on the A9
# (the armv7 wheel's float kernels use VFPv4 fused multiply-add: why npu-check --target cora-z7 refuses floats).
# No binfmt: the qemu binaries are called directly with -L SYSROOT. Sysroots and wheels are cached in
# ${SEMHINET_ARM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/semhinet-arm}, one folder per recipe version.
# Env: HOST_PYTHON (default python) runs the host side and must have the package and TensorFlow.
# Exit: 0 pass, 1 fail, 2 bad usage.
set -euo pipefail

usage() { echo "usage: $0 MODEL.tflite IMAGES_DIR OUT_DIR" >&2; exit 2; }
fail() { echo "arm board check: FAIL - $*" >&2; exit 1; }
[ $# -eq 3 ] || usage
MODEL=$(realpath "$1") IMAGES=$(realpath "$2") OUT=$3
[ -f "$MODEL" ] || { echo "error: $1: no such model file" >&2; exit 2; }
[ -d "$IMAGES" ] || { echo "error: $2: no such folder" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=${HOST_PYTHON:-python}
CACHE=${SEMHINET_ARM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/semhinet-arm}
MIRROR=http://deb.debian.org/debian
ARM64_DEBS="python3.11 libstdc++6"
ARM64_WHEELS="numpy<2 pillow tflite-runtime==2.14.0"
# python3-setuptools, -wheel, libpython3.9-dev, libc6-dev and libstdc++-10-dev only build numpy
ARMV7_DEBS="python3.11 python3-numpy python3-pil libstdc++6"
ARMV7_WHEELS="tflite-runtime==2.14.0"
recipe() { echo "$*" | sha1sum | cut -c1-8; }  # a changed recipe gets a new folder, never a stale one
ARM64=$CACHE/arm64-bookworm-$(recipe "$ARM64_DEBS" "$ARM64_WHEELS")
ARMV7=$CACHE/armhf-bookworm-$(recipe "$ARMV7_DEBS" "$ARMV7_WHEELS")
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
mkdir -p "$CACHE"
ulimit -c 0  # the float model's SIGILL must not leave a qemu core file in the checkout
start=$(date +%s)

retry() {  # network steps: three tries
    local n
    for n in 1 2 3; do "$@" && return 0; echo "arm board check: '$1' failed (try $n of 3)" >&2; sleep 15; done
    return 1
}

# Debian packages only when a tool is missing (CI's machine may have them from an earlier run).
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
    retry apt-get update -q >/dev/null || fail "apt-get update"
    retry env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
        || fail "apt-get install ${need[*]}"
fi

# A sysroot of Debian packages, unpacked only (no maintainer scripts: nothing runs in it at build time).
# Absolute symlinks (libm.so -> /lib/...) are made relative so the host's cross linker finds them too.
sysroot() {  # ARCH SUITE DIR PACKAGES...
    local arch=$1 suite=$2 dir=$3
    shift 3
    local pkgs
    pkgs=$(IFS=,; echo "$*")
    rm -rf "$dir"
    retry mmdebstrap --quiet --variant=extract --architectures="$arch" --include="$pkgs" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' "$suite" "$dir" "$MIRROR" || fail "mmdebstrap $arch $suite"
    find "$dir/usr/lib" "$dir/lib" -type l -lname '/*' | while read -r link; do
        ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$dir$(readlink "$link")")" "$link"
    done
}

# Wheels for another platform from PyPI, unpacked into SITE (pip cannot install for a foreign platform).
wheels() {  # SITE PYVER PLATFORMS(comma) REQUIREMENTS...
    local site=$1 pyver=$2 platforms=$3 dl
    shift 3
    dl=$(mktemp -d)
    # shellcheck disable=SC2046  # one --platform per word
    retry python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
        $(printf -- '--platform %s ' ${platforms//,/ }) -d "$dl" "$@" || fail "pip download $*"
    mkdir -p "$site"
    for whl in "$dl"/*.whl; do python3 -m zipfile -e "$whl" "$site"; done
    rm -rf "$dl"
}

if [ ! -f "$ARM64/.ready" ]; then
    t0=$(date +%s)
    # shellcheck disable=SC2086  # word lists
    sysroot arm64 bookworm "$ARM64" $ARM64_DEBS
    # shellcheck disable=SC2086
    wheels "$ARM64/opt/site" 3.11 manylinux_2_34_aarch64,manylinux_2_28_aarch64,manylinux2014_aarch64 $ARM64_WHEELS
    touch "$ARM64/.ready"
    echo "arm64 sysroot: made in $(( $(date +%s) - t0 )) s"
fi

if [ ! -f "$ARMV7/.ready" ]; then
    t0=$(date +%s)
    # shellcheck disable=SC2086
    sysroot armhf bookworm "$ARMV7" $ARMV7_DEBS
    # Debian's numpy finds BLAS/LAPACK through update-alternatives links, which a maintainer script makes: not run here
    for lib in blas lapack; do
        ln -sfn "$lib/lib$lib.so.3" "$ARMV7/usr/lib/arm-linux-gnueabihf/lib$lib.so.3"
    done
    # shellcheck disable=SC2086
    wheels "$ARMV7/opt/site" 3.11 manylinux_2_34_armv7l $ARMV7_WHEELS
    touch "$ARMV7/.ready"
    echo "armv7 sysroot: made in $(( $(date +%s) - t0 )) s"
fi

# Run the board's Python of one emulated CPU: only the wheels and the checkout on its path.
arm() {  # arm64|armv7 ARGS...
    local which=$1
    shift
    case $which in
        arm64) env PYTHONPATH="$ARM64/opt/site:$REPO" PYTHONNOUSERSITE=1 \
                   qemu-aarch64-static -cpu cortex-a53 -L "$ARM64" "$ARM64/usr/bin/python3.11" "$@" ;;
        armv7) env PYTHONPATH="$ARMV7/opt/site:$REPO" PYTHONNOUSERSITE=1 \
                   qemu-arm-static -cpu "${ARMV7_CPU:-cortex-a9}" ${ARMV7_TRACE:+-d in_asm -D "$ARMV7_TRACE"} -L "$ARMV7" \
                   "$ARMV7/usr/bin/python3.11" "$@" ;;
    esac
}

for cpu in arm64 armv7; do
    echo "$cpu: $(arm "$cpu" -c 'import sys, platform, numpy, PIL, tflite_runtime
print(f"{platform.machine()}, python {sys.version.split()[0]}, numpy {numpy.__version__}, pillow {PIL.__version__}, "
      f"tflite-runtime {tflite_runtime.__version__}")')" || fail "the $cpu Python cannot import numpy, PIL, tflite_runtime"
    if [ "$cpu" = armv7 ]; then export ARMV7_TRACE="$OUT/armv7_in_asm.log"; fi  # every instruction the A9 runs
    rc=0
    t0=$(date +%s%N)
    arm "$cpu" -m semhinet_tf.board "$MODEL" "$IMAGES" --format jsonl --out "$OUT/$cpu.jsonl" --overwrite \
        --threads 1 2> "$OUT/$cpu.log" || rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    unset ARMV7_TRACE
    [ "$rc" -le 1 ] || { cat "$OUT/$cpu.log" >&2; fail "python -m semhinet_tf.board exited $rc on $cpu"; }
    grep -q "engine tflite_runtime" "$OUT/$cpu.log" || fail "the $cpu run did not use tflite_runtime ($OUT/$cpu.log)"
    n_images=$(wc -l < "$OUT/$cpu.jsonl")  # one row per file; board_compare.py fails a file on one side only
    [ "$n_images" -gt 0 ] || fail "$cpu wrote no rows"
    echo "$cpu: $n_images images in $ms ms under emulation ($(( ms / n_images )) ms an image, start-up included;" \
         "an emulator's figure, not the board's)"
    arm "$cpu" "$REPO/tools/board_compare.py" frames "$MODEL" "$IMAGES" "$OUT/${cpu}_frames.json" \
        2> "$OUT/${cpu}_frames.log" || fail "decoding frames on $cpu ($OUT/${cpu}_frames.log)"
    "$HOST_PY" "$REPO/tools/board_compare.py" compare "$MODEL" "$IMAGES" "$OUT/$cpu.jsonl" \
        --frames "$OUT/${cpu}_frames.json" --host-out "$OUT/host.jsonl" || fail "host vs $cpu (above)"
done
"$HOST_PY" "$REPO/tools/arm_board_check.py" agree "$OUT/host.jsonl" "$OUT/arm64.jsonl" "$OUT/armv7.jsonl" \
    || fail "arm64 vs armv7 (above)"
"$HOST_PY" "$REPO/tools/arm_board_check.py" scan "$OUT/armv7_in_asm.log" || fail "the A9 run executed instructions it lacks"
rm -f "$OUT/armv7_in_asm.log"  # hundreds of MB

# A float model dies on the A9: the armv7 wheel's float kernels use VFPv4's fused multiply-add.
"$HOST_PY" "$REPO/tools/arm_board_check.py" float-model "$OUT/float.tflite" 2> "$OUT/float_model.log" \
    || fail "making the float model ($OUT/float_model.log)"
"$HOST_PY" -m semhinet_tf npu-check --target cora-z7 "$OUT/float.tflite" > "$OUT/float_npu_check.txt" \
    && fail "npu-check --target cora-z7 passed a float model"
run_float() {  # the float model through tflite_runtime on the emulated armv7 CPU given
    ARMV7_CPU=$1 arm armv7 -c 'import sys, numpy as np
from tflite_runtime.interpreter import Interpreter
it = Interpreter(sys.argv[1]); it.allocate_tensors()
d = it.get_input_details()[0]; it.set_tensor(d["index"], np.ones(d["shape"], np.float32)); it.invoke()' \
        "$OUT/float.tflite" 2> "$OUT/armv7_float_$1.log"
}
ARMV7_TRACE=$OUT/a15_in_asm.log run_float cortex-a15 \
    || fail "the float model fails on a Cortex-A15 (VFPv4) too: not the A9's missing FMA ($OUT/armv7_float_cortex-a15.log)"
# the scan's negative control: the float kernels' FMA on the A15 must be found
"$HOST_PY" "$REPO/tools/arm_board_check.py" scan "$OUT/a15_in_asm.log" > "$OUT/a15_scan.txt" \
    && fail "the instruction scan found no FMA in the float model's run on a Cortex-A15 ($OUT/a15_scan.txt)"
rm -f "$OUT/a15_in_asm.log"
rc=0
run_float cortex-a9 || rc=$?
[ "$rc" -eq 132 ] || fail "a float model on the A9: want SIGILL (exit 132), got $rc ($OUT/armv7_float_cortex-a9.log)"
echo "armv7: a float model runs on a Cortex-A15 (where the scan finds its FMA: $(grep -o "executed {[^}]*}" "$OUT/a15_scan.txt"))" \
     "and dies with SIGILL on the Cortex-A9 (exit $rc); npu-check --target cora-z7 refuses it:" \
     "$(tail -1 "$OUT/float_npu_check.txt")"
echo "arm board check: PASS in $(( $(date +%s) - start )) s"
