#!/usr/bin/env bash
# Prove the board runtime in the board's world, then check the host agrees with it.
#
#   tools/board_venv_check.sh MODEL.tflite IMAGES_DIR OUT_DIR
#
# 1. a venv at ${BOARD_VENV:-/tmp/semhinet-board-venv} made the board's way, `pip install "numpy<2" .[board]` (the
#    package with its board extra and every dependency it pulls: numpy<2, Pillow, tflite-runtime==2.14.0; reused
#    when it already holds exactly that), and proof that TensorFlow is absent;
# 2. in it, with the checkout on PYTHONPATH (so a reused venv runs this checkout's code):
#    python -m semhinet_tf.board MODEL IMAGES_DIR --format jsonl --out OUT_DIR/board.jsonl
#    and the hash of every decoded frame (tools/board_compare.py frames);
#    and the same with --views 8 (test-time views); a delegate that is not a library, with and without
#    --require-delegate;
# 3. with the host's Python (${HOST_PYTHON:-python}: the package and ai-edge-litert), tools/board_compare.py
#    compare: byte-identical frames; every verdict made without review the same on both sides; in bulk, the
#    median of the largest probability difference per image within ${BOARD_TOL:-0.1} and at least 90% of the
#    images keeping their verdict or changing it between near-tied leaves (int8 engines round differently; see
#    tools/board_compare.py); and with 8 views.
# Env: BOARD_PYTHON makes the venv (default python3; tflite-runtime 2.14 has wheels for Python <= 3.11).
# Exit: 0 agreement, 1 disagreement or a broken board world, 2 bad usage.
set -euo pipefail

usage() { echo "usage: $0 MODEL.tflite IMAGES_DIR OUT_DIR" >&2; exit 2; }
fail() { echo "board check: FAIL - $*" >&2; exit 1; }
[ $# -eq 3 ] || usage
MODEL=$1 IMAGES=$2 OUT=$3
[ -f "$MODEL" ] || { echo "error: $MODEL: no such model file" >&2; exit 2; }
[ -d "$IMAGES" ] || { echo "error: $IMAGES: no such folder" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${BOARD_VENV:-/tmp/semhinet-board-venv}
BOARD_PY=$VENV/bin/python
HOST_PY=${HOST_PYTHON:-python}
mkdir -p "$OUT"
start=$(date +%s)

# The installed distributions must be exactly the board's (pip's own tools aside), tflite-runtime 2.14.0, numpy<2.
venv_ok() {
    [ -x "$BOARD_PY" ] || return 1
    "$BOARD_PY" -I - <<'EOF'  # -I: not the current folder (a checkout holds semhinet_tf.egg-info)
import sys
from importlib import metadata
names = sorted({d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()} - {"pip", "setuptools", "wheel"})
ok = names == ["numpy", "pillow", "semhinet-tf", "tflite-runtime"]
ok = ok and metadata.version("tflite-runtime") == "2.14.0" and int(metadata.version("numpy").split(".")[0]) < 2
sys.exit(0 if ok else 1)
EOF
}

if venv_ok; then
    echo "board venv: reusing $VENV"
else
    if [ -e "$VENV" ]; then
        [ -f "$VENV/pyvenv.cfg" ] || fail "$VENV exists and is not a venv; set BOARD_VENV to another path"
        rm -rf "$VENV"
    fi
    t0=$(date +%s)
    "${BOARD_PYTHON:-python3}" -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11))' \
        || fail "tflite-runtime 2.14.0 has wheels for Python <= 3.11 only; set BOARD_PYTHON to such a python"
    "${BOARD_PYTHON:-python3}" -m venv "$VENV"
    "$BOARD_PY" -m pip install -q --disable-pip-version-check "numpy<2" "$REPO[board]"
    venv_ok || fail "pip install .[board] gave more or other than semhinet-tf, numpy<2, pillow, tflite-runtime==2.14.0"
    echo "board venv: created $VENV in $(( $(date +%s) - t0 )) s"
