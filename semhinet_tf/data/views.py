"""Test-time views: score a frame as several flips/quarter turns of itself and average the verdicts.

A model trained with flip and rot90 augmentation has seen every defect in the eight orientations of the
square (the dihedral group); its verdicts still differ a little between orientations of the same frame, and
averaging them removes part of that noise at the cost of one inference per view. Only the views the
training augmentation covered are offered: a model trained without flips may rely on orientation (scan
direction, charging streaks), and scoring it on flipped frames would be scoring it on data it never saw.

numpy only: the board runtime uses this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from semhinet_tf.taxonomy import OOD_OUTPUT

# name -> (flip rows, flip columns, transpose), applied in that order. Ordered so that the first 2, 4 and 8
# views of the full table are each a group (identity + transpose; + the half turn and anti-transpose; all
# eight): averaging over a group makes the verdict exactly invariant to those views.
VIEW_TABLE: dict[str, tuple[bool, bool, bool]] = {
    "identity": (False, False, False),
    "transpose": (False, False, True),
    "rot180": (True, True, False),
    "anti_transpose": (True, True, True),
    "flip_rows": (True, False, False),
    "flip_cols": (False, True, False),
    "rot90": (False, True, True),  # counter-clockwise, as numpy.rot90
    "rot270": (True, False, True),
}
# Views that need the transpose need rot90 augmentation; views that flip need flip augmentation.
_NEEDS = {name: ("flip" if (fr or fc) else None, "rot90" if tr else None) for name, (fr, fc, tr) in VIEW_TABLE.items()}
_LOG_FLOOR = 1e-7  # probabilities of exactly 0 (int8 outputs) would make the log-average -inf
SCORE_OUTPUTS = (OOD_OUTPUT,)  # outputs that are scores, not probabilities


def invariant_views(augment: Mapping | None) -> list[str]:
    """The views a model trained with this augmentation config (Augment.to_dict()) was taught to ignore."""
    augment = augment or {}
    allowed = {k for k in ("flip", "rot90") if augment.get(k)}
    return [name for name, needs in _NEEDS.items() if all(n is None or n in allowed for n in needs)]


def view_counts(available: Sequence[str]) -> list[int]:
    """How many views a model can be scored on: the sizes whose first views form a group (1, 2, 4, 8)."""
    return [n for n in (1, 2, 4, 8) if n <= max(len(available), 1)]


def select_views(available: Sequence[str] | None, count: int, source: str = "model") -> list[str]:
    """The first `count` of the model's views; a one-line error naming what it offers otherwise."""
    available = list(available or ["identity"])
    offered = view_counts(available)
    if count not in offered:
        raise ValueError(f"{source}: {count} test-time views asked; this model offers "
                         f"{', '.join(map(str, offered))} (its training augmentation decides which "
                         f"flips/rotations are safe: {', '.join(available)})")
    return available[:count]


def apply_view(frames: np.ndarray, name: str) -> np.ndarray:
    """(N, S, S) or (N, S, S, C) frames seen in orientation `name` (a contiguous copy unless identity)."""
    flip_rows, flip_cols, transpose = VIEW_TABLE[name]
    x = frames
    if flip_rows:
        x = x[:, ::-1]
    if flip_cols:
        x = x[:, :, ::-1]
    if transpose:
        x = np.swapaxes(x, 1, 2)
    return x if x is frames else np.ascontiguousarray(x)


def average_views(predict: Callable[[np.ndarray], Mapping[str, np.ndarray]], frames: np.ndarray,
                  views: Sequence[str]) -> dict[str, np.ndarray]:
    """Head probabilities of `predict` on `frames`, averaged over `views` (see log_average)."""
    if list(views) in ([], ["identity"]):
        return {k: np.asarray(v, np.float32) for k, v in predict(frames).items()}
    return log_average([predict(apply_view(frames, name)) for name in views])


def log_average(per_view: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean of the views' log-probabilities, renormalised per head.

    The log-average equals averaging the heads' logits, so one confident wrong view cannot outvote the
    others as it can in a plain mean (measured: a little better than the plain mean, float and int8).
    A score that is not a probability (the unfamiliar-frame score, output `ood`) is averaged plainly."""
    out = {}
    for head in per_view[0]:
        if head in SCORE_OUTPUTS:
            out[head] = np.mean([np.asarray(p[head], np.float32) for p in per_view], axis=0)
            continue
        z = np.mean([np.log(np.maximum(np.asarray(p[head], np.float64), _LOG_FLOOR)) for p in per_view], axis=0)
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        out[head] = (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out
