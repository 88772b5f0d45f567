"""`semhinet convert`: a run directory -> int8 .tflite with its contract embedded, checked for the NPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.contract import CONTRACT_FORMAT, ModelRefusedError, build_contract, embed_sealed
from semhinet_tf.artifacts.files import atomic_write_bytes, check_outputs, write_json
from semhinet_tf.artifacts.run import (
    CONFIG,
    FLOAT_MODEL,
    INT8_FLOAT_HEADS_MODEL,
    INT8_MODEL,
    QAT_MODEL,
    TAXONOMY,
    claims_run,
    conversion_files,
    model_inputs,
    validation_target_purity,
    validation_threshold,
    validation_thresholds_by_views,
)
from semhinet_tf.data.views import invariant_views
from semhinet_tf.evaluate import DEFAULT_READY_MIN_FRAMES

__all__ = ["CONTRACT_FORMAT", "calibration_frames", "convert_run", "run_contract"]


def calibration_frames(frames: np.ndarray, leaf_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n frames drawn class-balanced (round-robin over classes) from the training split."""
    rng = np.random.default_rng([seed, 4242])
    by_class = [rng.permutation(np.flatnonzero(leaf_ids == c)) for c in np.unique(leaf_ids)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(ix) for ix in by_class):
        picked += [int(ix[depth]) for ix in by_class if depth < len(ix)]
        depth += 1
    return frames[np.array(picked[:n], dtype=np.int64)]


def run_contract(run_dir: Path, config: dict, taxonomy_spec: dict, *, img_size: int, io_type: str,
                 quantization: dict | None, review_threshold: float, batch: int = 1, digest: bool = True,
                 ready_classes: list[str] | None = None, ood: dict | None = None) -> dict:
    """The contract of a model converted from RUN (artifacts.contract.build_contract with the run's facts)."""
    from semhinet_tf import __version__
    from semhinet_tf.artifacts.trained_frames import build as record_trained_frames

    return build_contract(
        run_id=f"{run_dir.resolve().name}@{config.get('created', '')}".rstrip("@"), taxonomy_spec=taxonomy_spec,
        img_size=img_size, io_type=io_type, preprocess=config["preprocess"],
        views=invariant_views(config.get("train", {}).get("augment")), review_threshold=review_threshold,
        review_threshold_by_views=validation_thresholds_by_views(run_dir), quantization=quantization,
        version=__version__, batch=batch, digest=digest, ready_classes=ready_classes, ood=ood,
        trained_frames=record_trained_frames(d) if (d := _training_digests(run_dir)) else None)


def _training_digests(run_dir: Path) -> list[str]:
    """sha256 of every frame of RUN's training split (none when its manifest or split cannot be read)."""
    from semhinet_tf.data.discover import Manifest, load_split

    try:
        train = set(load_split(run_dir)["train"])
        return [e.sha256 for e in Manifest.load(run_dir).entries if e.path in train and e.sha256]
    except (OSError, ValueError, KeyError, TypeError):
        return []


