"""Training: float phase (warm-up + cosine), then quantization-aware fine-tuning, best-by-validation.

The kept checkpoint of each phase is the best on the validation split by a hierarchical metric:
balanced accuracy of the leaf decoded through the whole hierarchy (the number a fab reads), so a
model that is good head by head but routes wrongly is not preferred.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from semhinet_tf.artifacts import run as run_files
from semhinet_tf.artifacts.files import write_json
from semhinet_tf.artifacts.run import CHECKPOINT, FLOAT_MODEL, QAT_MODEL, TRAIN_RESULT
from semhinet_tf.artifacts.run import CONFIG as CONFIG_FILE
from semhinet_tf.artifacts.run import TAXONOMY as TAXONOMY_FILE
from semhinet_tf.data.pipeline import Augment
from semhinet_tf.data.views import invariant_views
from semhinet_tf.training.config import TrainConfig, default_lr, weights_file
from semhinet_tf.training.state import read_state, resumed_config
from semhinet_tf.training.strategy import make_strategy, set_seed, worker_run_dir
from semhinet_tf.training.validation import hierarchical_scores, write_review_threshold
from semhinet_tf.training.weights import build_for_config, initial_weights


def resume_point(phase: str, state: dict, has_backup: bool, epochs: int, resume: bool) -> tuple[int | None, str]:
    """Where a phase starts: (first epoch, or None when it is already done; what to tell the user).

    A resumed run says which case it is in, so a run interrupted before its first epoch ended (nothing saved)
    is not silently trained again from the start."""
    if not resume:
        return 0, ""
    if not state:
        return 0, "no epoch of this phase had finished: training it from its first epoch"
    if state.get("stopped") or state.get("epoch", 0) >= epochs:
        return None, f"already finished ({state.get('epoch')} epochs); skipping"
    if not has_backup:
        return 0, (f"its checkpoint of epoch {state.get('epoch')} is missing ({CHECKPOINT}/{phase}): "
                   f"training it again from its first epoch")
    # BackupAndRestore restores the weights and the optimizer from the backup as fit starts
    return int(state["epoch"]), f"resuming after epoch {int(state['epoch'])}"


def fit_phase(phase: str, model: Any, taxonomy: Any, train: tuple, val: tuple, cfg: TrainConfig, run_dir: Path,
              epochs: int, peak_lr: float, warmup_epochs: float, model_path: Path, resume: bool, strategy: Any,
              progress: bool = True) -> float:
    """One training phase with its own schedule; returns the training step's images/s."""
    from semhinet_tf.data.pipeline import make_dataset
    from semhinet_tf.training.callbacks import StepTimer, phase_callbacks
    from semhinet_tf.training.compile import compile_phase

    steps = cfg.steps_per_epoch_for(len(train[1]))
    with strategy.scope():
        compile_phase(model, taxonomy, cfg, peak_lr, steps * epochs, int(warmup_epochs * steps), train[1],
                      average=phase == "float")
    backup = run_dir / CHECKPOINT / phase
    initial_epoch, said = resume_point(phase, read_state(run_dir).get(phase, {}), backup.is_dir(), epochs, resume)
    if said:
        print(f"  [{phase}] {said}", flush=True)
    if initial_epoch is None:
        return 0.0
    if initial_epoch == 0:  # a backup without saved progress belongs to no run this one continues
        shutil.rmtree(backup, ignore_errors=True)
    seed = cfg.seed if phase == "float" else cfg.seed + 1
    # the data loading call stays here, where a decoded-frame cache may be added
    ds = make_dataset(train[0], train[1], taxonomy, cfg.batch_size, steps * epochs, seed, cfg.sampler,
                      Augment(**cfg.augment), start_step=initial_epoch * steps, flat=cfg.flat)
    timer = StepTimer()
    callbacks = phase_callbacks(run_dir, phase, taxonomy, val, cfg, model_path, epochs, steps, progress, timer)
    model.fit(ds, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps, callbacks=[timer, *callbacks],
              verbose=0)
    return timer.images_per_second(cfg.batch_size)


def pipeline_throughput(train: tuple, taxonomy: Any, cfg: TrainConfig, batches: int = 20) -> float:
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


