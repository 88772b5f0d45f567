"""The gatekeeper against bogus frames of a kind it never saw, with and without the unfamiliar-frame score
(issue 26.4: leave-one-kind-out).

    python experiments/unseen_bogus.py --train TRAIN --test TEST --work DIR [--kinds photo,noise,...] [--seed 0] \
        [--full MODEL] [--out experiments/results/unseen_bogus.md] [-- extra train options]

For each bogus kind K (synth records it in dataset.json): a training folder of TRAIN without its bogus frames of
kind K (hard links, nothing copied), the default command on it (`semhinet train`, then `semhinet convert --ood`, which
fits the unfamiliar-frame score and sets its threshold at 1% of the validation split's normal frames), and the
int8 model run on TEST: its bogus frames of kind K (never seen), its normal frames (false alarms) and all of it
(leaf accuracy). Reported per kind: the gatekeeper's bogus recall on K (verdict bogus), the share of K sent
away from automatic classification with the score (verdict bogus, or the score above the contract's
threshold), the score alone at 1% false alarms on TEST's normal frames, and the normal frames the contract's
threshold sends to review; then what the board does with all its rules (verdict bogus, or review for any reason:
probability under the review threshold, a class not ready, or the score) and what that costs on normal frames.
`--full MODEL` adds the same rows for an int8 model (with the score) trained on every kind.
A kind's rows are kept in DIR/rows.jsonl as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_file import write_result

from semhinet_tf.stats import format_interval, interval


def semhinet(args: list[str], log: Path) -> None:
    """One `semhinet` command in a child process (a fresh TensorFlow each time), its output in `log`."""
    env = {**os.environ, "SEMHINET_QUIET": "1"}
    with open(log, "a") as fh:
        fh.write("$ semhinet " + " ".join(args) + "\n")
        fh.flush()
        if subprocess.run([sys.executable, "-m", "semhinet_tf", *args], stdout=fh, stderr=subprocess.STDOUT,
                          env=env).returncode:
            raise SystemExit(f"semhinet {' '.join(args)} failed; see {log}")


def kinds_of(data: Path) -> dict[str, str]:
    """{relative path: kind} of a synthetic set's bogus frames (dataset.json)."""
    meta = json.loads((data / "dataset.json").read_text())
    return {r["path"]: r["kind"] for r in meta["frames"] if r.get("kind")}


def without_kind(train: Path, kind: str, out: Path) -> int:
    """`out`: TRAIN's class folders as hard links, without the bogus frames of `kind`; the frames left out."""
    kinds = kinds_of(train)
    left_out = 0
    for path in sorted(train.rglob("*")):
        rel = path.relative_to(train).as_posix()
        if not path.is_file() or rel == "dataset.json":
            continue
        if kinds.get(rel) == kind:
            left_out += 1
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(path, target)
    return left_out


def score_run(model: Path, test: Path) -> dict:
    """Per test frame: verdict, unfamiliar flag and score of the int8 model (engines.load_model)."""
    from semhinet_tf.engines import load_model

    engine = load_model(model)
    rows = {}
    for row in engine.classify([test]):
        if "error" not in row:
            rows[Path(row["path"]).resolve().relative_to(test.resolve()).as_posix()] = row
    return {"rows": rows, "threshold": (engine.spec.ood or {}).get("threshold")}


def kind_figures(scored: dict, test: Path, kind: str) -> dict:
    from semhinet_tf.model.ood import recall_at

    rows, kinds = scored["rows"], kinds_of(test)
    unseen = [r for p, r in rows.items() if kinds.get(p) == kind]
    normal = [r for p, r in rows.items() if p.startswith("normal/")]
    leaf_right = [r["class"] == p.split("/")[0] for p, r in rows.items()]
    caught = sum(r["verdict"] == "bogus" for r in unseen)
    caught_ood = sum(r["verdict"] == "bogus" or r.get("unfamiliar", False) for r in unseen)
    caught_any = sum(r["verdict"] == "bogus" or r["review"] for r in unseen)
    alarms = sum(r.get("unfamiliar", False) for r in normal)
    return {"kind": kind, "n": len(unseen), "bogus_recall": caught / len(unseen),
            "bogus_recall_ci": interval(caught, len(unseen)),
            "with_ood": caught_ood / len(unseen), "with_ood_ci": interval(caught_ood, len(unseen)),
            "ood_alone_at_1pct": recall_at([r["ood"] for r in normal], [r["ood"] for r in unseen]),
            "any_rule": caught_any / len(unseen), "any_rule_ci": interval(caught_any, len(unseen)),
            "normal_n": len(normal), "normal_to_review_by_ood": alarms / max(len(normal), 1),
            "normal_to_review": sum(r["review"] for r in normal) / max(len(normal), 1),
            "leaf_accuracy": float(np.mean(leaf_right)), "threshold": scored["threshold"]}


