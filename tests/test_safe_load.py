"""Issue 22: no model, weights or taxonomy file runs code when loaded; refused in one line, exit 2.

The hostile model's Lambda touches the file named by $SEMHINET_TEST_MARKER when it runs: it runs once as the
model is built (before the marker path is set for the load), and again wherever a loader rebuilds it.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

import semhinet_tf
from semhinet_tf.cli import main
from semhinet_tf.model import keras
from semhinet_tf.safe_load import UnsafeFileError, UnsafeModelError, set_trust_model_code
from semhinet_tf.taxonomy import Taxonomy, UnsafeTaxonomyError

SIZE = 32
MARKER_ENV = "SEMHINET_TEST_MARKER"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One model with a code-running Lambda, saved as .h5, as .keras, and as HDF5 under a .keras name."""
    d = tmp_path_factory.mktemp("hostile")
    os.environ[MARKER_ENV] = str(d / "touched_while_building")
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Lambda(  # self-contained, as a hostile file's would be: no name from this module
        lambda t: (__import__("pathlib").Path(__import__("os").environ["SEMHINET_TEST_MARKER"]).touch(), t)[1],
        name="lambda")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, {"h1": keras.layers.Dense(3, activation="softmax", name="h1")(x)})
    model.save(d / "evil.h5")
    model.save(d / "evil.keras")
    (d / "run").mkdir()
    (d / "run" / "qat.h5").write_bytes((d / "evil.h5").read_bytes())
    (d / "run" / "float.keras").write_bytes((d / "evil.h5").read_bytes())  # HDF5: Keras loads it as .h5
    config = {"model": {"img_size": SIZE}, "train": {"granularity": "per-channel", "seed": 0}}
    (d / "run" / "config.json").write_text(json.dumps(config))
    (d / "run" / "taxonomy.json").write_text(json.dumps(Taxonomy.default().to_spec()))
    (d / "data").mkdir()
    (d / "frame.png").write_bytes(b"")
    yield d
    os.environ.pop(MARKER_ENV, None)


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "MARKER"
    monkeypatch.setenv(MARKER_ENV, str(path))
    set_trust_model_code(False)
    yield path
    set_trust_model_code(False)


def _refused(args: list[str], marker):
    result = CliRunner().invoke(main, args)
    assert not marker.exists(), "the model's code ran"
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["evil.h5", "evil.keras"])
def test_python_api_refuses_a_lambda_model(hostile, marker, name):
    error = None
    try:
        semhinet_tf.load_model(hostile / name)
    except ValueError as exc:
        error = exc
    assert not marker.exists(), "the model's code ran"
    assert isinstance(error, UnsafeModelError), error
    assert "refused: layer 'lambda' (Lambda) carries Python code" in str(error)
    assert "\n" not in str(error) and str(hostile / name) in str(error)


@pytest.mark.parametrize("command", [
    ["predict", "{d}/evil.h5", "{d}/frame.png"],
    ["predict", "{d}/evil.keras", "{d}/frame.png"],
    ["predict", "{d}/run", "{d}/frame.png"],
    ["eval", "{d}/evil.h5", "--data", "{d}/data"],
    ["compare", "{d}/run", "--data", "{d}/data"],
    ["convert", "{d}/run", "--out", "{d}/out.tflite"],
    ["export-onnx", "{d}/evil.h5", "--out", "{d}/out.onnx"],
])
def test_every_command_refuses_a_lambda_model_in_one_line(hostile, marker, command):
    if command[0] == "export-onnx":
        pytest.importorskip("tf2onnx")
    line = _refused([part.format(d=hostile) for part in command], marker)
    assert "'lambda' (Lambda)" in line and "--trust-model-code" in line


def test_trusting_model_code_is_an_explicit_opt_in(hostile, marker):
    with pytest.raises(ValueError, match="not a SEM-HiNet model"):  # loaded (its code ran), then: one head only
        semhinet_tf.load_model(hostile / "evil.h5", trust_code=True)
    assert marker.exists()
    marker.unlink()
    result = CliRunner().invoke(main, ["--trust-model-code", "predict", str(hostile / "evil.h5"),
                                       str(hostile / "frame.png")])
    assert marker.exists()
    assert result.stderr.splitlines()[0].startswith("warning: --trust-model-code")
    marker.unlink()
    _refused(["predict", str(hostile / "evil.h5"), str(hostile / "frame.png")], marker)  # no lingering opt-in