fi
"$BOARD_PY" -c "import tensorflow" 2>/dev/null && fail "tensorflow is importable in the board venv"
"$BOARD_PY" -c "import tf_keras" 2>/dev/null && fail "tf_keras is importable in the board venv"
"$BOARD_PY" -c "import ai_edge_litert" 2>/dev/null && fail "ai_edge_litert is importable in the board venv"
"$BOARD_PY" -I -c "import semhinet_tf.board.__main__" || fail "the package pip installed does not import in the board venv"
echo "board venv: $("$BOARD_PY" -c 'import sys, numpy, PIL, tflite_runtime
print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, pillow {PIL.__version__}, "
      f"tflite-runtime {tflite_runtime.__version__}; import tensorflow fails")')"

# The board run: only the checkout on the path, no user site-packages.
board() { env PYTHONPATH="$REPO" PYTHONNOUSERSITE=1 "$BOARD_PY" "$@"; }
rc=0
board -m semhinet_tf.board "$MODEL" "$IMAGES" --format jsonl --out "$OUT/board.jsonl" --overwrite 2> "$OUT/board.log" || rc=$?
cat "$OUT/board.log" >&2
[ "$rc" -le 1 ] || fail "python -m semhinet_tf.board exited $rc in the board venv (see $OUT/board.log)"
grep -q "engine tflite_runtime" "$OUT/board.log" || fail "the board run did not use tflite_runtime"
board "$REPO/tools/board_compare.py" frames "$MODEL" "$IMAGES" "$OUT/board_frames.json" \
    || fail "decoding frames in the board venv imported TensorFlow or failed"

# Test-time views in the board's world too (numpy<2): every image scored on 8 orientations and averaged.
rc=0
board -m semhinet_tf.board "$MODEL" "$IMAGES" --views 8 --format jsonl --out "$OUT/board_views8.jsonl" --overwrite \
    2> "$OUT/board_views8.log" || rc=$?
[ "$rc" -le 1 ] || fail "python -m semhinet_tf.board --views 8 exited $rc in the board venv (see $OUT/board_views8.log)"
grep -q "8 view(s) per image" "$OUT/board_views8.log" || fail "the board run did not score 8 views an image"

# A delegate that is not a library, with tflite_runtime's own loader: a warning and the CPU by default, a
# one-line error (exit 2, nothing written) with --require-delegate; never a traceback.
printf 'not a shared library' > "$OUT/libnot_a_delegate.so"
rc=0
board -m semhinet_tf.board "$MODEL" "$IMAGES" --delegate "$OUT/libnot_a_delegate.so" --out "$OUT/board_nodelegate.jsonl" --overwrite \
    2> "$OUT/board_nodelegate.log" || rc=$?
[ "$rc" -le 1 ] && grep -q "warning: cannot load delegate" "$OUT/board_nodelegate.log" \
    || fail "a delegate that is not a library did not fall back to the CPU with a warning (see $OUT/board_nodelegate.log)"
rc=0
board -m semhinet_tf.board "$MODEL" "$IMAGES" --delegate "$OUT/libnot_a_delegate.so" --require-delegate \
    --out "$OUT/board_required.jsonl" 2> "$OUT/board_required.log" || rc=$?
[ "$rc" -eq 2 ] && [ "$(wc -l < "$OUT/board_required.log")" -eq 1 ] && [ ! -e "$OUT/board_required.jsonl" ] \
    || fail "--require-delegate with a delegate that is not a library: want exit 2 and one line (see $OUT/board_required.log)"
grep -q "Traceback" "$OUT/board_nodelegate.log" "$OUT/board_required.log" && fail "a delegate failure printed a traceback"
echo "board venv: a delegate that is not a library: warning and CPU; with --require-delegate: $(cat "$OUT/board_required.log")"

# The host side: the same module with the host's interpreter, compared file by file.
rc=0
"$HOST_PY" "$REPO/tools/board_compare.py" compare "$MODEL" "$IMAGES" "$OUT/board.jsonl" \
    --frames "$OUT/board_frames.json" --host-out "$OUT/host.jsonl" --tol "${BOARD_TOL:-0.1}" || rc=$?
"$HOST_PY" "$REPO/tools/board_compare.py" compare "$MODEL" "$IMAGES" "$OUT/board_views8.jsonl" --views 8 \
    --host-out "$OUT/host_views8.jsonl" --tol "${BOARD_TOL:-0.1}" || rc=$?
echo "board check: $([ "$rc" -eq 0 ] && echo PASS || echo FAIL) in $(( $(date +%s) - start )) s"
exit "$rc"
