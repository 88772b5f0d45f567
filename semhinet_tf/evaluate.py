"""Metrics for the hierarchical classifier, from plain arrays so every model format is scored alike.

Inputs are numpy arrays, not models: `true_leaf` (N,) leaf indices into `taxonomy.leaves` and
`head_probs` {head name: (N, k) probabilities}. A Keras model, a TFLite interpreter and an ONNX
session all reduce to these, so `evaluate` writes the same JSON keys whatever produced them.
No TensorFlow here (and no matplotlib: plots live in `report.py`).

Conventions: confusion matrices are rows = true class, columns = predicted class. A ratio whose
denominator is zero (no image of a class, nothing predicted, a head with no applicable image) is
None (JSON null), never NaN and never an exception. Every accuracy, recall and precision has its 95% Wilson
interval next to it under the same key with `_ci` appended ([low, high], None where the ratio is None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from semhinet_tf.artifacts.files import (  # noqa: F401 - re-exported: evaluate's writers moved there
    atomic_write_bytes,
    atomic_write_text,
    to_jsonable,
    write_json,
)
from semhinet_tf.stats import interval, recall_at
from semhinet_tf.taxonomy import IGNORE, Taxonomy

FORMATS = ("keras", "tflite", "onnx")
DEFAULT_PURITY_TARGET = 0.95
OPERATING_TARGETS = (0.90, 0.95, 0.98, 0.99)  # purity targets tabulated in the report
MAX_CURVE_POINTS = 101
DEFAULT_READY_MIN_FRAMES = 30  # labelled frames a class needs before its precision is believed


class EvaluationError(ValueError):
    """Inputs that cannot be scored (wrong shapes, unknown format, out-of-range labels)."""


# ---------------------------------------------------------------- small building blocks
def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(k, k) int64 counts, rows = true, columns = predicted; absent classes give all-zero rows.

    scikit-learn's, except that no image at all (a head no image of the split reaches) gives zeros, not an error."""
    from sklearn import metrics

    true = np.asarray(true, dtype=np.int64)
    if true.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return metrics.confusion_matrix(true, np.asarray(pred, dtype=np.int64), labels=np.arange(num_classes)
                                    ).astype(np.int64)


def per_class_scores(true: np.ndarray, pred: np.ndarray, labels: Sequence[str]
                     ) -> dict[str, dict[str, float | int | None]]:
    """Precision, recall, F1 and support per class (scikit-learn's precision_recall_fscore_support).

    F1 = 2TP / (2TP + FP + FN), so it is 0 for a present class never predicted; a ratio with nothing to count
    (a class neither present nor predicted, or no image at all) is None.
    """
    from sklearn import metrics

    true = np.asarray(true, dtype=np.int64)
    if true.size == 0:
        return {label: {"precision": None, "recall": None, "f1": None, "support": 0} for label in labels}
    scores = metrics.precision_recall_fscore_support(true, np.asarray(pred, dtype=np.int64),
                                                     labels=np.arange(len(labels)), zero_division=np.nan)
    precision, recall, f1, support = (np.asarray(a) for a in scores)
    return {label: {"precision": _nan_to_none(precision[i]), "recall": _nan_to_none(recall[i]),
                    "f1": _nan_to_none(f1[i]), "support": int(support[i])} for i, label in enumerate(labels)}


