"""The unfamiliar-frame score (issue 26.4): how far a frame's pooled features lie from every class it was trained on.

A classifier has to put every frame in some class; a kind of bogus frame it never saw (a new failure of the tool,
an optical image, a wrong magnification) may land in any of them with a high probability. The score here is the
Mahalanobis distance of the frame's pooled features (average and max pooling, what the heads read) to the nearest
class mean, with one covariance shared by the classes (Lee et al., NeurIPS 2018), measured in the `dims` directions
where the training frames vary most, whitened, and divided by `dims` (about 1 on a familiar frame).

It is fitted after training on the training frames of the classes the model should recognise as usable SEM frames
(every leaf but `bogus` by default: bogus frames vary without end, and a verdict of bogus needs no second
opinion). `convert` appends the score to the int8 model as one more output, `ood`, computed by plain operators
(FULLY_CONNECTED, MUL, REDUCE_MAX) that the NPU runs with the rest; the contract carries its threshold (the
score that `OOD_FALSE_ALARM` of the validation split's normal frames exceed) and the board sends a frame above it
to review. This module fits (numpy) and builds the graph (TensorFlow, host only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from semhinet_tf.artifacts.contract import OOD_OUTPUT

OOD_DIMS = 32  # whitened directions kept; bounded by the training frames (rank) and the feature width
OOD_FALSE_ALARM = 0.01  # the share of normal frames the threshold may send to review
OOD_EXCLUDED_LEAVES = ("bogus",)
__all__ = ["OOD_OUTPUT", "OodFit", "feature_tap", "fit_ood", "ood_graph", "pooled_features", "recall_at",
           "threshold_at"]
CAP_FACTOR = 10.0
_SHRINK = 1e-3  # ridge on the shared covariance, relative to its mean eigenvalue (numerical safety only)


@dataclass(frozen=True)
class OodFit:
    """z = (f - center) @ project (whitened); the score is min over classes of |z - means[c]|^2 / dims."""

    center: np.ndarray  # (D,)
    project: np.ndarray  # (D, dims)
    means: np.ndarray  # (C, dims): the fitted classes' means, whitened
    leaves: tuple[str, ...]  # the fitted classes, in the order of `means`
    frames: int
    cap: float = float("inf")  # the graph's scores stop here (see fit_ood)

    @property
    def dims(self) -> int:
        return int(self.project.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """The score of (N, D) features, in float64 (the reference the int8 graph is checked against)."""
        z = (np.asarray(features, np.float64) - self.center) @ self.project
        d = ((z[:, None, :] - self.means[None]) ** 2).sum(-1) / self.dims
        return np.minimum(d.min(axis=1), self.cap)


def fit_ood(features: np.ndarray, leaf_ids: np.ndarray, leaves: Sequence[str], dims: int = OOD_DIMS,
            excluded: Sequence[str] = OOD_EXCLUDED_LEAVES) -> OodFit:
    """Class means and the shared within-class covariance of `features` (N, D) of the frames whose leaf is not
    `excluded`; the `dims` leading directions of that covariance, whitened. Needs two or more fitted frames."""
    features = np.asarray(features, np.float64)
    leaf_ids = np.asarray(leaf_ids)
    keep_ids = [i for i, leaf in enumerate(leaves) if leaf not in excluded and np.any(leaf_ids == i)]
    mask = np.isin(leaf_ids, keep_ids)
    x, y = features[mask], leaf_ids[mask]
    if len(x) < 2:
        raise ValueError(f"the unfamiliar-frame score needs two or more training frames outside "
                         f"{', '.join(excluded) or 'no class'}, got {len(x)}")
    means = np.stack([x[y == i].mean(axis=0) for i in keep_ids])
    residual = x - means[np.searchsorted(keep_ids, y)]
    center = x.mean(axis=0)
    cov = residual.T @ residual / max(len(x) - len(keep_ids), 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    rank = int(np.sum(values > values.max() * 1e-9)) if values.max() > 0 else 0
    dims = max(1, min(dims, rank or 1, features.shape[1]))
    values, vectors = values[order[:dims]], vectors[:, order[:dims]]
    values = values + _SHRINK * max(float(np.mean(np.diag(cov))), 1e-12)
    project = vectors / np.sqrt(values)
    fit = OodFit(center=center, project=project, means=(means - center) @ project,
                 leaves=tuple(leaves[i] for i in keep_ids), frames=int(len(x)))
    # The int8 output spreads its 256 steps over the calibration frames' range, bogus frames' huge scores
    # included; capped at CAP_FACTOR times the training frames' 99th percentile, the threshold (near that
    # percentile) is resolved to a few percent, and a capped score still says "far from everything".
    cap = CAP_FACTOR * float(np.quantile(fit.score(x), 0.99))
    return OodFit(fit.center, fit.project, fit.means, fit.leaves, fit.frames, cap=max(cap, 1e-6))


def threshold_at(scores: np.ndarray, false_alarm: float = OOD_FALSE_ALARM) -> float:
    """The score that a share `false_alarm` of `scores` (familiar frames) exceed: the review threshold."""
    scores = np.asarray(scores, np.float64)
    if not scores.size:
        raise ValueError("no frames to set the unfamiliar-frame threshold on")
    return float(np.quantile(scores, 1.0 - false_alarm, method="higher"))


def recall_at(familiar: np.ndarray, unfamiliar: np.ndarray, false_alarm: float = OOD_FALSE_ALARM) -> float | None:
    """Share of `unfamiliar` scores above the threshold that `false_alarm` of `familiar` exceed."""
    unfamiliar = np.asarray(unfamiliar, np.float64)
    if not unfamiliar.size or not np.asarray(familiar).size:
        return None
    return float(np.mean(unfamiliar > threshold_at(familiar, false_alarm)))


# ---------------------------------------------------------------- the graph (host only: TensorFlow)
POOL_LAYERS = ("pool", "pool_max")


def feature_tap(model):
    """`model` with its pooled features as more outputs, named after POOL_LAYERS (average, then max pooling); a
    float or a QAT model (its layers' names carry tfmot's `quant_` prefix). `pooled_features` joins them."""
    from semhinet_tf.model import keras

    by_name = {layer.name.removeprefix("quant_"): layer for layer in model.layers}
    pooled = {name: by_name[name].output for name in POOL_LAYERS if name in by_name}
    if not pooled:
        raise ValueError(f"{model.name}: no pooling layer named {' or '.join(POOL_LAYERS)}; not a SEM-HiNet model")
    outputs = dict(model.output) if isinstance(model.output, dict) else \
        dict(zip(model.output_names, model.outputs, strict=True))
    return keras.Model(model.inputs, {**outputs, **pooled}, name=f"{model.name}_tap")


def pooled_features(outputs: dict) -> np.ndarray:
    """The (N, D) features the score reads, from a feature_tap model's outputs (POOL_LAYERS side by side)."""
    return np.concatenate([np.asarray(outputs[name]) for name in POOL_LAYERS if name in outputs], axis=1)


