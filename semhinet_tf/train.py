"""Training: float phase (warm-up + cosine), then quantization-aware fine-tuning, best-by-validation.

The kept checkpoint of each phase is the best on the validation split by a hierarchical metric:
balanced accuracy of the leaf decoded through the whole hierarchy (the number a fab reads), so a
model that is good head by head but routes wrongly is not preferred.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from semhinet_tf.artifacts import run as run_files
from semhinet_tf.artifacts.files import atomic_write_text, write_json
from semhinet_tf.artifacts.run import CONFIG as CONFIG_FILE
from semhinet_tf.artifacts.run import FLOAT_MODEL, QAT_MODEL
from semhinet_tf.artifacts.run import HISTORY as HISTORY_FILE
from semhinet_tf.artifacts.run import STATE as STATE_FILE
from semhinet_tf.artifacts.run import TAXONOMY as TAXONOMY_FILE
from semhinet_tf.data.pipeline import Augment
from semhinet_tf.data.views import invariant_views

# What a resumed run may change: how long each phase runs. Anything else would make a different run.
RESUMABLE_CHANGES = frozenset({"epochs", "qat_epochs"})


@dataclass
class TrainConfig:
    img_size: int = 160
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


FINE_TUNE_LR = 3e-4
SCRATCH_LR = 1e-3


def default_lr(weights: str | None) -> float:
    """Peak learning rate for a start: pretrained backbones are fine-tuned at a third of the from-scratch rate.
    Measured (model_choices.md (f), 150 a class, SEM start, 128 px): 1e-4 / 3e-4 / 1e-3 / 3e-3 gave leaf accuracy
    0.739 / 0.746 / 0.725 / 0.677 on seed 0; 1e-3 overwrites what pretraining learnt."""
    return SCRATCH_LR if weights in (None, "", "none") else FINE_TUNE_LR


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


def make_strategy(name: str):
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


def worker_run_dir(run_dir: Path, strategy) -> Path:
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


def _atomic_json(obj: Any, path: Path) -> None:
    write_json(obj, path)


# ---------------------------------------------------------------- validation and history callbacks
def hierarchical_scores(model, frames: np.ndarray, leaf_ids: np.ndarray, taxonomy) -> dict:
    """Leaf accuracy and balanced accuracy through the hierarchy (or the flat softmax)."""
    from semhinet_tf.predict import predict_keras

    probs = predict_keras(model, frames)
    leaf_p = taxonomy.leaf_probabilities(probs)  # a flat model's "leaf" output as it is
    pred = leaf_p.argmax(1)
    recalls = [np.mean(pred[leaf_ids == c] == c) for c in np.unique(leaf_ids)]
    return {"val_leaf_acc": float(np.mean(pred == leaf_ids)), "val_leaf_bacc": float(np.mean(recalls))}


def _callbacks(run_dir: Path, phase: str, taxonomy, val, cfg: TrainConfig, model_path: Path, resume_epoch: int):
    from semhinet_tf.model import keras

    class Validate(keras.callbacks.Callback):
        """Scores the hierarchy on validation, keeps the best model on disk (atomically), stops early."""

        def __init__(self):
            super().__init__()
            state = _read_state(run_dir).get(phase, {})
            self.best = state.get("best", -1.0)
            self.best_epoch = state.get("best_epoch", -1)
            self.wait = 0

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            scores = hierarchical_scores(self.model, val[0], val[1], taxonomy)
            logs.update(scores)
            score = scores["val_leaf_bacc"]
            if score > self.best + 1e-6:
                self.best, self.best_epoch, self.wait = score, epoch, 0
                _save_model(self.model, model_path, quantized=phase == "qat")
            else:
                self.wait += 1
            if self.wait >= cfg.patience:
                self.model.stop_training = True
            print(f"  [{phase}] epoch {epoch + 1}: val leaf acc {scores['val_leaf_acc']:.3f}, "
                  f"balanced {score:.3f} (best {self.best:.3f} at epoch {self.best_epoch + 1})", flush=True)

    class History(keras.callbacks.Callback):
        """history.csv with a phase column, appended atomically after each epoch."""

        def on_epoch_end(self, epoch, logs=None):
            row = {"phase": phase, "epoch": epoch + 1, "lr": float(self._lr()), **{k: float(v) for k, v in
                                                                                    (logs or {}).items()}}
            _append_history(run_dir / HISTORY_FILE, row)

        def _lr(self):
            opt = self.model.optimizer
            lr = opt.learning_rate
            step = opt.iterations.read_value()  # a MirroredVariable under tf.distribute
            return (lr(step) if callable(lr) else lr).numpy()

    class Checkpoint(keras.callbacks.Callback):
        """Resumable state after every epoch: weights, optimizer, epoch, best score."""

        def __init__(self, validate: Validate):
            super().__init__()
            self.validate = validate

        def on_epoch_end(self, epoch, logs=None):
            ckpt_dir = run_dir / "checkpoint" / phase
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            import tensorflow as tf

            ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
            manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir), max_to_keep=1)
            manager.save(checkpoint_number=epoch + 1)  # the 'checkpoint' index file is written last
            state = _read_state(run_dir)
            state[phase] = {"epoch": epoch + 1, "best": self.validate.best, "best_epoch": self.validate.best_epoch,
                            "stopped": bool(self.model.stop_training)}
            _atomic_json(state, run_dir / STATE_FILE)

    validate = Validate()
    if phase == "float" and cfg.weight_average > 0:
        average = WeightAverage(cfg.weight_average)
        return [average, validate, average.restorer(), History(), Checkpoint(validate)]
    return [validate, History(), Checkpoint(validate)]


def _callback_base():
    """keras.callbacks.Callback of the Keras this package uses (tf-keras for QAT), imported when train is."""
    from semhinet_tf.model import keras

    return keras.callbacks.Callback


class WeightAverage(_callback_base()):
    """Exponential moving average of the trainable weights (Polyak averaging), swapped in for validation at
    each epoch's end, so the kept model is the average; the raw weights go back for the next epoch.

    Why: fine-tuned on a few hundred images, the weights move noticeably from step to step and the best epoch on a
    small validation split is partly luck; an average over the latest steps is a smoother point.
    The decay at step t is min(decay, (1 + t) / (10 + t)), so the first steps do not lean on the starting
    weights; in a run shorter than about 10 / (1 - decay) steps the ramp rules (the default 160 px run keeps its
    best epoch after 300-400 steps, where the ramp is 0.97-0.98: 0.99 and 0.995 give the same model, see
    model_choices.md (h)). The average is not in the resumable checkpoint: a resumed run restarts it from the
    raw weights."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = float(decay)
        self._shadow = None  # the averaged weights, built at the first step (the model is known by then)
        self._steps = None
        self._raw = None
        self._update = None

    def _build(self):
        import tensorflow as tf

        weights = self.model.trainable_weights
        with self.model.distribute_strategy.scope():
            self._shadow = [tf.Variable(w, trainable=False) for w in weights]
            self._steps = tf.Variable(0.0, trainable=False)

        @tf.function
        def update():
            self._steps.assign_add(1.0)
            decay = tf.minimum(self.decay, (1.0 + self._steps) / (10.0 + self._steps))
            for s, w in zip(self._shadow, weights, strict=True):
                s.assign(decay * s + (1.0 - decay) * w)

        self._update = update

    def on_train_batch_end(self, batch, logs=None):
        if self._update is None:
            self._build()
        self._update()

    def on_epoch_end(self, epoch, logs=None):
        if self._shadow is None:
            return
        self._raw = [w.numpy() for w in self.model.trainable_weights]
        for w, s in zip(self.model.trainable_weights, self._shadow, strict=True):
            w.assign(s)

    def restore(self) -> None:
        if self._raw is not None:
            for w, r in zip(self.model.trainable_weights, self._raw, strict=True):
                w.assign(r)
            self._raw = None

    def restorer(self):
        """The callback that puts the raw weights back after validation (placed after Validate)."""
        from semhinet_tf.model import keras

        average = self

        class Restore(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                average.restore()

        return Restore()


def _append_history(path: Path, row: dict) -> None:
    import csv
    import io

    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: str(v) for k, v in row.items()})
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _read_state(run_dir: Path) -> dict:
    p = run_dir / STATE_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def _save_model(model, path: Path, quantized: bool) -> None:
    from semhinet_tf.model.io import save_model

    save_model(model, path, quantized=quantized)


