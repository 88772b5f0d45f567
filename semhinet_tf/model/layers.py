"""Small Keras layers that quantization-aware training can wrap.

keras.applications writes hard-swish as `x + 3.0` (a TFOpLambda that tfmot cannot quantize) and uses
`layers.Multiply` for squeeze-excite (not in tfmot's registry). These layers compute the same
functions as real layers, so each gets a QuantizeConfig (see quant.py) and the TFLite converter
still fuses x * relu6(x + 3) / 6 into one HARD_SWISH operator.
"""

from __future__ import annotations

import tensorflow as tf

from semhinet_tf.model import keras


@keras.utils.register_keras_serializable(package="semhinet")
class HardSigmoid(keras.layers.Layer):
    """relu6(x + 3) / 6: the gate of squeeze-excite."""

    def call(self, inputs):
        return tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.utils.register_keras_serializable(package="semhinet")
class HardSwish(keras.layers.Layer):
    """x * relu6(x + 3) / 6, written so the converter emits a single HARD_SWISH op."""

    def call(self, inputs):
        return inputs * tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.utils.register_keras_serializable(package="semhinet")
class ChannelGate(keras.layers.Layer):
    """features * gate (broadcast over space): the excite step of squeeze-excite."""

    def call(self, inputs):
        features, gate = inputs
        return features * gate

    def compute_output_shape(self, input_shape):
        return input_shape[0]


CUSTOM_OBJECTS = {"HardSigmoid": HardSigmoid, "HardSwish": HardSwish, "ChannelGate": ChannelGate}
