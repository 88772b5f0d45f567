"""Backbone weights pretrained on synthetic SEM frames, shipped inside the package (`--weights sem`).

Convolution weights do not depend on the input size, so one file serves every --img-size; a file
exists per (alpha, minimalistic) that was pretrained (see tools/pretrain_sem.py).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def sem_weights_name(alpha: float, minimalistic: bool) -> str:
    return f"mobilenetv3small_a{alpha:g}{'_min' if minimalistic else ''}_sem.npz"


def sem_weights_path(model_config) -> Path | None:
    """The shipped SEM-pretrained backbone for this configuration, or None when there is none."""
    b = model_config.backbone
    path = WEIGHTS_DIR / sem_weights_name(b.alpha, b.minimalistic)
    return path if path.exists() else None
