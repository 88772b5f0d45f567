"""Helpers of tools/arm_board_check.sh: the board runtime on emulated ARM CPUs.

    python tools/arm_board_check.py scan QEMU_IN_ASM.log [...]          instructions a Cortex-A9 lacks
    python tools/arm_board_check.py agree HOST.jsonl ARM64.jsonl ARMV7.jsonl
    python tools/arm_board_check.py float-model OUT.tflite               (needs TensorFlow: the host's venv)

`scan` reads qemu's `-d in_asm` log (every block of guest code translated, so every instruction that ran, and a few
after a branch out of a block) and fails on the instructions of VFPv4 and of the ARMv7 integer-divide extension,
which the Cora Z7's Cortex-A9 (ARMv7-A, VFPv3 + NEON) does not have: fused multiply-add (VFMA, VFMS, VFNMA, VFNMS,
scalar or NEON) and SDIV/UDIV. qemu's cortex-a9 model does not trap every one of them, so a run that passed under
emulation could still die with SIGILL on the board. VDIV (floating-point divide) is a VFPv3 instruction the A9 has:
it is counted, not refused (CPython's own float division executes it).

`agree` prints how the three engines agree, frame by frame: verdicts and probabilities bit for bit, and the largest
probability difference (the host's bulk tolerance is checked by tools/board_compare.py compare). It exits 1 if
the two ARM runs differ in any output: the same int8 kernels on the two ARM CPUs round the same way (measured:
identical on every frame), so a difference there is a broken wheel or sysroot, not rounding.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

from tools.board_compare import compare, read_rows  # noqa: E402

# address, one or two groups of hex (ARM: one of 8 digits; Thumb-2: one or two of 4), then the mnemonic
_LINE = re.compile(r"^0x[0-9a-f]+:\s+(?:[0-9a-f]{4,8}\s)+\s*([a-z][a-z0-9]*)")
_COND = "(?:eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al)?"
FORBIDDEN = ("vfma", "vfms", "vfnma", "vfnms", "sdiv", "udiv")  # VFPv4 fused multiply-add; integer divide
COUNTED = ("vdiv",)  # VFPv3: the A9 has it
_BASE = re.compile(rf"^({'|'.join(sorted(FORBIDDEN + COUNTED, key=len, reverse=True))}){_COND}$")


def scan_lines(lines) -> tuple[Counter, int]:
    """Mnemonics of interest (condition codes stripped) counted over an in_asm log's lines, and the lines read."""
    found: Counter = Counter()
    n = 0
    for line in lines:
        n += 1
        m = _LINE.match(line)
        base = _BASE.match(m.group(1)) if m else None
        if base:
            found[base.group(1)] += 1
    return found, n


def _scan(paths: list[str]) -> int:
    total, n_lines = Counter(), 0
    for path in paths:
        with open(path, errors="replace") as fh:
            found, n = scan_lines(fh)
        total += found
        n_lines += n
    bad = {k: total[k] for k in FORBIDDEN if total[k]}
    counted = ", ".join(f"{k} {total[k]}" for k in COUNTED)
    if not n_lines:
        print("A9 instruction scan: FAIL - the in_asm log is empty (qemu wrote nothing?)")
        return 1
    if bad:
        print(f"A9 instruction scan: FAIL - executed {bad} (VFPv4 fused multiply-add or integer divide: the "
              f"Cortex-A9 has neither) in {n_lines:,} log lines; {counted} (VFPv3, fine)")
        return 1
    print(f"A9 instruction scan: PASS - no {'/'.join(FORBIDDEN)} in {n_lines:,} log lines of executed code; "
          f"{counted} (VFPv3 divide, which the A9 has)")
    return 0


def _identical(result: dict) -> int:
    return sum(1 for f in result["files"].values() if f["diff"] == 0.0 and not f["flip"] and f["agree"])


def _agree(host: str, arm64: str, armv7: str) -> int:
    rows = {name: read_rows(path) for name, path in (("host", host), ("arm64", arm64), ("armv7", armv7))}
    rc = 0
    for a, b in (("host", "arm64"), ("host", "armv7"), ("arm64", "armv7")):
        r = compare(rows[a], rows[b])
        n = r["n"]
        print(f"agreement {a} vs {b}: {n - r['flips']}/{n} same verdict, {_identical(r)}/{n} frames with every "
              f"probability bit for bit equal, largest probability difference {r['max_diff']:.4f} "
              f"(median {r['median_diff']:.4f})")
        if (a, b) == ("arm64", "armv7") and (not n or _identical(r) != n):
            print("  FAIL: the two ARM runs differ (same int8 kernels, so a broken wheel or sysroot)")
            rc = 1
    return rc


def _float_model(out: str) -> int:
    """A tiny float32 model: convolution, dense and softmax in float, the kernels that use FMA where the CPU has it."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    inp = tf.keras.Input((32, 32, 1), batch_size=1)
    x = tf.keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = tf.keras.layers.DepthwiseConv2D(3)(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(4, activation="softmax")(x))
    Path(out).write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="arm_board_check.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan", help="fail on instructions the Cortex-A9 lacks in qemu in_asm logs")
    s.add_argument("logs", nargs="+")
    a = sub.add_parser("agree", help="agreement of the host's, arm64's and armv7's board JSONL")
    a.add_argument("host")
    a.add_argument("arm64")
    a.add_argument("armv7")
    f = sub.add_parser("float-model", help="write a tiny float32 .tflite (needs TensorFlow)")
    f.add_argument("out")
    args = p.parse_args(argv)
    if args.command == "scan":
        return _scan(args.logs)
    if args.command == "agree":
        return _agree(args.host, args.arm64, args.armv7)
    return _float_model(args.out)


if __name__ == "__main__":
    sys.exit(main())
