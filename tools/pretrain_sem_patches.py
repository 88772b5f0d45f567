"""Pretrain the SEM backbone on defect-centred crops paired with the same crops of their clean twins.

    python tools/pretrain_sem_patches.py --per-class 2000 --epochs 24 \
        --init semhinet_tf/weights/mobilenetv3small_a1_sem.npz --out W/sem_patches.npz

Why: on whole frames a hairline crack or a little extra edge roughness is a few percent of the pixels
and the rest of the frame (pitch, dose, blur, charging) varies far more than the defect does; trained on
whole frames the backbone learns those and calls most ler and crack frames normal (detectability.md).
Here every training example is a crop where the defect changed the frame most, and its negative is the
very same crop of the frame's clean twin (the generator renders both with the same pattern and noise).
Nothing but the defect separates the two, and the defect fills a large part of the input, so the
backbone has to learn the defect detectors themselves (experiments/twin_probe.py measured the effect).
Measured (experiments/results/patch_pretraining.md): six stages of 20 epochs on 9,000 new defect frames
each (11-14 min a stage here) lift the benchmark fine-tuned on 150 images a class from 0.430 to about 0.66
leaf accuracy at 128 px; the shipped `--weights sem` adds two whole-frame stages of tools/pretrain_sem.py
on top of them (about 0.70-0.74).
Crops come from frames scaled to each of --img-sizes so the detectors serve every input size. Only the
backbone is saved (the 7-way crop classifier on top is dropped); the user's fine-tuning needs only folder
labels, as before.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

TOP_CHANGE = 99.0  # crops are centred on the pixels whose change is above this percentile of the frame's


def _render_chunk(job: tuple[str, list[int], int, int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(frame, twin, candidate crop centres) for images `ks` of one defect class at size `img_size`."""
    from semhinet_tf.data.decode import resize_square
    from semhinet_tf.data.synth import image_seed, render_pair

    leaf, ks, seed, img_size = job
    out = []
    for k in ks:
        img, twin = render_pair(leaf, np.random.default_rng(image_seed(seed, leaf, k)), 256)
        img, twin = resize_square(img, img_size), resize_square(twin, img_size)
        out.append((img, twin, crop_centres(img, twin)))
    return out


def crop_centres(img: np.ndarray, twin: np.ndarray) -> np.ndarray:
    """(n, 2) row/column of the pixels where the defect changed the frame most (locally smoothed |frame - twin|)."""
    from scipy import ndimage

    change = ndimage.uniform_filter(np.abs(img.astype(np.float32) - twin.astype(np.float32)), 5)
    return np.argwhere(change >= np.percentile(change, TOP_CHANGE)).astype(np.int16)


def make_pairs(per_class: int, seed: int, sizes: list[int], workers: int) -> list[tuple]:
    """All (frame, twin, centres, class id) of the six defect classes; image k is scaled to sizes[k % n]."""
    from tqdm import tqdm

    from semhinet_tf.data.synth import DEFECTS

    jobs = []
    for leaf in DEFECTS:
        for o, size in enumerate(sizes):
            ks = list(range(o, per_class, len(sizes)))
            jobs += [(leaf, ks[i:i + 50], seed, size) for i in range(0, len(ks), 50)]
    pairs = []
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        chunks = pool.map(_render_chunk, jobs) if workers > 1 else map(_render_chunk, jobs)
        for job, chunk in tqdm(zip(jobs, chunks, strict=True), total=len(jobs),
                               desc="render defect frames + clean twins"):
            pairs += [(img, twin, centres, 1 + DEFECTS.index(job[0])) for img, twin, centres in chunk]
    return pairs


