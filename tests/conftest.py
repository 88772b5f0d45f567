"""Fixtures shared across modules: the tiny int8 model is built and converted once a session.

Building the real classifier and converting it to int8 costs 15-20 s of CPU; the board, bench, contract and
ONNX tests all need such a model, and before this fixture each module converted its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The suite's tiny runs (a handful of steps) train eagerly: tracing MobileNetV3's training step costs more than the
# steps (semhinet_tf/training/compile.py). Commands run "as a user" (child processes through `as_user_env`) and the
# shared trained run below keep the traced graph that users get.
os.environ["SEMHINET_RUN_EAGERLY"] = "1"
REPO = Path(__file__).resolve().parents[1]

SIZE = 32
ALPHA = 0.35
PREPROCESS = {"size": SIZE, "databar": "auto", "fit": "crop", "bit_depth_rule": "minmax", "max_pixels": 100_000_000}
QUANTIZATION = {"source": "float", "granularity": "per-channel", "io": "uint8", "float_heads": False}


def sem_frames(n: int, seed: int) -> np.ndarray:
    """Smooth random uint8 frames (blobs over a gradient), so activations are not all saturated noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        img = 80 + 60 * rng.uniform(-1, 1) * xx + 40 * rng.uniform(-1, 1) * yy
        for _ in range(3):
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
            img = img + rng.uniform(-90, 120) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


