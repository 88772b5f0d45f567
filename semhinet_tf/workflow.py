"""The multi-step jobs behind `eval`, `predict` and `quickstart`, shared by the CLI and by scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.files import check_outputs
from semhinet_tf.artifacts.run import CONFIG, FLOAT_MODEL, HISTORY, QAT_MODEL, model_inputs
from semhinet_tf.data.decode import Preprocess
from semhinet_tf.taxonomy import Taxonomy


# ---------------------------------------------------------------- what a run knows about its model
def run_views(run_dir: str | Path) -> list[str]:
    """The test-time views a run's model may be averaged over (those its training augmentation taught it to
    ignore), for scripts that call `model.predict` themselves."""
    from semhinet_tf.data.views import invariant_views

    config = json.loads((Path(run_dir) / CONFIG).read_text())
    return invariant_views(config.get("train", {}).get("augment"))


# ---------------------------------------------------------------- eval
def trained_on(paths: list[str], run_dir: Path | None) -> int:
    """How many of `paths` are byte for byte (sha256) a frame of the run's training split: a copy of the training
    folder evaluated as if it were new data."""
    from semhinet_tf.artifacts.files import file_sha256
    from semhinet_tf.data.discover import Manifest, load_split

    if run_dir is None:
        return 0
    try:
        train = set(load_split(run_dir)["train"])
        hashes = {e.sha256 for e in Manifest.load(run_dir).entries if e.path in train and e.sha256}
    except (OSError, ValueError, KeyError):
        return 0
    count = 0
    for p in paths:
        try:
            count += file_sha256(p) in hashes
        except OSError:
            continue
    return count


def load_engine(model: str | Path, progress: bool = True, clock: bool | None = None, **options):
    """engines.load_model for a command: a Keras model takes 10-35 s to load (TensorFlow, then the model), so a
    clock shows while it does (with `progress`, or `clock`), and a command does not look hung."""
    import contextlib

    from semhinet_tf.engines import load_model, model_format
    from semhinet_tf.progress import step

    slow = model_format(model) == "keras" and (progress if clock is None else clock)
    with step(f"loading {model} with TensorFlow") if slow else contextlib.nullcontext():
        return load_model(model, progress=progress, **options)


def _recorded_training_frames(paths: list[str], record: dict | None) -> np.ndarray:
    """For each path, whether the contract's record of training frames (artifacts.trained_frames) holds it."""
    from semhinet_tf.artifacts.files import file_sha256
    from semhinet_tf.artifacts.trained_frames import contains

    if record is None:
        return np.zeros(len(paths), dtype=bool)
    return np.array([contains(record, file_sha256(p)) for p in paths], dtype=bool)


def decode_items(items: list, pre: Preprocess, taxonomy: Taxonomy, notes: list[str], progress: bool = True):
    """Decode (path, leaf) items with the model's preprocessing (an engine's `preprocess`); unreadable files are
    noted and dropped."""
    from semhinet_tf.data.pipeline import decode_frames

    frames, bad = decode_frames([p for p, _ in items], pre, progress=progress, desc="decode")
    bad_paths = {p for p, _ in bad}
    keep = np.array([str(p) not in bad_paths for p, _ in items], dtype=bool)
    paths = [str(p) for (p, _), k in zip(items, keep, strict=True) if k]
    leaf_ids = np.array([taxonomy.leaf_index(leaf) for (_, leaf), k in zip(items, keep, strict=True) if k],
                        dtype=np.int64)
    if bad:
        notes.append(f"{len(bad)} unreadable file(s) skipped, e.g. {bad[0][0]}: {bad[0][1]}")
    return frames[keep], paths, leaf_ids