def _nan_to_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def head_metrics(true: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class recall/precision and confusion of one head on the images it applies to.

    `true` may contain IGNORE; those images are dropped (the head does not apply to them).
    """
    true = np.asarray(true, dtype=np.int64)
    keep = true != IGNORE
    true, pred = true[keep], np.asarray(pred, dtype=np.int64)[keep]
    cm = confusion_matrix(true, pred, len(labels))
    scores = per_class_scores(true, pred, labels)
    recall_ci, precision_ci = class_intervals(cm, labels)
    return {"labels": list(labels), "n": int(keep.sum()), "accuracy": _ratio(np.trace(cm), cm.sum()),
            "accuracy_ci": interval(np.trace(cm), cm.sum()),
            "recall": {c: s["recall"] for c, s in scores.items()}, "recall_ci": recall_ci,
            "precision": {c: s["precision"] for c, s in scores.items()}, "precision_ci": precision_ci,
            "confusion": cm.tolist()}


def class_intervals(cm: np.ndarray, labels: Sequence[str]) -> tuple[dict[str, list | None], dict[str, list | None]]:
    """95% intervals of each class's recall (over its row) and precision (over its column) of a confusion."""
    cm = np.asarray(cm, dtype=np.int64)
    diag, rows, cols = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    return ({c: interval(diag[i], rows[i]) for i, c in enumerate(labels)},
            {c: interval(diag[i], cols[i]) for i, c in enumerate(labels)})


def reached_metrics(labels: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray], taxonomy: Taxonomy
                    ) -> dict[str, dict[str, Any]]:
    """Per non-root head, its accuracy on the images it decides for in use: those it applies to whose heads
    above all chose the way down to it (the router on the defects the gatekeeper passed on).

    The plain head accuracy scores the router on every true defect, also those the gatekeeper called normal;
    this one separates the router's own errors from the gatekeeper's."""
    def passed(name: str) -> np.ndarray:  # what the heads above sent its way (specs list heads in any order)
        head = taxonomy.head(name)
        if head.parent is None:
            return np.ones(len(preds[name]), dtype=bool)
        parent, cls = head.parent
        return passed(parent) & (preds[parent] == taxonomy.head(parent).classes.index(cls))

    out = {}
    for head in taxonomy.heads:
        if head.parent is None:
            continue
        keep = (np.asarray(labels[head.name]) != IGNORE) & passed(head.name)
        n = int(keep.sum())
        right = int((preds[head.name][keep] == labels[head.name][keep]).sum())
        out[head.name] = {"n": n, "accuracy": _ratio(right, n), "accuracy_ci": interval(right, n)}
    return out