def main() -> None:
    from semhinet_tf.data.synth import BOGUS_KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--kinds", default=",".join(BOGUS_KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", type=Path, help="an int8 model with the score trained on every kind, for comparison")
    p.add_argument("--out", type=Path, default=Path("experiments/results/unseen_bogus.md"))
    p.add_argument("extra", nargs="*", help="more `semhinet train` options (after --)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows_file = args.work / "rows.jsonl"
    done = {}
    if rows_file.exists():
        done = {(r["trained_without"], r["kind"]): r for r in map(json.loads, rows_file.read_text().splitlines())}
    kinds = [k for k in args.kinds.split(",") if k]
    jobs = [(k, k) for k in kinds] + ([("none", k) for k in kinds] if args.full else [])
    for without, kind in jobs:
        if (without, kind) in done:
            continue
        t = time.time()
        if without == "none":
            model = args.full
        else:
            data, run = args.work / f"train_without_{kind}", args.work / f"run_without_{kind}"
            left_out = without_kind(args.train, kind, data)
            log = args.work / f"{kind}.log"
            if not (run / "model_int8.tflite").exists():
                if not (run / "float.keras").exists():
                    semhinet(["train", str(data), "--out", str(run), "--seed", str(args.seed), "--overwrite",
                              *args.extra], log)
                semhinet(["convert", str(run), "--ood", "--overwrite"], log)
            model = run / "model_int8.tflite"
            print(f"{kind}: {left_out} training frames left out", flush=True)
        row = {"trained_without": without, **kind_figures(score_run(model, args.test), args.test, kind),
               "seconds": round(time.time() - t)}
        done[(without, kind)] = row
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    report(done, kinds, args)


def report(done: dict, kinds: list[str], args) -> None:
    lines = ["# The gatekeeper against bogus frames of a kind it never saw (issue 26.4, leave-one-kind-out)", "",
             f"Training set `{args.train}` without the bogus frames of one kind at a time, the default command "
             f"(seed {args.seed}{', ' + ' '.join(args.extra) if args.extra else ''}) and `semhinet convert --ood` "
             f"(int8, with the unfamiliar-frame score); scored on `{args.test}`. 'with the score': the share of "
             "the unseen kind's frames that do not pass as SEM frames (verdict bogus, or the score above the "
             "contract's threshold, set at 1% of the validation split's normal frames). 'score alone': the share "
             "above the threshold that 1% of the test set's normal frames exceed. 'any rule': verdict bogus, or "
             "sent to review by the board for any reason (probability under the review threshold, a class not ready "
             "for automatic classification, or the score). 95% Wilson intervals.", "",
             "| trained without | unseen kind | frames | gatekeeper bogus recall | with the score | score alone at 1% "
             "normal false alarms | normal frames sent to review by the score | bogus or sent to review by any rule "
             "| normal frames sent to review by any rule | leaf accuracy (whole test set) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for without in [*kinds, "none"]:
        for kind in kinds:
            r = done.get((without, kind))
            if r is None or (without != "none" and without != kind):
                continue
            alone = "-" if r["ood_alone_at_1pct"] is None else f"{r['ood_alone_at_1pct']:.2f}"
            lines.append(f"| {'every kind (' + str(args.full) + ')' if without == 'none' else without} | {kind} | "
                         f"{r['n']} | {r['bogus_recall']:.2f} {format_interval(r['bogus_recall_ci'])} | "
                         f"{r['with_ood']:.2f} {format_interval(r['with_ood_ci'])} | {alone} | "
                         f"{r['normal_to_review_by_ood']:.3f} of {r['normal_n']} | "
                         f"{r['any_rule']:.2f} {format_interval(r['any_rule_ci'])} | {r['normal_to_review']:.3f} | "
                         f"{r['leaf_accuracy']:.3f} |")
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
