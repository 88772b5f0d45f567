"""The options of a training run (TrainConfig) and the defaults that depend on them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from semhinet_tf.data.decode import DEFAULT_IMG_SIZE
from semhinet_tf.data.pipeline import Augment

# What a resumed run may change: how long each phase runs. Anything else would make a different run.
RESUMABLE_CHANGES = frozenset({"epochs", "qat_epochs"})

FINE_TUNE_LR = 3e-4
SCRATCH_LR = 1e-3


@dataclass
class TrainConfig:
    img_size: int = DEFAULT_IMG_SIZE
    epochs: int = 30
    qat_epochs: int = 6
    batch_size: int = 32
    steps_per_epoch: int | None = None  # default: one pass over the (balanced) training split
    lr: float | None = None  # peak rate; None: default_lr(weights)
    qat_lr: float = 1e-4  # QAT peak rate: fine-tunes a trained model, whatever the float phase started from
    qat_calibrate: bool = True  # start QAT's activation ranges from the float model's (False: tfmot's [-6, 6])
    qat_freeze_bn: bool = False  # QAT keeps the float model's BatchNorm moving statistics
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-5
    weight_average: float = 0.0  # float phase: validate and keep an exponential moving average of the weights
    label_smoothing: float = 0.05
    loss_weights: dict[str, float] = field(default_factory=dict)  # overrides of the taxonomy defaults
    seed: int = 0
    val_split: float = 0.2
    sampler: str = "balanced"
    balance_heads: bool = True  # weight each head's classes equally (see losses.head_class_weights)
    head_loss: str = "masked-mean"  # or "joint": -log P(leaf), no loss weights, balance by logit adjustment
    augment: dict[str, Any] = field(default_factory=lambda: Augment().to_dict())
    weights: str = "sem"  # none | sem | imagenet | PATH
    alpha: float = 1.0
    minimalistic: bool = False
    bn_momentum: float | None = None  # None: chosen from the training length
    head_units: int = 128
    dropout: float = 0.2
    flat: bool = False
    granularity: str = "per-channel"
    patience: int = 10
    databar: str = "auto"
    fit: str = "crop"
    strategy: str = "auto"  # auto | default | mirrored | multiworker
    workers: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def steps_per_epoch_for(self, train_size: int) -> int:
        """Steps of one epoch: the option, or one pass over the training split."""
        return self.steps_per_epoch or max(1, -(-train_size // self.batch_size))


def default_lr(weights: str | None) -> float:
    """Peak learning rate for a start: pretrained backbones are fine-tuned at a third of the from-scratch rate.
    Measured (model_choices.md (f), 150 a class, SEM start, 128 px): 1e-4 / 3e-4 / 1e-3 / 3e-3 gave leaf accuracy
    0.739 / 0.746 / 0.725 / 0.677 on seed 0; 1e-3 overwrites what pretraining learnt."""
    return SCRATCH_LR if weights in (None, "", "none") else FINE_TUNE_LR


def weights_file(weights: str | None) -> str | None:
    """The file a --weights value names, or None for the built-in starts (an input the run must not overwrite)."""
    return weights if weights not in ("none", "sem", "imagenet", "", None) else None