def crops(pairs: list[tuple], crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One crop per pair near its defect (label: the defect) and the same crop of the twin (label 0, normal)."""
    h = crop // 2
    x = np.empty((2 * len(pairs), crop, crop, 1), np.float32)
    y = np.empty(2 * len(pairs), np.int32)
    for i, (img, twin, centres, label) in enumerate(pairs):
        size = img.shape[0]
        cy, cx = centres[rng.integers(len(centres))].astype(int) + rng.integers(-h // 2, h // 2 + 1, 2)
        cy, cx = int(np.clip(cy, h, size - h)), int(np.clip(cx, h, size - h))
        x[2 * i, ..., 0] = img[cy - h:cy + h, cx - h:cx + h]
        x[2 * i + 1, ..., 0] = twin[cy - h:cy + h, cx - h:cx + h]
        y[2 * i], y[2 * i + 1] = label, 0
    return dihedral(x, rng), y


def dihedral(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/rotations per image of a (B, S, S, 1) batch (exact for SEM frames)."""
    k = rng.integers(0, 8, len(x))[:, None, None, None]
    x = np.where(k & 1, x[:, ::-1], x)
    x = np.where(k & 2, x[:, :, ::-1], x)
    return np.where(k & 4, x.transpose(0, 2, 1, 3), x)


def crop_classifier(init: str, total_steps: int, lr: float, alpha: float):
    from semhinet_tf.model import keras
    from semhinet_tf.model.mobilenet_v3 import (
        BackboneConfig,
        auto_bn_momentum,
        backbone_features,
        load_backbone_weights,
    )

    image = keras.Input((None, None, 1), name="image")
    features = backbone_features(image, BackboneConfig(alpha=alpha, bn_momentum=auto_bn_momentum(total_steps)))
    pooled = keras.layers.GlobalMaxPooling2D(name="crop_pool")(features)
    out = keras.layers.Dense(7, activation="softmax", name="crop_classes")(keras.layers.Dropout(0.2)(pooled))
    model = keras.Model(image, out)
    if init != "none":
        print(f"started from {init}: {load_backbone_weights(model, init)} layers", flush=True)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, total_steps - total_steps // 20, warmup_target=lr,
                                                      warmup_steps=total_steps // 20)
    model.compile(keras.optimizers.AdamW(schedule, weight_decay=1e-5), "sparse_categorical_crossentropy",
                  metrics=["acc"])
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=2000, help="defect frames (each with its twin) a class")
    p.add_argument("--img-sizes", default="128,224", help="frame scales the crops are cut from")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=5000, help="generator seed: keep it apart from every benchmark's")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--init", default="none", help="backbone .npz to start from (e.g. the shipped SEM weights)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="backbone weights .npz to write")
    args = p.parse_args()

    from semhinet_tf.model import keras
    from semhinet_tf.model.mobilenet_v3 import save_backbone_weights

    start = time.time()
    sizes = [int(s) for s in args.img_sizes.split(",")]
    pairs = make_pairs(args.per_class, args.seed, sizes, args.workers)
    t_gen = time.time() - start
    print(f"{len(pairs)} defect frames with twins in {t_gen:.0f} s", flush=True)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    steps_per_epoch = int(np.ceil(2 * len(pairs) / args.batch_size))
    model = crop_classifier(args.init, steps_per_epoch * args.epochs, args.lr, args.alpha)
    history = []
    for epoch in range(args.epochs):
        x, y = crops(pairs, args.crop, rng)
        print(f"epoch {epoch + 1}/{args.epochs}", flush=True)
        h = model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=True, verbose=2)
        history.append(round(float(h.history["acc"][0]), 4))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n = save_backbone_weights(model, args.out, keep=lambda name: not name.startswith(("crop_", "dropout", "image")))
    info = {"stage": "defect-centred crops vs clean-twin crops", "init": args.init, "per_class": args.per_class,
            "img_sizes": sizes, "crop": args.crop, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "layers": n, "generate_seconds": round(t_gen),
            "train_seconds": round(time.time() - start - t_gen), "crop_train_acc": history,
            "machine": "2 CPU cores, no GPU"}
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
