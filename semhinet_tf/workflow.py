"""The multi-step jobs behind `eval`, `predict` and `quickstart`, shared by the CLI and by scripts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from semhinet_tf.taxonomy import Taxonomy


# ---------------------------------------------------------------- what a model file knows about itself
def find_run_dir(model_path: Path, contract: dict | None = None) -> Path | None:
    """The run directory a model belongs to: itself, its folder, or none."""
    for cand in (model_path, model_path.parent):
        if cand.is_dir() and (cand / "config.json").exists() and (cand / "taxonomy.json").exists():
            return cand
    return None


def model_context(predictor) -> tuple[Taxonomy, dict, Path | None]:
    """Taxonomy, preprocessing and run directory for any model format."""
    from semhinet_tf.data.decode import Preprocess

    run_dir = find_run_dir(predictor.path)
    if predictor.contract:
        tax = Taxonomy.from_spec(predictor.contract["taxonomy"]) if "taxonomy" in predictor.contract \
            else Taxonomy.default()
        pre = dict(predictor.contract.get("preprocess", {}))
    elif run_dir is not None:
        tax = Taxonomy.from_spec(json.loads((run_dir / "taxonomy.json").read_text()))
        pre = json.loads((run_dir / "config.json").read_text())["preprocess"]
    else:
        tax, pre = Taxonomy.default(), {}
    pre["size"] = predictor.input_size
    return tax, Preprocess.from_dict(pre).to_dict(), run_dir


# ---------------------------------------------------------------- eval
def eval_model(model: str | Path, data: str | Path, split: str | None = None, json_out: str | Path | None = None,
               report_dir: str | Path | None = None, target_purity: float = 0.99, progress: bool = True) -> dict:
    """Evaluate any model format on DATA; same JSON keys whatever the format."""
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.data.pipeline import decode_frames
    from semhinet_tf.evaluate import evaluate, format_summary_table, write_json
    from semhinet_tf.predict import Predictor

    model = Path(model)
    predictor = Predictor(model)
    taxonomy, pre, run_dir = model_context(predictor)
    items, split_used, notes = eval_items(data, taxonomy, run_dir, split)
    frames, bad = decode_frames([p for p, _ in items], Preprocess.from_dict(pre), progress=progress, desc="decode")
    bad_paths = {p for p, _ in bad}
    keep = np.array([str(p) not in bad_paths for p, _ in items], dtype=bool)
    paths = [str(p) for (p, _), k in zip(items, keep) if k]
    leaf_ids = np.array([taxonomy.leaf_index(leaf) for (_, leaf), k in zip(items, keep) if k], dtype=np.int64)
    frames = frames[keep]
    if bad:
        notes.append(f"{len(bad)} unreadable file(s) skipped, e.g. {bad[0][0]}: {bad[0][1]}")
    if not len(frames):
        raise ValueError(f"{data}: no readable images in the {split_used} split")
    probs = predictor.predict(frames)
    result = evaluate(leaf_ids, probs, taxonomy, model_name=str(model), fmt=predictor.format,
                      purity_target=target_purity)
    result["split"] = split_used
    if result.get("missing_classes"):
        notes.append(f"classes missing from this split: {', '.join(result['missing_classes'])}")
    if json_out:
        write_json(result, json_out)
        notes.append(f"metrics written to {json_out}")
    if report_dir:
        from semhinet_tf.report import write_report

        history = run_dir / "history.csv" if run_dir and (run_dir / "history.csv").exists() else None
        index = write_report(report_dir, result, paths, leaf_ids, probs, taxonomy, history_csv=history,
                             title=f"SEM-HiNet-TF evaluation: {model.name} ({predictor.format}, {split_used} split)")
        notes.append(f"report: {index}")
    table = format_summary_table({f"{model.name} ({predictor.format})": result})
    return {"result": result, "table": table, "notes": notes, "paths": paths, "leaf_ids": leaf_ids,
            "probs": probs}


# ---------------------------------------------------------------- predict
def predict_paths(model: str | Path, paths: Iterable[str | Path], threshold: float | None = None,
                  threads: int | None = None, batch_size: int = 32) -> Iterator[dict]:
    """Stream per-image verdicts for files and folders, any model format; bad files yield an 'error'."""
    from semhinet_tf.board.runtime import iter_image_paths
    from semhinet_tf.data.decode import ImageError, Preprocess, load_frame
    from semhinet_tf.predict import Predictor

    predictor = Predictor(model, threads=threads)
    taxonomy, pre_dict, _ = model_context(predictor)
    pre = Preprocess.from_dict(pre_dict)
    if threshold is None:
        threshold = float((predictor.contract or {}).get("review_threshold", _run_threshold(Path(model))))
    missing: list[Path] = []
    batch: list[tuple[Path, np.ndarray]] = []

    def flush():
        frames = np.stack([f for _, f in batch])
        results = taxonomy.decode(predictor.predict(frames), threshold)
        for (p, _), r in zip(batch, results):
            yield {"path": str(p), **r}
        batch.clear()

    for path in iter_image_paths(paths, on_missing=missing.append):
        try:
            batch.append((path, load_frame(path, pre)))
        except ImageError as exc:
            yield {"path": str(path), "error": exc.reason}
            continue
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()
    for p in missing:
        yield {"path": str(p), "error": "no such file or folder"}


def _run_threshold(model: Path, default: float = 0.5) -> float:
    run_dir = find_run_dir(model)
    if run_dir and (run_dir / "review_threshold.json").exists():
        return float(json.loads((run_dir / "review_threshold.json").read_text())["threshold"])
    return default


# ---------------------------------------------------------------- quickstart
def quickstart(out: str | Path, per_class: int = 150, img_size: int = 128, epochs: int = 25, qat_epochs: int = 4,
               seed: int = 0, weights: str = "sem", overwrite: bool = False) -> dict:
    """Synthetic data -> float + QAT training -> int8 TFLite -> eval of both on the held-out split."""
    from semhinet_tf.data.synth import generate
    from semhinet_tf.evaluate import format_summary_table, write_json
    from semhinet_tf.export.convert import convert_run
    from semhinet_tf.train import TrainConfig, train

    t0 = time.time()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (use --overwrite or another --out)")
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    data, run = out / "data", out / "run"
    print(f"[1/5] synthetic SEM data: {per_class} images x 8 classes -> {data}", flush=True)
    generate(data, per_class=per_class, size=256, seed=seed)
    print(f"[2/5] training at {img_size}px: {epochs} float + {qat_epochs} QAT epochs -> {run}", flush=True)
    cfg = TrainConfig(img_size=img_size, epochs=epochs, qat_epochs=qat_epochs, seed=seed, weights=weights)
    train_result = train(data, run, cfg)
    print("[3/5] converting to full-int8 TFLite", flush=True)
    conv = convert_run(run)
    print(conv["npu_report"].splitlines()[-1], flush=True)
    print("[4/5] evaluating float and int8 models on the held-out split", flush=True)
    float_eval = eval_model(run / "float.keras", data, split="val", json_out=run / "eval_float.json")
    int8_eval = eval_model(Path(conv["path"]), data, split="val", json_out=run / "eval_int8.json",
                           report_dir=run / "report")
    print("[5/5] summary", flush=True)
    results = {"float (Keras)": float_eval["result"], "int8 (TFLite)": int8_eval["result"]}
    table = format_summary_table(results)
    seconds = time.time() - t0
    summary = {"seconds": round(seconds, 1), "train": train_result, "tflite": conv["path"],
               "tflite_bytes": conv["bytes"], "npu_ok": conv["npu_ok"],
               "leaf_accuracy": {k: v["leaf"]["accuracy"] for k, v in results.items()}}
    write_json(summary, out / "quickstart_summary.json")
    return {"table": table, "seconds": seconds, "report": str(run / "report" / "index.html"), "summary": summary}
