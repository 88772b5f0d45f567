"""Class-balanced vs natural sampling when one class dominates the training data (as `normal` does in a fab).

    python experiments/sampling.py --work DIR --test TEST_DATA [--minority 60] [--ratio 10] [--img-size 128] \
        [--epochs 20] [--qat-epochs 2] [--out experiments/results/sampling.md]

Generates an imbalanced training folder (normal `ratio` times more frequent than every other class, from
the project's generator with its own seed), trains the default model twice with `--sampler balanced` and
`--sampler natural` (float phase, a short QAT phase, then `convert`), and evaluates float and int8 on a
separately generated, balanced test set (TEST_DATA). Runs already present in DIR are reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from results_file import write_result


def imbalanced_data(root: Path, minority: int, ratio: int, seed: int) -> Path:
    """normal: minority * ratio frames; every other class: minority frames."""
    from semhinet_tf.data.synth import LEAVES, generate

    out = root / f"imbalanced_{minority}x{ratio}"
    if (out / "dataset.json").exists():
        return out
    tmp = root / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp / "rest", per_class=minority, seed=seed, classes=[c for c in LEAVES if c != "normal"])
    generate(tmp / "normal", per_class=minority * ratio, seed=seed, classes=["normal"])
    (tmp / "data").mkdir()
    for part in ("rest", "normal"):
        for folder in (tmp / part).iterdir():
            if folder.is_dir():
                folder.rename(tmp / "data" / folder.name)
    (tmp / "data" / "dataset.json").write_text(json.dumps({"minority": minority, "ratio": ratio, "seed": seed}))
    (tmp / "data").rename(out)
    shutil.rmtree(tmp)
    return out


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    with log.open("w") as fh:
        if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"failed; see {log}")


def variant(args, data: Path, sampler: str) -> dict:
    run_dir = args.work / f"sampler_{sampler}"
    semhinet = [sys.executable, "-m", "semhinet_tf"]
    train_cmd = ["train", str(data), "--out", str(run_dir), "--img-size", str(args.img_size), "--epochs",
                 str(args.epochs), "--qat-epochs", str(args.qat_epochs), "--seed", str(args.seed),
                 "--sampler", sampler]
    if not (run_dir / "train_result.json").exists():
        run([*semhinet, *train_cmd, *(["--overwrite"] if run_dir.exists() else [])], args.work / f"{sampler}.log")
    if not (run_dir / "model_int8.tflite").exists():
        run([*semhinet, "convert", str(run_dir)], args.work / f"{sampler}.convert.log")
    results = {}
    for name, model in (("float", run_dir / "float.keras"), ("int8", run_dir / "model_int8.tflite")):
        out = run_dir / f"test_eval_{name}.json"
        if not out.exists():
            run([*semhinet, "eval", str(model), "--data", str(args.test), "--split", "all", "--json", str(out)],
                args.work / f"{sampler}.eval_{name}.log")
        results[name] = json.loads(out.read_text())
    results["command"] = "semhinet " + " ".join(shlex.quote(a) for a in train_cmd).replace(str(run_dir), "RUN")
    return results


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| sampler | model | leaf acc | Δ int8 vs float (points) | h1 recall bogus / normal / defect "
             "| h2 router acc | specialist precision min | per-class recall (min, class) |",
             "|---|---|---|---|---|---|---|---|"]
    for sampler, res in rows.items():
        for name in ("float", "int8"):
            r = res[name]
            s = r["summary"]
            rec = s["h1_recall"]
            precisions = [v for v in s["specialist_precision"].values() if v is not None]
            recalls = {k: v["recall"] for k, v in r["per_class"].items() if v.get("recall") is not None}
            worst = min(recalls, key=recalls.get) if recalls else None
            delta = ("" if name == "float" else
                     f"{100 * (r['leaf']['accuracy'] - res['float']['leaf']['accuracy']):+.1f}")
            lines.append(f"| {sampler} | {name} | {r['leaf']['accuracy']:.3f} | {delta} | "
                         f"{_f(rec.get('bogus'))} / {_f(rec.get('normal'))} / {_f(rec.get('defect'))} | "
                         f"{_f(s['h2_router_accuracy'])} | {_f(min(precisions) if precisions else None)} | "
                         f"{_f(recalls.get(worst))} ({worst}) |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--minority", type=int, default=60)
    p.add_argument("--ratio", type=int, default=10)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=303)
    p.add_argument("--out", type=Path, default=Path("experiments/results/sampling.md"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = imbalanced_data(args.work, args.minority, args.ratio, args.data_seed)
    rows = {s: variant(args, data, s) for s in ("balanced", "natural")}
    lines = [f"Training data: normal {args.minority * args.ratio} frames, every other class {args.minority} "
             f"(generator seed {args.data_seed}); test: `{args.test}` (balanced, separately generated). "
             f"{args.img_size} px, {args.epochs} float + {args.qat_epochs} QAT epochs, seed {args.seed}, "
             "this 2-core CPU.", "", *table(rows), "",
             *(f"- {s}: `{r['command']}`" for s, r in rows.items())]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
