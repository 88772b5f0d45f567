"""Model and training choices on the same data and budget: (a) five heads vs a flat 8-way softmax,
(b) loss weights, (c) input size, (d) from scratch vs the shipped SEM-pretrained backbone (vs ImageNet),
(e) the heads' loss: masked means vs the joint -log P(leaf), (f) the peak learning rate, (g) training length.

    python experiments/model_choices.py --train TRAIN_DATA --test TEST_DATA --work DIR \
        [--only a,b,c,d,e,f,g] [--img-size 128] [--epochs 30] [--seeds 0,1,2] [--imagenet WEIGHTS.h5] \
        [--reuse NAME=RUN ...] [--out experiments/results/model_choices.md]

With several seeds every figure is the mean over them, and the leaf accuracy cell lists each seed's.

Every variant is a `semhinet train` (float phase only: quantization is experiments/quantization.py's
subject) with one setting changed from the defaults, evaluated by `semhinet eval` on a separately
generated test set. Runs already present in --work are reused, so the script can be resumed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from results_file import write_result


def variants(args) -> dict[str, list[tuple[str, list[str]]]]:
    """experiment -> [(variant name, extra `semhinet train` arguments)]; the first one is the reference."""
    size = ["--img-size", str(args.img_size)]
    base = ("five heads, SEM start", size)
    out = {
        "a": [base, ("flat 8-way softmax, SEM start", [*size, "--flat"])],
        "b": [("h3-h5 weight 2 (default)", size), ("all weights 1", [*size, "--loss-weights", "h3=1,h4=1,h5=1"]),
              ("h3-h5 weight 4", [*size, "--loss-weights", "h3=4,h4=4,h5=4"])],
        "c": [(f"{s} px", ["--img-size", str(s)]) for s in (128, 160, 224)],
        "d": [base, ("from scratch", [*size, "--weights", "none"])],
        "e": [base, ("joint -log P(leaf), balanced by logit adjustment", [*size, "--head-loss", "joint"]),
              ("joint -log P(leaf), unbalanced", [*size, "--head-loss", "joint", "--no-balance-heads"]),
              ("flat 8-way softmax", [*size, "--flat"])],
        "f": [("3e-4 (default from pretrained weights)", size), ("1e-4", [*size, "--lr", "1e-4"]),
              ("1e-3 (the default before 2026-11-30)", [*size, "--lr", "1e-3"]), ("3e-3", [*size, "--lr", "3e-3"])],
        "g": [("30 epochs, stop after 10 without gain (default)", size),
              ("all 30 epochs", [*size, "--patience", "100"]),
              ("60 epochs", [*size, "--epochs", "60", "--patience", "100"])],
    }
    if args.imagenet:
        out["d"].append(("ImageNet start", [*size, "--weights", str(args.imagenet)]))
    return out


def run_name(extra: list[str], seed: int = 0) -> str:
    name = "_".join(a.strip("-").replace("=", "").replace(",", "") for a in extra) or "default"
    return name.replace("/", "_")[:80] + (f"_seed{seed}" if seed else "")


def train_and_eval(args, extra: list[str], reuse: dict[str, Path], seed: int) -> dict:
    name = run_name(extra, seed)
    run = reuse.get(name, args.work / name)
    result_file = run / "test_eval.json"
    if not result_file.exists():
        if not (run / "train_result.json").exists():
            cmd = [sys.executable, "-m", "semhinet_tf", "train", str(args.train), "--out", str(run),
                   *_epochs(args, extra), "--qat-epochs", "0", "--seed", str(seed), *extra]
            if run.exists():
                cmd.append("--overwrite")
            _run(cmd, args.work / f"{name}.log")
        minutes = json.loads((run / "train_result.json").read_text())["float_seconds"] / 60
        _run([sys.executable, "-m", "semhinet_tf", "eval", str(run / "float.keras"), "--data", str(args.test),
              "--split", "all", "--json", str(result_file)], args.work / f"{name}.eval.log")
        result = json.loads(result_file.read_text())
        result["train_minutes"] = round(minutes, 1)
        result_file.write_text(json.dumps(result))
    return {**json.loads(result_file.read_text()), "run": str(run), "command": _train_command(args, extra)}


def _train_command(args, extra: list[str]) -> str:
    seed = str(args.seeds[0]) if len(args.seeds) == 1 else "S"
    return " ".join(shlex.quote(a) for a in ["semhinet", "train", str(args.train), "--out", "RUN",
                                             *_epochs(args, extra), "--qat-epochs", "0", "--seed", seed, *extra])


def _epochs(args, extra: list[str]) -> list[str]:
    """The script's --epochs, unless the variant sets its own (a training-length variant)."""
    return [] if "--epochs" in extra else ["--epochs", str(args.epochs)]


