"""The unfamiliar-frame score (issue 26.4): how far a frame's pooled features lie from every class it was trained on.

A classifier has to put every frame in some class; a kind of bogus frame it never saw (a new failure of the tool,
an optical image, a wrong magnification) may land in any of them with a high probability. The score here reads the
frame's pooled features (average and max pooling, what the heads read) and adds two terms, each about 1 on a
familiar frame:
* the Mahalanobis distance to the nearest class mean, with one covariance shared by the classes (Lee et al.,
  NeurIPS 2018), in the `dims` directions where the training frames of a class vary most, whitened, / `dims`;
* the energy of the features outside those directions and the class means' span, relative to the training
  frames' mean (the residual of ViM, Wang et al., CVPR 2022): a frame that differs where the training frames
  never varied is unfamiliar however near a class mean its leading directions put it.

It is fitted after training on the training frames of the classes the model should recognise as usable SEM frames
(every leaf but `bogus` by default: bogus frames vary without end, and a verdict of bogus needs no second
opinion). `convert` appends the score to the int8 model as one more output, `ood`, computed by plain operators
on the VX delegate's list (FULLY_CONNECTED, MUL, SUB, ADD, REDUCE_MAX, MINIMUM; see ood_graph) that the ARM
boards' tflite-runtime also runs (`--no-ood` leaves it out). The contract carries
its threshold (the score that `OOD_FALSE_ALARM` of the validation split's normal frames exceed) and the board
sends a frame above it to review. This module fits (numpy) and builds the graph (TensorFlow, host only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from semhinet_tf import stats
from semhinet_tf.export.npu import ARM_MIN_FC_DEPTH as MIN_FC_DEPTH
from semhinet_tf.taxonomy import OOD_OUTPUT

OOD_DIMS = 32  # whitened directions kept; bounded by the training frames (rank) and the feature width
OOD_FALSE_ALARM = 0.01  # the share of normal frames the threshold may send to review
OOD_EXCLUDED_LEAVES = ("bogus",)
__all__ = ["OOD_OUTPUT", "OodFit", "feature_tap", "fit_ood", "ood_graph", "pooled_features", "recall_at",
           "threshold_at"]
CAP_FACTOR = 10.0  # each term stops at this times its training 99th percentile (see fit_ood)
_SHRINK = 1e-3  # ridge on the shared covariance, relative to its mean eigenvalue (numerical safety only)
_RESIDUAL_FLOOR = 1e-3  # a residual scale below this share of the features' spread is the fit's own echo


@dataclass(frozen=True)
class OodFit:
    """z = (f - center) @ project (whitened); r = (f - center) outside the orthonormal `basis`, taken a feature
    block at a time (`widths`: the pooled tensors side by side). The score is min over classes of
    |z - means[c]|^2 / dims, plus each block's |r|^2 over its training mean, each term capped (`caps`)."""

    center: np.ndarray  # (D,)
    project: np.ndarray  # (D, dims)
    means: np.ndarray  # (C, dims): the fitted classes' means, whitened
    basis: np.ndarray  # (D, B): the leading directions and the class means' span, orthonormal
    widths: tuple[int, ...]  # the feature blocks (average, max pooling), summing to D
    residual_scales: tuple[float, ...]  # each block's mean residual energy on the training frames
    leaves: tuple[str, ...]  # the fitted classes, in the order of `means`
    frames: int
    caps: tuple[float, ...] = ()  # each term (distance, then a residual a block) stops here (see fit_ood)

    @property
    def dims(self) -> int:
        return int(self.project.shape[1])

    @property
    def cap(self) -> float:
        """The highest score."""
        return float(sum(self.caps))

    def blocks(self) -> list[slice]:
        edges = np.cumsum((0, *self.widths))
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def terms(self, features: np.ndarray) -> list[np.ndarray]:
        """[distance, residual of each block] of (N, D) features, uncapped."""
        centred = np.asarray(features, np.float64) - self.center
        z = centred @ self.project
        out = [(((z[:, None, :] - self.means[None]) ** 2).sum(-1) / self.dims).min(axis=1)]
        r = centred - (centred @ self.basis) @ self.basis.T
        out += [(r[:, cols] ** 2).sum(1) / scale for cols, scale in zip(self.blocks(), self.residual_scales,
                                                                           strict=True)]
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        """The score of (N, D) features, in float64 (the reference the int8 graph is checked against)."""
        terms = self.terms(features)
        caps = self.caps or (np.inf,) * len(terms)
        return np.sum([np.minimum(t, c) for t, c in zip(terms, caps, strict=True)], axis=0)


