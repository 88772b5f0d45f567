"""What the validation split says about a model: the hierarchy's leaf scores (which pick the kept epoch)
and the review threshold `convert` embeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semhinet_tf.artifacts.files import write_json
from semhinet_tf.artifacts.run import REVIEW_THRESHOLD


def hierarchical_scores(model: Any, frames: np.ndarray, leaf_ids: np.ndarray, taxonomy: Any) -> dict:
    """Leaf accuracy and balanced accuracy through the hierarchy (or the flat softmax)."""
    from semhinet_tf.engines.keras import predict_keras

    probs = predict_keras(model, frames)
    leaf_p = taxonomy.leaf_probabilities(probs)  # a flat model's "leaf" output as it is
    pred = leaf_p.argmax(1)
    recalls = [np.mean(pred[leaf_ids == c] == c) for c in np.unique(leaf_ids)]
    return {"val_leaf_acc": float(np.mean(pred == leaf_ids)), "val_leaf_bacc": float(np.mean(recalls))}


def write_review_threshold(model: Any, val: tuple, taxonomy: Any, run_dir: Path, target_purity: float = 0.99,
                           views: Sequence[str] = ("identity",)) -> dict:
    """The lowest leaf-probability threshold whose automatic decisions reach the target purity on validation;
    `convert` embeds it in the .tflite so predict and the board flag the same images.

    Averaging test-time views changes how confident the model is, so the threshold is also chosen for each
    number of views the model offers ("by_views"); the top-level keys are the single-view one."""
    from semhinet_tf.data.views import apply_view, log_average, view_counts
    from semhinet_tf.engines.keras import predict_keras
    from semhinet_tf.evaluate import coverage_curve, threshold_for_purity

    counts = view_counts(views)
    per_view = [predict_keras(model, apply_view(val[0], name)) for name in views[:max(counts)]]

    def point_for(n: int) -> dict:
        leaf_p = taxonomy.leaf_probabilities(per_view[0] if n == 1 else log_average(per_view[:n]))
        point = threshold_for_purity(coverage_curve(val[1], leaf_p), target_purity)
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in point.items()}

    point = point_for(1)
    by_views = {str(n): point_for(n) for n in counts if n > 1}
    write_json({**point, "target_purity": target_purity, "split": "val", "by_views": by_views},
               run_dir / REVIEW_THRESHOLD)
    return {**point, "by_views": by_views}
