"""Run any model format (Keras, TFLite, ONNX) on decoded uint8 frames and get head probabilities.

Every evaluation and comparison goes through here, so the same frames and the same decoding feed
each format; only the engine differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from semhinet_tf.data.views import average_views


def _strip(name: str) -> str:
    return name.removeprefix("quant_")


def predict_keras(model, frames: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Head probabilities (dict h1..h5, or 'leaf' for a flat model) for (N, S, S) uint8 frames."""
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(frames), batch_size):
        batch = frames[i:i + batch_size, :, :, None].astype(np.float32)
        out = model(batch, training=False)
        if not isinstance(out, dict):
            out = dict(zip(model.output_names, out if isinstance(out, (list, tuple)) else [out], strict=True))
        for k, v in out.items():
            outs.setdefault(_strip(k), []).append(np.asarray(v, np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def model_format(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir() or p.suffix in (".keras", ".h5"):
        return "keras"
    if p.suffix == ".tflite":
        return "tflite"
    if p.suffix == ".onnx":
        return "onnx"
    raise ValueError(f"{p}: unknown model format (expected a run directory, .keras, .tflite or .onnx)")


class Predictor:
    """Uniform front for the three formats: .input_size, .predict(frames) -> dict of head probabilities."""

    def __init__(self, path: str | Path, threads: int | None = None, allow_no_contract: bool = False):
        """`allow_no_contract`: run a .tflite without a contract on the defaults (said on stderr)."""
        self.path = Path(path)
        self.format = model_format(path)
        self.contract: dict | None = None
        self.spec = None  # the validated Contract of a .tflite / .onnx (artifacts.contract)
        if self.format == "keras":
            from semhinet_tf.model.io import load_model

            self._model = load_model(path)
            shape = tuple(self._model.inputs[0].shape)
            if len(self._model.inputs) != 1 or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1:
                raise ValueError(f"{self.path}: input shape {list(shape)}, expected grey square frames "
                                 f"[N, S, S, 1]; not a model written by `semhinet train`")
            self.input_size = int(shape[1])
            self.output_names = [_strip(n) for n in self._model.output_names]
        elif self.format == "tflite":
            from semhinet_tf.board.runtime import BoardModel

            self._model = BoardModel(path, threads=threads, allow_no_contract=allow_no_contract)
            self.input_size = self._model.input_size
            self.spec = self._model.spec
            self.contract = self._model.contract if self.spec.present else None
            self.output_names = list(self._model.output_details)
        else:
            from semhinet_tf.export.onnx import OnnxModel

            self._model = OnnxModel(path, threads=threads)
            self.input_size = self._model.input_size
            self.spec = self._model.spec
            self.contract = self._model.contract
            self.output_names = list(self._model.output_names)

    def predict(self, frames: np.ndarray, views: Sequence[str] = ("identity",)) -> dict[str, np.ndarray]:
        """Head probabilities for (N, S, S) uint8 frames, log-averaged over test-time `views`
        (semhinet_tf.data.views; `workflow.model_views` picks those the model was trained to ignore)."""
        return average_views(self._predict_one_view, frames, views)

    def _predict_one_view(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        if self.format == "keras":
            return predict_keras(self._model, frames)
        return self._model.predict_frames(frames)


def iter_chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