# ---------------------------------------------------------------- phases
def _compile(model, taxonomy, cfg: TrainConfig, peak_lr: float, total_steps: int, warmup_steps: int,
             leaf_ids: np.ndarray | None = None):
    from semhinet_tf.losses import (
        MaskedAccuracy,
        head_class_priors,
        head_class_weights,
        masked_sparse_crossentropy,
    )
    from semhinet_tf.model import keras
    from semhinet_tf.schedule import WarmupCosine

    schedule = WarmupCosine(peak_lr, total_steps, warmup_steps)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
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
                  metrics={n: [MaskedAccuracy(name="acc")] for n in names})


def _fit_phase(phase: str, model, taxonomy, train, val, cfg: TrainConfig, run_dir: Path, epochs: int,
               peak_lr: float, warmup_epochs: float, model_path: Path, resume: bool, strategy) -> float:
    """One training phase with its own schedule; returns the training step's images/s."""
    import tensorflow as tf

    from semhinet_tf.data.pipeline import make_dataset

    steps = cfg.steps_per_epoch or max(1, int(np.ceil(len(train[1]) / cfg.batch_size)))
    with strategy.scope():
        _compile(model, taxonomy, cfg, peak_lr, steps * epochs, int(warmup_epochs * steps), train[1])
    initial_epoch = 0
    state = _read_state(run_dir).get(phase, {})
    if resume and state:
        if state.get("stopped") or state.get("epoch", 0) >= epochs:
            print(f"  [{phase}] already finished ({state.get('epoch')} epochs); skipping", flush=True)
            return 0.0
        ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        latest = tf.train.latest_checkpoint(str(run_dir / "checkpoint" / phase))
        if latest:
            ckpt.restore(latest).expect_partial()
            initial_epoch = int(state["epoch"])
            print(f"  [{phase}] resuming after epoch {initial_epoch}", flush=True)
    seed = cfg.seed if phase == "float" else cfg.seed + 1
    ds = make_dataset(train[0], train[1], taxonomy, cfg.batch_size, steps * epochs, seed, cfg.sampler,
                      Augment(**cfg.augment), start_step=initial_epoch * steps, flat=cfg.flat)
    callbacks = _callbacks(run_dir, phase, taxonomy, val, cfg, model_path, initial_epoch)
    timer = _StepTimer()
    model.fit(ds, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps, callbacks=[timer, *callbacks],
              verbose=1 if os.environ.get("SEMHINET_QUIET") != "1" else 2)
    return timer.images_per_second(cfg.batch_size)


