"""Do unlabelled frames help? Label a pool with a trained model (its test-time views averaged), keep the
confident verdicts, and build a training folder of the labelled set plus those pseudo-labelled frames.

    python experiments/pseudo_labels.py TEACHER_RUN --labelled TRAIN --unlabelled POOL --out DIR \
        [--count 3000] [--min-probability 0.7] [--views 8] [--seed 7]
    semhinet train DIR --out STUDENT --seed 0          # then compare STUDENT with TEACHER_RUN on a test set

The pool's class folders are never used to label: they only measure how pure the pseudo-labels are (a real
user's unlabelled frames have no such folders). DIR holds symbolic links, one folder per class, and
`pseudo_labels.csv` (frame, pseudo class, leaf probability, true class). The labelled set's frames are
linked unchanged, so the student sees every labelled frame plus the kept pool frames.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", type=Path, help="a `semhinet train` run folder (its float.keras labels the pool)")
    ap.add_argument("--labelled", type=Path, required=True, help="the labelled training folder")
    ap.add_argument("--unlabelled", type=Path, required=True, help="frames to pseudo-label (class folders ignored)")
    ap.add_argument("--out", type=Path, required=True, help="new training folder (must not exist)")
    ap.add_argument("--count", type=int, default=3000, help="pool frames drawn at random")
    ap.add_argument("--min-probability", type=float, default=0.7, help="keep verdicts at least this sure")
    ap.add_argument("--views", type=int, default=8, help="test-time views the teacher averages")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out}: exists; choose another --out")

    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.engines import load_model
    from semhinet_tf.workflow import decode_items

    teacher = load_model(args.teacher / "float.keras", views=args.views)
    taxonomy, pre = teacher.taxonomy, teacher.preprocess
    items, _, notes = eval_items(args.unlabelled, taxonomy, None, "all")
    pick = np.random.default_rng(args.seed).permutation(len(items))[:args.count]
    items = [items[i] for i in sorted(pick)]
    frames, paths, truth = decode_items(items, pre, taxonomy, notes)
    leaf_p = taxonomy.leaf_probabilities(teacher.predict(frames))
    pseudo, sure = leaf_p.argmax(1), leaf_p.max(1)
    keep = sure >= args.min_probability

    labelled, _, _ = eval_items(args.labelled, taxonomy, None, "all")
    for leaf in taxonomy.leaves:
        (args.out / leaf).mkdir(parents=True)
    for path, leaf in labelled:
        src = Path(path).resolve()
        os.symlink(src, args.out / leaf / f"{src.parent.name}_{src.name}")
    rows = []
    for i in np.flatnonzero(keep):
        src = Path(paths[i]).resolve()
        leaf = taxonomy.leaves[pseudo[i]]
        os.symlink(src, args.out / leaf / f"pseudo_{i:06d}{src.suffix}")
        rows.append([str(src), leaf, f"{sure[i]:.4f}", taxonomy.leaves[truth[i]]])
    with open(args.out / "pseudo_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["frame", "pseudo_class", "leaf_probability", "true_class"], *rows])

    right = np.mean(pseudo[keep] == truth[keep]) if keep.any() else 0.0
    print(f"teacher ({args.views} views) on {len(truth)} pool frames: leaf accuracy {np.mean(pseudo == truth):.4f}; "
          f"kept {keep.sum()} at probability >= {args.min_probability}, of them right {right:.4f}")
    for c, leaf in enumerate(taxonomy.leaves):
        mine = keep & (pseudo == c)
        print(f"  {leaf}: {mine.sum()} pseudo-labelled, {np.mean(truth[mine] == c) if mine.any() else 0:.3f} right; "
              f"{len([1 for _, lf in labelled if lf == leaf])} labelled")


if __name__ == "__main__":
    main()
