"""Keras (QAT or float) -> full-int8 TFLite with a named signature (input `image`, outputs h1..h5).

Batch is fixed at 1 (the VX delegate refuses dynamic shapes). Outputs are named by the signature,
never by position: TFLite does not keep the output order of a multi-output Keras model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from semhinet_tf.model import keras
from semhinet_tf.model.ood import OOD_OUTPUT, OodFit, ood_graph
from semhinet_tf.progress import Step
from semhinet_tf.progress import step as progress_step

IO_TYPES = {"uint8": tf.uint8, "int8": tf.int8}


def serving_function(model: keras.Model, img_size: int, output_names: Iterable[str], ood: OodFit | None = None):
    """A concrete function image(1,S,S,1) -> {h1..h5}, whatever names tfmot gave the Keras outputs.

    `ood`: also the unfamiliar-frame score, output `ood`, from the pooled features (`model` is then a
    model.ood.feature_tap model, whose pooled outputs it reads)."""
    names = list(output_names)

    @tf.function(input_signature=[tf.TensorSpec([1, img_size, img_size, 1], tf.float32, name="image")])
    def serve(image):
        out = model(image, training=False)
        if isinstance(out, dict):
            by_head = {k.removeprefix("quant_"): v for k, v in out.items()}
            result = {n: tf.identity(by_head[n], name=n) for n in names}
            if ood is not None:
                result[OOD_OUTPUT] = tf.identity(ood_graph(by_head, ood), name=OOD_OUTPUT)
            return result
        if ood is not None:
            raise ValueError("the unfamiliar-frame score needs a model with named outputs (model.ood.feature_tap)")
        if not isinstance(out, (list, tuple)):
            out = [out]
        return {n: tf.identity(v, name=n) for n, v in zip(names, out, strict=True)}

    return serve.get_concrete_function()


def _converter(fn, model: keras.Model) -> tf.lite.TFLiteConverter:
    """A converter for `fn` whose variables are held by a bare tf.Module, not by the Keras model.

    The converter saves what it is given as a SavedModel first; handed the tf-keras model itself it also
    serializes every layer's call functions, three quarters of a conversion's time (50 of 65 s for the
    tests' tiny QAT model). The variables alone give the same .tflite, byte for byte."""
    holder = tf.Module()
    holder.model_variables = list(model.variables)
    return tf.lite.TFLiteConverter.from_concrete_functions([fn], holder)


def representative_dataset(frames: Callable[[], Iterator[np.ndarray]], step: Step | None = None,
                           total: int | None = None) -> Callable[[], Iterator[list]]:
    """Wrap a generator of uint8 (S,S) frames as the converter's representative dataset.

    `step`: the conversion's progress line, told how many of the `total` frames were calibrated on (the
    converter pulls them inside its own call)."""

    def gen():
        for done, frame in enumerate(frames(), 1):
            yield [np.asarray(frame, np.float32).reshape(1, *frame.shape[:2], 1)]
            if step is not None:
                step.note(f"calibrated {done}/{total or '?'} frames")

    return gen


def convert_int8(model: keras.Model, img_size: int, output_names: Iterable[str],
                 calibration: Callable[[], Iterator[np.ndarray]] | None, io_type: str = "uint8",
                 per_tensor: bool = False, float_heads: bool = False, progress: bool = False,
                 calibration_size: int | None = None, ood: OodFit | None = None) -> bytes:
    """Full-integer conversion. A QAT model carries its own ranges; calibration still sets any the
    fake-quant nodes do not cover (and is required for a float model: post-training quantization).

    `progress`: a bar for the calibration frames (`calibration_size` of them), then the converter's own time.

    `float_heads`: everything up to the pooled features in int8 (the NPU's part), then a DEQUANTIZE and the
    heads in float32 on the CPU, with float32 outputs (see `_quantize_all_but_heads`).

    `ood`: add the unfamiliar-frame score as output `ood` (see serving_function)."""
    with progress_step("converting to int8 TFLite", enabled=progress) as step:
        return _convert_int8(model, img_size, output_names, calibration, io_type, per_tensor, float_heads, step,
                             calibration_size, ood)


def _convert_int8(model: keras.Model, img_size: int, output_names: Iterable[str],
                  calibration: Callable[[], Iterator[np.ndarray]] | None, io_type: str, per_tensor: bool,
                  float_heads: bool, step: Step, calibration_size: int | None, ood: OodFit | None = None) -> bytes:
    fn = serving_function(model, img_size, output_names, ood)
    converter = _converter(fn, model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if per_tensor:  # one scale per weight tensor: PTQ, or a per-tensor QAT model (its kernels are BN-folded)
        converter._experimental_disable_per_channel = True
    if calibration is not None:
        converter.representative_dataset = representative_dataset(calibration, step, calibration_size)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = IO_TYPES[io_type]
    converter.inference_output_type = IO_TYPES[io_type]
    if float_heads:
        if calibration is None:
            raise ValueError("float heads need calibration frames")
        return _quantize_all_but_heads(converter, io_type, per_tensor)
    return converter.convert()


def _quantize_all_but_heads(converter, io_type: str, per_tensor: bool) -> bytes:
    """Selective quantization, the route of TFLite's QuantizationDebugger: calibrate, then quantize with
    every operator that produces a head tensor denylisted, so the heads stay float."""
    from tensorflow.lite.python import convert as lite_convert
    from tensorflow.lite.python import util as lite_util

    from semhinet_tf.export.tflite_meta import read_model

    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    graph = read_model(calibrated)
    outputs = set(graph.outputs)  # the heads' softmax tensors carry signature names, not layer names
    head_tensors = [graph.tensors[i].name for op in graph.operators for i in op.outputs
                    if i in outputs or _in_head(graph.tensors[i].name)]
    if not head_tensors:
        raise ValueError("no head operators found to keep in float")
    quantized = lite_convert.mlir_quantize(calibrated, disable_per_channel=per_tensor, fully_quantize=False,
                                           denylisted_nodes=head_tensors)
    return lite_util.modify_model_io_type(quantized, IO_TYPES[io_type], tf.float32)


def _in_head(tensor_name: str) -> bool:
    """'semhinet/quant_h3_hidden/MatMul;...' names a head's tensor; pooling stays on the NPU."""
    from semhinet_tf.model.quant import is_float_head_layer

    return any(is_float_head_layer(segment) for part in tensor_name.split(";") for segment in part.split("/")[1:2])


def convert_float(model: keras.Model, img_size: int, output_names: Iterable[str]) -> bytes:
    """A float32 TFLite model (reference for comparisons; not for the NPU)."""
    fn = serving_function(model, img_size, output_names)
    converter = _converter(fn, model)
    return converter.convert()
