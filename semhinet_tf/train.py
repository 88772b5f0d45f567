"""Training's public names, kept importable from here for existing callers; the code lives in
semhinet_tf/training/, one module a job."""

from __future__ import annotations

from semhinet_tf.artifacts.run import FLOAT_MODEL, QAT_MODEL
from semhinet_tf.training.callbacks import phase_callbacks
from semhinet_tf.training.compile import RampedAverageAdamW, compile_phase, make_optimizer
from semhinet_tf.training.config import FINE_TUNE_LR, RESUMABLE_CHANGES, SCRATCH_LR, TrainConfig, default_lr
from semhinet_tf.training.loop import calibration_batches, fit_phase, pipeline_throughput, train
from semhinet_tf.training.state import resumed_config
from semhinet_tf.training.strategy import make_strategy, set_seed, worker_run_dir
from semhinet_tf.training.validation import hierarchical_scores, write_review_threshold
from semhinet_tf.training.weights import build_for_config, initial_weights

__all__ = [
    "FINE_TUNE_LR", "FLOAT_MODEL", "QAT_MODEL", "RESUMABLE_CHANGES", "SCRATCH_LR", "RampedAverageAdamW",
    "TrainConfig", "build_for_config", "calibration_batches", "compile_phase", "default_lr", "fit_phase",
    "hierarchical_scores", "initial_weights", "make_optimizer", "make_strategy", "phase_callbacks",
    "pipeline_throughput", "resumed_config", "set_seed", "train", "worker_run_dir", "write_review_threshold",
]