def eval_model(model: str | Path, data: str | Path, split: str | None = None, json_out: str | Path | None = None,
               report_dir: str | Path | None = None, target_purity: float = 0.99, progress: bool = True,
               run_dir: str | Path | None = None, views: int = 1, allow_no_contract: bool = False,
               overwrite: bool = False, ready_min_frames: int | None = None,
               attributes: Sequence[str | Path] = ()) -> dict:
    """Evaluate any model format on DATA; same JSON keys whatever the format.

    `run_dir` names the run whose saved split to use when the model file lives elsewhere; `views` > 1
    averages that many test-time flips/rotations (semhinet_tf.data.views); `allow_no_contract` runs a
    .tflite without a contract (see BoardModel). The JSON and report files are checked before any work:
    existing ones are refused unless `overwrite`. `attributes` are CSVs of numbers per file (read, and refused
    with AttributeFileError, before any work); with DATA's synth dataset.json they give recall by tercile
    (semhinet_tf.attributes) under "attributes" in the result."""
    from semhinet_tf.attributes import read_attribute_csv
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.engines import find_run_dir
    from semhinet_tf.evaluate import evaluate, format_summary_table, write_json
    from semhinet_tf.report import REPORT_FILES

    check_outputs([json_out, *(Path(report_dir) / name for name in REPORT_FILES)] if report_dir else [json_out],
                  overwrite, inputs=[*model_inputs(model), data, *attributes])
    attribute_tables = [read_attribute_csv(p) for p in attributes]
    model = Path(model)
    engine = load_engine(model, views=views, allow_no_contract=allow_no_contract, progress=progress)
    taxonomy = engine.taxonomy
    run_dir = Path(run_dir) if run_dir is not None else find_run_dir(model)
    items, split_used, notes = eval_items(data, taxonomy, run_dir, split)
    frames, paths, leaf_ids = decode_items(items, engine.preprocess, taxonomy, notes, progress)
    record = getattr(getattr(engine, "spec", None), "trained_frames", None) if run_dir is None else None
    recorded = _recorded_training_frames(paths, record)
    if recorded.any() and split is None:  # a deployed copy: what its run's split would have held out
        keep = ~recorded
        if not keep.any():
            raise ValueError(f"{data}: every frame of it is one {model} was trained on (the record in its contract); "
                             f"score frames it has not seen, or pass --split all")
        frames, leaf_ids = frames[keep], np.asarray(leaf_ids)[keep]
        paths = [p for p, k in zip(paths, keep) if k]  # noqa: B905 (one flag a path)
        split_used = "unseen"
        notes.append(f"left out {int(recorded.sum())} frames {model} was trained on (by the record of its training "
                     f"frames in its contract, which takes a new frame for one with probability "
                     f"{record['false_match']:.1g}); --split all scores them too")
    if not len(frames):
        raise ValueError(f"{data}: no readable images in the {split_used} split")
    which = {"val": "the run's held-out split", "unseen": "those the model was not trained on"}.get(
        split_used, f"{split_used} split")
    notes.insert(0, f"scored {len(frames)} frames of {data} ({which})")
    notes.extend(still_training_warning(run_dir))
    seen = trained_on(paths, run_dir) if split_used != "val" else 0
    if recorded.any() and split_used != "unseen":  # --split all on a deployed copy (no run: `seen` is 0)
        notes.insert(1, f"warning: {int(recorded.sum())} of these {len(frames)} frames are frames the model trained "
                        f"on (the record in its contract): the figures flatter it")
    elif run_dir is None and record is None:  # a model copied out of its run ("the file alone is the deployment")
        notes.insert(1, f"warning: no run directory found for {model} (beside it, or --run RUN), so nothing tells "
                        f"its training frames from new ones: if {data} holds frames it was trained on, these "
                        f"figures flatter it (give --run RUN to score only that run's held-out split)")
    if seen:
        notes.insert(1, f"warning: {seen} of these {len(frames)} frames are byte for byte frames the model trained "
                        f"on ({run_dir}'s training split): the figures flatter it; score a separate test set, or the "
                        f"run's own data folder (its held-out split)")
    probs, ood_scores = engine.predict_with_ood(frames)
    from semhinet_tf.evaluate import DEFAULT_READY_MIN_FRAMES, unfamiliar_section

    # a run directory stands for its best model: name the file that was scored (qat.h5, else float.keras)
    scored = getattr(engine, "model_file", model)
    result = evaluate(leaf_ids, probs, taxonomy, model_name=str(scored), fmt=engine.format,
                      purity_target=target_purity, review_threshold=engine.review_threshold,
                      ready_min_frames=DEFAULT_READY_MIN_FRAMES if ready_min_frames is None else ready_min_frames)
    result["split"] = split_used
    ready = result["readiness"]
    not_ready = [f"{leaf} ({c['why_not']})" for leaf, c in ready["classes"].items() if not c["ready"]]
    notes.append(f"ready for automatic classification at threshold {ready['threshold']:.3f} and purity "
                 f"{ready['target_purity']:g}: {', '.join(ready['ready']) or 'no class'}"
                 + (f"; not ready: {'; '.join(not_ready)}" if not_ready else ""))
    result["views"] = engine.views
    if ood_scores is not None and engine.spec.ood is not None:
        result["unfamiliar"] = unfamiliar_section(leaf_ids, ood_scores, engine.spec.ood, taxonomy.leaves)
        result["unfamiliar"]["scores"] = [round(float(v), 4) for v in ood_scores]
        flagged = {leaf: c for leaf, c in result["unfamiliar"]["classes"].items() if c["n"]}
        notes.append("unfamiliar-frame score above the contract's " + f"{engine.spec.ood['threshold']:.3g}: "
                     + ", ".join(f"{leaf} {c['above']}/{c['n']}" for leaf, c in flagged.items()))
    attributes_text = _attributes(result, data, attribute_tables, paths, leaf_ids, probs, taxonomy, notes)
    if result.get("missing_classes"):
        notes.append(f"classes missing from this split: {', '.join(result['missing_classes'])}")
    if json_out:
        write_json(result, json_out)
        notes.append(f"metrics written to {json_out}")
    if report_dir:
        from semhinet_tf.report import write_report

        history = run_dir / HISTORY if run_dir and (run_dir / HISTORY).exists() else None
        index = write_report(report_dir, result, paths, leaf_ids, probs, taxonomy, history_csv=history,
                             title=f"SEM-HiNet-TF evaluation: {model.name} ({engine.format}, {split_used} split"
                                   f"{f', {views} test-time views' if views > 1 else ''})")
        notes.append(f"report: {index}")
    label = f"{model.name} ({engine.format}{f', {views} views' if views > 1 else ''})"
    table = format_summary_table({label: result}, intervals=True)
    return {"result": result, "table": table, "notes": notes, "paths": paths, "leaf_ids": leaf_ids,
            "probs": probs, "attributes_table": attributes_text}


