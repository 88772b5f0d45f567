"""Quantization-aware training with tensorflow-model-optimization on our MobileNetV3Small.

Our activation layers (HardSwish, HardSigmoid, ChannelGate) and Rescaling are not in tfmot's default
registry; they get an output-only QuantizeConfig (they have no weights). `granularity="per-tensor"`
uses tfmot's default scheme with per-axis weights disabled (one scale per convolution kernel), which
older NPU guidance says runs faster (see ../shared/NPU_NOTES.md).
"""

from __future__ import annotations

from contextlib import contextmanager

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_registry import (
    Default8BitConvQuantizeConfig,
    Default8BitQuantizeRegistry,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_scheme import (
    Default8BitQuantizeScheme,
)

from semhinet_tf.model import keras
from semhinet_tf.model.heads import is_head_layer
from semhinet_tf.model.layers import CUSTOM_OBJECTS, ChannelGate, HardSigmoid, HardSwish
from semhinet_tf.model.mobilenet_v3 import RESCALE_STEPS, rescaled_ranges

qkeras = tfmot.quantization.keras
quantizers = qkeras.quantizers
layers = keras.layers

GRANULARITIES = ("per-channel", "per-tensor")


class OutputQuantizeConfig(qkeras.QuantizeConfig):
    """Quantize only the output of a weightless layer (8-bit, asymmetric, moving-average range)."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

    def get_config(self):
        return {}


class RescaleQuantizeConfig(OutputQuantizeConfig):
    """A rescale step's output on a fixed grid (mobilenet_v3.rescaled_ranges), neither learned nor calibrated."""

    def __init__(self, low: float, high: float):
        self.low, self.high = float(low), float(high)

    def get_output_quantizers(self, layer):
        return [quantizers.FixedQuantizer(num_bits=8, init_min=self.low, init_max=self.high, narrow_range=False)]

    def get_config(self):
        return {"low": self.low, "high": self.high}


class DepthwiseWeightsQuantizer(quantizers.Quantizer):
    """8-bit symmetric weights of a depthwise kernel (kh, kw, channels, multiplier), one range per channel.

    Why: tfmot's per-axis weight quantizer takes a kernel's last axis as its channel axis. For a depthwise
    kernel that axis is the depth multiplier (1), so tfmot's "per-channel" QAT gives every depthwise kernel a
    single range (tensorflow/model-optimization#808). The converter then stores per-channel scales, but the
    integers stay on that one coarse grid: in the 160 px default run the median channel used 40-77 of the
    127 levels, late blocks' small channels fewer. Here each channel gets its own range (the last value of
    its largest |weight|, as tfmot's LastValueQuantizer does for ordinary convolutions)."""

    def build(self, tensor_shape, name, layer):
        channels = int(tensor_shape[-2]) * int(tensor_shape[-1])

        def bound(suffix: str, value: float):
            return layer.add_weight(f"{name}_{suffix}", shape=(channels,), trainable=False,
                                    initializer=keras.initializers.Constant(value))

        return {"min_var": bound("min", -6.0), "max_var": bound("max", 6.0)}

    def __call__(self, inputs, training, weights, **kwargs):
        import tensorflow as tf

        shape = inputs.shape
        per_channel = tf.reshape(inputs, (shape[0], shape[1], shape[2] * shape[3]))
        low, high = weights["min_var"], weights["max_var"]
        if training:
            largest = tf.reduce_max(tf.abs(per_channel), axis=(0, 1))
            low, high = low.assign(-largest), high.assign(largest)
        quantized = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            per_channel, low, high, num_bits=8, narrow_range=True)
        return tf.reshape(quantized, shape)

    def get_config(self):
        return {}

    def __eq__(self, other):
        return isinstance(other, DepthwiseWeightsQuantizer)

    def __ne__(self, other):
        return not self == other


class DepthwiseQuantizeConfig(Default8BitConvQuantizeConfig):
    """tfmot's convolution config with per-channel depthwise weights (DepthwiseWeightsQuantizer)."""

    def __init__(self, weight_attrs, activation_attrs, quantize_output):
        super().__init__(weight_attrs, activation_attrs, quantize_output)
        self.weight_quantizer = DepthwiseWeightsQuantizer()


class PerChannelRegistry(Default8BitQuantizeRegistry):
    """tfmot's default registry, depthwise convolutions quantized per channel."""

    def get_quantize_config(self, layer):
        if isinstance(layer, layers.DepthwiseConv2D):
            return DepthwiseQuantizeConfig(["depthwise_kernel"], ["activation"], False)
        return super().get_quantize_config(layer)


