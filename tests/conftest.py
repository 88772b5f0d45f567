"""Fixtures shared across modules: the tiny int8 model is built and converted once a session.

Building the real classifier and converting it to int8 costs 15-20 s of CPU; the board, bench, contract and
ONNX tests all need such a model, and before this fixture each module converted its own.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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
# from ending with an end-to-end module while the other sits idle.
LONG_MODULES = ("test_end_to_end.py", "test_review_loop.py", "test_model.py", "test_onnx.py", "test_loop.py",
                "test_distributed.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order within a module and among the others is kept