def _attributes(result: dict, data: str | Path, tables: list, paths: list[str], leaf_ids: np.ndarray, probs,
                taxonomy: Taxonomy, notes: list[str]) -> str:
    """Add recall by attribute tercile to `result` (issue 26.2) from DATA's dataset.json and the --attributes
    tables (those override); return its terminal tables ("" when there is no attribute)."""
    from semhinet_tf.attributes import attribute_results, dataset_attributes, format_attribute_tables, source_notes
    from semhinet_tf.evaluate import leaf_predictions

    found, note = dataset_attributes(data)
    notes.extend([note] if note else [])
    tables = ([found] if found is not None else []) + list(tables)
    if not tables:
        return ""
    pred, _, _ = leaf_predictions({k: np.asarray(v, dtype=np.float64)
                                  for k, v in taxonomy.as_head_probabilities(probs).items()}, taxonomy)
    block, sources = attribute_results(leaf_ids, pred, list(taxonomy.leaves), tables, paths, data)
    result["attributes"], result["attribute_sources"] = block, sources
    notes.extend(source_notes(sources))
    return format_attribute_tables(block)


# ---------------------------------------------------------------- predict
def predict_paths(model: str | Path, paths: Iterable[str | Path], threshold: float | None = None,
                  threads: int | None = None, batch_size: int | None = None, views: int = 1,
                  allow_no_contract: bool = False) -> Iterator[dict]:
    """Stream per-image verdicts for files and folders, any model format (Engine.classify); bad files yield an
    'error' row in their place, missing paths one at the end.

    `views` > 1 averages that many test-time flips/rotations, with the review threshold chosen for them;
    `allow_no_contract` runs a .tflite without a contract (see BoardModel)."""
    engine = load_engine(model, threads=threads, views=views, review_threshold=threshold,
                         allow_no_contract=allow_no_contract, progress=False, clock=True)
    missing: list[Path] = []
    yield from engine.classify(paths, batch_size=batch_size, on_missing=missing.append)
    for p in missing:
        yield {"path": str(p), "error": "no such file or folder"}


