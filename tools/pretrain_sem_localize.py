"""Pretrain the SEM backbone with defect *localization* as well as the five heads (stage 3 of `--weights sem`).

    python tools/pretrain_sem_localize.py --per-class 3000 --epochs 8 \
        --init semhinet_tf/weights/mobilenetv3small_a1_sem.npz

Why: with image-level labels only, a tiny defect (a bridge of two pixels, a hairline crack, a little
extra edge roughness) is a weak signal; measured here, the backbone pretrained on 24,000 labelled frames
still called 94% of line-edge-roughness frames and 95% of crack frames "normal", even obvious ones. The
generator knows where each defect is (it renders every defect frame's clean twin: same pattern, same
noise), so pretraining can also ask the last feature map which of its cells hold which defect. That
dense signal teaches the early layers the defect detectors; the fine-tuning a user runs afterwards
needs only folder labels, as before. Only the backbone is shipped (the localization layer is dropped).

Measured (experiments/results/localization_pretraining.md): 8 epochs of this stage on 24,000 frames
gave no gain when fine-tuning on 150 images a class (0.426 vs 0.430 leaf accuracy), so it was not shipped.
What did work is tools/pretrain_sem_patches.py (crops at the defect against the same crops of the twin).
Kept to be tried with other rates and lengths.

Cell labels: |frame - twin| smoothed (Gaussian sigma 1.5 px) above 6 grey levels marks the defect's
pixels; a cell of the stride-32 feature map is labelled with the defect class when at least 0.5% of its
pixels are marked, else background. Normal and bogus frames are all background.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

STRIDE = 32  # the backbone's output stride
MARK_LEVEL = 6.0  # grey levels of |frame - twin| (after smoothing) that count as defect
CELL_FRACTION = 0.005


def _render_chunk(job: tuple[str, list[int], int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, S, S) uint8 and cell labels (n, G, G) int8 for images `ks` of one class."""
    from scipy import ndimage

    from semhinet_tf.data.decode import resize_square
    from semhinet_tf.data.synth import DEFECTS, _render, image_seed

    leaf, ks, seed, frame_size, img_size = job
    grid = img_size // STRIDE
    cell = frame_size // grid
    frames = np.zeros((len(ks), img_size, img_size), np.uint8)
    cells = np.zeros((len(ks), grid, grid), np.int8)
    for i, k in enumerate(ks):
        img, twin, _ = _render(leaf, np.random.default_rng(image_seed(seed, leaf, k)), frame_size, 0.5,
                               twin=leaf in DEFECTS)
        frames[i] = resize_square(img, img_size)
        if leaf in DEFECTS:
            diff = ndimage.gaussian_filter(np.abs(img.astype(np.float32) - twin.astype(np.float32)), 1.5)
            marked = (diff > MARK_LEVEL)[: grid * cell, : grid * cell]
            share = marked.reshape(grid, cell, grid, cell).mean(axis=(1, 3))
            cells[i] = np.where(share >= CELL_FRACTION, 1 + DEFECTS.index(leaf), 0)
    return frames, cells


def make_set(per_class: int, seed: int, frame_size: int, img_size: int, workers: int):
    from tqdm import tqdm

    from semhinet_tf.data.synth import LEAVES

    jobs = [(leaf, list(range(k, min(k + 100, per_class))), seed, frame_size, img_size)
            for leaf in LEAVES for k in range(0, per_class, 100)]
    frames, cells, leaves = [], [], []
    with ProcessPoolExecutor(workers) as pool:
        for job, (f, c) in tqdm(zip(jobs, pool.map(_render_chunk, jobs), strict=True), total=len(jobs),
                                desc="render frames + defect cells"):
            frames.append(f)
            cells.append(c)
            leaves.append(np.full(len(f), LEAVES.index(job[0]), np.int32))
    return np.concatenate(frames), np.concatenate(cells), np.concatenate(leaves)


def localizing_model(model, head_names, n_cell_classes: int):
    """The five-head model plus `loc`: per-cell logits (background + each defect) on the last feature map."""
    from semhinet_tf.model import keras

    features = model.get_layer("Conv_1/hswish").output
    loc = keras.layers.Conv2D(n_cell_classes, 1, name="loc_logits")(features)
    outputs = {h: model.get_layer(h).output for h in head_names}
    return keras.Model(model.input, {**outputs, "loc": loc}, name="semhinet_localize")


