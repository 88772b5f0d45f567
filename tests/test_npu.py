"""NPU (VX delegate) compatibility check on tiny converted models, and on hand-made graphs for the rare cases."""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from semhinet_tf.export.npu import ARM_MIN_FC_DEPTH, check_cora_z7, check_npu, check_target, count_macs
from semhinet_tf.export.tflite_meta import Operator, Quantization, SubGraph, Tensor, TFLiteModel, read_model

# MACs of the Keras model below: conv 8x8x8 outputs x 3x3x1, depthwise 8x8x8 x 3x3, dense 512->32, heads 32->3, 32->2.
TINY_MACS = 8 * 8 * 8 * 9 + 8 * 8 * 8 * 9 + 512 * 32 + 32 * 3 + 32 * 2


def _tiny(keras, batch):
    x = keras.Input((16, 16, 1), batch_size=batch, name="image")
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(y)
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dense(32, activation="relu")(y)  # 16384 weights: dynamic-range quantization takes it
    h1 = keras.layers.Dense(3, activation="softmax", name="h1")(y)
    h2 = keras.layers.Dense(2, activation="softmax", name="h2")(y)
    return keras.Model(x, {"h1": h1, "h2": h2})


def _representative(batch=1):
    rng = np.random.default_rng(0)
    for _ in range(4):
        yield [rng.uniform(0, 255, (batch, 16, 16, 1)).astype(np.float32)]


def _convert(tf, model, mode):
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode in ("int8", "hybrid"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        conv.representative_dataset = _representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
    return conv.convert()


def _unsupported(tf):
    """CUMSUM (a builtin the VX delegate lacks) and Erfinv (no builtin: a custom op)."""

    @tf.function(input_signature=[tf.TensorSpec((1, 8), tf.float32)])
    def fn(x):
        return {"y": tf.math.erfinv(tf.math.cumsum(x, axis=1) * 0.01)}

    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], None)
    conv.allow_custom_ops = True
    return conv.convert()


def _float_tail(tf, keras):
    """Int8 backbone, then DEQUANTIZE and a float dense + softmax head (what a --float-heads export gives)."""
    x = keras.Input((16, 16, 1), batch_size=1, name="image")
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.GlobalAveragePooling2D()(y)
    model = keras.Model(x, {"h1": keras.layers.Dense(3, activation="softmax", name="h1")(y)})
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=["FULLY_CONNECTED", "SOFTMAX"])
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=_representative, debug_options=options
    )
    return debugger.get_nondebug_quantized_model()


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    tf = pytest.importorskip("tensorflow")
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    tiny = _tiny(keras, 1)
    return {
        "int8": _convert(tf, tiny, "int8"),
        "float": _convert(tf, tiny, "float"),
        "hybrid": _convert(tf, tiny, "hybrid"),
        "dynamic": _convert(tf, _tiny(keras, None), "int8"),
        "batch2": _convert(tf, _tiny(keras, 2), "float"),
        "unsupported": _unsupported(tf),
        "tail": _float_tail(tf, keras),
    }


def _kinds(report) -> set[str]:
    return {i.kind for i in report.issues}


def test_full_int8_passes(models):
    report = check_npu(models["int8"])
    assert report.ok, report.format()
    assert report.format().splitlines()[-1] == (
        f"NPU check: PASS - {report.n_ops} ops, all on the VX delegate's list, fully integer"
    )
    assert report.op_histogram["CONV_2D"] == 1 and report.op_histogram["FULLY_CONNECTED"] == 3
    assert report.macs == TINY_MACS == count_macs(models["int8"])
    d = report.to_dict()
    assert d["ok"] is True and d["issues"] == [] and d["n_ops"] == sum(d["op_histogram"].values())


def test_float_model_fails_on_float_ops_and_tensors(models):
    report = check_npu(models["float"])
    assert not report.ok
    assert _kinds(report) == {"float_op", "float_tensor"}
    flagged = {i.op_name for i in report.issues if i.kind == "float_op"}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= flagged
    text = report.format()
    assert len(text.splitlines()) == len(report.issues) + 2  # header, one line per issue, verdict
    assert text.splitlines()[-1].startswith(f"NPU check: FAIL - {len(report.issues)} issues (")
    assert count_macs(models["float"]) == TINY_MACS