@dataclass(frozen=True)
class TinyRun:
    """A run directory (config.json, taxonomy.json, float.keras, model_int8.tflite with its sealed contract).

    Shared by the whole session, so read it only: a test that writes next to the model works on `copy_to`."""

    dir: Path
    float_model: Any
    bare: bytes  # the same int8 model without a contract

    frames = staticmethod(sem_frames)  # the kind of frames it was calibrated on, for tests to feed it

    @property
    def tflite(self) -> Path:
        return self.dir / "model_int8.tflite"

    def copy_to(self, dest: Path) -> Path:
        """A private copy of the run directory at `dest` (which must not exist yet)."""
        return Path(shutil.copytree(self.dir, dest))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The real architecture (MobileNetV3Small alpha 0.35, hard-swish, five heads of 16 units) at 32 px, untrained,
    post-training quantized on smooth frames; trained, as far as its config says, with the default flips and
    quarter turns (eight views offered)."""
    from semhinet_tf.artifacts.contract import embed_sealed
    from semhinet_tf.data.pipeline import Augment
    from semhinet_tf.export.convert import run_contract
    from semhinet_tf.export.tflite import convert_int8
    from semhinet_tf.model import keras
    from semhinet_tf.model.heads import ModelConfig, build_model
    from semhinet_tf.model.io import save_model
    from semhinet_tf.model.mobilenet_v3 import BackboneConfig
    from semhinet_tf.taxonomy import Taxonomy

    keras.utils.set_random_seed(0)
    d = tmp_path_factory.mktemp("tiny_run") / "run"
    d.mkdir()
    tax = Taxonomy.default()
    config = {"model": {"img_size": SIZE}, "preprocess": PREPROCESS,
              "train": {"granularity": "per-channel", "augment": Augment().to_dict()}, "created": "test"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "taxonomy.json").write_text(json.dumps(tax.to_spec()))
    model = build_model(tax, ModelConfig(img_size=SIZE, backbone=BackboneConfig(alpha=ALPHA), head_units=16))
    rng = np.random.default_rng(5)
    for h in tax.heads:  # untrained heads all say ~uniform; give each its own leaning so a head mix-up shows
        kernel, bias = model.get_layer(h.name).get_weights()
        model.get_layer(h.name).set_weights([kernel * 4, rng.normal(0, 1.5, bias.shape)])
    save_model(model, d / "float.keras")
    bare = convert_int8(model, SIZE, tax.head_names, lambda: iter(sem_frames(8, 3)))
    contract = run_contract(d, config, tax.to_spec(), img_size=SIZE, io_type="uint8", review_threshold=0.5,
                            quantization=QUANTIZATION)
    (d / "model_int8.tflite").write_bytes(embed_sealed(bare, contract))
    return TinyRun(dir=d, float_model=model, bare=bare)


@pytest.fixture(autouse=True, scope="session")
def _frame_cache_in_a_temporary_folder(tmp_path_factory):
    """Training caches decoded frames under ~/.cache/semhinet by default: the suite must never write there."""
    import os

    before = os.environ.get("SEMHINET_CACHE")
    os.environ["SEMHINET_CACHE"] = str(tmp_path_factory.mktemp("frame-cache"))
    yield
    if before is None:
        os.environ.pop("SEMHINET_CACHE", None)
    else:
        os.environ["SEMHINET_CACHE"] = before


# Modules that take minutes, slowest first. The suite runs on two pytest-xdist workers, one module per worker at a
# time (--dist loadfile, so a module's fixtures are built once); starting the long ones first keeps one worker
# from ending with an end-to-end module while the other sits idle. test_end_to_end builds the shared trained run
# (about 4 minutes); test_review_loop, which needs it too, comes after enough other work not to wait for it.
LONG_MODULES = ("test_end_to_end.py", "test_model.py", "test_onnx.py", "test_review_loop.py", "test_train_cli.py",
                "test_distributed.py", "test_loop.py", "test_pretrain_patches.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order within a module and among the others is kept


def as_user_env() -> dict[str, str]:
    """The environment of a command a user types: this checkout importable, TensorFlow's C++ log level and the
    eager switch not set (the package must quiet TensorFlow itself and trains traced graphs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("TF_CPP_MIN_LOG_LEVEL", "SEMHINET_RUN_EAGERLY"):
        env.pop(name, None)
    return env


def run_as_user(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """A command in a child process with stderr a pipe, as a user runs it: TensorFlow's C++ logging goes to the
    process's own file descriptor 2, which CliRunner cannot see, so the log-line check needs a real process."""
    return subprocess.run([sys.executable, "-m", "semhinet_tf", *args], capture_output=True, env=as_user_env(),
                          timeout=timeout)


# synth's cause labels: at 32-48 px most faint defects cannot be made visible (the default rule redraws them, seconds
# a call), and the subject of the tests using them is the pipeline, not the label rule (tests/test_synth.py's).
CAUSE = ("--workers", "1", "--labels", "cause")
TRAINED_COMMANDS = ("train", "convert", "convert --float-heads")


@dataclass(frozen=True)
class TrainedRun:
    """semhinet_quickstart/{data,run} at test scale: 6 cause-labelled 48 px frames a class, a 32 px run trained
    one epoch a phase by `semhinet train` as a user runs it and converted (plain and --float-heads).

    Shared by the whole session, so read it only (copy it to write next to it). `stderr` holds what each of the
    three commands printed on its stderr."""

    root: Path
    stderr: dict

    @property
    def data(self) -> Path:
        return self.root / "semhinet_quickstart" / "data"

    @property
    def run(self) -> Path:
        return self.root / "semhinet_quickstart" / "run"


def _build_trained_run(root: Path) -> None:
    from click.testing import CliRunner

    from semhinet_tf.cli import main

    data, run = root / "semhinet_quickstart" / "data", root / "semhinet_quickstart" / "run"
    synth = CliRunner().invoke(main, ["synth", str(data), "--per-class", "6", "--size", "48", "--seed", "3", *CAUSE],
                               catch_exceptions=False)
    assert synth.exit_code == 0, synth.output
    steps = {
        "train": ["train", str(data), "--out", str(run), "--img-size", "32", "--epochs", "1", "--qat-epochs", "1",
                  "--batch-size", "8", "--weights", "none", "--seed", "1", "--val-split", "0.34", "--patience", "3",
                  # 4 training steps: BatchNorm's moving statistics must catch up, or the untrained model's outputs
                  # do not depend on the input and Keras vs int8 comparisons become coin flips on ties
                  "--bn-momentum", "0.5"],
        "convert": ["convert", str(run), "--calib-samples", "16"],
        "convert --float-heads": ["convert", str(run), "--calib-samples", "16", "--float-heads"],
    }
    for name, args in steps.items():
        out = run_as_user(*args)
        assert out.returncode == 0, f"{name}: exit {out.returncode}: {out.stderr.decode(errors='replace')[-1500:]}"
        (root / f"stderr-{name.replace(' ', '_')}.txt").write_bytes(out.stderr)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """Built once for the whole test session: the first pytest-xdist worker to ask builds it under a file lock in
    the folder the workers share, the others wait for it and read it (a failed build is retried by the next)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "trained_run"
    with open(shared / "trained_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _build_trained_run(root)
            (root / "built").touch()
    stderr = {name: (root / f"stderr-{name.replace(' ', '_')}.txt").read_bytes() for name in TRAINED_COMMANDS}
    return TrainedRun(root=root, stderr=stderr)
