"""Masked per-head losses and metrics: a head contributes nothing for an image it does not apply to.

Labels use -1 (taxonomy.IGNORE) where a head is masked. The loss is the mean over the images the
head applies to (not over the whole batch), so a specialist that sees three line defects in a batch
of 32 learns as much from them as it would from a batch of line defects.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from semhinet_tf.model import keras


def masked_sparse_crossentropy(label_smoothing: float = 0.0, class_weights=None, per_applicable: bool = True,
                               train_prior=None):
    """Per-sample cross-entropy scaled so Keras' batch mean equals the (class-weighted) mean over the
    applicable samples. `class_weights` (one per class of the head) balance a head whose classes the
    sampler does not balance: leaf-balanced sampling shows the gatekeeper 'defect' six times as often
    as 'normal'. `per_applicable=False` averages over the whole batch instead: summed over the heads
    with weight 1 and no class weights, that is -log P(leaf) of the product along the path, the flat
    softmax's own objective. `train_prior` (the head's class frequencies under the sampler) is the
    logit-adjusted loss (Menon et al., 2021, "Long-tail learning via logit adjustment"): the loss sees
    the output times the prior, renormalised, so the output itself learns the posterior under equal
    class priors. It balances a head like `class_weights` do, without reweighting any image's gradient."""
    weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
    prior = None if train_prior is None else tf.constant(train_prior, tf.float32)

    def loss(y_true, y_pred):
        y = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        mask = tf.cast(y >= 0, y_pred.dtype)
        if weights is not None:
            mask = mask * tf.cast(tf.gather(weights, tf.maximum(y, 0)), y_pred.dtype)
        if prior is not None:
            y_pred = y_pred * tf.cast(prior, y_pred.dtype)
            y_pred = y_pred / tf.maximum(tf.reduce_sum(y_pred, axis=-1, keepdims=True), 1e-12)
        k = tf.shape(y_pred)[-1]
        target = tf.one_hot(tf.maximum(y, 0), k, dtype=y_pred.dtype)
        if label_smoothing:
            target = target * (1.0 - label_smoothing) + label_smoothing / tf.cast(k, y_pred.dtype)
        ce = -tf.reduce_sum(target * tf.math.log(tf.clip_by_value(y_pred, 1e-7, 1.0)), axis=-1)
        if not per_applicable:
            return ce * mask
        n = tf.cast(tf.shape(y)[0], y_pred.dtype)
        return ce * mask * n / tf.maximum(tf.reduce_sum(mask), 1.0)

    loss.__name__ = "masked_ce"
    return loss


def _sampled_leaf_frequencies(num_leaves: int, leaf_ids: np.ndarray, sampler: str) -> np.ndarray:
    counts = np.bincount(leaf_ids, minlength=num_leaves).astype(np.float64)
    leaf_freq = (counts > 0).astype(np.float64) if sampler == "balanced" else counts
    return leaf_freq / max(leaf_freq.sum(), 1e-12)


def _head_class_frequencies(label_matrix: np.ndarray, leaf_ids: np.ndarray, sampler: str,
                            num_classes: list[int]) -> list[np.ndarray]:
    """Per head, the sampled share of each of its classes (unnormalised: images the head skips add nothing)."""
    leaf_freq = _sampled_leaf_frequencies(label_matrix.shape[0], leaf_ids, sampler)
    return [np.array([leaf_freq[label_matrix[:, j] == c].sum() for c in range(k)])
            for j, k in enumerate(num_classes)]


def head_class_priors(label_matrix: np.ndarray, leaf_ids: np.ndarray, sampler: str,
                      num_classes: list[int]) -> list[list[float]]:
    """Per head, how often each of its classes appears among the training images the head applies to, under
    the sampler (leaf-balanced sampling: the gatekeeper sees bogus / normal / defect as 1/8, 1/8, 6/8)."""
    return [[float(v) for v in freq / max(freq.sum(), 1e-12)]
            for freq in _head_class_frequencies(label_matrix, leaf_ids, sampler, num_classes)]


def head_class_weights(label_matrix: np.ndarray, leaf_ids: np.ndarray, sampler: str,
                       num_classes: list[int]) -> list[list[float]]:
    """Per head, weights that make its classes count equally under the sampler's leaf frequencies."""
    out = []
    for freq in _head_class_frequencies(label_matrix, leaf_ids, sampler, num_classes):
        present = freq > 0
        w = np.where(present, 1.0 / np.maximum(freq, 1e-12), 0.0)
        w = w / (freq[present] * w[present]).sum() * freq[present].sum()  # expected weight 1 per sample
        out.append([float(v) for v in w])
    return out


@keras.utils.register_keras_serializable(package="semhinet")
class MaskedAccuracy(keras.metrics.Metric):
    """Accuracy over the samples whose label is not -1."""

    def __init__(self, name: str = "acc", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_weight(name="correct", initializer="zeros")
        self.count = self.add_weight(name="count", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
        mask = y >= 0
        hit = tf.logical_and(mask, tf.equal(tf.argmax(y_pred, axis=-1), y))
        self.correct.assign_add(tf.reduce_sum(tf.cast(hit, tf.float32)))
        self.count.assign_add(tf.reduce_sum(tf.cast(mask, tf.float32)))

    def result(self):
        return tf.math.divide_no_nan(self.correct, self.count)

    def reset_state(self):
        self.correct.assign(0.0)
        self.count.assign(0.0)