@claims_run(shared=True, busy="convert it when that training has ended")
def convert_run(run_dir: str | Path, out: str | Path | None = None, io_type: str = "uint8", calib_samples: int = 200,
                source: str = "qat", review_threshold: float | None = None,
                overwrite: bool = False, progress: bool = True, granularity: str | None = None,
                float_heads: bool = False, ready_min_frames: int | None = None, ood: bool = True) -> dict:
    """Convert RUN's QAT (or float, as PTQ) model; write .tflite + contract JSON; run the NPU check.

    `float_heads`: int8 backbone for the NPU, heads in float on the CPU (a DEQUANTIZE after the pooled
    features), from the QAT model; npu-check then lists the heads' CPU operators.
    The contract lists the classes ready for automatic classification (issue 24.5): the converted model itself is
    scored on the run's validation split at its review threshold, and a class with fewer than `ready_min_frames`
    (default 30) validation frames, or whose automatic verdicts fall under the run's target purity, is left out,
    so the board sends its verdicts to review.

    `ood`: fit the unfamiliar-frame score (semhinet_tf.model.ood) on the training split's pooled features, add it
    to the model as output `ood`, and put in the contract the threshold that OOD_FALSE_ALARM of the validation
    split's normal frames exceed (with the converted model's own scores)."""
    from semhinet_tf.data.dataset import load_split_frames
    from semhinet_tf.export.npu import check_npu
    from semhinet_tf.export.tflite import convert_int8
    from semhinet_tf.export.tflite_meta import read_contract
    from semhinet_tf.model.io import load_model
    from semhinet_tf.model.ood import feature_tap
    from semhinet_tf.progress import step
    from semhinet_tf.taxonomy import Taxonomy

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.json); make one with `semhinet train`")
    config = json.loads((run_dir / CONFIG).read_text())
    taxonomy = Taxonomy.from_spec(json.loads((run_dir / TAXONOMY).read_text()))
    model_file = run_dir / (QAT_MODEL if source == "qat" else FLOAT_MODEL)
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file}: not found (train with --qat-epochs > 0, or convert --source float)")
    out = Path(out) if out else run_dir / (INT8_FLOAT_HEADS_MODEL if float_heads else INT8_MODEL)
    # the model, its contract and its NPU report, before any work; never one of the run's own files
    # (and no frame or dataset.json of the data set it calibrates on)
    check_outputs(conversion_files(out), overwrite, inputs=[*model_inputs(run_dir), config.get("data_dir")])
    out.parent.mkdir(parents=True, exist_ok=True)  # its temporary readiness model is written beside it
    trained = config["train"].get("granularity", "per-channel")
    granularity = granularity or (trained if source == "qat" else "per-channel")
    if source == "qat" and granularity != trained:
        raise ValueError(f"{run_dir}: the QAT model was trained {trained}; retrain with --granularity {granularity} "
                         f"or convert the float model with --source float --granularity {granularity}")
    if float_heads and source != "qat":
        raise ValueError(f"{run_dir}: --float-heads converts the QAT model (--source qat)")
    img_size = int(config["model"]["img_size"])
    model = load_model(model_file)
    if float_heads:
        from semhinet_tf.model.heads import ModelConfig
        from semhinet_tf.model.quant import qat_base, with_float_heads

        template = qat_base(load_model(run_dir / FLOAT_MODEL), taxonomy, ModelConfig.from_dict(config["model"]),
                            granularity)
        model = with_float_heads(model, template, granularity)
    frames, leaf_ids = load_split_frames(run_dir, "train", progress=progress)
    calib = calibration_frames(frames, leaf_ids, calib_samples, int(config["train"]["seed"]))
    fit = fit_unfamiliar(model, frames, leaf_ids, taxonomy, progress) if ood else None

    def converted(fit) -> bytes:
        return convert_int8(feature_tap(model) if fit else model, img_size, taxonomy.head_names,
                            lambda: iter(calib), io_type=io_type, per_tensor=granularity == "per-tensor",
                            float_heads=float_heads, progress=progress, calibration_size=len(calib), ood=fit)

    tflite = converted(fit)
    if review_threshold is None:
        review_threshold = validation_threshold(run_dir)
    quantization = {"source": source, "granularity": granularity, "io": io_type, "float_heads": float_heads}
    contract = run_contract(run_dir, config, taxonomy.to_spec(), img_size=img_size, io_type=io_type,
                            quantization=quantization, review_threshold=review_threshold)
    min_frames = DEFAULT_READY_MIN_FRAMES if ready_min_frames is None else ready_min_frames
    try:
        readiness = _readiness(run_dir, embed_sealed(tflite, contract), out, taxonomy, review_threshold, min_frames,
                               progress, fit)
    except ModelRefusedError as exc:
        if fit is None:
            raise
        # A model whose pooled features hardly vary (untrained, collapsed) gives the score int8 scales an
        # interpreter refuses: the classifier is still delivered, without the score, and the user told why.
        from semhinet_tf.engines.base import warn_stderr

        warn_stderr(f"{run_dir}: no unfamiliar-frame score: the int8 model with it does not load ({exc}); "
                    f"converting without it")
        fit, tflite = None, converted(None)
        readiness = _readiness(run_dir, embed_sealed(tflite, contract), out, taxonomy, review_threshold, min_frames,
                               progress)
    contract = run_contract(run_dir, config, taxonomy.to_spec(), img_size=img_size, io_type=io_type,
                            quantization=quantization, review_threshold=review_threshold,
                            ready_classes=readiness["ready"], ood=readiness.get("ood"))
    tflite = embed_sealed(tflite, contract)
    contract = read_contract(tflite)  # as embedded: with its digest
    atomic_write_bytes(out, tflite)
    _, contract_path, npu_path = conversion_files(out)
    write_json(contract, contract_path)
    with step("checking the operators for the NPU", enabled=progress):
        report = check_npu(out, allow_float_tail=float_heads)
    write_json(report.to_dict(), npu_path)
    return {"path": str(out), "bytes": len(tflite), "contract_path": str(contract_path),
            "npu_ok": report.ok, "npu_report": report.format(limit=40), "readiness": readiness}


