"""Can one inference do what eight views do? Distil a run's eight-view verdicts into a single-view student.

    python experiments/distillation.py TEACHER_RUN --out STUDENT_RUN [--unlabelled POOL --count 4000]
        [--views 8] [--epochs 10] [--lr 1e-4] [--hard 0.5] [--qat-epochs 4] [--start teacher|sem]
    semhinet convert STUDENT_RUN && semhinet compare STUDENT_RUN --data TEST --split all

Test-time views buy 1-2 points of leaf accuracy for eight inferences an image (test_time_views.md). The
student is trained to give, from one view of a frame in any orientation, the teacher's log-average over
its eight views (soft targets per head, Hinton et al. 2015 "Distilling the knowledge in a neural network";
the teacher here is an ensemble of one model's views). Targets are kept for every head: a head that does not
apply is weighted by the teacher's probability that it applies (a frame the teacher calls 90% normal
teaches the line specialist with weight 0.1 x P(line)), so unlabelled frames teach every head as much as
the teacher knows. Labelled frames mix their one-hot label in (`--hard`) and keep the hard mask.

The QAT phase (`--qat-epochs`) is distilled the same way, from the same float eight-view targets, which is
also the field's usual way to narrow an int8 gap (the quantized model learns the float model's outputs, not
only the labels). STUDENT_RUN is a complete run folder (the teacher's split, taxonomy and preprocessing), so
`semhinet convert`, `eval` and `compare` work on it unchanged. The pool's class folders are never used for
training; unlabelled frames are drawn at random and only the teacher labels them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RUN_FILES = ("config.json", "taxonomy.json", "split.json", "manifest.csv", "manifest.json", "skipped.csv")


def path_weights(taxonomy, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per head, the teacher's probability that the head applies to each frame (root head: 1)."""
    out: dict[str, np.ndarray] = {}
    for head in taxonomy.heads:  # parents come before children in the taxonomy's head order
        n = len(next(iter(probs.values())))
        if head.parent is None:
            out[head.name] = np.ones(n)
        else:
            p_head, p_cls = head.parent
            out[head.name] = out[p_head] * probs[p_head][:, taxonomy.head(p_head).classes.index(p_cls)]
    return out


def soft_targets(taxonomy, teacher: dict[str, np.ndarray], leaf_ids: np.ndarray | None, hard: float,
                 class_weights: dict[str, list[float]] | None) -> dict[str, np.ndarray]:
    """Per head (N, k + 1): the target distribution and, in the last column, the frame's weight for that head.
    Unlabelled frames (leaf_ids None): the teacher's distribution, weighted by the teacher's path probability.
    Labelled frames: (1 - hard) x teacher + hard x one-hot, weighted by the head's class weight, masked where
    the head does not apply (as in ordinary training)."""
    out = {}
    weights = path_weights(taxonomy, teacher)
    labels = None if leaf_ids is None else taxonomy.head_labels(leaf_ids)
    for head in taxonomy.heads:
        p = np.asarray(teacher[head.name], np.float64)
        if labels is None:
            target, w = p, weights[head.name]
        else:
            y = labels[head.name]
            applies = y >= 0
            onehot = np.eye(head.num_classes)[np.maximum(y, 0)]
            target = (1.0 - hard) * p + hard * onehot
            cw = np.asarray(class_weights[head.name]) if class_weights else np.ones(head.num_classes)
            w = np.where(applies, cw[np.maximum(y, 0)], 0.0)
        out[head.name] = np.concatenate([target, w[:, None]], axis=1).astype(np.float32)
    return out


def soft_crossentropy():
    """Weighted cross-entropy against soft targets; y_true is (B, k + 1) with the weight last. Scaled so Keras'
    batch mean is the weighted mean over the frames (as losses.masked_sparse_crossentropy does)."""
    import tensorflow as tf

    def loss(y_true, y_pred):
        target, w = y_true[:, :-1], y_true[:, -1]
        ce = -tf.reduce_sum(target * tf.math.log(tf.clip_by_value(y_pred, 1e-7, 1.0)), axis=-1)
        n = tf.cast(tf.shape(w)[0], ce.dtype)
        return ce * w * n / tf.maximum(tf.reduce_sum(w), 1.0)

    loss.__name__ = "soft_ce"
    return loss


