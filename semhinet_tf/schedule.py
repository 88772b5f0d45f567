"""Learning-rate schedule: linear warm-up then cosine decay (keyed on the optimizer step, so it resumes)."""

from __future__ import annotations

import math

import tensorflow as tf

from semhinet_tf.model import keras


@keras.utils.register_keras_serializable(package="semhinet")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, floor: float = 0.01):
        self.peak = float(peak)
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.floor = float(floor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / max(1.0, float(self.warmup_steps))
        progress = tf.clip_by_value((step - self.warmup_steps) / max(1.0, float(self.total_steps - self.warmup_steps)),
                                    0.0, 1.0)
        cosine = self.peak * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + tf.cos(math.pi * progress)))
        return tf.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "floor": self.floor}