def fit_unfamiliar(model, frames: np.ndarray, leaf_ids: np.ndarray, taxonomy, progress: bool):
    """The unfamiliar-frame score fitted on `model`'s pooled features of the training frames (model.ood.fit_ood);
    None, with a warning, when the training split has too few frames outside bogus to fit it."""
    from semhinet_tf.engines.base import warn_stderr
    from semhinet_tf.model.ood import feature_tap, fit_ood, pooled_features
    from semhinet_tf.progress import step

    with step(f"fitting the unfamiliar-frame score on {len(frames)} training frames", enabled=progress):
        features, widths = pooled_features(feature_tap(model).predict(frames[..., None], batch_size=32, verbose=0))
    try:
        return fit_ood(features, leaf_ids, taxonomy.leaves, widths=widths)
    except ValueError as exc:
        warn_stderr(f"no unfamiliar-frame score: {exc}")
        return None


def ood_contract(fit, scores: np.ndarray, leaf_ids: np.ndarray, taxonomy) -> dict | None:
    """The contract's `ood` block: the threshold that OOD_FALSE_ALARM of the validation frames of the normal class
    (of every fitted class when the taxonomy has no `normal` leaf or the split none of its frames) exceed."""
    from semhinet_tf.model.ood import OOD_FALSE_ALARM, OOD_OUTPUT, threshold_at

    fitted = [taxonomy.leaves.index(leaf) for leaf in fit.leaves]
    reference = [taxonomy.leaves.index("normal")] if "normal" in taxonomy.leaves else fitted
    mask = np.isin(leaf_ids, reference)
    if not mask.any():
        mask = np.isin(leaf_ids, fitted)
    if not mask.any():
        return None
    return {"output": OOD_OUTPUT, "threshold": round(threshold_at(scores[mask]), 6), "false_alarm": OOD_FALSE_ALARM,
            "leaves": list(fit.leaves), "dims": fit.dims, "frames": fit.frames, "reference_frames": int(mask.sum()),
            "method": "whitened distance to the nearest class mean (shared covariance) / dims, plus the features' "
                      "energy outside those directions over its training mean (semhinet_tf.model.ood)"}


def _readiness(run_dir: Path, model_bytes: bytes, out: Path, taxonomy, threshold: float, min_frames: int,
               progress: bool, fit=None) -> dict:
    """Class readiness of the converted model (evaluate.class_readiness) on RUN's validation split: the model is
    run from a temporary file beside `out`, removed afterwards, so no model without its ready list is ever left
    where a board could pick it up. With `fit`, also the contract's `ood` block (ood_contract) under "ood"."""
    import os
    import tempfile

    from semhinet_tf.board.runtime import BoardModel
    from semhinet_tf.data.dataset import load_split_frames
    from semhinet_tf.evaluate import class_readiness

    frames, leaf_ids = load_split_frames(run_dir, "val", progress=progress)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".readiness.tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model_bytes)
        engine = BoardModel(tmp, review_threshold=threshold, progress=progress, warn=lambda _: None)
        probs, scores = engine.predict_with_ood(frames)
    finally:
        Path(tmp).unlink(missing_ok=True)
    leaf_p = taxonomy.leaf_probabilities(probs) if len(frames) else np.zeros((0, len(taxonomy.leaves)))
    result = class_readiness(leaf_ids, leaf_p, taxonomy.leaves, threshold, validation_target_purity(run_dir),
                             min_frames)
    if fit is not None and scores is not None:
        result["ood"] = ood_contract(fit, scores, leaf_ids, taxonomy)
    return result