def test_dynamic_range_model_fails_as_hybrid(models):
    report = check_npu(models["hybrid"])
    hybrid = [i for i in report.issues if i.kind == "hybrid_op"]
    assert hybrid and all(i.op_name == "FULLY_CONNECTED" for i in hybrid)
    assert "FLOAT32 input with INT8 weights" in hybrid[0].message


def test_unsupported_and_custom_ops_are_named(models):
    report = check_npu(models["unsupported"])
    named = {(i.kind, i.op_name) for i in report.issues}
    assert ("unsupported_op", "CUMSUM") in named
    assert ("custom_op", "Erfinv") in named
    assert "CUMSUM" in report.format() and "Erfinv" in report.format()


def test_dynamic_batch_fails_and_only_for_that(models):
    report = check_npu(models["dynamic"])
    assert _kinds(report) == {"dynamic_shape"}
    assert len(report.issues) == 1  # reported where it starts (the input), not on every tensor downstream
    assert report.issues[0].tensor == read_model(models["dynamic"]).input_tensors[0].name


def test_fixed_batch_other_than_one_fails(models):
    assert "batch_not_1" in _kinds(check_npu(models["batch2"]))


def test_float_tail_fails_unless_requested(models):
    strict = check_npu(models["tail"])
    assert not strict.ok and _kinds(strict) <= {"float_op", "float_tensor"}
    assert "allow_float_tail=True" in strict.verdict
    relaxed = check_npu(models["tail"], allow_float_tail=True)
    assert relaxed.ok, relaxed.format()
    model = read_model(models["tail"])
    assert [model.operators[i].name for i in relaxed.cpu_ops] == ["FULLY_CONNECTED", "SOFTMAX"]
    assert relaxed.cpu_macs == 8 * 3 and relaxed.macs == 8 * 8 * 8 * 9 + 8 * 3
    assert "2 float ops on the CPU downstream of a DEQUANTIZE" in relaxed.verdict
    assert 0 < relaxed.to_dict()["cpu_mac_share"] < 0.01


def test_int8_model_passes_in_float_tail_mode_too(models):
    report = check_npu(models["int8"], allow_float_tail=True)
    assert report.ok and report.cpu_ops == []


# --- hand-made graphs: cases the converter does not produce on demand ------------------------------------------


def _t(index, dtype, shape=(1, 4), scale=(0.1,), const=False, signature=None):
    quant = Quantization(tuple(scale), (0,) * len(scale)) if scale else None
    buffer = index if const else 0
    return Tensor(index, f"t{index}", tuple(shape), tuple(signature or shape), dtype, buffer, quant, const)


def _model(tensors, ops, inputs, outputs) -> TFLiteModel:
    operators = [Operator(i, 0, name, 0, None, 1, tuple(a), tuple(b)) for i, (name, a, b) in enumerate(ops)]
    sg = SubGraph("main", tensors, tuple(inputs), tuple(outputs), operators)
    return TFLiteModel("<hand-made>", 3, "", [sg], {}, {}, buffer_spans=[])


def test_per_channel_io_int16_and_missing_quantization_are_refused():
    tensors = [
        _t(0, "INT8", scale=(0.1, 0.2)),  # per-channel model input
        _t(1, "INT16"),
        _t(2, "INT8", scale=()),  # no quantization parameters
        _t(3, "INT8"),
    ]
    ops = [("ADD", [0, 0], [1]), ("MUL", [1, 1], [2]), ("RELU", [2], [3])]
    report = check_npu(_model(tensors, ops, [0], [3]))
    assert _kinds(report) == {"per_channel_io", "int16_tensor", "no_quant_params"}
    assert {i.tensor for i in report.issues} == {"t0", "t1", "t2"}


