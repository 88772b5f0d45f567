"""The model a run starts from: built from the configuration, then loaded with its starting weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semhinet_tf.training.config import TrainConfig


def build_for_config(taxonomy: Any, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """The untrained model and its ModelConfig; BatchNorm momentum follows the training length unless set."""
    from semhinet_tf.model.heads import ModelConfig, build_model
    from semhinet_tf.model.mobilenet_v3 import BackboneConfig, auto_bn_momentum

    momentum = cfg.bn_momentum if cfg.bn_momentum is not None else auto_bn_momentum(total_steps)
    mcfg = ModelConfig(img_size=cfg.img_size, head_units=cfg.head_units, dropout=cfg.dropout, flat=cfg.flat,
                       backbone=BackboneConfig(alpha=cfg.alpha, minimalistic=cfg.minimalistic, bn_momentum=momentum))
    return build_model(taxonomy, mcfg), mcfg


def initial_weights(model: Any, cfg: TrainConfig, mcfg: Any) -> str:
    """Load the starting weights; returns a one-line description of what was loaded."""
    from semhinet_tf.model import mobilenet_v3 as mb
    from semhinet_tf.model.pretrained import sem_weights_path
    from semhinet_tf.safe_load import UnsafeFileError

    w = cfg.weights
    if w in ("none", "", None):
        return "random initialisation"
    if w == "sem":
        path = sem_weights_path(mcfg)
        if path is None:
            from semhinet_tf.model.pretrained import sem_weights_name

            b = mcfg.backbone
            print(f"warning: no SEM-pretrained backbone is shipped for alpha={b.alpha:g}"
                  f"{' minimalistic' if b.minimalistic else ''} ({sem_weights_name(b.alpha, b.minimalistic)}): "
                  "training from random weights, which on the synthetic benchmark reached about 0.2 leaf accuracy "
                  "(experiments/results/learning_curve.md). Pretrain one first (tools/pretrain_sem.py --alpha ...) "
                  "or pass --weights imagenet or --weights FILE", flush=True)
            return "random initialisation (no SEM-pretrained weights shipped for this configuration)"
        n = mb.load_backbone_weights(model, path)
        return f"SEM-pretrained backbone ({n} layers from {path.name})"
    if w == "imagenet":
        n = mb.load_imagenet_weights(model, cfg.img_size, mcfg.backbone, "imagenet")
        return f"ImageNet weights ({n} layers)"
    path = Path(w)
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    expected = "a .npz of backbone weights (tools/pretrain_sem.py) or keras.applications' MobileNetV3Small .h5"
    try:
        if path.suffix == ".npz":
            n = mb.load_backbone_weights(model, path)
            kind = "backbone weights"
        else:
            n = mb.load_imagenet_weights(model, cfg.img_size, mcfg.backbone, str(path))
            kind = "keras.applications weights"
    except UnsafeFileError:
        raise  # already one line naming the file; the CLI exits 2 for it
    except Exception as exc:  # noqa: BLE001 - h5py, numpy and Keras each raise their own types for a bad file
        raise ValueError(f"{path}: not weights this model can load ({expected}): "
                         f"{type(exc).__name__}: {exc}") from exc
    if n == 0:
        raise ValueError(f"{path}: no layer of this model found in it ({expected})")
    return f"{kind} ({n} layers from {path})"