# ---------------------------------------------------------------- input checks
def _check_inputs(true_leaf: Any, head_probs: Mapping[str, Any], taxonomy: Taxonomy
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Arrays of the right shapes, or one clear error saying which input is wrong."""
    true = np.asarray(true_leaf)
    if true.ndim != 1:
        raise EvaluationError(f"true_leaf must be a 1-D array of leaf indices, got shape {true.shape}")
    if true.size and not np.issubdtype(true.dtype, np.integer):
        raise EvaluationError(f"true_leaf must hold integer leaf indices, got dtype {true.dtype}")
    true = true.astype(np.int64)
    n_leaves = len(taxonomy.leaves)
    if true.size and (true.min() < 0 or true.max() >= n_leaves):
        raise EvaluationError(f"true_leaf values must be in 0..{n_leaves - 1} (taxonomy.leaves), "
                              f"got {int(true.min())}..{int(true.max())}")
    probs: dict[str, np.ndarray] = {}
    for head in taxonomy.heads:
        if head.name not in head_probs:
            raise EvaluationError(f"head_probs has no output for head {head.name!r} "
                                  f"(got {', '.join(map(str, head_probs)) or 'nothing'})")
        p = np.asarray(head_probs[head.name], dtype=np.float64)
        if p.shape != (true.shape[0], head.num_classes):
            raise EvaluationError(f"head {head.name} probabilities have shape {p.shape}, "
                                  f"expected ({true.shape[0]}, {head.num_classes})")
        if not np.all(np.isfinite(p)):
            raise EvaluationError(f"head {head.name} probabilities contain NaN or inf")
        probs[head.name] = p
    return true, probs


def leaf_predictions(head_probs: Mapping[str, np.ndarray], taxonomy: Taxonomy
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted leaf index, its probability, all leaf probabilities) through the whole hierarchy."""
    leaf_p = taxonomy.leaf_probabilities(head_probs)
    pred = leaf_p.argmax(axis=1)
    conf = leaf_p[np.arange(leaf_p.shape[0]), pred]
    return pred.astype(np.int64), conf, leaf_p


# ---------------------------------------------------------------- coverage vs purity
def coverage_curve(true_leaf: np.ndarray, leaf_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Coverage and purity for every distinct top-leaf probability used as a review threshold.

    An image is kept automatic when its top leaf probability is >= t (the same rule as
    `Taxonomy.decode`, which flags p < t for review). coverage(t) = share kept, purity(t) = accuracy
    on the kept images. Thresholds ascend, so coverage falls from 1.0; every threshold keeps at least
    one image, so purity is always defined.
    """
    leaf_probs = np.asarray(leaf_probs, dtype=np.float64)
    true = np.asarray(true_leaf, dtype=np.int64)
    if leaf_probs.ndim != 2 or leaf_probs.shape[0] != true.shape[0]:
        raise EvaluationError(f"leaf_probs shape {leaf_probs.shape} does not match {true.shape[0]} labels")
    if true.size == 0:
        empty = np.zeros(0, dtype=np.float64)
        return {"thresholds": empty, "coverage": empty.copy(), "purity": empty.copy()}
    top = leaf_probs.max(axis=1)
    correct = (leaf_probs.argmax(axis=1) == true).astype(np.int64)
    order = np.argsort(top, kind="stable")
    top_sorted, correct_sorted = top[order], correct[order]
    # correct_from[i] = correct images among sorted positions i.. (those with p >= top_sorted[i])
    correct_from = np.concatenate([np.cumsum(correct_sorted[::-1])[::-1], [0]])
    thresholds = np.unique(top_sorted)
    first = np.searchsorted(top_sorted, thresholds, side="left")
    kept = true.size - first
    return {"thresholds": thresholds, "coverage": kept / true.size, "purity": correct_from[first] / kept}


def threshold_for_purity(curve: Mapping[str, Sequence[float]], target: float) -> dict[str, Any]:
    """The lowest threshold whose purity reaches `target`, so as many images as possible stay automatic.

    When no threshold reaches the target, `reached` is False and the point of highest purity (the
    lowest threshold among ties) is returned instead, so the caller still gets a usable setting.
    """
    thresholds = np.asarray(curve["thresholds"], dtype=np.float64)
    coverage = np.asarray(curve["coverage"], dtype=np.float64)
    purity = np.asarray(curve["purity"], dtype=np.float64)
    if thresholds.size == 0:
        return {"target": float(target), "threshold": None, "coverage": None, "review_share": None,
                "purity": None, "reached": False}
    ok = np.flatnonzero(purity >= target)
    reached = ok.size > 0
    i = int(ok[np.argmin(thresholds[ok])]) if reached else int(np.flatnonzero(purity == purity.max())[0])
    return {"target": float(target), "threshold": float(thresholds[i]), "coverage": float(coverage[i]),
            "review_share": float(1.0 - coverage[i]), "purity": float(purity[i]), "reached": bool(reached)}


def downsample_curve(curve: Mapping[str, Sequence[float]], max_points: int = MAX_CURVE_POINTS) -> dict[str, list]:
    """At most `max_points` evenly spaced (by rank) points of a curve, ends included, as plain lists."""
    n = len(curve["thresholds"])
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64)) if n > max_points else np.arange(n)
    return {k: [float(v) for v in np.asarray(curve[k])[idx]] for k in ("thresholds", "coverage", "purity")}


def coverage_section(true_leaf: np.ndarray, leaf_probs: np.ndarray, target: float = DEFAULT_PURITY_TARGET
                     ) -> dict[str, Any]:
    """The "coverage" block of the results: chosen operating point, a few standard ones, the curve."""
    curve = coverage_curve(true_leaf, leaf_probs)
    targets = sorted(set(OPERATING_TARGETS) | {float(target)})
    n = int(np.asarray(true_leaf).size)
    return {"target": float(target), "operating_point": _with_counts(threshold_for_purity(curve, target), n),
            "operating_points": [_with_counts(threshold_for_purity(curve, t), n) for t in targets],
            "curve": downsample_curve(curve)}


# ---------------------------------------------------------------- class readiness
def min_automatic_verdicts(min_frames: int) -> int:
    """Automatic verdicts a class's precision must rest on before it is believed: a third of the labelled frames
    it needs (10 at the default 30), at least 1. Without it a class with one automatic verdict that happens to be
    right would count as 100% pure and be declared ready."""
    return max(1, math.ceil(int(min_frames) / 3))


def class_readiness(true_leaf: np.ndarray, leaf_probs: np.ndarray, leaves: Sequence[str], threshold: float | None,
                    target: float, min_frames: int = DEFAULT_READY_MIN_FRAMES) -> dict[str, Any]:
    """Which classes may be classified automatically (issue 24.5): a class is ready when it has at least
    `min_frames` labelled frames here and, among the verdicts of that class the model makes on its own (top leaf
    probability >= `threshold`, the review threshold in use), at least min_automatic_verdicts(min_frames) of them,
    and the share that is right reaches `target` purity (its 95% interval is given with it).

    Why per class: a good average purity can hide a rare class whose automatic verdicts are mostly wrong; the
    board sends every verdict of a class that is not ready to a person. `threshold` None (no operating point):
    nothing is automatic, no class is ready."""
    true = np.asarray(true_leaf, dtype=np.int64)
    leaf_probs = np.asarray(leaf_probs, dtype=np.float64)
    pred = leaf_probs.argmax(axis=1) if true.size else np.zeros(0, np.int64)
    top = leaf_probs.max(axis=1) if true.size else np.zeros(0)
    auto = top >= threshold if threshold is not None else np.zeros(true.size, dtype=bool)
    classes = {}
    min_auto = min_automatic_verdicts(min_frames)
    for j, leaf in enumerate(leaves):
        n = int((true == j).sum())
        called = auto & (pred == j)
        n_auto = int(called.sum())
        right = int((called & (true == j)).sum())
        precision = _ratio(right, n_auto)
        if n < min_frames:
            why = f"{n} labelled frames, needs {min_frames}"
        elif precision is None:
            why = "no verdict of it at or above the review threshold"
        elif n_auto < min_auto:
            why = (f"{n_auto} automatic verdict{'s' if n_auto != 1 else ''} of it, needs {min_auto} before its "
                   f"precision is believed")
        elif precision < target:
            why = f"precision {precision:.3f} of its automatic verdicts is under the target {target:g}"
        else:
            why = ""
        classes[leaf] = {"labelled": n, "automatic": n_auto, "precision": precision,
                         "precision_ci": interval(right, n_auto) if n_auto else None, "ready": not why,
                         "why_not": why or None}
    return {"threshold": None if threshold is None else float(threshold), "target_purity": float(target),
            "min_frames": int(min_frames), "min_automatic": min_auto, "classes": classes,
            "ready": [leaf for leaf in leaves if classes[leaf]["ready"]]}
def _with_counts(point: dict[str, Any], n: int) -> dict[str, Any]:
    """An operating point with the number of images it keeps automatic and its purity's 95% interval: a purity
    reached on a handful of images says little."""
    if point.get("coverage") is None:
        return {**point, "automatic_n": 0, "purity_ci": None}
    kept = int(round(point["coverage"] * n))
    return {**point, "automatic_n": kept, "purity_ci": interval(int(round(point["purity"] * kept)), kept)}


# ---------------------------------------------------------------- the results document
def unfamiliar_section(true_leaf: np.ndarray, scores: np.ndarray, ood: Mapping[str, Any], leaves: Sequence[str]
                       ) -> dict[str, Any]:
    """How the unfamiliar-frame score (a model's `ood` output, issue 26.4) falls on labelled frames: per class,
    the share above the contract's threshold (with its interval) and the median score; for each class the score
    was not fitted on (bogus), the share the score alone catches at the threshold 1% of this set's normal frames
    exceed (`recall_at_1pct_normal`), the figure that says how well it tells that class from normal."""
    true = np.asarray(true_leaf, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    threshold = float(ood["threshold"])
    normal = scores[true == list(leaves).index("normal")] if "normal" in leaves else np.zeros(0)
    classes = {}
    for j, leaf in enumerate(leaves):
        s = scores[true == j]
        above = int(np.sum(s > threshold))
        row = {"n": int(s.size), "above": above, "share": _ratio(above, s.size), "share_ci": interval(above, s.size),
               "median": None if not s.size else round(float(np.median(s)), 4)}
        if leaf not in ood["leaves"] and leaf != "normal":
            row["recall_at_1pct_normal"] = recall_at(normal, s, 0.01)
        classes[leaf] = row
    return {"threshold": threshold, "fitted_leaves": list(ood["leaves"]), "classes": classes}


def root_head(taxonomy: Taxonomy) -> str:
    return next(h.name for h in taxonomy.heads if h.parent is None)


def router_heads(taxonomy: Taxonomy) -> list[str]:
    """Second-level heads: those gated by a class of the root head (h2 in the default)."""
    root = root_head(taxonomy)
    return [h.name for h in taxonomy.heads if h.parent and h.parent[0] == root]


def specialist_leaves(taxonomy: Taxonomy) -> list[str]:
    """Leaves below the second level (bridge..inc_etch in the default)."""
    return [leaf for leaf in taxonomy.leaves if len(taxonomy.path(leaf)) > 2]


def summary_metrics(heads: Mapping[str, dict], per_class: Mapping[str, dict], taxonomy: Taxonomy) -> dict:
    """Headline numbers: root recall per class, router accuracy, end-to-end specialist precision.

    Keys follow the head names ("h1_recall", "h2_router_accuracy" in the default taxonomy).
    Specialist precision is the leaf's precision through the whole hierarchy, so a gatekeeper
    that wrongly sends a normal image to "bridge" lowers bridge precision here even though the
    bridge head itself was never scored on that image. It is None when the leaf was never predicted
    or has no image in the split (a headline number about a class the split cannot judge would
    mislead); `per_class` keeps the plain precision (0.0 for false alarms of an absent class).
    """
    root = root_head(taxonomy)
    out: dict[str, Any] = {f"{root}_recall": dict(heads[root]["recall"])}
    for name in router_heads(taxonomy):
        out[f"{name}_router_accuracy"] = heads[name]["accuracy"]
    out["specialist_precision"] = {leaf: per_class[leaf]["precision"] if per_class[leaf]["support"] else None
                                   for leaf in specialist_leaves(taxonomy)}
    return out


def evaluate(true_leaf: np.ndarray, head_probs: Mapping[str, np.ndarray], taxonomy: Taxonomy,
             model_name: str, fmt: str, purity_target: float = DEFAULT_PURITY_TARGET,
             review_threshold: float | None = None, ready_min_frames: int = DEFAULT_READY_MIN_FRAMES
             ) -> dict[str, Any]:
    """Score one model's outputs; the result has the same keys for Keras, TFLite and ONNX.

    Heads are scored on the images they apply to, by their own argmax; the leaf by the argmax of the
    hierarchical leaf probability. Also returns per-class leaf scores, missing classes, the
    coverage/purity trade-off of a review threshold (target `purity_target`) and each class's readiness for
    automatic classification at `review_threshold` (the model's; default: the operating point found here).
    """
    fmt_l = str(fmt).lower()
    if fmt_l not in FORMATS:
        raise EvaluationError(f"model format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    true, probs = _check_inputs(true_leaf, taxonomy.as_head_probabilities(head_probs), taxonomy)
    leaves = list(taxonomy.leaves)
    pred, _, leaf_p = leaf_predictions(probs, taxonomy)
    leaf_cm = confusion_matrix(true, pred, len(leaves))
    per_class = per_class_scores(true, pred, leaves)
    recall_ci, precision_ci = class_intervals(leaf_cm, leaves)
    for leaf in leaves:
        per_class[leaf].update(precision_ci=precision_ci[leaf], recall_ci=recall_ci[leaf])
    labels = taxonomy.head_labels(true)
    preds = {h.name: probs[h.name].argmax(axis=1) for h in taxonomy.heads}
    heads = {h.name: head_metrics(labels[h.name], preds[h.name], h.classes) for h in taxonomy.heads}
    for name, reached in reached_metrics(labels, preds, taxonomy).items():
        heads[name]["reached"] = reached
    coverage = coverage_section(true, leaf_p, purity_target)
    threshold = review_threshold if review_threshold is not None else coverage["operating_point"]["threshold"]
    return {
        "model": str(model_name), "format": fmt_l, "n": int(true.size),
        "leaf": {"labels": leaves, "accuracy": _ratio(np.trace(leaf_cm), true.size),
                 "accuracy_ci": interval(np.trace(leaf_cm), true.size), "confusion": leaf_cm.tolist()},
        "heads": heads,
        "summary": summary_metrics(heads, per_class, taxonomy),
        "per_class": per_class,
        "missing_classes": [leaf for leaf in leaves if per_class[leaf]["support"] == 0],
        "coverage": coverage,
        "readiness": class_readiness(true, leaf_p, leaves, threshold, purity_target, ready_min_frames),
    }


# ---------------------------------------------------------------- reading results back
def headline_metrics(result: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """(name, value) pairs of the headline numbers of one results document, in display order.

    Reads the summary generically (any "<root>_recall" and "<head>_router_accuracy" keys), so it also
    works for a custom taxonomy.
    """
    rows: list[tuple[str, float | None]] = [("leaf accuracy", result["leaf"]["accuracy"])]
    summary = result["summary"]
    for key, value in summary.items():
        if key.endswith("_recall") and isinstance(value, dict):
            rows += [(f"{key[:-len('_recall')]} recall {cls}", v) for cls, v in value.items()]
    for key, value in summary.items():
        if key.endswith("_router_accuracy"):
            name = key[:-len('_router_accuracy')]
            rows.append((f"{name} router accuracy", value))
            reached = result.get("heads", {}).get(name, {}).get("reached")
            if reached is not None:  # results written before this figure existed have none
                rows.append((f"{name} router accuracy, passed defects", reached["accuracy"]))
    spec = summary.get("specialist_precision", {})
    if spec:
        known = [(c, v) for c, v in spec.items() if v is not None]
        worst = min(known, key=lambda cv: cv[1]) if known else None
        rows.append((f"specialist precision min ({worst[0]})" if worst else "specialist precision min",
                     worst[1] if worst else None))
        rows += [(f"precision {cls}", v) for cls, v in spec.items()]
    return rows


def headline_details(result: Mapping[str, Any]) -> dict[str, tuple[list[float] | None, int]]:
    """For each label of `headline_metrics`: its 95% interval and the number of images it rests on.

    Counted from the confusion matrices, so a results JSON written before intervals existed gets them too."""
    out: dict[str, tuple[list[float] | None, int]] = {}
    leaf_cm = np.asarray(result["leaf"]["confusion"], dtype=np.int64)
    out["leaf accuracy"] = (interval(np.trace(leaf_cm), leaf_cm.sum()), int(leaf_cm.sum()))
    heads = result.get("heads", {})
    for key, value in result["summary"].items():
        if key.endswith("_recall") and isinstance(value, dict):
            head = key[:-len("_recall")]
            cm = np.asarray(heads[head]["confusion"], dtype=np.int64)
            for i, cls in enumerate(heads[head]["labels"]):
                out[f"{head} recall {cls}"] = (interval(cm[i, i], cm[i].sum()), int(cm[i].sum()))
        elif key.endswith("_router_accuracy"):
            head = key[:-len("_router_accuracy")]
            cm = np.asarray(heads[head]["confusion"], dtype=np.int64)
            out[f"{head} router accuracy"] = (interval(np.trace(cm), cm.sum()), int(cm.sum()))
            reached = heads[head].get("reached")
            if reached is not None and reached["accuracy"] is not None:
                right = int(round(reached["accuracy"] * reached["n"]))
                out[f"{head} router accuracy, passed defects"] = (interval(right, reached["n"]), reached["n"])
    labels = result["leaf"]["labels"]
    for leaf in result["summary"].get("specialist_precision", {}):
        j = labels.index(leaf)
        out[f"precision {leaf}"] = (interval(leaf_cm[j, j], leaf_cm[:, j].sum()), int(leaf_cm[:, j].sum()))
    return out


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_summary_table(results: Mapping[str, Mapping[str, Any]], digits: int = 3, intervals: bool = False) -> str:
    """A Markdown table (also readable as plain text) of the headline metrics, one column per model.

    "min" rows name the weakest specialist per model, so that row label is kept generic. `intervals` writes
    each figure's 95% interval beside it and marks with * a figure resting on fewer than 30 images.
    """
    from semhinet_tf.stats import FEW_FRAMES, format_interval

    names = list(results)
    metric_rows: dict[str, dict[str, Any]] = {"format": {}, "images": {}}
    for name in names:
        metric_rows["format"][name] = results[name].get("format", "-")
        metric_rows["images"][name] = results[name].get("n", "-")
        details = headline_details(results[name]) if intervals else {}
        for label, value in headline_metrics(results[name]):
            if label.startswith("specialist precision min"):
                cls = label[len("specialist precision min"):].strip(" ()")
                metric_rows.setdefault("specialist precision min", {})[name] = \
                    f"{_fmt(value, digits)} ({cls})" if cls else _fmt(value, digits)
            elif label in details and value is not None:
                ci, n = details[label]
                metric_rows.setdefault(label, {})[name] = \
                    f"{_fmt(value, digits)} {format_interval(ci)}{'*' if n < FEW_FRAMES else ''}"
            else:
                metric_rows.setdefault(label, {})[name] = value
    header = ["metric", *names]
    body = [[label, *(_fmt(vals.get(n), digits) for n in names)] for label, vals in metric_rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    table = "\n".join([line(header), rule, *(line(r) for r in body)])
    if intervals:
        table += (f"\n[low, high]: 95% Wilson interval over the images; *: fewer than {FEW_FRAMES} images behind "
                  f"the figure")
    return table
