"""How does accuracy grow with labelled images per class, from the SEM-pretrained start and from scratch?

    python experiments/learning_curve.py --pool POOL --test TEST_DATA --work DIR \
        [--runs 150:128:sem,150:128:none,600:128:sem,...] [--epochs 30] [--out RESULT.md]

Each run is IMAGES_A_CLASS:INPUT_PX:WEIGHTS. POOL is a class-folder data set with at least the largest
number of images a class (e.g. `semhinet synth POOL --per-class 1500 --seed 303`); a run trains on the
first N images of every class (symlinked, so the smaller sets are subsets of the larger ones) with the
default recipe (float phase only), and every run is evaluated on the same separately generated
TEST_DATA. Runs already present in --work are reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model_choices import row, train_and_eval  # experiments/ is on the path when a script here runs
from results_file import write_result

from semhinet_tf.data.synth import LEAVES


def subset(pool: Path, n: int, out: Path) -> Path:
    """`out` with the first n images (sorted by name) of each class folder of `pool`, as symlinks."""
    for leaf in LEAVES:
        files = sorted(p for p in (pool / leaf).iterdir() if p.is_file())
        if len(files) < n:
            raise SystemExit(f"{pool / leaf}: {len(files)} images, need {n}")
        (out / leaf).mkdir(parents=True, exist_ok=True)
        for f in files[:n]:
            link = out / leaf / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--runs", default="150:128:sem,150:128:none,600:128:sem,600:128:none,600:224:sem,1500:128:sem")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("experiments/results/learning_curve.md"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    lines = [f"Pool: `{args.pool}`; test: `{args.test}` (separately generated); {args.epochs} float epochs "
             f"(early stopping on), seed {args.seed}, this 2-core CPU.", "",
             "| images a class | input px | start | leaf acc | h1 recall normal | h1 recall defect | h1 recall min "
             "| h2 router acc | specialist precision min | train min | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in args.runs.split(","):
        n, px, weights = spec.split(":")
        data = subset(args.pool, int(n), args.work / f"data_{n}")
        run_args = argparse.Namespace(**{**vars(args), "train": data, "work": args.work / f"n{n}"})
        run_args.work.mkdir(exist_ok=True)
        res = train_and_eval(run_args, ["--img-size", px, "--weights", weights], {})
        lines.append(f"| {n} | {px} | {weights} " + row("x", res, None).removeprefix("| x "))
        print(lines[-1], flush=True)
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
