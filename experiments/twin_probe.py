"""Can the backbone learn the defect signal at all? Frames that differ from their negatives only by the defect.

    python experiments/twin_probe.py --test bench_test [--per-class 800] [--size 128] [--epochs 12]
        [--patch-epochs 60] [--crop 64] [--classes crack,ler] [--modes frames,twins,patches]
        [--out experiments/results/twin_probe.md]

The issue-4 model misses ler, crack and open frames whatever their severity (detectability.md). Two
explanations predict different things: (1) the classes are confusable (a ler frame can look like a rough
normal one), or (2) the defect is visible but this network does not pick it up from this much data.
The generator can render every defect frame's clean twin (same pattern, imaging and noise; no defect), so:

- `frames`: normal vs the defect classes, normal frames drawn independently (the ordinary task);
- `twins`: the same, but every normal training frame is the clean twin of a defect training frame. Nothing
  but the defect tells the classes apart, so no shortcut (pattern, dose, blur) can help and a perfect
  training score exists;
- `control`: a positive control for the set-up: the twins against the same twins with one bright spot
  (radius 3 px, +60 grey levels, at a random place); tested on the test set's normal frames with and
  without such a spot. It shows how quickly this network learns a small, plainly visible local change;
- `patches`: training on crops of `--crop` px centred where the defect changed the frame most, each paired
  with the same crop of its twin (the defect now fills a large part of the input), tested on whole frames
  through global max pooling (the network is fully convolutional).

All start from the shipped SEM backbone (or --init) and are tested on the same whole frames of TEST (normal and
the probe classes, first 100 of each). Training accuracy near the "always normal" rate in `twins` and
`patches` means the network does not find the defect even where nothing else varies: explanation (2).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from results_file import write_result

from semhinet_tf.data import synth
from semhinet_tf.data.decode import Preprocess, load_frame, resize_square

TEST_PER_CLASS = 100


def _load_crop_tool():
    """tools/pretrain_sem_patches.py: the probe's crops are exactly the pretraining stage's."""
    path = Path(__file__).resolve().parents[1] / "tools" / "pretrain_sem_patches.py"
    spec = importlib.util.spec_from_file_location("pretrain_sem_patches", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CROPS = _load_crop_tool()


def _render_pair(job: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    leaf, k, seed = job
    return synth.render_pair(leaf, np.random.default_rng(synth.image_seed(seed, leaf, k)), 256)


def make_pairs(classes: list[str], per_class: int, seed: int, size: int) -> dict[str, np.ndarray]:
    """Defect frames, their clean twins and independent normal frames, resized to `size` like training."""
    jobs = [(leaf, k, seed) for leaf in [*classes, "normal"] for k in range(per_class)]
    with ProcessPoolExecutor(2) as pool:
        pairs = list(pool.map(_render_pair, jobs, chunksize=16))
    def resize(a: np.ndarray) -> np.ndarray:
        return resize_square(a, size).astype(np.float32)
    leaf = np.array([j[0] for j in jobs])
    return {"image": np.stack([resize(p[0]) for p in pairs]), "twin": np.stack([resize(p[1]) for p in pairs]),
            "leaf": leaf}


def training_set(data: dict, mode: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(frames, class ids) for `frames` or `twins`: the defect frames plus as many normals as one class."""
    defect = data["leaf"] != "normal"
    x = [data["image"][defect]]
    y = [np.array([names.index(v) for v in data["leaf"][defect]])]
    n = int((data["leaf"] == names[1]).sum())
    if mode == "frames":
        x.append(data["image"][data["leaf"] == "normal"][:n])
    else:  # twins: an equal share of clean twins from every defect class
        share = n // (len(names) - 1)
        x += [data["twin"][data["leaf"] == c][:share] for c in names[1:]]
    y.append(np.zeros(sum(len(a) for a in x[1:]), int))
    return np.concatenate(x)[..., None], np.concatenate(y)


def crop_pairs(data: dict, names: list[str]) -> list[tuple]:
    """The defect frames in the crop pretraining's format: (frame, twin, crop centres at the defect, class id)."""
    return [(data["image"][i], data["twin"][i], CROPS.crop_centres(data["image"][i], data["twin"][i]),
             names.index(str(data["leaf"][i]))) for i in np.nonzero(data["leaf"] != "normal")[0]]


SPOT_RADIUS, SPOT_LEVEL = 3, 60.0


def with_spots(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The control's 'defect': one bright disk per frame at a random place."""
    out = frames.copy()
    size = frames.shape[1]
    yy, xx = np.mgrid[:size, :size]
    for f in out:
        cy, cx = rng.integers(SPOT_RADIUS, size - SPOT_RADIUS, 2)
        f[(yy - cy) ** 2 + (xx - cx) ** 2 <= SPOT_RADIUS ** 2] += SPOT_LEVEL
    return np.clip(out, 0, 255)


def control_set(data: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    twins = data["twin"][data["leaf"] != "normal"]
    return np.concatenate([twins, with_spots(twins, rng)])[..., None], np.repeat([0, 1], len(twins))


def build(num_classes: int, pooling: str, total_steps: int, init: str):
    from semhinet_tf.model import keras
    from semhinet_tf.model.mobilenet_v3 import (
        BackboneConfig,
        auto_bn_momentum,
        backbone_features,
        load_backbone_weights,
    )
    from semhinet_tf.model.pretrained import WEIGHTS_DIR, sem_weights_name

    cfg = BackboneConfig(bn_momentum=auto_bn_momentum(total_steps))
    image = keras.Input((None, None, 1))
    features = backbone_features(image, cfg)
    pooled = [keras.layers.GlobalMaxPooling2D()(features)]
    if pooling == "avgmax":
        pooled.insert(0, keras.layers.GlobalAveragePooling2D()(features))
    x = keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0]
    out = keras.layers.Dense(num_classes, activation="softmax")(keras.layers.Dropout(0.2)(x))
    model = keras.Model(image, out)
    load_backbone_weights(model, init or WEIGHTS_DIR / sem_weights_name(1.0, False))
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, total_steps)
    model.compile(keras.optimizers.AdamW(schedule, weight_decay=1e-5), "sparse_categorical_crossentropy",
                  metrics=["acc"])
    return model