def test_classes_our_models_never_contain_are_refused(tmp_path, marker):
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.GlobalAveragePooling2D()(inputs + 1.0)  # a TFOpLambda: a function called by name
    path = tmp_path / "op.h5"
    keras.Model(inputs, {"h1": keras.layers.Dense(3, name="h1")(x)}).save(path)
    with pytest.raises(UnsafeModelError, match=r"\(TFOpLambda\)"):
        semhinet_tf.load_model(path)
    flat = keras.layers.Flatten(name="flatten")(inputs)  # named: Keras numbers unnamed layers per process
    foreign = keras.Model(inputs, {"h1": keras.layers.Dense(3, name="h1")(flat)})
    foreign.save(tmp_path / "flatten.keras")
    with pytest.raises(UnsafeModelError, match=r"not a SEM-HiNet model: layer 'flatten' \(Flatten\) is no class"):
        semhinet_tf.load_model(tmp_path / "flatten.keras")


def test_our_float_and_qat_models_pass_the_check_and_load(tmp_path, marker):
    from semhinet_tf.model.heads import ModelConfig, build_model
    from semhinet_tf.model.io import load_model, save_model
    from semhinet_tf.model.mobilenet_v3 import BackboneConfig
    from semhinet_tf.model.quant import quantize_model

    model = build_model(Taxonomy.default(), ModelConfig(img_size=SIZE, backbone=BackboneConfig(alpha=0.35),
                                                        head_units=16))
    save_model(model, tmp_path / "float.keras")
    save_model(quantize_model(model), tmp_path / "qat.h5", quantized=True)
    for name in ("float.keras", "qat.h5"):
        assert load_model(tmp_path / name).inputs[0].shape[1] == SIZE


def test_a_damaged_keras_archive_is_refused_in_one_line(tiny_run, tmp_path, marker):
    """One flipped byte in a .keras archive's config.json: zipfile's BadZipFile ("Bad CRC-32") reached the user
    as a traceback from the quantization probe, before the safety check."""
    import zipfile

    from semhinet_tf.model.io import load_model

    damaged = tmp_path / "float.keras"
    raw = bytearray((tiny_run.dir / "float.keras").read_bytes())
    with zipfile.ZipFile(tiny_run.dir / "float.keras") as z:
        info = z.getinfo("config.json")
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
    raw[at] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="float.keras: damaged .keras archive"):
        load_model(damaged)
    from PIL import Image

    Image.fromarray(tiny_run.frames(1, 0)[0]).save(tmp_path / "frame.png")
    result = CliRunner().invoke(main, ["predict", str(damaged), str(tmp_path / "frame.png")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {damaged}: damaged .keras archive")


def test_a_yaml_taxonomy_with_a_python_tag_is_refused(tmp_path, marker):
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: evil\nheads: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UnsafeTaxonomyError, match="refused: could not determine a constructor") as info:
        Taxonomy.from_file(path)
    assert "\n" not in str(info.value) and isinstance(info.value, UnsafeFileError)
    assert not marker.exists()
    (tmp_path / "data").mkdir()
    _refused(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--taxonomy", str(path)], marker)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_weights_holding_pickled_objects_are_refused(tmp_path, marker):
    from semhinet_tf.model.heads import ModelConfig
    from semhinet_tf.train import TrainConfig, initial_weights

    npz = tmp_path / "evil.npz"
    np.savez(npz, **{"Conv::0": np.array([_Payload(marker)], dtype=object)})
    npy = tmp_path / "evil_pickle.npz"
    npy.write_bytes(pickle.dumps(_Payload(marker)))
    for path in (npz, npy):
        cfg = TrainConfig(weights=str(path), img_size=SIZE)
        with pytest.raises(UnsafeFileError, match="refused: .*pickled Python objects") as info:
            initial_weights(None, cfg, ModelConfig(img_size=SIZE))
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