class PerChannelScheme(Default8BitQuantizeScheme):
    """tfmot's default 8-bit scheme (its Conv+BatchNorm transforms included) with PerChannelRegistry."""

    def __init__(self):
        super().__init__(disable_per_axis=False)

    def get_quantize_registry(self):
        return PerChannelRegistry(disable_per_axis=False)


def scheme_for(granularity: str) -> Default8BitQuantizeScheme:
    """The tfmot scheme of a weight granularity (per-tensor: tfmot's own, per-axis weights disabled)."""
    if granularity == "per-tensor":
        return Default8BitQuantizeScheme(disable_per_axis=True)
    return PerChannelScheme()


def scope_objects() -> dict:
    return {**CUSTOM_OBJECTS, "OutputQuantizeConfig": OutputQuantizeConfig,
            "RescaleQuantizeConfig": RescaleQuantizeConfig, "DepthwiseQuantizeConfig": DepthwiseQuantizeConfig,
            "DepthwiseWeightsQuantizer": DepthwiseWeightsQuantizer}


@contextmanager
def quant_scope():
    """Everything needed to deserialize a QAT model (tfmot wrappers and our configs)."""
    with qkeras.quantize_scope(scope_objects()):
        yield


def _annotation(layer):
    fixed = rescaled_ranges().get(layer.name)
    if isinstance(layer, layers.Rescaling) and fixed and _is_rescale_step(layer):
        return RescaleQuantizeConfig(*fixed)
    if isinstance(layer, (HardSwish, HardSigmoid, ChannelGate, layers.Rescaling)):
        return OutputQuantizeConfig()
    return None  # tfmot's default registry (Conv+BN folding, per-channel or per-tensor weights)


def _is_rescale_step(layer) -> bool:
    """True for a Rescaling layer built from RESCALE_STEPS (not one of a model saved before them)."""
    steps = {name: (scale, offset) for name, scale, offset in RESCALE_STEPS}
    scale, offset = steps[layer.name]
    return abs(float(layer.scale) - scale) < 1e-12 and abs(float(layer.offset) - offset) < 1e-12


def is_float_head_layer(name: str) -> bool:
    """Layers after the pooled features that `float_heads` keeps in float (each head's Dense/act/dropout)."""
    return is_head_layer(name) and not name.removeprefix("quant_").startswith("pool")


def quantize_model(model: keras.Model, granularity: str = "per-channel", float_heads: bool = False) -> keras.Model:
    """A QAT copy of a float model (weights carried over), ready to compile and fine-tune.

    `float_heads`: the heads' layers get no fake-quant nodes, so the converter can keep them in float."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")

    def annotate(layer):
        clone = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, keras.layers.InputLayer) or (float_heads and is_float_head_layer(layer.name)):
            return clone
        return qkeras.quantize_annotate_layer(clone, _annotation(layer))

    with keras.utils.custom_object_scope(CUSTOM_OBJECTS):
        annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with quant_scope():
        qat = qkeras.quantize_apply(annotated, scheme_for(granularity))
    pin_input_range(qat)
    return qat


def pin_input_range(qat: keras.Model, pixel_range: tuple[float, float] = (0.0, 255.0)) -> None:
    """The input quantizer's range set to the full pixel range, so the int8 model's uint8 input is the raw
    pixel (scale 1, zero point 0). Why: tfmot's input quantizer keeps the min/max of the training images; on
    frames that never reach white (measured: 0..212) the .tflite input got scale 212/255, and a raw pixel fed
    to it meant 0.83 of itself to the model unless every caller rescaled and rounded it first."""
    for layer in qat.layers:
        if _is_input_quantizer(layer):
            for var in layer.weights:
                short = _short(var.name)
                if short.endswith("_min"):
                    var.assign(pixel_range[0])
                elif short.endswith("_max"):
                    var.assign(pixel_range[1])


def qat_base(float_model: keras.Model, taxonomy, model_config, granularity: str) -> keras.Model:
    """The float model QAT starts from: as trained for per-channel weights; with BatchNorm folded into the
    convolutions for per-tensor weights (see mobilenet_v3.fold_batchnorm)."""
    if granularity != "per-tensor":
        return float_model
    from dataclasses import replace

    from semhinet_tf.model.heads import build_model
    from semhinet_tf.model.mobilenet_v3 import fold_batchnorm

    cfg = replace(model_config, backbone=replace(model_config.backbone, batchnorm=False))
    with keras.utils.custom_object_scope(CUSTOM_OBJECTS):
        return fold_batchnorm(float_model, build_model(taxonomy, cfg))


def with_float_heads(qat: keras.Model, float_model: keras.Model, granularity: str = "per-channel") -> keras.Model:
    """The trained QAT model with its heads taken out of quantization: backbone wrappers (weights and learned
    ranges) copied layer by layer, each head's float weights copied from inside its wrapper."""
    target = quantize_model(float_model, granularity, float_heads=True)
    by_name = {layer.name: layer for layer in qat.layers}
    input_quantizers = [layer for layer in qat.layers if _is_input_quantizer(layer)]
    for layer in target.layers:
        if not layer.weights:
            continue
        if _is_input_quantizer(layer) and len(input_quantizers) == 1:  # auto-named: quantize_layer, _1, ...
            source = input_quantizers[0]
        else:
            source = by_name.get(layer.name) or by_name.get(f"quant_{layer.name}")
        if source is None:
            raise ValueError(f"layer {layer.name!r} of the float-heads model has no counterpart in the QAT model")
        if [w.shape for w in source.weights] == [w.shape for w in layer.weights]:  # the same (wrapped) layer
            layer.set_weights(source.get_weights())
            continue
        # a float head layer: its kernel and bias are among the QAT wrapper's variables (with the quantizers')
        found = {_short(v.name): v for v in source.weights}
        missing = [_short(w.name) for w in layer.weights if _short(w.name) not in found]
        if missing:
            raise ValueError(f"{source.name}: no {', '.join(missing)} in the QAT model")
        layer.set_weights([found[_short(w.name)].numpy() for w in layer.weights])
    return target


