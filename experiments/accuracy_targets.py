"""Issue 26's done-when figures from the JSON files of the default command, seed by seed, with their intervals.

    python experiments/accuracy_targets.py --work DIR [--seeds 0,1,2] [--out experiments/results/accuracy_targets.md]

DIR holds what these commands wrote (experiments/accuracy_targets.sh runs them):
    semhinet synth DIR/train --per-class 150 --seed 101                  # visible labels (the default)
    semhinet synth DIR/test --per-class 100 --seed 202
    semhinet synth DIR/test_cause --per-class 100 --seed 202 --labels cause   # the stress set
    semhinet train DIR/train --out DIR/runS --seed S; semhinet convert DIR/runS
    semhinet eval DIR/runS/{float.keras,model_int8.tflite} --data DIR/test --split all --json DIR/eval_S_{...}.json
    semhinet eval ... --data DIR/test_cause ... --json DIR/cause_S_{...}.json
    semhinet compare DIR/runS --data DIR/test --split all --not-worse --json DIR/compare_S.json
Tables: the targets per seed (int8, one view) with 95% Wilson intervals; int8 against float (McNemar's exact test
on the same frames); recall by visibility tercile (where the misses are); the same targets on the stress set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from results_file import write_result

from semhinet_tf.evaluate import headline_details
from semhinet_tf.stats import format_interval

TARGETS = [("h1 recall bogus", 0.99), ("h1 recall normal", 0.99), ("h1 recall defect", 0.99),
           ("h2 router accuracy", 0.99)] + [(f"precision {leaf}", 0.95) for leaf in
                                            ("bridge", "open", "cmp", "crack", "ler", "inc_etch")] + \
          [("leaf accuracy", 0.95)]
INT8, FLOAT = "model_int8.tflite", "float.keras"


def value(result: dict, name: str) -> float | None:
    if name == "leaf accuracy":
        return result["leaf"]["accuracy"]
    if name == "h2 router accuracy":
        return result["summary"]["h2_router_accuracy"]
    if name.startswith("h1 recall "):
        return result["summary"]["h1_recall"][name.split()[-1]]
    return result["summary"]["specialist_precision"][name.split()[-1]]


def cell(result: dict, name: str, target: float) -> str:
    v = value(result, name)
    ci, n = headline_details(result)[name]
    mark = "" if v is None else (" ✓" if v >= target else (" (target inside)" if ci and ci[1] >= target else ""))
    return "-" if v is None else f"{v:.3f} {format_interval(ci)}{mark}"


def targets_table(results: dict[int, dict], title: str) -> list[str]:
    seeds = sorted(results)
    lines = [f"| {title} | target | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for name, target in TARGETS:
        lines.append(f"| {name} | {target} | " + " | ".join(cell(results[s], name, target) for s in seeds) + " |")
    return lines


def paired_table(work: Path, seeds: list[int]) -> list[str]:
    lines = ["| seed | float leaf acc | int8 leaf acc | int8 − float, points | float right, int8 wrong | "
             "int8 right, float wrong | McNemar p (int8 worse, one-sided) | int8 significantly worse? |",
             "|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        path = work / f"compare_{s}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        models = {m["model"]: m for m in doc["models"]}
        f, q = models.get(FLOAT), models.get(INT8)
        if f is None or q is None:
            continue
        lost, gained = q["leaf_discordant"]
        lines.append(f"| {s} | {f['leaf_accuracy']:.4f} | {q['leaf_accuracy']:.4f} | {q['leaf_delta_points']:+.2f} | "
                     f"{lost} | {gained} | {q['leaf_p_worse']:.3g} | {'yes' if q['leaf_p_worse'] < 0.05 else 'no'} |")
    return lines


def visibility_table(results: dict[int, dict]) -> list[str]:
    lines = ["| class | seed | recall | low visibility third | middle third | high third |",
             "|---|---|---|---|---|---|"]
    for s, r in sorted(results.items()):
        block = (r.get("attributes") or {}).get("visibility")
        if not block:
            continue
        for leaf, c in block["classes"].items():
            thirds = [f"{t['recall']:.2f} ({t['correct']}/{t['n']}, {t['range'][0]:.2f}-{t['range'][1]:.2f})"
                      for t in c["terciles"]]
            lines.append(f"| {leaf} | {s} | {c['recall']:.2f} | " + " | ".join(thirds) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("experiments/results/accuracy_targets.md"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    def load(prefix: str, model: str) -> dict[int, dict]:
        return {s: json.loads((args.work / f"{prefix}_{s}_{model}.json").read_text()) for s in seeds
                if (args.work / f"{prefix}_{s}_{model}.json").exists()}

    int8, flt, stress = load("eval", INT8), load("eval", FLOAT), load("cause", INT8)
    lines = ["# Issue 26's targets on the default command (visible labels, 150 frames a class, int8, one view)", "",
             "`semhinet train` with its defaults on `semhinet synth train --per-class 150 --seed 101`, converted by "
             "`semhinet convert`, scored by `semhinet eval --split all` on 100 frames a class generated with seed 202 "
             "(visible labels). 95% Wilson intervals over frames; ✓ the target reached; '(target inside)' missed, but "
             "the target lies inside the interval.", "", *targets_table(int8, "int8 figure"), "",
             "## int8 against float (the same 800 frames, McNemar's exact test)", "", *paired_table(args.work, seeds),
             "", "## Float figures", "", *targets_table(flt, "float figure"), "",
             "## Where the misses are: recall by the generator's visibility score (int8; 1 = the label rule's "
             "threshold)", "", *visibility_table(int8), "",
             "## The stress set: the same models on cause-labelled frames (`--labels cause`, every defect draw "
             "labelled, however faint)", "", *targets_table(stress, "int8 figure, cause labels")]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