def test_float_between_dequantize_and_quantize_is_not_a_tail():
    tensors = [_t(0, "INT8"), _t(1, "FLOAT32", scale=()), _t(2, "FLOAT32", scale=()), _t(3, "INT8")]
    ops = [("DEQUANTIZE", [0], [1]), ("TANH", [1], [2]), ("QUANTIZE", [2], [3])]
    report = check_npu(_model(tensors, ops, [0], [3]), allow_float_tail=True)
    assert report.cpu_ops == [] and not report.ok
    assert {i.op_name for i in report.issues if i.kind == "float_op"} == {"DEQUANTIZE", "TANH", "QUANTIZE"}


def test_boundary_quantize_and_dequantize_are_fine():
    tensors = [_t(0, "FLOAT32", scale=()), _t(1, "INT8"), _t(2, "INT8"), _t(3, "FLOAT32", scale=())]
    ops = [("QUANTIZE", [0], [1]), ("HARD_SWISH", [1], [2]), ("DEQUANTIZE", [2], [3])]
    report = check_npu(_model(tensors, ops, [0], [3]))
    assert report.ok, report.format()
    assert report.verdict.endswith("integer inside, float I/O converted at the boundary")


# --- Cora Z7 (Cortex-A9: no VFPv4 FMA, which the armv7 tflite_runtime's float kernels use) ------------------------


def test_cora_z7_refuses_every_float_operator_and_passes_the_int8_model(models):
    float_report = check_target(models["float"], target="cora-z7")
    assert not float_report.ok and _kinds(float_report) == {"float_op"}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= {i.op_name for i in float_report.issues}
    assert float_report.verdict.startswith("Cora Z7 check: FAIL")
    assert "VFPv4 FMA" in float_report.issues[0].message
    int8 = check_cora_z7(models["int8"])
    assert int8.ok, int8.format()
    assert int8.verdict.startswith("Cora Z7 check: PASS") and int8.to_dict()["target"] == "cora-z7"
    # the float head of a --float-heads export is refused too: there is no CPU tail to fall back to
    tail = check_cora_z7(models["tail"])
    assert {i.op_name for i in tail.issues} >= {"DEQUANTIZE", "FULLY_CONNECTED", "SOFTMAX"}
    # the NPU's own rules are not the A9's: a dynamic batch runs on the CPU
    assert check_cora_z7(models["dynamic"]).ok
    with pytest.raises(ValueError, match="no meaning for cora-z7"):
        check_target(models["int8"], target="cora-z7", allow_float_tail=True)


def test_cora_z7_refuses_float_boundary_converters():
    tensors = [_t(0, "FLOAT32", scale=()), _t(1, "INT8"), _t(2, "INT8"), _t(3, "FLOAT32", scale=())]
    ops = [("QUANTIZE", [0], [1]), ("HARD_SWISH", [1], [2]), ("DEQUANTIZE", [2], [3])]
    report = check_cora_z7(_model(tensors, ops, [0], [3]))
    assert [i.op_name for i in report.issues] == ["QUANTIZE", "DEQUANTIZE"]
    assert check_npu(_model(tensors, ops, [0], [3])).ok  # the NPU takes them


def test_a_shallow_integer_fully_connected_is_refused_for_both_boards():
    """tflite-runtime 2.14's optimized int8 FULLY_CONNECTED crashes on arm64 and armv7 below an input depth of 8."""
    def fc(depth):
        tensors = [_t(0, "INT8", shape=(1, depth)), _t(1, "INT8", shape=(3, depth), const=True), _t(2, "INT8", (1, 3))]
        return _model(tensors, [("FULLY_CONNECTED", [0, 1, -1], [2])], [0], [2])

    for check in (check_npu, check_cora_z7):
        report = check(fc(ARM_MIN_FC_DEPTH - 1))
        assert _kinds(report) == {"shallow_fully_connected"} and report.issues[0].op_name == "FULLY_CONNECTED"
        assert f"input depth of {ARM_MIN_FC_DEPTH - 1}" in report.issues[0].message
        assert check(fc(ARM_MIN_FC_DEPTH)).ok
