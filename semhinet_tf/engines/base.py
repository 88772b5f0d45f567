"""What every engine (Keras, TFLite, ONNX) does the same way: views, review threshold, batching, classifying files.

numpy, Pillow and the stdlib only: the board's TFLite engine (board/runtime.py BoardModel) is one of these
engines, and the board has no TensorFlow. An engine subclass says how to run one batch of frames (`_infer`) and
what the model knows about itself (a validated Contract: the one embedded in the .tflite / .onnx, or a run
directory's settings for a Keras model, see `run_settings`); everything else lives here, once.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np

from semhinet_tf.artifacts.contract import Contract
from semhinet_tf.data.decode import IMAGE_SUFFIXES, ImageError, load_frame
from semhinet_tf.data.scan import MISSING, Unreadable, scan_paths
from semhinet_tf.data.views import average_views, select_views, view_counts
from semhinet_tf.taxonomy import OOD_OUTPUT

__all__ = ["Engine", "find_run_dir", "iter_image_paths", "run_settings", "warn_stderr"]

PROGRESS_MIN_FRAMES = 256  # fewer frames than this take a second or two on any engine: no bar for them


class Engine:
    """One model behind the interface every command uses.

    `predict(frames)` gives the head probabilities (dict h1..h5 of (N, k) float32) for decoded uint8 frames,
    averaged over the test-time views chosen with `use_views`; `classify(paths)` decodes files and folders as the
    model was trained and yields one verdict row per image, the rows `semhinet predict` and the board print
    (an unreadable file, folder or missing path is a row with an 'error', in its place).
    Attributes: path, format ("keras" | "tflite" | "onnx"), input_size, spec (the validated Contract), taxonomy,
    preprocess (Preprocess), output_names, views (names in use), review_threshold.
    """

    format: ClassVar[str] = ""
    classify_batch: ClassVar[int] = 32  # images decoded and run together by `classify` (the board streams: 1)
    no_views_hint: ClassVar[str] = "it records no test-time views"

    path: Path
    input_size: int
    output_names: list[str]
    progress: bool = False
    warmup_ms: float | None = None

    # ---------------------------------------------------------------- set-up (called by subclasses)
    def _use_contract(self, spec: Contract, review_threshold: float | None = None, views: int = 1,
                      warn=None) -> None:
        """Take taxonomy, preprocessing, views and review threshold from `spec` (size from the model itself)."""
        self.spec = spec
        self.contract = spec.raw  # the contract as stored ({} when there is none)
        self.taxonomy = spec.taxonomy()
        self.preprocess = spec.preprocessing(self.input_size)
        self._warn = warn or warn_stderr
        self._fixed_threshold = review_threshold
        self.use_views(views)

    def offered_views(self) -> list[int]:
        """The view counts this model can be scored on (1 for a model whose training views are unknown)."""
        return view_counts(self.spec.view_names())

    def use_views(self, count: int) -> None:
        """Score each image on `count` views from now on, with the review threshold chosen for that count."""
        if count > 1 and self.spec.views is None:
            raise ValueError(f"{self.path}: {self.no_views_hint}")
        self.views = select_views(self.spec.views, count, str(self.path))
        if self._fixed_threshold is None and count > 1 and str(count) not in self.spec.review_threshold_by_views:
            self._warn(f"{self.path}: no review threshold was chosen for {count} views (trained before they were); "
                       f"using the one-view threshold")
        self.review_threshold = self._fixed_threshold if self._fixed_threshold is not None else \
            self.spec.threshold(count)

    # ---------------------------------------------------------------- inference
    def _infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """(N, S, S) uint8 frames -> dict of (N, k) float32 head probabilities, one view."""
        raise NotImplementedError

    def predict(self, frames: np.ndarray, views: list[str] | None = None, *, batch_size: int = 256,
                verbose: int | str | None = None) -> dict[str, np.ndarray]:
        """Head probabilities for (N, S, S) (or Keras-style (N, S, S, 1)) uint8 frames of raw pixels 0..255.

        `views`: view names to log-average over (default: those chosen with `use_views`). `verbose` is accepted
        as Keras' `predict` accepts it: 0 hides the progress bar that long runs show on stderr."""
        return self.predict_with_ood(frames, views, batch_size=batch_size, verbose=verbose)[0]

    def predict_with_ood(self, frames: np.ndarray, views: list[str] | None = None, *, batch_size: int = 256,
                         verbose: int | str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """(head probabilities as `predict` gives them, the unfamiliar-frame score of each frame (N,) or None
        for a model without one). Over several views the score is their mean."""
        frames = np.asarray(frames)
        if frames.ndim == 4 and frames.shape[-1] == 1:
            frames = frames[..., 0]
        size = self.input_size
        if frames.ndim != 3 or frames.shape[1:] != (size, size):
            raise ValueError(f"{self.path}: frames have shape {frames.shape}, expected (N, {size}, {size})")
        if not len(frames):
            return {h.name: np.zeros((0, h.num_classes), np.float32) for h in self.taxonomy.heads}, None
        views = list(self.views if views is None else views)
        show = self.progress and verbose != 0 and len(frames) * len(views) >= PROGRESS_MIN_FRAMES
        bar = None
        if show:  # host only: the bar needs tqdm, which the board does not have (its `progress` stays off)
            from semhinet_tf.progress import bar as progress_bar

            bar = progress_bar(len(frames) * len(views), desc=f"inference ({self.format})", unit="frame")
        parts: dict[str, list[np.ndarray]] = {}
        try:
            for i in range(0, len(frames), batch_size):
                chunk = frames[i:i + batch_size]
                out = average_views(lambda x: self._counted(x, bar), chunk, views)
                for name, value in out.items():
                    parts.setdefault(name, []).append(value)
        finally:
            if bar is not None:
                bar.close()
        out = {name: np.concatenate(values) for name, values in parts.items()}
        ood = out.pop(OOD_OUTPUT, None)
        return out, None if ood is None else ood.reshape(len(frames)).astype(np.float32)

    def _counted(self, frames: np.ndarray, bar) -> dict[str, np.ndarray]:
        out = self._infer(frames)
        if bar is not None:
            bar.update(len(frames))
        return out

    def warm_up(self) -> float:
        """Run one frame once (an NPU compiles its graph on the first inference); its milliseconds."""
        t = time.perf_counter()
        self._infer(np.zeros((1, self.input_size, self.input_size), np.uint8))
        self.warmup_ms = (time.perf_counter() - t) * 1000
        return self.warmup_ms

    # ---------------------------------------------------------------- files
    def classify(self, paths: str | Path | Iterable[str | Path], batch_size: int | None = None,
                 on_missing=None) -> Iterator[dict]:
        """Stream one verdict row per image below `paths` (files and folders, see `iter_image_paths`).

        A row holds path, verdict, family, class, probability, review, ready (the class is ready for automatic
        classification; if not, review is set), heads, leaf_probabilities, decode_ms and infer_ms (a batch's
        inference time shared among its images); a file that cannot be decoded, or an entry the scan could not
        read, is a row {"path", "error"} in its place. A missing path goes to
        `on_missing(path)` when given, else it is such a row too."""
        batch_size = batch_size or self.classify_batch
        if self.warmup_ms is None:
            self.warm_up()
        pending: list[dict | tuple[Path, np.ndarray, float]] = []  # error rows wait with the frames: paths' order
        frames = 0
        for path in iter_image_paths(paths, on_missing=on_missing):
            if isinstance(path, Unreadable):
                pending.append({"path": str(path.path), "error": path.reason})
            else:
                t0 = time.perf_counter()
                try:
                    pending.append((path, load_frame(path, self.preprocess), (time.perf_counter() - t0) * 1000))
                    frames += 1
                except ImageError as exc:
                    pending.append({"path": str(path), "error": exc.reason})
            if frames >= batch_size or (not frames and pending):
                yield from self._verdicts(pending)
                frames = 0
        yield from self._verdicts(pending)

    def verdicts(self, frames: np.ndarray) -> list[dict]:
        """One verdict row per frame for frames the caller decoded ((N, S, S) uint8, as `predict` takes them):
        the rows `classify` gives without path and timings. `review` is set as the board sets it: under the
        review threshold, a class the contract does not list as ready, or a frame the unfamiliar-frame score
        flags (`ready`, `unfamiliar` and `ood` say which)."""
        probs, ood = self.predict_with_ood(frames, verbose=0)
        rows = self.taxonomy.decode(probs, self.review_threshold)
        if ood is not None:
            for row, score in zip(rows, ood):  # noqa: B905 (one score a frame, from the same batch)
                # the contract's threshold has 6 decimals: the row shows the number it was compared with
                row["ood"] = round(float(score), 6)
        if len(rows) != len(frames):  # zip(strict=True) is Python 3.10+; the armv7 board runs 3.9
            raise RuntimeError(f"{self.path}: {len(rows)} verdicts for {len(frames)} frames")
        return [self._readiness(row) for row in rows]

    def _verdicts(self, pending: list[dict | tuple[Path, np.ndarray, float]]) -> Iterator[dict]:
        """The rows of `pending` in order (emptying it): error rows as they are, frames run as one batch."""
        batch = [item for item in pending if not isinstance(item, dict)]
        rows: list[dict] = []
        if batch:
            t = time.perf_counter()
            rows = self.verdicts(np.stack([frame for _, frame, _ in batch]))
            infer_ms = (time.perf_counter() - t) * 1000 / len(batch)
        verdicts = iter(zip(batch, rows))  # noqa: B905 (one row a frame, checked in verdicts)
        items = list(pending)
        pending.clear()
        for item in items:
            if isinstance(item, dict):
                yield item
                continue
            (path, _, decode_ms), row = next(verdicts)
            yield {"path": str(path), **row, "decode_ms": round(decode_ms, 2), "infer_ms": round(infer_ms, 2)}

    def _readiness(self, row: dict) -> dict:
        """A verdict of a class the contract does not list as ready goes to review whatever its probability
        (issue 24.5): its automatic verdicts were not shown to reach the target purity, or it had too few
        labelled frames to tell. So does a frame whose unfamiliar-frame score is above the contract's threshold
        (issue 26.4: unlike anything the model was trained on). `ready` and `unfamiliar` say which rule flagged
        a row."""
        ready = self.spec.is_ready(row["class"])
        out = {**row, "ready": ready}
        unfamiliar = False
        if self.spec.ood is not None:
            unfamiliar = self.spec.is_unfamiliar(row["class"], row.get("ood"))
            out["unfamiliar"] = unfamiliar
        out["review"] = bool(row["review"] or not ready or unfamiliar)
        return out


def warn_stderr(message: str) -> None:
    """Where engines say what the user should know (a missing digest, defaults in use) unless told otherwise."""
    print(message, file=sys.stderr)


def iter_image_paths(items: Iterable[str | Path], on_missing=None) -> Iterator[Path | Unreadable]:
    """Files as given, and image files below folders (name order, recursive), streamed.

    What cannot be read (an unreadable folder, a symlink loop, a broken link) is yielded in its place as an
    `Unreadable` (path, reason): report it, never drop it. A missing item goes to `on_missing(path)` when
    given, else it is yielded as Unreadable too."""
    for entry in scan_paths([items] if isinstance(items, (str, Path)) else items, IMAGE_SUFFIXES):
        if isinstance(entry, Unreadable) and entry.reason == MISSING and on_missing is not None:
            on_missing(entry.path)
        else:
            yield entry


# ---------------------------------------------------------------- what a model file knows from its run
def find_run_dir(model_path: str | Path) -> Path | None:
    """The run directory a model belongs to: itself, its folder, or none."""
    from semhinet_tf.artifacts.run import CONFIG, TAXONOMY

    model_path = Path(model_path)
    for cand in (model_path, model_path.parent):
        if cand.is_dir() and (cand / CONFIG).exists() and (cand / TAXONOMY).exists():
            return cand
    return None


def run_settings(run_dir: Path) -> Contract:
    """What `semhinet convert` would put in a contract, read from the run directory: its taxonomy, preprocessing,
    test-time views and the review thresholds chosen on validation. For a model that carries no contract (a
    Keras model, a contract-less ONNX export) but lives in its run. `present` stays False: nothing is embedded."""
    from semhinet_tf.artifacts.contract import DEFAULT_REVIEW_THRESHOLD
    from semhinet_tf.artifacts.run import CONFIG, TAXONOMY, validation_threshold, validation_thresholds_by_views
    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.data.views import invariant_views

    config = json.loads((run_dir / CONFIG).read_text())
    one = validation_threshold(run_dir, DEFAULT_REVIEW_THRESHOLD)
    by_views = validation_thresholds_by_views(run_dir, DEFAULT_REVIEW_THRESHOLD)
    return Contract(taxonomy_spec=json.loads((run_dir / TAXONOMY).read_text()),
                    preprocess=Preprocess.from_dict(config.get("preprocess")).to_dict(),
                    views=tuple(invariant_views(config.get("train", {}).get("augment"))),
                    review_threshold=one, review_threshold_by_views=by_views, present=False)