class _StepTimer(_callback_base()):
    """Training-step throughput, first epoch excluded (graph tracing), validation excluded."""

    def __init__(self):
        super().__init__()
        self.batches, self.seconds, self._t = 0, 0.0, None

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._t is not None and batch > 0:  # the first batch of an epoch pays for tracing / iterator start
            self.batches += 1
            self.seconds += time.perf_counter() - self._t

    def images_per_second(self, batch_size: int) -> float:
        return round(self.batches * batch_size / self.seconds, 1) if self.seconds else 0.0


def pipeline_throughput(train, taxonomy, cfg: TrainConfig, batches: int = 20) -> float:
    """Images/s the input pipeline alone delivers (gather + augment + batch), to compare with the step."""
    from semhinet_tf.data.pipeline import make_dataset

    ds = make_dataset(train[0], train[1], taxonomy, cfg.batch_size, batches + 2, cfg.seed, cfg.sampler,
                      Augment(**cfg.augment), flat=cfg.flat)
    it = iter(ds)
    next(it)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return round(batches * cfg.batch_size / (time.perf_counter() - t), 1)


def build_for_config(taxonomy, cfg: TrainConfig, total_steps: int):
    from semhinet_tf.model.heads import ModelConfig, build_model
    from semhinet_tf.model.mobilenet_v3 import BackboneConfig, auto_bn_momentum

    momentum = cfg.bn_momentum if cfg.bn_momentum is not None else auto_bn_momentum(total_steps)
    mcfg = ModelConfig(img_size=cfg.img_size, head_units=cfg.head_units, dropout=cfg.dropout, flat=cfg.flat,
                       backbone=BackboneConfig(alpha=cfg.alpha, minimalistic=cfg.minimalistic, bn_momentum=momentum))
    return build_model(taxonomy, mcfg), mcfg


def initial_weights(model, cfg: TrainConfig, mcfg) -> str:
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


