"""Model building (backbone, heads), quantization-aware training helpers and model files.

`keras` here is always tf-keras (Keras 2): tensorflow-model-optimization does not support Keras 3.
Import of this package imports TensorFlow; the board runtime never imports it.
"""

from __future__ import annotations

import os

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":  # pragma: no cover - semhinet_tf/__init__ sets it
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tf_keras as keras  # noqa: E402

__all__ = ["keras"]