def seed_mean(results: list[dict]) -> dict:
    """The mean over seeds of every figure in the table; `per_seed` keeps each seed's leaf accuracy."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    first = results[0]
    summary = {
        "h1_recall": {k: mean([r["summary"]["h1_recall"].get(k) for r in results])
                      for k in first["summary"]["h1_recall"]},
        "h2_router_accuracy": mean([r["summary"]["h2_router_accuracy"] for r in results]),
        "specialist_precision": {"min": mean([min(v for v in r["summary"]["specialist_precision"].values()
                                                  if v is not None) for r in results])},
    }
    minutes = [r.get("train_minutes") for r in results]
    return {"summary": summary, "leaf": {"accuracy": mean([r["leaf"]["accuracy"] for r in results])},
            "per_seed": [r["leaf"]["accuracy"] for r in results], "command": first["command"],
            "train_minutes": round(mean(minutes), 1) if None not in minutes else "-",
            "h1_recall_min": mean([min(v for v in r["summary"]["h1_recall"].values() if v is not None)
                                   for r in results])}


def _run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**_env(), "SEMHINET_QUIET": "1"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}); see {log}")


def _env() -> dict:
    import os

    return dict(os.environ)


def row(name: str, res: dict, ref: dict | None) -> str:
    s = res["summary"]
    acc = res["leaf"]["accuracy"]
    recalls = [v for v in s["h1_recall"].values() if v is not None]
    precisions = [v for v in s["specialist_precision"].values() if v is not None]
    delta = "" if ref is None else f" ({100 * (acc - ref['leaf']['accuracy']):+.1f})"
    seeds = " [" + " / ".join(f"{a:.3f}" for a in res["per_seed"]) + "]" if len(res.get("per_seed", [])) > 1 else ""
    h1_min = res.get("h1_recall_min", min(recalls) if recalls else None)
    return (f"| {name} | {acc:.3f}{delta}{seeds} | {_f(s['h1_recall'].get('normal'))} "
            f"| {_f(s['h1_recall'].get('defect'))} | {_f(h1_min)} | {_f(s['h2_router_accuracy'])} "
            f"| {_f(min(precisions) if precisions else None)} | {res.get('train_minutes', '-')} | `{res['command']}` |")


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


TITLES = {"a": "(a) Hierarchical five heads vs flat softmax", "b": "(b) Loss weights",
          "c": "(c) Input size", "d": "(d) Starting weights", "e": "(e) Head loss: masked means vs joint",
          "f": "(f) Peak learning rate", "g": "(g) Training length"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--only", default="a,b,c,d,e,f,g")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", default="0", help="comma-separated; figures are means over them")
    p.add_argument("--imagenet", type=Path, default=None, help="keras.applications MobileNetV3Small weights")
    p.add_argument("--reuse", action="append", default=[], help="NAME=RUN: an existing run for a variant")
    p.add_argument("--out", type=Path, default=Path("experiments/results/model_choices.md"))
    args = p.parse_args()
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    reuse = {k: Path(v) for k, v in (r.split("=", 1) for r in args.reuse)}

    lines = [f"Train: `{args.train}`; test: `{args.test}` (separately generated); {args.epochs} float epochs, "
             f"seed(s) {', '.join(map(str, args.seeds))}, float models on this 2-core CPU. Leaf accuracy in "
             "brackets: points vs the first row of each table.", ""]
    for key in args.only.split(","):
        lines += [f"### {TITLES[key]}", "",
                  "| variant | leaf acc | h1 recall normal | h1 recall defect | h1 recall min | h2 router acc "
                  "| specialist precision min | train min | command |", "|---|---|---|---|---|---|---|---|---|"]
        ref = None
        for name, extra in variants(args)[key]:
            per_seed = [train_and_eval(args, extra, reuse, seed) for seed in args.seeds]
            res = per_seed[0] if len(per_seed) == 1 else seed_mean(per_seed)
            lines.append(row(name, res, ref))
            ref = ref or res
            print(lines[-1], flush=True)
        lines.append("")
    write_result(lines[:-1], args.out)  # each table ends with a blank line already


if __name__ == "__main__":
    main()