def dataset(frames, cells, leaves, taxonomy, batch: int, steps: int, seed: int):
    """Class-balanced batches; flips and transposes applied to the image and its cell labels together."""
    import tensorflow as tf

    from semhinet_tf.data.pipeline import Augment, augment_batch, sample_order

    order = sample_order(leaves, steps, batch, "balanced", seed, len(taxonomy.leaves)).reshape(steps, batch)
    table = tf.constant(taxonomy.label_matrix())
    frames_t, cells_t, leaves_t = tf.constant(frames), tf.constant(cells), tf.constant(leaves)
    photometric = Augment(flip=False, rot90=False)

    def make(step, idx):
        x = tf.cast(tf.gather(frames_t, idx), tf.float32)[..., None]
        c = tf.cast(tf.gather(cells_t, idx), tf.int32)[..., None]
        r = tf.random.stateless_uniform([3], seed=tf.stack([tf.cast(seed, tf.int64), step]))
        x, c = tf.cond(r[0] < 0.5, lambda: (tf.reverse(x, [2]), tf.reverse(c, [2])), lambda: (x, c))
        x, c = tf.cond(r[1] < 0.5, lambda: (tf.reverse(x, [1]), tf.reverse(c, [1])), lambda: (x, c))
        x, c = tf.cond(r[2] < 0.5, lambda: (tf.transpose(x, [0, 2, 1, 3]), tf.transpose(c, [0, 2, 1, 3])),
                       lambda: (x, c))
        x = augment_batch(x, step, seed, photometric)
        labels = tf.gather(table, tf.gather(leaves_t, idx))
        y = {h: labels[:, i] for i, h in enumerate(taxonomy.head_names)}
        y["loc"] = c[..., 0]
        return x, y

    ds = tf.data.Dataset.from_tensor_slices((tf.range(steps, dtype=tf.int64), order))
    return ds.map(make, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=3000)
    p.add_argument("--frame-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--loc-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=2000, help="generator seed (disjoint from quickstart and tests)")
    p.add_argument("--init", default="none", help="backbone .npz to start from (e.g. the shipped one)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache", type=Path, default=Path("sem_localize_set.npz"))
    p.add_argument("--out", type=Path, default=None, help="default: semhinet_tf/weights/<name>.npz")
    args = p.parse_args()

    import tensorflow as tf

    from semhinet_tf.data.synth import DEFECTS
    from semhinet_tf.losses import MaskedAccuracy, masked_sparse_crossentropy
    from semhinet_tf.model import keras
    from semhinet_tf.model.heads import ModelConfig, build_model, is_head_layer
    from semhinet_tf.model.mobilenet_v3 import (
        BackboneConfig,
        auto_bn_momentum,
        load_backbone_weights,
        save_backbone_weights,
    )
    from semhinet_tf.model.pretrained import WEIGHTS_DIR, sem_weights_name
    from semhinet_tf.schedule import WarmupCosine
    from semhinet_tf.taxonomy import Taxonomy
    from semhinet_tf.train import hierarchical_scores, set_seed

    t0 = time.time()
    if args.cache.exists():
        data = np.load(args.cache, allow_pickle=False)
        frames, cells, leaves = data["frames"], data["cells"], data["leaves"]
    else:
        frames, cells, leaves = make_set(args.per_class, args.seed, args.frame_size, args.img_size, args.workers)
        np.savez(args.cache, frames=frames, cells=cells, leaves=leaves)
    t_gen = time.time() - t0
    defect_cells = cells[cells > 0].size / max(1, cells[np.isin(leaves, range(2, 8))].size)
    print(f"{len(frames)} frames, {t_gen:.0f} s; share of defect-frame cells marked: {defect_cells:.1%}", flush=True)

    set_seed(args.seed)
    taxonomy = Taxonomy.default()
    rng = np.random.default_rng(args.seed)
    val = rng.random(len(frames)) < 0.05
    steps = int(np.ceil((~val).sum() / args.batch_size))
    total = steps * args.epochs
    cfg = ModelConfig(img_size=args.img_size, backbone=BackboneConfig(bn_momentum=auto_bn_momentum(total)))
    model = build_model(taxonomy, cfg)
    if args.init != "none":
        print(f"start: {load_backbone_weights(model, args.init)} layers from {args.init}", flush=True)
    train_model = localizing_model(model, taxonomy.head_names, 1 + len(DEFECTS))
    heads = taxonomy.head_names
    losses = {h: masked_sparse_crossentropy(0.05) for h in heads}
    losses["loc"] = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = {**taxonomy.loss_weights({}), "loc": args.loc_weight}
    train_model.compile(
        optimizer=keras.optimizers.AdamW(WarmupCosine(args.lr, total, steps // 2), weight_decay=1e-5),
        loss=losses, loss_weights=weights, metrics={h: [MaskedAccuracy(name="acc")] for h in heads})
    ds = dataset(frames[~val], cells[~val], leaves[~val], taxonomy, args.batch_size, total, args.seed)
    history = []

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            history.append({"epoch": epoch + 1, **hierarchical_scores(model, frames[val], leaves[val], taxonomy)})
            print(f"  epoch {epoch + 1}: {history[-1]}", flush=True)

    t_train = time.time()
    train_model.fit(ds, epochs=args.epochs, steps_per_epoch=steps, callbacks=[Score()], verbose=2)
    t_train = time.time() - t_train
    out = args.out or WEIGHTS_DIR / sem_weights_name(1.0, False)
    n = save_backbone_weights(model, out, keep=lambda name: not is_head_layer(name))
    info = {"stage": "localization", "init": args.init, "per_class": args.per_class, "seed": args.seed,
            "frame_size": args.frame_size, "img_size": args.img_size, "epochs": args.epochs, "lr": args.lr,
            "loc_weight": args.loc_weight, "layers": n, "generate_seconds": round(t_gen),
            "train_seconds": round(t_train), "val_history": history, "machine": "2 CPU cores, no GPU"}
    out.with_suffix(".stage.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    tf.keras.backend.clear_session()


if __name__ == "__main__":
    main()
