"""SEM-HiNet-TF: hierarchical SEM defect classifier (MobileNetV3Small, five heads) for edge NPUs.

Importing this package never imports TensorFlow (the board runtime has none); it only makes sure
that, when TensorFlow is imported later, it uses tf-keras (Keras 2), which quantization-aware
training with tensorflow-model-optimization requires.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "decode_predictions", "Taxonomy"]


def _tensorflow_already_imported_without_legacy_keras() -> bool:
    return "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1"


def load_model(path, trust_code: bool = False, **options):
    """Load any model: a run directory (its best QAT or float model), .keras, .h5, .tflite or .onnx.

    Returns an Engine (semhinet_tf.engines): `predict(frames)` gives the dict h1..h5 of head probabilities for
    uint8 grayscale frames (N, S, S) or (N, S, S, 1) of raw pixel values 0..255, and `classify(paths)` decodes
    files and folders as the model was trained and yields the verdict rows `semhinet predict` prints (an
    unreadable file is a row with an 'error', in its place). A Keras model stays a Keras model: its engine
    answers `predict(batch, verbose=0)` and every other attribute (`inputs`, `summary()`, ...) as tf-keras does,
    and `keras_model` is the tf-keras model itself.

    A .keras/.h5 file holding a Lambda or a layer class our models are not built from is refused
    (UnsafeModelError, a ValueError): loading it would run its Python code. Pass `trust_code=True` only for a
    model you wrote. `options`: threads, views, review_threshold, allow_no_contract, progress (see
    semhinet_tf.engines.load_model).
    """
    from semhinet_tf.engines import load_model as _load

    return _load(path, trust_code=trust_code, **options)


def decode_predictions(outputs, taxonomy=None, review_threshold: float | None = None, run=None,
                       views: int = 1) -> list[dict]:
    """Turn `model.predict` outputs (dict h1..h5) into the per-image verdicts `semhinet predict` prints.

    With `run` (a run directory) its taxonomy and the review threshold chosen on validation for `views`
    test-time views are used, as `semhinet predict` does; otherwise the default taxonomy and 0.5.
    `taxonomy` and `review_threshold` override either."""
    import json
    from pathlib import Path

    from semhinet_tf.artifacts.run import TAXONOMY
    from semhinet_tf.taxonomy import Taxonomy as TaxonomyClass

    if run is not None:
        from semhinet_tf.workflow import review_threshold as run_threshold

        run = Path(run)
        if taxonomy is None:
            taxonomy = TaxonomyClass.from_spec(json.loads((run / TAXONOMY).read_text()))
        if review_threshold is None:
            review_threshold = run_threshold(None, run, views)
    tax = taxonomy if taxonomy is not None else TaxonomyClass.default()
    return tax.decode(outputs, 0.5 if review_threshold is None else review_threshold)


def __getattr__(name):
    if name == "Taxonomy":
        from semhinet_tf.taxonomy import Taxonomy

        return Taxonomy
    raise AttributeError(name)