def sample_indices(n_labelled: int, leaf_ids: np.ndarray, n_pool: int, total: int, seed: int,
                   pool_share: float) -> np.ndarray:
    """Indices into [labelled..., pool...]: labelled frames class-balanced, pool frames uniform."""
    rng = np.random.default_rng([seed, 4242])
    counts = np.bincount(leaf_ids)
    p_lab = (1.0 / counts[leaf_ids]) / len(counts)
    p = np.concatenate([p_lab * (1.0 - pool_share), np.full(n_pool, pool_share / max(n_pool, 1))])
    return rng.choice(n_labelled + n_pool, size=total, p=p / p.sum()).astype(np.int32)


def make_dataset(frames: np.ndarray, targets: dict[str, np.ndarray], order: np.ndarray, batch_size: int,
                 seed: int, augment: dict):
    import tensorflow as tf

    from semhinet_tf.data.pipeline import Augment, augment_batch

    aug = Augment(**augment)
    frames_t = tf.constant(frames)
    targets_t = {h: tf.constant(t) for h, t in targets.items()}
    steps = len(order) // batch_size
    order = order[:steps * batch_size].reshape(steps, batch_size)

    def batch_fn(step, idx):
        images = augment_batch(tf.cast(tf.gather(frames_t, idx), tf.float32)[..., None], step, seed, aug)
        return images, {h: tf.gather(t, idx) for h, t in targets_t.items()}

    ds = tf.data.Dataset.from_tensor_slices((tf.range(steps, dtype=tf.int64), order))
    return ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def fit(model, phase, taxonomy, ds, steps_per_epoch, epochs, peak_lr, warmup_steps, val, cfg, out, model_path):
    from semhinet_tf.schedule import WarmupCosine
    from semhinet_tf.train import make_optimizer, phase_callbacks

    schedule = WarmupCosine(peak_lr, steps_per_epoch * epochs, warmup_steps)
    model.compile(optimizer=make_optimizer(cfg, schedule, average=phase == "float"),
                  loss={h: soft_crossentropy() for h in taxonomy.head_names},
                  loss_weights=taxonomy.loss_weights(cfg.loss_weights))
    model.fit(ds, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0,
              callbacks=phase_callbacks(out, phase, taxonomy, val, cfg, model_path, epochs, steps_per_epoch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", type=Path, help="a `semhinet train` run folder (its float.keras is the teacher)")
    ap.add_argument("--out", type=Path, required=True, help="student run folder (must not exist)")
    ap.add_argument("--unlabelled", type=Path, help="frames without labels the teacher labels (class folders unused)")
    ap.add_argument("--count", type=int, default=4000, help="unlabelled frames drawn at random")
    ap.add_argument("--views", type=int, default=8, help="test-time views the teacher averages")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak rate of the float phase")
    ap.add_argument("--hard", type=float, default=0.5, help="share of the one-hot label in a labelled target")
    ap.add_argument("--pool-share", type=float, default=0.5, help="share of unlabelled frames in a batch")
    ap.add_argument("--qat-epochs", type=int, default=4)
    ap.add_argument("--start", choices=("teacher", "sem"), default="teacher",
                    help="student's starting weights: the teacher's float model, or the SEM backbone as in training")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out}: exists; choose another --out")

    from semhinet_tf.data.dataset import eval_items, load_split_frames
    from semhinet_tf.engines import load_model as load_engine
    from semhinet_tf.losses import head_class_weights
    from semhinet_tf.model.io import load_model
    from semhinet_tf.train import (
        FLOAT_MODEL,
        QAT_MODEL,
        TrainConfig,
        build_for_config,
        calibration_batches,
        hierarchical_scores,
        initial_weights,
        set_seed,
        write_review_threshold,
    )
    from semhinet_tf.workflow import decode_items

    t0 = time.time()
    config = json.loads((args.teacher / "config.json").read_text())
    cfg = replace(TrainConfig.from_dict(config["train"]), seed=args.seed)
    set_seed(args.seed)
    teacher = load_engine(args.teacher / FLOAT_MODEL, views=args.views)
    taxonomy, pre, views = teacher.taxonomy, teacher.preprocess, teacher.views
    train = load_split_frames(args.teacher, "train")
    val = load_split_frames(args.teacher, "val")
    frames, leaf_ids = train
    pool = np.zeros((0, *frames.shape[1:]), np.uint8)
    if args.unlabelled:
        items, _, notes = eval_items(args.unlabelled, taxonomy, None, "all")
        pick = np.random.default_rng([args.seed, 99]).permutation(len(items))[:args.count]
        pool, _, _ = decode_items([items[i] for i in sorted(pick)], pre, taxonomy, notes)

    cw = dict(zip(taxonomy.head_names, head_class_weights(taxonomy.label_matrix(), leaf_ids, cfg.sampler,
                                                          [h.num_classes for h in taxonomy.heads]), strict=True))
    lab_t = soft_targets(taxonomy, teacher.predict(frames, views), leaf_ids, args.hard, cw)
    parts = [lab_t]
    if len(pool):
        parts.append(soft_targets(taxonomy, teacher.predict(pool, views), None, 0.0, None))
    targets = {h: np.concatenate([p[h] for p in parts]) for h in taxonomy.head_names}
    all_frames = np.concatenate([frames, pool]) if len(pool) else frames
    print(f"teacher ({len(views)} views): {len(frames)} labelled + {len(pool)} unlabelled frames, "
          f"{time.time() - t0:.0f} s", flush=True)

    args.out.mkdir(parents=True)
    for name in RUN_FILES:
        if (args.teacher / name).exists():
            shutil.copy2(args.teacher / name, args.out / name)
    config["distillation"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    steps = max(1, len(all_frames) // cfg.batch_size)  # one epoch: as many frames as labelled + pool
    share = args.pool_share if len(pool) else 0.0
    t_float = time.time()
    if args.start == "teacher":
        student = load_model(args.teacher / FLOAT_MODEL)
    else:
        student, mcfg = build_for_config(taxonomy, cfg, steps * args.epochs)
        print(f"start: {initial_weights(student, cfg, mcfg)}", flush=True)
    order = sample_indices(len(frames), leaf_ids, len(pool), steps * args.epochs * cfg.batch_size, args.seed, share)
    ds = make_dataset(all_frames, targets, order, cfg.batch_size, args.seed, cfg.augment)
    fit(student, "float", taxonomy, ds, steps, args.epochs, args.lr, steps // 2, val, cfg, args.out,
        args.out / FLOAT_MODEL)
    t_float = time.time() - t_float
    best = load_model(args.out / FLOAT_MODEL)
    result = {"float_seconds": round(t_float, 1), "float_val": hierarchical_scores(best, *val, taxonomy)}

    if args.qat_epochs:
        from semhinet_tf.model.heads import ModelConfig
        from semhinet_tf.model.quant import calibrate_ranges, qat_base, quantize_model

        t_qat = time.time()
        mcfg = ModelConfig.from_dict(config["model"])
        base = qat_base(best, taxonomy, mcfg, cfg.granularity)
        qat = quantize_model(base, cfg.granularity)
        calibrate_ranges(qat, base, calibration_batches(train, taxonomy, cfg))
        order = sample_indices(len(frames), leaf_ids, len(pool), steps * args.qat_epochs * cfg.batch_size,
                               args.seed + 1, share)
        ds = make_dataset(all_frames, targets, order, cfg.batch_size, args.seed + 1, cfg.augment)
        fit(qat, "qat", taxonomy, ds, steps, args.qat_epochs, cfg.qat_lr, 0, val, cfg, args.out, args.out / QAT_MODEL)
        result["qat_seconds"] = round(time.time() - t_qat, 1)
        result["qat_val"] = hierarchical_scores(load_model(args.out / QAT_MODEL), *val, taxonomy)
    final = load_model(args.out / (QAT_MODEL if args.qat_epochs else FLOAT_MODEL))
    from semhinet_tf.data.views import invariant_views

    result["review_threshold"] = write_review_threshold(final, val, taxonomy, args.out,
                                                        views=invariant_views(cfg.augment))
    result["seconds"] = round(time.time() - t0, 1)
    (args.out / "train_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "review_threshold"}, indent=2))


if __name__ == "__main__":
    main()