def review_threshold(contract, run_dir: Path | None, views: int = 1, default: float = 0.5) -> float:
    """The review threshold chosen on validation for this many views: from the model's contract (a Contract, or
    a dict with 'review_threshold'), else from its run's review_threshold.json (as `convert` would embed it),
    else `default`."""
    from semhinet_tf.artifacts.contract import Contract, threshold_for_views
    from semhinet_tf.artifacts.run import validation_threshold, validation_thresholds_by_views

    if isinstance(contract, Contract) or (contract and "review_threshold" in contract):
        return threshold_for_views(contract, views)
    if run_dir is not None:
        by_views = validation_thresholds_by_views(run_dir, default)
        return by_views.get(str(views), validation_threshold(run_dir, default))
    return default


# ---------------------------------------------------------------- quickstart
def quickstart(out: str | Path, per_class: int = 150, img_size: int = 128, epochs: int = 30, qat_epochs: int = 4,
               seed: int = 0, weights: str = "sem", overwrite: bool = False) -> dict:
    """Synthetic data -> float + QAT training -> int8 TFLite -> eval of both on the held-out split (and of
    int8 on every test-time view its training augmentation allows)."""
    from semhinet_tf.artifacts.run import QUICKSTART_FILES, QUICKSTART_MARKER, is_quickstart_dir, prepare_run_dir

    t0 = time.time()
    out = Path(out)
    # the quickstart folder is ours only when it carries the quickstart's marker: --overwrite never empties another,
    # and in ours replaces only what the quickstart wrote (the README's review loop keeps its answers beside it)
    with prepare_run_dir(out, overwrite=overwrite, kind="quickstart folder", marker=QUICKSTART_MARKER,
                         recognise=is_quickstart_dir, resumable=False,
                         replaces=QUICKSTART_FILES):  # claimed until the summary is written
        return _quickstart_claimed(out, per_class, img_size, epochs, qat_epochs, seed, weights, t0)


def _quickstart_claimed(out: Path, per_class: int, img_size: int, epochs: int, qat_epochs: int, seed: int,
                        weights: str, t0: float) -> dict:
    from semhinet_tf.artifacts.run import QUICKSTART_SUMMARY
    from semhinet_tf.data.synth import generate
    from semhinet_tf.data.views import invariant_views, view_counts
    from semhinet_tf.evaluate import format_summary_table, write_json
    from semhinet_tf.export.convert import convert_run
    from semhinet_tf.train import TrainConfig, train

    data, run = out / "data", out / "run"
    print(f"[1/5] synthetic SEM data: {per_class} images x 8 classes -> {data}", flush=True)
    generate(data, per_class=per_class, size=256, seed=seed, visibility_size=img_size)  # labels judged as it sees
    print(f"[2/5] training at {img_size}px: {epochs} float + {qat_epochs} QAT epochs -> {run}", flush=True)
    cfg = TrainConfig(img_size=img_size, epochs=epochs, qat_epochs=qat_epochs, seed=seed, weights=weights)
    train_result = train(data, run, cfg)
    print("[3/5] converting to full-int8 TFLite", flush=True)
    conv = convert_run(run)
    print(conv["npu_report"].splitlines()[-1], flush=True)
    print("[4/5] evaluating float and int8 models on the held-out split", flush=True)
    float_eval = eval_model(run / FLOAT_MODEL, data, split="val", json_out=run / "eval_float.json")
    int8_eval = eval_model(Path(conv["path"]), data, split="val", json_out=run / "eval_int8.json",
                           report_dir=run / "report")
    results = {"float (Keras)": float_eval["result"], "int8 (TFLite)": int8_eval["result"]}
    views = max(view_counts(invariant_views(cfg.augment)))
    if views > 1:  # what test-time views add, at `views` inferences an image (predict/eval/board --views)
        results[f"int8, {views} views"] = eval_model(Path(conv["path"]), data, split="val", views=views,
                                                     json_out=run / f"eval_int8_{views}views.json")["result"]
    print("[5/5] summary", flush=True)
    table = format_summary_table(results)
    seconds = time.time() - t0
    summary = {"seconds": round(seconds, 1), "train": train_result, "tflite": conv["path"],
               "tflite_bytes": conv["bytes"], "npu_ok": conv["npu_ok"],
               "leaf_accuracy": {k: v["leaf"]["accuracy"] for k, v in results.items()}}
    write_json(summary, out / QUICKSTART_SUMMARY)
    return {"table": table, "seconds": seconds, "report": str(run / "report" / "index.html"), "summary": summary}