def fit_ood(features: np.ndarray, leaf_ids: np.ndarray, leaves: Sequence[str], dims: int = OOD_DIMS,
            excluded: Sequence[str] = OOD_EXCLUDED_LEAVES, widths: Sequence[int] | None = None) -> OodFit:
    """Class means and the shared within-class covariance of `features` (N, D) of the frames whose leaf is not
    `excluded`; the `dims` leading directions of that covariance, whitened; the residual's scale per block of
    `widths` (default: one block). Needs two or more fitted frames."""
    features = np.asarray(features, np.float64)
    leaf_ids = np.asarray(leaf_ids)
    widths = tuple(int(w) for w in (widths or (features.shape[1],)))
    if sum(widths) != features.shape[1]:
        raise ValueError(f"feature blocks {widths} do not add up to the {features.shape[1]} features")
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
    # a quarter of the fitted frames at most: more directions than that and the basis below spans the training
    # frames themselves, whose residual (its scale) then vanishes
    dims = max(1, min(dims, rank or 1, features.shape[1], len(x) // 4))
    values, vectors = values[order[:dims]], vectors[:, order[:dims]]
    values = values + _SHRINK * max(float(np.mean(np.diag(cov))), 1e-12)
    project = vectors / np.sqrt(values)
    span, singular, _ = np.linalg.svd(np.concatenate([vectors, (means - center).T], axis=1), full_matrices=False)
    basis = span[:, singular > singular.max() * 1e-9]
    fit = OodFit(center=center, project=project, means=(means - center) @ project, basis=basis, widths=widths,
                 residual_scales=(1.0,) * len(widths), leaves=tuple(leaves[i] for i in keep_ids), frames=int(len(x)))
    total = float(np.mean(((x - center) ** 2).sum(1)))
    scales = tuple(max(float(np.mean(t)), _RESIDUAL_FLOOR * total, 1e-12) for t in fit.terms(x)[1:])
    fit = replace(fit, residual_scales=scales)
    # The int8 tensors spread their 256 steps over the calibration frames' range, bogus frames' huge scores
    # included; each term capped at CAP_FACTOR times its 99th percentile on the training frames (or times 1, its
    # nominal familiar value, if higher), the threshold
    # is resolved to a few percent, a capped score still says "far from everything", and the terms reach their
    # ADDs on comparable int8 scales (XNNPACK refuses an ADD whose scales are too far apart; the NPU loses
    # precision on one).
    caps = tuple(CAP_FACTOR * max(float(np.quantile(t, 0.99)), 1.0) for t in fit.terms(x))
    return replace(fit, caps=caps)


def threshold_at(scores: np.ndarray, false_alarm: float = OOD_FALSE_ALARM) -> float:
    """The lowest threshold that at most a share `false_alarm` of `scores` (familiar frames) exceed."""
    return stats.threshold_at(scores, false_alarm)


def recall_at(familiar: np.ndarray, unfamiliar: np.ndarray, false_alarm: float = OOD_FALSE_ALARM) -> float | None:
    """Share of `unfamiliar` scores above the threshold that `false_alarm` of `familiar` exceed."""
    return stats.recall_at(familiar, unfamiliar, false_alarm)


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


def pooled_features(outputs: dict) -> tuple[np.ndarray, tuple[int, ...]]:
    """The (N, D) features the score reads, from a feature_tap model's outputs (POOL_LAYERS side by side), and
    the width of each block (fit_ood's `widths`)."""
    blocks = [np.asarray(outputs[name]) for name in POOL_LAYERS if name in outputs]
    return np.concatenate(blocks, axis=1), tuple(b.shape[1] for b in blocks)


def ood_graph(outputs: dict, fit: OodFit):
    """TensorFlow ops from a feature_tap model's pooled outputs to the (1, 1) score, as the int8 converter can
    quantize them. Distance: a FULLY_CONNECTED from each pooled tensor to the whitened coordinates, added (not
    one on their concatenation, which would make the converter give both the same int8 scale and so change what
    the heads read), one FULLY_CONNECTED to each class's difference, MUL for the squares, one FULLY_CONNECTED
    summing each class's squares (negated), REDUCE_MAX and a sign flip. Residual, a pooled tensor at a time
    (its own scale): the tensor minus its reconstruction from the basis (FULLY_CONNECTED twice, SUB), squared
    and summed (MUL, FULLY_CONNECTED). Each term capped (MINIMUM), then added. Differences are formed before
    squaring, so no two large int8 numbers are subtracted after it. The whitened coordinates and the basis get
    zero directions up to MIN_FC_DEPTH: a shallower int8 FULLY_CONNECTED crashes the ARM boards' runtime."""
    import tensorflow as tf

    classes, dims = fit.means.shape
    depth = max(dims, MIN_FC_DEPTH)  # zero directions added: exactly 0 in int8, so the score is unchanged
    project, means, basis = (_zero_columns(a, depth) for a in (fit.project, fit.means, fit.basis))
    const = lambda a: tf.constant(np.asarray(a, np.float32))  # noqa: E731
    tensors = [outputs[name] for name in POOL_LAYERS if name in outputs]
    if [int(t.shape[-1]) for t in tensors] != list(fit.widths):
        raise ValueError(f"pooled outputs of widths {[int(t.shape[-1]) for t in tensors]}, fitted on {fit.widths}")
    blocks = list(zip(tensors, fit.blocks(), strict=True))
    z = -const((fit.center @ project)[None])
    u = -const((fit.center @ basis)[None])
    for tensor, cols in blocks:
        z = z + tf.matmul(tensor, const(project[cols]))
        u = u + tf.matmul(tensor, const(basis[cols]))
    tile = const(np.tile(np.eye(depth), (1, classes)))  # (depth, classes*depth)
    diff = tf.matmul(z, tile) - const(means.reshape(1, -1))
    summer = const(np.kron(np.eye(classes), np.ones((depth, 1))) * (-1.0 / dims))
    negative = tf.matmul(diff * diff, summer)  # (1, classes): minus each class's distance
    score = _ranged(tf.multiply(tf.reduce_max(negative, axis=1, keepdims=True), -1.0), fit.caps[0])
    total = fit.caps[0]
    for (tensor, cols), scale, cap in zip(blocks, fit.residual_scales, fit.caps[1:], strict=True):
        r = tensor - (tf.matmul(u, const(basis[cols].T)) + const(fit.center[cols][None]))
        energy = tf.matmul(r * r, const(np.full((cols.stop - cols.start, 1), 1.0 / scale)))
        total += cap
        score = _ranged(score + _ranged(energy, cap), total)
    return score


def _zero_columns(a: np.ndarray, width: int) -> np.ndarray:
    """`a` with zero columns appended up to `width` columns."""
    return np.pad(a, ((0, 0), (0, max(0, width - a.shape[1]))))


def _ranged(x, cap: float):
    """min(x, cap), with its int8 range fixed to [0, cap]: otherwise the converter takes the range from the
    calibration frames, and every frame beyond the most unfamiliar of those (an odd normal frame, most bogus
    frames) ties at that value."""
    import tensorflow as tf

    capped = tf.minimum(x, tf.constant([[cap]], tf.float32))
    return tf.quantization.fake_quant_with_min_max_args(capped, min=0.0, max=float(cap), num_bits=8)
