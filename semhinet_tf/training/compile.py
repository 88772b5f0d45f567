"""A phase's optimizer (AdamW on a warm-up + cosine schedule, optionally averaging the weights) and its
losses (masked per-head cross-entropy, or the joint -log P(leaf))."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from semhinet_tf.model import keras
from semhinet_tf.training.config import TrainConfig


class RampedAverageAdamW(keras.optimizers.AdamW):
    """AdamW whose weight average (use_ema) ramps its decay up as min(decay, (1 + t) / (10 + t)): Keras'
    fixed decay would weigh the random starting weights in for the first 1 / (1 - decay) steps.

    Why average: fine-tuned on a few hundred images, the weights move noticeably from step to step and the best
    epoch on a small validation split is partly luck; an average over the latest steps is a smoother point. In a
    run shorter than about 10 / (1 - decay) steps the ramp rules (the default 160 px run keeps its best epoch
    after 300-400 steps, where the ramp is 0.97-0.98: 0.99 and 0.995 give the same model, see model_choices.md
    (h)). The average lives in the optimizer, so the resumable checkpoint keeps it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("use_ema", True)
        super().__init__(*args, **kwargs)

    def _update_model_variables_moving_average(self, var_list):
        import tensorflow as tf

        # Keras calls this before the step counter moves: t = 0 on the first step, whose weights are copied.
        t = tf.cast(self.iterations, tf.float32)
        ramp = tf.minimum(tf.constant(self.ema_momentum, tf.float32), (2.0 + t) / (11.0 + t))
        decay = tf.where(t > 0, ramp, 0.0)
        for var in var_list:
            average = self._model_variables_moving_average[self._index_dict[self._var_key(var)]]
            d = tf.cast(decay, average.dtype)
            average.assign(d * average + (1.0 - d) * var)


RUN_EAGERLY_ENV = "SEMHINET_RUN_EAGERLY"


def run_eagerly() -> bool:
    """SEMHINET_RUN_EAGERLY=1 runs each training and validation step op by op instead of as a traced graph.

    Why: a Python breakpoint inside a layer or a loss then stops there, and a run of a handful of steps skips the
    20-35 s it takes to trace MobileNetV3's training step (measured: one 4-step epoch at 32 px, 35 s traced, 7 s
    eager; the test suite's tiny runs use it). A real run is several times slower so: leave it off."""
    return os.environ.get(RUN_EAGERLY_ENV) == "1"


def make_optimizer(cfg: TrainConfig, schedule: Any, average: bool = False) -> Any:
    """AdamW; with `average` (the float phase's --weight-average) one that keeps a moving average of the weights."""
    if average and cfg.weight_average > 0:
        return RampedAverageAdamW(learning_rate=schedule, weight_decay=cfg.weight_decay,
                                  ema_momentum=cfg.weight_average)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


def compile_phase(model: Any, taxonomy: Any, cfg: TrainConfig, peak_lr: float, total_steps: int, warmup_steps: int,
                  leaf_ids: np.ndarray | None = None, average: bool = False) -> None:
    """Compile `model` for one phase: its own schedule, optimizer, per-head losses, weights and metrics."""
    from semhinet_tf.losses import (
        MaskedAccuracy,
        head_class_priors,
        head_class_weights,
        masked_sparse_crossentropy,
    )
    from semhinet_tf.schedule import WarmupCosine

    schedule = WarmupCosine(peak_lr, total_steps, warmup_steps)
    optimizer = make_optimizer(cfg, schedule, average)
    names = ["leaf"] if cfg.flat else list(taxonomy.head_names)
    joint = cfg.head_loss == "joint"
    weights = {"leaf": 1.0} if cfg.flat else taxonomy.loss_weights(cfg.loss_weights)
    if joint:  # the product's negative log-likelihood: every head counts as often as it applies
        weights = {n: 1.0 for n in names}
    class_weights = {n: None for n in names}
    priors = {n: None for n in names}
    if cfg.balance_heads and not cfg.flat and leaf_ids is not None:
        args = (taxonomy.label_matrix(), leaf_ids, cfg.sampler, [h.num_classes for h in taxonomy.heads])
        if joint:  # balance by logit adjustment, which leaves every image's weight in -log P(leaf) as it is
            priors = dict(zip(names, head_class_priors(*args), strict=True))
        else:
            class_weights = dict(zip(names, head_class_weights(*args), strict=True))
    model.compile(optimizer=optimizer,
                  loss={n: masked_sparse_crossentropy(cfg.label_smoothing, class_weights[n], per_applicable=not joint,
                                                      train_prior=priors[n])
                        for n in names},
                  loss_weights={n: weights[n] for n in names},
                  metrics={n: [MaskedAccuracy(name="acc")] for n in names},
                  run_eagerly=run_eagerly())