def freeze_batchnorm(qat: keras.Model) -> int:
    """Keep every BatchNorm's moving statistics where the float model left them (momentum 1): they stop
    following QAT's augmented, quantized training batches, so the int8 model normalises as the float one did.
    Scale and shift still fine-tune at QAT's rate. (Keras' trainable=False would freeze those too, but tfmot's
    QuantizeWrapper then lists them twice and saving the QAT model fails.) Returns the layers frozen."""
    frozen = 0
    for layer in qat.layers:
        inner = getattr(layer, "layer", layer)  # tfmot's QuantizeWrapper holds the layer it quantizes
        if isinstance(inner, layers.BatchNormalization):
            inner.momentum = 1.0
            frozen += 1
    return frozen


def _short(variable_name: str) -> str:
    """'quant_h1/kernel:0' -> 'kernel'."""
    return variable_name.rsplit("/", 1)[-1].split(":")[0]


def _is_input_quantizer(layer) -> bool:
    return type(layer).__name__ == "QuantizeLayer"


# ---------------------------------------------------------------- activation ranges
RANGE_SUFFIXES = ("output", "post_activation", "pre_activation")


def calibrate_ranges(qat: keras.Model, float_model: keras.Model, batches) -> int:
    """Start each activation range of a fresh QAT model where the float model's activations are.

    Why: tfmot starts every range at [-6, 6] and moves it by a moving average with decay 0.999 per step, so a
    QAT phase of a few hundred steps ends with ranges still mostly at the start value (measured: [-5.4, 5.4]
    for the rescaled input, whose real range is [-1, 1], i.e. 47 of 256 levels; [-5.3, 5.4] for the
    squeeze-excite gates in [0, 1]). Each range becomes the mean over `batches` of the batch minimum and
    maximum, the value the moving average would converge to. Returns the number of ranges set (a range whose
    activations were constant over the batches keeps its start value)."""
    import numpy as np

    targets = []  # (variables (min, max), float layer, "pre" for a softmax/sigmoid layer's logits)
    for layer in qat.layers:
        by_suffix = {_short(v.name): v for v in layer.weights}
        for kind in RANGE_SUFFIXES:
            if f"{kind}_min" in by_suffix:
                name = layer.name.removeprefix("quant_")
                try:
                    source = float_model.get_layer(name)
                except ValueError:
                    continue
                targets.append(((by_suffix[f"{kind}_min"], by_suffix[f"{kind}_max"]), source, kind == "pre_activation"))
    if not targets:
        return 0
    outputs = [t[1].input if t[2] else t[1].output for t in targets]
    probe = keras.Model(float_model.inputs, outputs)
    lows, highs = [[] for _ in targets], [[] for _ in targets]
    for images in batches:
        values = probe(images, training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for i, ((_, source, pre), v) in enumerate(zip(targets, values, strict=True)):
            v = np.asarray(v)
            if pre:  # logits of a Dense with a softmax (or sigmoid) activation, computed from its input
                kernel, bias = source.get_weights()[:2]
                v = v @ kernel + bias
            lows[i].append(float(v.min()))
            highs[i].append(float(v.max()))
    assigned = 0
    for i, ((lo_var, hi_var), _, _) in enumerate(targets):
        lo, hi = min(float(np.mean(lows[i])), 0.0), max(float(np.mean(highs[i])), 0.0)  # the range holds zero
        if hi - lo < 1e-6:
            continue
        lo_var.assign(lo)
        hi_var.assign(hi)
        assigned += 1
    return assigned
