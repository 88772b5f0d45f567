"""Reference point: a plain keras.applications MobileNetV3Small, flat 8-way softmax, from scratch.

    python experiments/plain_keras_baseline.py --train TRAIN --test TEST [--img-size 128] [--epochs 30] \
        [--bn-momentum 0.9] [--out experiments/results/plain_keras_baseline.md]

No code of ours in the model or the training loop (Adam 1e-3, batch 32, shuffled epochs, no augmentation); the
frames are decoded by our loader so the pixels are the same as everywhere else. It answers whether our recipe
is the reason a small model learns little from 150 images a class, or the data are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from results_file import write_result

LEAVES = ("bogus", "normal", "bridge", "open", "cmp", "crack", "ler", "inc_etch")


def load(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    from semhinet_tf.data.decode import Preprocess, load_frame

    pre = Preprocess(size=size)
    xs, ys = [], []
    for i, leaf in enumerate(LEAVES):
        for f in sorted((root / leaf).iterdir()):
            xs.append(load_frame(f, pre))
            ys.append(i)
    return np.stack(xs)[..., None].astype(np.float32), np.array(ys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--bn-momentum", type=float, default=0.999, help="keras.applications' own is 0.999")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results/plain_keras_baseline.md"))
    args = p.parse_args()

    x_train, y_train = load(args.train, args.img_size)
    x_test, y_test = load(args.test, args.img_size)
    import tensorflow as tf  # after our loader: tf.keras is then tf-keras, as everywhere in this project

    tf.keras.utils.set_random_seed(args.seed)
    model = tf.keras.applications.MobileNetV3Small(input_shape=(args.img_size, args.img_size, 1), weights=None,
                                                   classes=len(LEAVES), include_preprocessing=True, dropout_rate=0.2)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = args.bn_momentum
    model.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    t = time.time()
    history = model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, shuffle=True, verbose=2)
    minutes = (time.time() - t) / 60
    pred = model.predict(x_test, verbose=0).argmax(1)
    recall = {leaf: round(float(np.mean(pred[y_test == i] == i)), 2) for i, leaf in enumerate(LEAVES)}
    lines = ["| model | BN momentum | epochs | train accuracy (last epoch) | test leaf accuracy | recall per class | "
             "train min |", "|---|---|---|---|---|---|---|",
             f"| keras.applications MobileNetV3Small, flat, from scratch, {args.img_size} px | {args.bn_momentum} | "
             f"{args.epochs} | {history.history['accuracy'][-1]:.3f} | {np.mean(pred == y_test):.3f} | "
             f"{json.dumps(recall)} | {minutes:.1f} |"]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