def run_mode(mode: str, data: dict, names: list[str], test: tuple[np.ndarray, np.ndarray], args) -> dict:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    epochs = args.patch_epochs if mode == "patches" else args.epochs
    defects = int((data["leaf"] != "normal").sum())
    n_train = 2 * defects if mode in ("patches", "control") else len(training_set(data, mode, names)[1])
    steps = int(np.ceil(n_train / 32)) * epochs
    model = build(2 if mode == "control" else len(names), "max" if mode == "patches" else "avgmax", steps,
                  args.init)
    start, train_acc = time.perf_counter(), []
    pairs = crop_pairs(data, names) if mode == "patches" else None
    for epoch in range(epochs):
        if mode == "patches":  # crops of the pretraining tool, flipped/rotated there
            x, y = CROPS.crops(pairs, args.crop, rng)
        else:
            x, y = control_set(data, rng) if mode == "control" else training_set(data, mode, names)
            x = CROPS.dihedral(x, rng)
        hist = model.fit(x, y, batch_size=32, epochs=1, shuffle=True, verbose=0)
        train_acc.append(float(hist.history["acc"][0]))
        print(f"  [{mode}] epoch {epoch + 1}/{epochs}: training accuracy {train_acc[-1]:.3f}", flush=True)
    if mode == "control":
        normal = test[0][test[1] == 0]
        test = (np.concatenate([normal, with_spots(normal[..., 0], rng)[..., None]]), np.repeat([0, 1], len(normal)))
    pred = model.predict(test[0], batch_size=32, verbose=0).argmax(1)
    return {"mode": mode, "n_train": n_train, "always_normal": float((y == 0).mean()), "train_acc": train_acc[-1],
            "test_acc": float((pred == test[1]).mean()),
            "recall": [float((pred[test[1] == i] == i).mean()) for i in range(int(test[1].max()) + 1)],
            "minutes": (time.perf_counter() - start) / 60, "epochs": epochs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test", required=True, help="generated test folder (normal and the probe classes)")
    ap.add_argument("--classes", default="crack,ler")
    ap.add_argument("--per-class", type=int, default=800)
    ap.add_argument("--seed", type=int, default=404, help="generator seed of the training pairs (and the run)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--patch-epochs", type=int, default=60)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--init", default="", help="backbone .npz to start from (default: the shipped SEM backbone)")
    ap.add_argument("--modes", default="control,frames,twins,patches")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/twin_probe.md"))
    args = ap.parse_args()
    names = ["normal", *args.classes.split(",")]

    start = time.perf_counter()
    data = make_pairs(names[1:], args.per_class, args.seed, args.size)
    print(f"rendered {len(data['leaf'])} frames with twins in {time.perf_counter() - start:.0f} s", flush=True)
    pre = Preprocess(size=args.size)
    test_x = np.stack([load_frame(p, pre) for c in names
                       for p in sorted((Path(args.test) / c).iterdir())[:TEST_PER_CLASS]])[..., None]
    test = (test_x.astype(np.float32), np.repeat(np.arange(len(names)), TEST_PER_CLASS))
    rows = [run_mode(m, data, names, test, args) for m in args.modes.split(",")]

    lines = [f"Generator {synth.GENERATOR_VERSION}, default difficulty, 256 px frames at {args.size} px; training "
             f"pairs: seed {args.seed}, {args.per_class} a class; test: `{Path(args.test).name}`, first "
             f"{TEST_PER_CLASS} frames of each of {', '.join(names)}. Backbone: "
             f"{Path(args.init).name if args.init else 'the shipped SEM backbone'}; AdamW 1e-3 cosine, batch "
             "32, flips/rotations.", "",
             "| training negatives | training examples | epochs | training acc. (always-normal rate) | "
             "whole-frame test acc. | test recall " + " / ".join(names) + " | min |",
             "|---|---|---|---|---|---|---|"]
    label = {"control": "clean twins vs the same twins with a bright spot (test: normal frames with/without)",
             "frames": "independent normal frames", "twins": "clean twins of the defect frames",
             "patches": f"{args.crop} px crops at the defect and the same crops of the twins"}
    for r in rows:
        lines.append(f"| {label[r['mode']]} | {r['n_train']} | {r['epochs']} | {r['train_acc']:.3f} "
                     f"({r['always_normal']:.2f}) | {r['test_acc']:.3f} | "
                     + " / ".join(f"{v:.2f}" for v in r["recall"]) + f" | {r['minutes']:.1f} |")
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
