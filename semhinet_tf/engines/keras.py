"""The Keras engine: a float or QAT tf-keras model (a run directory, .keras or .h5) behind the Engine interface.

It is also the Keras model: attributes the engine does not define (`inputs`, `layers`, `summary()`, ...) are the
wrapped model's, and `predict(batch, verbose=0)` takes Keras' (N, S, S, 1) batches and returns the head dict as
Keras' own predict does; `keras_model` is the tf-keras model itself, for training or saving. The taxonomy,
preprocessing, views and review thresholds come from the model's run directory (see `run_settings`); a bare
model file outside any run runs on the defaults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.contract import default_contract
from semhinet_tf.engines.base import Engine, find_run_dir, run_settings

KERAS_BATCH = 64  # frames per call of the model: bounded memory at any input size


def strip_quant(name: str) -> str:
    """tfmot names a QAT model's outputs quant_h1..; the heads are h1.. in every format."""
    return name.removeprefix("quant_")


def predict_keras(model, frames: np.ndarray, batch_size: int = KERAS_BATCH) -> dict[str, np.ndarray]:
    """Head probabilities (dict h1..h5, or 'leaf' for a flat model) of a tf-keras model for (N, S, S) uint8 frames.

    For training and experiments that hold a bare tf-keras model; everything else goes through an Engine."""
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(frames), batch_size):
        batch = frames[i:i + batch_size, :, :, None].astype(np.float32)
        out = model(batch, training=False)
        if not isinstance(out, dict):
            out = dict(zip(model.output_names, out if isinstance(out, (list, tuple)) else [out], strict=True))
        for k, v in out.items():
            outs.setdefault(strip_quant(k), []).append(np.asarray(v, np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


class KerasEngine(Engine):
    """A tf-keras model of this package, loaded only after the safe-load check (model.io.load_model)."""

    format = "keras"
    no_views_hint = "a model file outside its run directory knows no test-time views; load the run directory"

    def __init__(self, path: str | Path, review_threshold: float | None = None, views: int = 1,
                 trust_code: bool = False, progress: bool = False, warn=None):
        from semhinet_tf.model.io import load_model, resolve_model_file

        self.path = Path(path)
        self.model_file = resolve_model_file(path)
        self.keras_model = load_model(self.model_file, trust_code=trust_code)
        shape = tuple(self.keras_model.inputs[0].shape)
        if len(self.keras_model.inputs) != 1 or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1:
            raise ValueError(f"{self.path}: input shape {list(shape)}, expected grey square frames "
                             f"[N, S, S, 1]; not a model written by `semhinet train`")
        self.input_size = int(shape[1])
        self.output_names = [strip_quant(n) for n in self.keras_model.output_names]
        self.progress = progress
        self.run_dir = find_run_dir(self.path) or find_run_dir(self.model_file)
        spec = run_settings(self.run_dir) if self.run_dir is not None else default_contract()
        spec.taxonomy().check_outputs(self.output_names, str(self.path))
        self._use_contract(spec, review_threshold, views, warn)

    def _infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        return predict_keras(self.keras_model, frames)

    def warm_up(self) -> float:
        """Nothing to compile ahead on the host: no warm-up run (it would only cost a graph trace)."""
        self.warmup_ms = 0.0
        return self.warmup_ms

    def __getattr__(self, name: str):
        # only called for names the engine lacks: the rest of the Keras model's interface
        if name == "keras_model":  # not set yet (failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.keras_model, name)
