"""TensorFlow's C++ log lines stay off the terminal; our own lines and progress bars get through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from semhinet_tf.console import is_native_log, without_native_log

REPO = Path(__file__).resolve().parents[1]

NATIVE = [  # lines seen on this CPU machine from TensorFlow 2.21 and its converter
    b"I0000 00:00:1796581451.262283   10638 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    b"GPU will not be used.\n",
    b"E0000 00:00:1733000000.1 4242 cuda_executor.cc:1228] failed call to cuInit: INTERNAL: CUDA error\n",
    b"W1206 18:20:11.123456  123 tf_tfl_flatbuffer_helpers.cc:365] Ignored output_format.\n",
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.\n",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
    b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: UINT8\n",
]
OURS = [
    b"error: data/bridge/x.png: image is 300x200 px\n",
    b"train:  40%|####      | 4/10 [00:01<00:01, 3.2img/s]\r",
    b"epoch 1/3: loss 0.93 val_leaf_acc 0.41\n",
    b"warning: I0000 is not a log line when it is quoted\n",
]


@pytest.mark.parametrize("line", NATIVE)
def test_native_log_lines_are_recognised(line):
    assert is_native_log(line)


@pytest.mark.parametrize("line", OURS)
def test_our_lines_and_progress_bars_are_not(line):
    assert not is_native_log(line)


def test_a_native_line_written_after_an_unfinished_bar_is_dropped_and_the_bar_kept():
    bar = b"converting to int8 TFLite: 00:30"
    assert without_native_log(bar + NATIVE[-1]) == bar
    assert without_native_log(bar + b" " + NATIVE[0]).rstrip() == bar
    assert without_native_log(OURS[0]) == OURS[0]
    assert without_native_log(NATIVE[2]) == b""


def _stderr_of(code: str, env_extra: dict | None = None) -> str:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return out.stderr.decode(errors="replace")


@pytest.mark.slow
def test_importing_tensorflow_under_the_filter_prints_only_our_lines():
    """The real thing: TensorFlow writes its cuInit/cudart lines on import here; the filter drops them and
    forwards what we write to descriptor 2 around them. Without the filter the same import prints them (so the
    check is not vacuous on this machine)."""
    body = ("import os\nos.write(2, b'ours before\\n')\nimport tensorflow as tf\ntf.constant(1.0) + 1.0\n"
            "os.write(2, b'ours after\\n')\n")
    raw = _stderr_of("import semhinet_tf\n" + body, {"TF_CPP_MIN_LOG_LEVEL": "0"})
    if not any(is_native_log(line.encode() + b"\n") for line in raw.splitlines()):
        pytest.skip("this TensorFlow build printed no C++ log line on import")
    quiet = _stderr_of("from semhinet_tf.console import quiet_native_logs\nquiet_native_logs()\n" + body)
    lines = quiet.splitlines()
    assert "ours before" in lines and "ours after" in lines
    leaked = [line for line in lines if is_native_log(line.encode() + b"\n")]
    assert not leaked, leaked


def test_a_terminal_behind_the_filter_is_still_a_terminal_for_progress_bars():
    """Under the filter descriptor 2 is a pipe: the training's step bar and `step`'s ticking clock asked
    sys.stderr.isatty(), got False, and hid themselves on every terminal (a 30-50 s epoch showed nothing)."""
    import os
    import pty

    code = ("import sys\nfrom semhinet_tf.console import quiet_native_logs, stderr_is_terminal\n"
            "from semhinet_tf.progress import _is_terminal\n"
            "quiet_native_logs()\nprint(sys.stderr.isatty(), stderr_is_terminal(), _is_terminal())")
    controller, terminal = pty.openpty()
    try:
        out = subprocess.run([sys.executable, "-c", code], stderr=terminal, capture_output=False,
                             stdout=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(terminal)
        os.close(controller)
    assert out.stdout.split() == ["False", "True", "True"], out.stdout
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert piped.stdout.split() == ["False", "False", "False"], piped.stdout
