"""Pure-Python TFLite reader and the JSON contract in the model's metadata, checked against ai_edge_litert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from semhinet_tf.export.tflite_meta import (
    BUILTIN_OPERATORS,
    CONTRACT_NAME,
    TENSOR_TYPES,
    contract_json,
    embed_contract,
    read_contract,
    read_model,
)

litert = pytest.importorskip("ai_edge_litert.interpreter")

CONTRACT = {
    "heads": {"h1": ["bogus", "normal", "defect"], "h2": ["line", "area", "edge"]},
    "img_size": 16,
    "input": {"dtype": "uint8", "scale": np.float32(0.5), "zero_point": np.int64(0)},
    "note": "défaut / 欠陥",
}


@pytest.fixture(scope="module")
def tflite(tmp_path_factory) -> Path:
    """A small int8 model with two named heads (uint8 I/O) written to disk."""
    tf = pytest.importorskip("tensorflow")
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    # 8 filters: an integer FULLY_CONNECTED reading fewer crashes the ARM runtimes (npu-check refuses it)
    x = keras.Input((16, 16, 1), batch_size=1, name="image")
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.GlobalAveragePooling2D()(y)
    model = keras.Model(x, {"h1": keras.layers.Dense(3, activation="softmax", name="h1")(y),
                            "h2": keras.layers.Dense(3, activation="softmax", name="h2")(y)})

    def rep():
        rng = np.random.default_rng(0)
        for _ in range(4):
            yield [rng.uniform(0, 255, (1, 16, 16, 1)).astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    path = tmp_path_factory.mktemp("meta") / "tiny.tflite"
    path.write_bytes(conv.convert())
    return path


def _run(model_bytes: bytes) -> dict[str, np.ndarray]:
    interp = litert.Interpreter(model_content=model_bytes)
    runner = interp.get_signature_runner()
    image = (np.arange(256, dtype=np.int64) * 7 % 256).astype(np.uint8).reshape(1, 16, 16, 1)
    return {k: v.copy() for k, v in runner(image=image).items()}


def test_enum_tables_match_the_schema():
    from tensorflow.lite.python import schema_py_generated as schema

    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    assert BUILTIN_OPERATORS == tuple(ops[i] for i in range(len(ops)))
    assert TENSOR_TYPES == tuple(types[i] for i in range(len(types)))


def test_reader_agrees_with_the_interpreter(tflite):
    model = read_model(tflite)
    interp = litert.Interpreter(model_path=str(tflite))  # not allocated: no delegate node appended yet
    assert model.op_names == [d["op_name"] for d in interp._get_ops_details()]
    assert [list(op.inputs) for op in model.operators] == [list(d["inputs"]) for d in interp._get_ops_details()]
    assert model.signature_list() == interp.get_signature_list()
    assert model.signatures["serving_default"].outputs.keys() == {"h1", "h2"}
    details = {d["index"]: d for d in interp.get_tensor_details()}
    for t in model.tensors:
        if t.index in details:
            d = details[t.index]
            assert (t.name, t.shape, t.dtype.lower()) == (d["name"], tuple(d["shape"]), d["dtype"].__name__)
            scale, zero_point = d["quantization_parameters"]["scales"], d["quantization_parameters"]["zero_points"]
            if t.quantization is None:
                assert len(scale) == 0
            else:
                assert np.allclose(t.quantization.scale, scale) and list(t.quantization.zero_point) == list(zero_point)
    (inp,) = model.input_tensors
    assert (inp.dtype, inp.shape, inp.shape_signature) == ("UINT8", (1, 16, 16, 1), (1, 16, 16, 1))
    assert [m for m in model.metadata_names if m == CONTRACT_NAME] == []


def test_contract_round_trip_keeps_the_model_identical(tflite):
    raw = tflite.read_bytes()
    assert read_contract(raw) is None
    out = embed_contract(raw, CONTRACT)
    expected = json.loads(contract_json(CONTRACT))
    assert read_contract(out) == expected and expected["input"]["scale"] == 0.5
    before, after = read_model(raw), read_model(out)
    assert after.metadata_names == [*before.metadata_names, CONTRACT_NAME]
    assert after.op_names == before.op_names and after.signature_list() == before.signature_list()
    assert all(start % 16 == 0 for start, size in after.buffer_spans if size)  # weights stay aligned
    results_before, results_after = _run(raw), _run(out)
    assert results_before.keys() == {"h1", "h2"} == results_after.keys()
    for key in results_before:
        np.testing.assert_array_equal(results_before[key], results_after[key])


def test_embedding_again_replaces_the_entry(tflite):
    once = embed_contract(tflite.read_bytes(), CONTRACT)
    twice = embed_contract(once, {"version": 2})
    model = read_model(twice)
    assert model.metadata_names.count(CONTRACT_NAME) == 1
    assert len(model.buffer_spans) == len(read_model(once).buffer_spans)  # buffer reused, not orphaned
    assert read_contract(twice) == {"version": 2}
    assert read_contract(twice, name="other") is None
    other = embed_contract(twice, {"x": 1}, name="other")
    assert read_contract(other) == {"version": 2} and read_contract(other, name="other") == {"x": 1}


def test_bad_contracts_and_files_are_refused(tflite, tmp_path):
    raw = tflite.read_bytes()
    with pytest.raises(ValueError):
        embed_contract(raw, {"threshold": float("nan")})
    with pytest.raises(TypeError):
        embed_contract(raw, ["not", "a", "dict"])
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.tflite: not a TFLite model"):
        read_model(junk)
    with pytest.raises(ValueError, match="corrupt"):
        read_model(raw[:200])
    not_json = embed_contract(raw, {"a": 1})
    start, size = read_model(not_json).buffer_spans[read_model(not_json).metadata[CONTRACT_NAME]]
    broken = not_json[:start] + b"\xff" * size + not_json[start + size :]
    with pytest.raises(ValueError, match="is not UTF-8 JSON"):
        read_contract(broken)
    # a metadata entry pointing past the buffers (a flipped byte): an IndexError reached the board as a traceback
    import struct

    from semhinet_tf.export.tflite_meta import _Table

    root = _Table(not_json, struct.unpack_from("<I", not_json, 0)[0])
    field = next(m for m in root.tables(6) if m.string(0) == CONTRACT_NAME)._field(1)
    past = not_json[:field] + struct.pack("<I", 0x0F000111) + not_json[field + 4:]
    with pytest.raises(ValueError, match="corrupt TFLite flatbuffer .metadata 'semhinet_contract' points at buffer"):
        read_contract(past)


def test_reader_and_npu_check_need_no_tensorflow(tflite):
    code = (
        "import sys\n"
        "from semhinet_tf.export.tflite_meta import read_model, read_contract\n"
        "from semhinet_tf.export.npu import check_npu\n"
        f"m = read_model({str(tflite)!r}); r = check_npu(m); read_contract(m)\n"
        "bad = [n for n in ('tensorflow', 'flatbuffers', 'tf_keras', 'keras') if n in sys.modules]\n"
        "assert not bad, bad\n"
        "print(len(m.operators), r.ok)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(read_model(tflite).operators)), "True"]