def calibration_batches(train: tuple, taxonomy: Any, cfg: TrainConfig, steps: int = 8) -> list:
    """A few training batches as QAT will see them (balanced, augmented), to start its activation ranges."""
    from semhinet_tf.data.pipeline import make_dataset

    ds = make_dataset(train[0], train[1], taxonomy, cfg.batch_size, steps, cfg.seed + 2, cfg.sampler,
                      Augment(**cfg.augment), flat=cfg.flat)
    return [images for images, _ in ds]


def train(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, taxonomy: Any = None,
          overwrite: bool = False, resume: bool = False, strict: bool = False, progress: bool = True,
          given: set[str] | None = None, inputs: Sequence[str | Path] = (), cache_dir: str | Path | None = None,
          use_cache: bool = True, source: Any = None, labels: str | Path | None = None) -> dict:
    """Discover, split, decode, train float, fine-tune QAT; everything lands in run_dir.

    Decoded frames go through the on-disk frame cache (data/cache.py; `cache_dir` or the default location)
    unless `use_cache` is False, in which case they are held in memory.

    `source` (a from_run.SourceRun, with `cfg` from `from_run.fine_tune_config`) fine-tunes that run's float
    weights on its own split, with the reviewed frames of `labels` (REVIEW/labels.jsonl) added (`train --from`).

    run_dir is never an input's folder (`inputs`: more files the run reads, e.g. a taxonomy file); `overwrite`
    replaces only a run directory; `resume` continues one, with the options in `given` checked against it.
    `progress`: bars on stderr (also off with SEMHINET_QUIET=1); the per-epoch lines go to stdout either way.
    The run directory is claimed (artifacts.run.RunLock) from before its first file is written until the end."""
    t0 = time.time()
    progress = progress and os.environ.get("SEMHINET_QUIET") != "1"
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op of the program.
    strategy = make_strategy(cfg.strategy)
    chief_run_dir = Path(run_dir)
    run_dir = worker_run_dir(chief_run_dir, strategy)
    if run_dir != chief_run_dir:  # a non-chief worker: same work, files kept apart and removed at the end
        overwrite, resume = True, False
    extra_inputs = [source.dir, labels] if source is not None else []
    claim = run_files.prepare_run_dir(run_dir, inputs=[data_dir, weights_file(cfg.weights), *inputs,
                                                       *extra_inputs], overwrite=overwrite, resume=resume,
                                      replaces=run_files.is_run_output)
    with claim:  # held while this process writes the run; another train, resume or convert of it is refused
        return _train_claimed(data_dir, run_dir, chief_run_dir, cfg, taxonomy, resume, strict, progress, given,
                              cache_dir, use_cache, source, labels, strategy, t0)


