"""One way to run any model: `load_model` on every kind of model path, the same head dict from every engine, an
unreadable file reported in place by `classify`, and the README's "From Python" section run as written.

One tiny run (32 px, untrained, the small minimalistic backbone) holds all five kinds: the run directory,
float.keras, float.h5, model_int8.tflite (post-training quantized, sealed contract) and model.onnx (from the
.keras; the cheaper export).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import semhinet_tf
from semhinet_tf.taxonomy import Taxonomy

pytestmark = pytest.mark.slow
SIZE = 32
HEAD_WIDTHS = {"h1": 3, "h2": 3, "h3": 2, "h4": 2, "h5": 2}
README = Path(__file__).resolve().parents[1] / "README.md"
KINDS = {"run": ("", "keras"), "keras": ("float.keras", "keras"), "h5": ("float.h5", "keras"),
         "tflite": ("model_int8.tflite", "tflite"), "onnx": ("model.onnx", "onnx")}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from semhinet_tf.artifacts.contract import embed_sealed
    from semhinet_tf.export.convert import run_contract
    from semhinet_tf.export.onnx import export_onnx
    from semhinet_tf.export.tflite import convert_int8
    from semhinet_tf.model import keras
    from semhinet_tf.model.heads import ModelConfig, build_model
    from semhinet_tf.model.io import save_model
    from semhinet_tf.model.mobilenet_v3 import BackboneConfig

    keras.utils.set_random_seed(0)
    d = tmp_path_factory.mktemp("engines") / "r1"
    d.mkdir()
    tax = Taxonomy.default()
    config = {"model": {"img_size": SIZE}, "preprocess": {"size": SIZE},
              "train": {"augment": {"flip": True, "rot90": True}}, "created": "test"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "taxonomy.json").write_text(json.dumps(tax.to_spec()))
    (d / "review_threshold.json").write_text(json.dumps({"threshold": 0.4, "by_views": {"8": {"threshold": 0.3}}}))
    model = build_model(tax, ModelConfig(img_size=SIZE, backbone=BackboneConfig(alpha=0.35, minimalistic=True),
                                         head_units=16))
    save_model(model, d / "float.keras")
    save_model(model, d / "float.h5")
    frames = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8)
    contract = run_contract(d, config, tax.to_spec(), img_size=SIZE, io_type="uint8", review_threshold=0.4,
                            quantization=None)
    tflite = convert_int8(model, SIZE, tax.head_names, lambda: iter(frames))
    (d / "model_int8.tflite").write_bytes(embed_sealed(tflite, contract))
    export_onnx(d / "float.keras", d / "model.onnx")
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three grey frames and, between them in name order, a file that is no image."""
    folder = tmp_path_factory.mktemp("images") / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "c.png", "d.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def engines(run):
    return {kind: semhinet_tf.load_model(run / name, progress=False) for kind, (name, _) in KINDS.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_model_path_loads_with_its_run_settings(engines, kind):
    engine = engines[kind]
    assert engine.format == KINDS[kind][1]
    assert engine.input_size == SIZE and list(engine.taxonomy.head_names) == list(HEAD_WIDTHS)
    assert engine.preprocess.size == SIZE
    assert engine.review_threshold == pytest.approx(0.4)  # the run's (Keras, contract-less ONNX) or the contract's
    engine.use_views(8)
    assert len(engine.views) == 8 and engine.review_threshold == pytest.approx(0.3)
    engine.use_views(1)


def test_predict_gives_the_same_head_dict_from_every_engine(engines):
    frames = np.random.default_rng(3).integers(0, 256, (5, SIZE, SIZE), dtype=np.uint8)
    outputs = {kind: engine.predict(frames) for kind, engine in engines.items()}
    for kind, out in outputs.items():
        assert {h: v.shape for h, v in out.items()} == {h: (5, k) for h, k in HEAD_WIDTHS.items()}, kind
        assert all(v.dtype == np.float32 for v in out.values())
        np.testing.assert_allclose(out["h1"].sum(axis=1), 1.0, atol=0.01)  # int8: one output step off at most
    for kind in ("run", "h5", "onnx"):  # one float model under three paths: the same answers
        for head in HEAD_WIDTHS:
            np.testing.assert_allclose(outputs[kind][head], outputs["keras"][head], atol=1e-4, err_msg=kind)
    assert np.abs(outputs["tflite"]["h1"] - outputs["keras"]["h1"]).max() < 0.1  # int8 rounding only
    # Keras-style batches (N, S, S, 1) and Keras' keyword are accepted by every engine
    batch = engines["tflite"].predict(frames[..., None], verbose=0)
    np.testing.assert_array_equal(batch["h2"], outputs["tflite"]["h2"])


def test_the_keras_engine_is_still_the_keras_model(engines):
    engine = engines["keras"]
    assert engine.keras_model.name == engine.name  # attributes it lacks are the model's
    assert tuple(engine.inputs[0].shape) == (None, SIZE, SIZE, 1)
    out = engine.predict(np.full((2, SIZE, SIZE, 1), 128, np.uint8), verbose=0)
    assert set(out) == set(HEAD_WIDTHS)


@pytest.mark.parametrize("kind", ["keras", "tflite", "onnx"])
def test_classify_reports_an_unreadable_file_in_its_place(engines, images, kind):
    rows = list(engines[kind].classify([images, images / "missing.png"]))
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png", "missing.png"]
    assert "error" in rows[1] and "error" in rows[4] and rows[4]["error"] == "no such file or folder"
    for row in (rows[0], rows[2], rows[3]):
        assert "error" not in row and row["verdict"] in ("bogus", "normal", "defect")
        assert row["class"] in Taxonomy.default().leaves and isinstance(row["review"], bool)
        assert row["review"] == (row["probability"] < engines[kind].review_threshold)


def test_classify_batches_give_the_rows_of_one_image_at_a_time(engines, images):
    engine = engines["onnx"]
    one, two = (list(engine.classify([images], batch_size=n)) for n in (1, 2))
    assert [(r["path"], r.get("class"), r.get("error")) for r in one] == \
        [(r["path"], r.get("class"), r.get("error")) for r in two]
    for a, b in zip(one, two, strict=True):  # batched float kernels may differ in the last digits
        assert a.get("probability", 0) == pytest.approx(b.get("probability", 0), abs=1e-5)


def _readme_python_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readmes_python_section_runs(run, images, tmp_path, capsys):
    """The README's "From Python" blocks, run as written in a folder holding runs/r1 and images/."""
    blocks = _readme_python_blocks()
    assert blocks, "no python block in the README's 'From Python' section"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r1").symlink_to(run, target_is_directory=True)
    (tmp_path / "images").symlink_to(images, target_is_directory=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "b.png unreadable" in printed and printed.count("\n") >= 4
