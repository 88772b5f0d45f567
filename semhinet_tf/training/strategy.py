"""Where and how TensorFlow runs a training: the tf.distribute strategy, which process writes the run
directory, and the seed that makes a run repeatable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def set_seed(seed: int) -> None:
    """One seed for Python, numpy and TensorFlow (initialisation, dropout) and deterministic kernels."""
    import random

    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # noqa: BLE001 - older TF or already-initialised context
        pass


def make_strategy(name: str) -> Any:
    """tf.distribute: MirroredStrategy over local GPUs, MultiWorkerMirroredStrategy from TF_CONFIG."""
    import tensorflow as tf

    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"unknown strategy {name!r} (auto, default, mirrored, multiworker)")


def worker_run_dir(run_dir: Path, strategy: Any) -> Path:
    """Where this process writes. Every multi-worker process runs the same steps (saving included, since
    reading mirrored variables is a collective), but only the chief writes to the run directory; the
    others write to a hidden sibling that is removed when they finish."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type:
        return run_dir
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and resolver.task_id == 0 and not has_chief)
    return run_dir if is_chief else run_dir.with_name(f".{run_dir.name}.{task_type}{resolver.task_id}")