# ---------------------------------------------------------------- compare
def compare_run(run_dir: str | Path, data: str | Path, split: str | None = None, max_drop: float | None = None,
                json_out: str | Path | None = None, progress: bool = True, views: int = 1,
                allow_no_contract: bool = False, overwrite: bool = False, not_worse: bool = False,
                alpha: float = 0.05) -> dict:
    """Float Keras vs QAT Keras vs int8 TFLite (vs ONNX files in the run): same frames, same metrics.

    Deltas are against the float model, each with McNemar's exact test on the same images (two-sided, and
    one-sided "worse"); `max_drop` (percentage points of leaf accuracy) makes the result fail when the int8
    model falls further below float than that; `not_worse` when McNemar finds int8 significantly worse (at
    `alpha`); both together, when it falls further than `max_drop` and significantly (stats.fails). `views` > 1
    scores every model on that many test-time flips/rotations (a model that does not offer them is skipped with a
    note).
    """
    from semhinet_tf import stats
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.evaluate import evaluate, format_summary_table, write_json

    run_dir = Path(run_dir)
    candidates = [run_dir / FLOAT_MODEL, run_dir / QAT_MODEL, *sorted(run_dir.glob("*.tflite")),
                  *sorted(run_dir.glob("*.onnx"))]
    models = [p for p in candidates if p.exists() and not p.name.endswith(".backbone.tflite")]
    check_outputs([json_out], overwrite, inputs=[*model_inputs(run_dir), *models, data])
    if not (run_dir / FLOAT_MODEL).exists():
        raise FileNotFoundError(f"{run_dir}: no {FLOAT_MODEL} to compare against")
    reference = load_engine(run_dir / FLOAT_MODEL, progress=progress)
    taxonomy = reference.taxonomy
    reference.use_views(views)  # a one-line error before decoding when the run cannot offer them
    items, split_used, notes = eval_items(data, taxonomy, run_dir, split)
    frames, paths, truth = decode_items(items, reference.preprocess, taxonomy, notes, progress)
    notes.extend(still_training_warning(run_dir))
    if not len(frames):
        raise ValueError(f"{data}: no readable images in the {split_used} split")
    seen = trained_on(paths, run_dir) if split_used != "val" else 0
    if seen:
        notes.insert(0, f"warning: {seen} of these {len(frames)} frames are byte for byte frames the models trained "
                        f"on ({run_dir}'s training split): the figures flatter them")
    results, probs = {}, {}
    for path in models:
        engine = reference if path == run_dir / FLOAT_MODEL else \
            load_engine(path, allow_no_contract=allow_no_contract, progress=progress)
        if engine.input_size != reference.input_size:
            notes.append(f"{path.name}: input {engine.input_size}px differs from the float model; skipped")
            continue
        try:
            engine.use_views(views)
        except ValueError as exc:
            notes.append(f"{exc}; skipped")
            continue
        probs[path.name] = engine.predict(frames)
        results[path.name] = evaluate(truth, probs[path.name], taxonomy, model_name=path.name, fmt=engine.format)
        results[path.name]["views"] = engine.views
    ref_name = FLOAT_MODEL
    ref_leaf = taxonomy.leaf_probabilities(probs[ref_name])
    rows = []
    ref_right = ref_leaf.argmax(1) == truth
    for name, res in results.items():
        leaf_p = taxonomy.leaf_probabilities(probs[name])
        agree = float(np.mean(leaf_p.argmax(1) == ref_leaf.argmax(1)))
        b, c = stats.discordant(ref_right, leaf_p.argmax(1) == truth)
        delta_ci = stats.paired_difference_interval(ref_right, leaf_p.argmax(1) == truth)
        deviation = max(float(np.abs(probs[name][h] - probs[ref_name][h]).max()) for h in taxonomy.head_names)
        flips = [{"path": paths[i], "truth": taxonomy.leaves[truth[i]],
                  "reference": taxonomy.leaves[int(ref_leaf[i].argmax())],
                  "reference_p": round(float(ref_leaf[i].max()), 4),
                  "this": taxonomy.leaves[int(leaf_p[i].argmax())], "this_p": round(float(leaf_p[i].max()), 4)}
                 for i in np.flatnonzero(leaf_p.argmax(1) != ref_leaf.argmax(1))]
        heads = {h: {"accuracy": res["heads"][h]["accuracy"],
                     "delta": _delta(res["heads"][h]["accuracy"], results[ref_name]["heads"][h]["accuracy"])}
                 for h in taxonomy.head_names}
        rows.append({"model": name, "format": res["format"], "leaf_accuracy": res["leaf"]["accuracy"],
                     "leaf_accuracy_ci": res["leaf"]["accuracy_ci"],
                     "leaf_delta_points": _delta(res["leaf"]["accuracy"], results[ref_name]["leaf"]["accuracy"], 100),
                     "leaf_delta_ci_points": None if delta_ci is None else [round(100 * x, 4) for x in delta_ci],
                     "leaf_discordant": [b, c], "leaf_mcnemar_p": stats.mcnemar(b, c),
                     "leaf_p_worse": stats.mcnemar_worse(b, c),
                     "leaf_agreement": agree, "max_probability_deviation": deviation, "heads": heads,
                     "flips": flips})
    gate = None
    if max_drop is not None or not_worse:
        int8 = [r for r in rows if r["format"] == "tflite"]
        tolerance = 0.0 if max_drop is None else max_drop
        worst = min(int8, key=lambda r: r["leaf_delta_points"], default=None)
        failed = [r["model"] for r in int8 if stats.fails(-r["leaf_delta_points"], tolerance, r["leaf_p_worse"],
                                                           not_worse, alpha)]
        gate = {"max_drop": max_drop, "not_worse": not_worse, "alpha": alpha,
                "worst_int8_delta_points": worst["leaf_delta_points"] if worst else 0.0,
                "worst_int8_p_worse": worst["leaf_p_worse"] if worst else None, "failed": failed,
                "passed": not failed}
    out = {"run": str(run_dir), "split": split_used, "n": int(len(truth)), "views": views, "models": rows,
           "gate": gate, "results": results}
    if json_out:
        write_json(out, json_out)
        notes.append(f"comparison written to {json_out}")
    return {"compare": out, "table": format_summary_table(results, intervals=True) + "\n\n" + _compare_table(rows),
            "notes": notes}


