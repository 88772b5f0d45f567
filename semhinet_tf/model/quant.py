"""Quantization-aware training with tensorflow-model-optimization on our MobileNetV3Small.

Our activation layers (HardSwish, HardSigmoid, ChannelGate) and Rescaling are not in tfmot's default
registry; they get an output-only QuantizeConfig (they have no weights). `granularity="per-tensor"`
uses tfmot's default scheme with per-axis weights disabled (one scale per convolution kernel), which
older NPU guidance says runs faster (see ../shared/NPU_NOTES.md).
"""

from __future__ import annotations

from contextlib import contextmanager

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_scheme import (
    Default8BitQuantizeScheme,
)

from semhinet_tf.model import keras
from semhinet_tf.model.layers import CUSTOM_OBJECTS, ChannelGate, HardSigmoid, HardSwish

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


def scope_objects() -> dict:
    return {**CUSTOM_OBJECTS, "OutputQuantizeConfig": OutputQuantizeConfig}


@contextmanager
def quant_scope():
    """Everything needed to deserialize a QAT model (tfmot wrappers and our configs)."""
    with qkeras.quantize_scope(scope_objects()):
        yield


def _annotation(layer):
    if isinstance(layer, (HardSwish, HardSigmoid, ChannelGate, layers.Rescaling)):
        return OutputQuantizeConfig()
    return None  # tfmot's default registry (Conv+BN folding, per-channel or per-tensor weights)


def quantize_model(model: keras.Model, granularity: str = "per-channel") -> keras.Model:
    """A QAT copy of a float model (weights carried over), ready to compile and fine-tune."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")

    def annotate(layer):
        clone = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, keras.layers.InputLayer):
            return clone
        return qkeras.quantize_annotate_layer(clone, _annotation(layer))

    with keras.utils.custom_object_scope(CUSTOM_OBJECTS):
        annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    scheme = Default8BitQuantizeScheme(disable_per_axis=granularity == "per-tensor")
    with quant_scope():
        return qkeras.quantize_apply(annotated, scheme)