def ood_graph(outputs: dict, fit: OodFit):
    """TensorFlow ops from a feature_tap model's pooled outputs to the (1, 1) score, as the int8 converter can
    quantize them: a FULLY_CONNECTED from each pooled tensor to the whitened coordinates, added (not one on their
    concatenation, which would make the converter give both the same int8 scale and so change what the heads
    read), one FULLY_CONNECTED to each class's difference, MUL for the squares, one
    FULLY_CONNECTED summing each class's squares (negated, over dims), REDUCE_MAX, a sign flip and the cap
    (MINIMUM). Each class's difference is formed before squaring, so no two large int8 numbers are subtracted."""
    import tensorflow as tf

    classes, dims = fit.means.shape
    z = -tf.constant((fit.center @ fit.project)[None], tf.float32)
    start = 0
    for name in POOL_LAYERS:
        if name in outputs:
            width = int(outputs[name].shape[-1])
            z = z + tf.matmul(outputs[name], tf.constant(fit.project[start:start + width], tf.float32))
            start += width
    tile = tf.constant(np.tile(np.eye(dims), (1, classes)), tf.float32)  # (dims, classes*dims)
    diff = tf.matmul(z, tile) - tf.constant(fit.means.reshape(1, -1), tf.float32)
    summer = tf.constant(np.kron(np.eye(classes), np.ones((dims, 1))) * (-1.0 / dims), tf.float32)
    negative = tf.matmul(diff * diff, summer)  # (1, classes): minus each class's distance
    score = tf.multiply(tf.reduce_max(negative, axis=1, keepdims=True), -1.0)
    return tf.minimum(score, tf.constant(fit.cap, tf.float32))