def still_training_warning(run_dir: Path | None) -> list[str]:
    """A warning when the run is being trained right now: its models are scored as they are, and the training
    replaces them (atomically) as it goes, so these figures may not be those of the run's final models."""
    from semhinet_tf.artifacts.run import being_trained

    holder = being_trained(run_dir) if run_dir is not None else None
    return [f"warning: {run_dir} is {holder}: its models were scored as they are now; training may still replace "
            f"them"] if holder else []


def _delta(value, reference, scale: float = 1.0):
    if value is None or reference is None:
        return None
    return round((value - reference) * scale, 4)


def _points_interval(ci: list[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _compare_table(rows: list[dict]) -> str:
    from semhinet_tf.stats import format_interval

    lines = ["| model | leaf acc [95% CI] | Δ vs float, points [95% CI, paired] | McNemar p (same images) | "
             "leaf agreement | "
             "max prob deviation | flips |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, c = r["leaf_discordant"]
        lines.append(f"| {r['model']} | {r['leaf_accuracy']:.4f} {format_interval(r['leaf_accuracy_ci'])} | "
                     f"{r['leaf_delta_points']:+.2f} {_points_interval(r.get('leaf_delta_ci_points'))} | "
                     f"{r['leaf_mcnemar_p']:.3g} ({b} lost, {c} gained) | "
                     f"{r['leaf_agreement']:.4f} | {r['max_probability_deviation']:.4f} | {len(r['flips'])} |")
    return "\n".join(lines)
