"""Pretrain the backbone on a large synthetic SEM set and write the weights shipped as `--weights sem`.

    python tools/pretrain_sem.py --per-class 4000 --epochs 8 --work /tmp/sem_pretrain

Steps: generate frames with seeds disjoint from the quickstart's and the tests' (default seed 1000),
train the five-head model (float only; from scratch, or from `--init` weights), then save the backbone
layers (not the heads) of the best checkpoint as .npz into semhinet_tf/weights/. The time it took is
printed and stored next to the weights, so the cost is documented with the file.

The shipped backbone uses this tool twice: first from scratch (whole frames), and again as the last
stages, started from the crop stages of tools/pretrain_sem_patches.py. Whole-frame training from scratch
learns little of the small defects; after the crop stages it learns how the frame-level heads read the
defect detectors (see experiments/results/patch_pretraining.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=4000)
    p.add_argument("--frame-size", type=int, default=256, help="generated frame size")
    p.add_argument("--img-size", type=int, default=128, help="training input size")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--init", default="none", help="start from these weights (e.g. a previous .npz) to continue")
    p.add_argument("--work", type=Path, default=Path("sem_pretrain"))
    p.add_argument("--out", type=Path, default=None, help="default: semhinet_tf/weights/<name>.npz")
    args = p.parse_args()

    from semhinet_tf.data.synth import generate
    from semhinet_tf.model.heads import is_head_layer
    from semhinet_tf.model.io import load_model
    from semhinet_tf.model.mobilenet_v3 import save_backbone_weights
    from semhinet_tf.model.pretrained import WEIGHTS_DIR, sem_weights_name
    from semhinet_tf.train import TrainConfig, train

    t0 = time.time()
    data = args.work / "data"
    if not (data / "dataset.json").exists():
        stats = generate(data, per_class=args.per_class, size=args.frame_size, seed=args.seed)
        print(f"generated {stats['total']} frames in {stats['seconds']:.0f} s", flush=True)
    t_gen = time.time() - t0
    cfg = TrainConfig(img_size=args.img_size, epochs=args.epochs, qat_epochs=0, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, val_split=0.05, weights=args.init, alpha=args.alpha, patience=100)
    run_dir = args.work / ("run" if args.init == "none" else "run_continued")
    result = train(data, run_dir, cfg, overwrite=True)
    model = load_model(run_dir / "float.keras")
    out = args.out or WEIGHTS_DIR / sem_weights_name(args.alpha, False)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = save_backbone_weights(model, out, keep=lambda name: not is_head_layer(name))
    info = {"init": args.init, "per_class": args.per_class, "frame_size": args.frame_size, "img_size": args.img_size,
            "epochs": args.epochs, "seed": args.seed, "layers": n, "generate_seconds": round(t_gen),
            "train_seconds": result["float_seconds"], "total_seconds": round(time.time() - t0),
            "val": result["float_val"], "machine": "2 CPU cores, no GPU"}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