def _train_claimed(data_dir, run_dir: Path, chief_run_dir: Path, cfg: TrainConfig, taxonomy: Any, resume: bool,
                   strict: bool, progress: bool, given: set[str] | None, cache_dir, use_cache: bool, source: Any,
                   labels, strategy, t0: float) -> dict:
    """train() once the run directory is claimed."""
    from semhinet_tf.data.cache import open_cache
    from semhinet_tf.data.dataset import prepare_dataset
    from semhinet_tf.taxonomy import Taxonomy

    if resume and _fine_tuned(run_dir):
        raise run_files.RunDirError(f"{run_dir}: was fine-tuned with --from, which --resume cannot continue; "
                                    f"run the same train --from command again with --overwrite")
    if resume:
        cfg = resumed_config(run_dir, cfg, data_dir, given, taxonomy)
        taxonomy = Taxonomy.from_spec(json.loads((run_dir / TAXONOMY_FILE).read_text()))
    if cfg.lr is None:
        cfg = replace(cfg, lr=default_lr(cfg.weights))
    taxonomy = taxonomy or Taxonomy.default()
    set_seed(cfg.seed)
    cache = open_cache(cache_dir, use_cache)
    if source is not None:
        from semhinet_tf.training.from_run import prepare_from_run

        data = prepare_from_run(data_dir, run_dir, source, Path(labels) if labels else None, taxonomy, cfg,
                                progress=progress, cache=cache, strict=strict)
    else:
        data = prepare_dataset(data_dir, run_dir, taxonomy, cfg, strict=strict, progress=progress,
                               reuse_split=resume, cache=cache)
    train_set, val_set = data["train"], data["val"]
    steps = cfg.steps_per_epoch_for(len(train_set[1]))
    with strategy.scope():
        model, mcfg = build_for_config(taxonomy, cfg, steps * cfg.epochs)
        if source is not None:
            from semhinet_tf.training.from_run import load_run_weights

            start = load_run_weights(model, source)
        else:
            start = initial_weights(model, cfg, mcfg)
    print(f"model: MobileNetV3Small alpha={cfg.alpha} at {cfg.img_size}px, {model.count_params():,} parameters, "
          f"BN momentum {mcfg.backbone.bn_momentum:.3f}; start: {start}", flush=True)
    config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "data_dir": str(Path(data_dir).resolve()),
              "preprocess": data["preprocess"], "start_weights": start, "version": _version()}
    if source is not None:
        from semhinet_tf.training.from_run import record

        config["from"] = record(source, data["review"])
    write_json(config, run_dir / CONFIG_FILE)
    write_json(taxonomy.to_spec(), run_dir / TAXONOMY_FILE)

    pipe_ips = pipeline_throughput(train_set, taxonomy, cfg)
    where = f"memory-mapped from {cache.root}" if cache else "held in memory"
    print(f"input pipeline: {pipe_ips:.0f} images/s (decoded frames {where})", flush=True)
    earlier = read_state(run_dir) if resume else {}  # what processes before this --resume ran of each phase
    t_float = time.time()
    step_ips = fit_phase("float", model, taxonomy, train_set, val_set, cfg, run_dir, cfg.epochs, cfg.lr,
                         cfg.warmup_epochs, run_dir / FLOAT_MODEL, resume, strategy, progress)
    t_float = time.time() - t_float
    from semhinet_tf.model.io import load_model

    best_float = load_model(run_dir / FLOAT_MODEL)
    result = {"run_dir": str(run_dir), "float_seconds": round(_seconds_before(earlier, "float") + t_float, 1),
              "float_val": hierarchical_scores(best_float, *val_set, taxonomy)}
    if cfg.qat_epochs > 0:
        from semhinet_tf.model.quant import calibrate_ranges, freeze_batchnorm, qat_base, quantize_model

        t_qat = time.time()
        with strategy.scope():
            base = qat_base(best_float, taxonomy, mcfg, cfg.granularity)
            qat = quantize_model(base, cfg.granularity)
        if cfg.qat_calibrate:
            batches = calibration_batches(train_set, taxonomy, cfg)
            n = calibrate_ranges(qat, base, batches)
            print(f"  [qat] {n} activation ranges started from the float model's on {len(batches)} training batches",
                  flush=True)
        if cfg.qat_freeze_bn:
            print(f"  [qat] {freeze_batchnorm(qat)} BatchNorm layers keep the float model's statistics", flush=True)
        fit_phase("qat", qat, taxonomy, train_set, val_set, cfg, run_dir, cfg.qat_epochs, cfg.qat_lr, 0.0,
                  run_dir / QAT_MODEL, resume, strategy, progress)
        result["qat_seconds"] = round(_seconds_before(earlier, "qat") + time.time() - t_qat, 1)
        final = load_model(run_dir / QAT_MODEL)  # the best QAT epoch, as saved (rebuilding one costs seconds)
        result["qat_val"] = hierarchical_scores(final, *val_set, taxonomy)
    else:
        final = best_float
    result["review_threshold"] = write_review_threshold(final, val_set, taxonomy, run_dir,
                                                        views=invariant_views(cfg.augment))
    result["seconds"] = round(time.time() - t0, 1)
    if source is not None:
        result["from_run_seconds"] = source.seconds
    result["pipeline_images_per_second"] = pipe_ips
    if not step_ips:  # every float step ran before this --resume: the figure that process measured
        step_ips = read_state(run_dir).get("float", {}).get("images_per_second")
    result["train_step_images_per_second"] = step_ips
    step_text = f"{step_ips:.0f} images/s" if step_ips else "not measured (its steps ran before this --resume)"
    print(f"throughput: input pipeline {pipe_ips:.0f} images/s vs training step {step_text}", flush=True)
    write_json(result, run_dir / TRAIN_RESULT)
    if run_dir != chief_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _seconds_before(state: dict, phase: str) -> float:
    """The phase's training seconds run by processes before this one (0 for a new run or an older state file)."""
    try:
        return float(state.get(phase, {}).get("seconds", 0.0))
    except (TypeError, ValueError, AttributeError):
        return 0.0


def _fine_tuned(run_dir: Path) -> bool:
    """A run made by `train --from` (its config says so)."""
    try:
        return "from" in json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _version() -> str:
    from semhinet_tf import __version__

    return __version__