def train(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, taxonomy=None, overwrite: bool = False,
          resume: bool = False, strict: bool = False, progress: bool = True, given: set[str] | None = None,
          inputs: Sequence[str | Path] = (), cache_dir: str | Path | None = None, use_cache: bool = True) -> dict:
    """Discover, split, decode, train float, fine-tune QAT; everything lands in run_dir.

    Decoded frames go through the on-disk frame cache (data/cache.py; `cache_dir` or the default location)
    unless `use_cache` is False, in which case they are held in memory.

    run_dir is never an input's folder (`inputs`: more files the run reads, e.g. a taxonomy file); `overwrite`
    replaces only a run directory; `resume` continues one, with the options in `given` checked against it."""
    from semhinet_tf.data.cache import open_cache
    from semhinet_tf.data.dataset import prepare_dataset
    from semhinet_tf.taxonomy import Taxonomy

    t0 = time.time()
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op of the program.
    strategy = make_strategy(cfg.strategy)
    chief_run_dir = Path(run_dir)
    run_dir = worker_run_dir(chief_run_dir, strategy)
    if run_dir != chief_run_dir:  # a non-chief worker: same work, files kept apart and removed at the end
        overwrite, resume = True, False
    weights_file = cfg.weights if cfg.weights not in ("none", "sem", "imagenet", "", None) else None
    run_files.prepare_run_dir(run_dir, inputs=[data_dir, weights_file, *inputs], overwrite=overwrite, resume=resume)
    if resume:
        cfg = resumed_config(run_dir, cfg, data_dir, given, taxonomy)
        taxonomy = Taxonomy.from_spec(json.loads((run_dir / TAXONOMY_FILE).read_text()))
    if cfg.lr is None:
        cfg = replace(cfg, lr=default_lr(cfg.weights))
    taxonomy = taxonomy or Taxonomy.default()
    set_seed(cfg.seed)
    cache = open_cache(cache_dir, use_cache)
    data = prepare_dataset(data_dir, run_dir, taxonomy, cfg, strict=strict, progress=progress, reuse_split=resume,
                           cache=cache)
    train_set, val_set = data["train"], data["val"]
    steps = cfg.steps_per_epoch or max(1, int(np.ceil(len(train_set[1]) / cfg.batch_size)))
    with strategy.scope():
        model, mcfg = build_for_config(taxonomy, cfg, steps * cfg.epochs)
        start = initial_weights(model, cfg, mcfg)
    print(f"model: MobileNetV3Small alpha={cfg.alpha} at {cfg.img_size}px, {model.count_params():,} parameters, "
          f"BN momentum {mcfg.backbone.bn_momentum:.3f}; start: {start}", flush=True)
    config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "data_dir": str(Path(data_dir).resolve()),
              "preprocess": data["preprocess"], "start_weights": start, "version": _version()}
    _atomic_json(config, run_dir / CONFIG_FILE)
    _atomic_json(taxonomy.to_spec(), run_dir / TAXONOMY_FILE)

    pipe_ips = pipeline_throughput(train_set, taxonomy, cfg)
    where = f"memory-mapped from {cache.root}" if cache else "held in memory"
    print(f"input pipeline: {pipe_ips:.0f} images/s (decoded frames {where})", flush=True)
    t_float = time.time()
    step_ips = _fit_phase("float", model, taxonomy, train_set, val_set, cfg, run_dir, cfg.epochs, cfg.lr,
                          cfg.warmup_epochs, run_dir / FLOAT_MODEL, resume, strategy)
    t_float = time.time() - t_float
    from semhinet_tf.model.io import load_model

    best_float = load_model(run_dir / FLOAT_MODEL)
    result = {"run_dir": str(run_dir), "float_seconds": round(t_float, 1),
              "float_val": hierarchical_scores(best_float, *val_set, taxonomy)}
    if cfg.qat_epochs > 0:
        from semhinet_tf.model.quant import calibrate_ranges, freeze_batchnorm, qat_base, quantize_model

        t_qat = time.time()
        with strategy.scope():
            base = qat_base(best_float, taxonomy, mcfg, cfg.granularity)
            qat = quantize_model(base, cfg.granularity)
        if cfg.qat_calibrate:
            batches = _calibration_batches(train_set, taxonomy, cfg)
            n = calibrate_ranges(qat, base, batches)
            print(f"  [qat] {n} activation ranges started from the float model's on {len(batches)} training batches",
                  flush=True)
        if cfg.qat_freeze_bn:
            print(f"  [qat] {freeze_batchnorm(qat)} BatchNorm layers keep the float model's statistics", flush=True)
        _fit_phase("qat", qat, taxonomy, train_set, val_set, cfg, run_dir, cfg.qat_epochs,
                   cfg.qat_lr, 0.0, run_dir / QAT_MODEL, resume, strategy)
        result["qat_seconds"] = round(time.time() - t_qat, 1)
        final = load_model(run_dir / QAT_MODEL)  # the best QAT epoch, as saved (rebuilding one costs seconds)
        result["qat_val"] = hierarchical_scores(final, *val_set, taxonomy)
    else:
        final = best_float
    result["review_threshold"] = write_review_threshold(final, val_set, taxonomy, run_dir,
                                                        views=invariant_views(cfg.augment))
    result["seconds"] = round(time.time() - t0, 1)
    result["pipeline_images_per_second"] = pipe_ips
    result["train_step_images_per_second"] = step_ips
    print(f"throughput: input pipeline {pipe_ips:.0f} images/s vs training step {step_ips:.0f} images/s",
          flush=True)
    _atomic_json(result, run_dir / "train_result.json")
    if run_dir != chief_run_dir:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _calibration_batches(train, taxonomy, cfg: TrainConfig, steps: int = 8) -> list:
    """A few training batches as QAT will see them (balanced, augmented), to start its activation ranges."""
    from semhinet_tf.data.pipeline import Augment, make_dataset

    ds = make_dataset(train[0], train[1], taxonomy, cfg.batch_size, steps, cfg.seed + 2, cfg.sampler,
                      Augment(**cfg.augment), flat=cfg.flat)
    return [images for images, _ in ds]


def write_review_threshold(model, val, taxonomy, run_dir: Path, target_purity: float = 0.99,
                           views: Sequence[str] = ("identity",)) -> dict:
    """The lowest leaf-probability threshold whose automatic decisions reach the target purity on validation;
    `convert` embeds it in the .tflite so predict and the board flag the same images.

    Averaging test-time views changes how confident the model is, so the threshold is also chosen for each
    number of views the model offers ("by_views"); the top-level keys are the single-view one."""
    from semhinet_tf.data.views import apply_view, log_average, view_counts
    from semhinet_tf.evaluate import coverage_curve, threshold_for_purity
    from semhinet_tf.predict import predict_keras

    counts = view_counts(views)
    per_view = [predict_keras(model, apply_view(val[0], name)) for name in views[:max(counts)]]

    def point_for(n: int) -> dict:
        leaf_p = taxonomy.leaf_probabilities(per_view[0] if n == 1 else log_average(per_view[:n]))
        point = threshold_for_purity(coverage_curve(val[1], leaf_p), target_purity)
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in point.items()}

    point = point_for(1)
    by_views = {str(n): point_for(n) for n in counts if n > 1}
    _atomic_json({**point, "target_purity": target_purity, "split": "val", "by_views": by_views},
                 run_dir / "review_threshold.json")
    return {**point, "by_views": by_views}


def resumed_config(run_dir: Path, cfg: TrainConfig, data_dir: str | Path, given: set[str] | None = None,
                   taxonomy=None) -> TrainConfig:
    """The configuration a --resume continues with: the run's own, with new epoch counts.

    `given` names the options the user set on purpose (None: every field of `cfg`); any of them that differs
    from the run's, other than the epoch counts, is refused, each named, as are another data folder or taxonomy."""
    from semhinet_tf.taxonomy import Taxonomy

    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text())
        saved = TrainConfig.from_dict(config["train"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise run_files.RunDirError(f"{run_dir}: cannot be resumed: its {CONFIG_FILE} is missing or unreadable "
                                    f"(the run stopped before its first epoch; start it again with --overwrite)"
                                    ) from exc
    fields = set(cfg.to_dict()) if given is None else set(given) & set(cfg.to_dict())
    changed = [f"{name} {getattr(saved, name)!r} -> {getattr(cfg, name)!r}"
               for name in sorted(fields - RESUMABLE_CHANGES)
               if getattr(cfg, name) != getattr(saved, name) and not (name == "lr" and getattr(cfg, name) is None)]
    saved_data = config.get("data_dir")
    if saved_data and Path(saved_data).resolve() != Path(data_dir).resolve():
        changed.append(f"data {saved_data} -> {Path(data_dir).resolve()}")
    if taxonomy is not None:
        saved_tax = Taxonomy.from_spec(json.loads((run_dir / TAXONOMY_FILE).read_text()))
        if saved_tax.to_spec() != taxonomy.to_spec():
            changed.append("taxonomy differs from the run's")
    if changed:
        raise run_files.RunDirError(f"{run_dir}: --resume continues the same run; only --epochs and --qat-epochs may "
                                    f"change, but: {'; '.join(changed)}")
    return replace(saved, epochs=cfg.epochs, qat_epochs=cfg.qat_epochs)


def _version() -> str:
    from semhinet_tf import __version__

    return __version__
