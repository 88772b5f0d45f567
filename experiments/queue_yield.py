"""How many of the frames the review queue shows an engineer are the model's mistakes? (issue 24, what a user gets)

    python experiments/queue_yield.py MODEL POOL [--budgets 40,80,160,320] [--work DIR] \
        [--out experiments/results/queue_yield.md]

MODEL is any model `semhinet review queue` takes (the converted .tflite of a run, so the contract's class
readiness and unfamiliar-frame score take part as they do for a user); POOL a labelled folder of new frames (class
folders; the folder is the truth, as in experiments/review_loop.py). For each budget B the script runs the real
command, `semhinet review queue MODEL POOL --out WORK/qB --max B`, and counts the queued frames whose verdict
differs from their folder: the errors a reviewer finds by labelling the queue. Random review of B frames finds on
average B times the pool's error rate (from `semhinet predict`'s verdicts on the whole pool), with the
hypergeometric 2.5-97.5% range of one draw. Also per budget: the share of all the pool's errors the queue
catches, and the errors among the queue's frames by why they were queued.

The learning-curve experiment (review_loop.md) asks whether labelling these frames makes a better model; this one
asks what reviewing them is worth by itself: the mistakes a person sees and corrects before they reach the line.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from results_file import write_result
from scipy.stats import hypergeom


def semhinet(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "semhinet_tf", *args], check=True, stdout=subprocess.DEVNULL)


def truth_of(path: str, pool: Path) -> str:
    """The class folder a frame lies in (the first folder below POOL)."""
    return Path(path).resolve().relative_to(pool.resolve()).parts[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("pool", type=Path)
    ap.add_argument("--budgets", default="40,80,160,320")
    ap.add_argument("--work", type=Path, default=Path("queue_yield_work"))
    ap.add_argument("--out", type=Path, default=Path("experiments/results/queue_yield.md"))
    ap.add_argument("--note", default="", help="a paragraph to print under the tables (e.g. an earlier run's figures)")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)

    verdicts_file = args.work / "verdicts.jsonl"
    if not verdicts_file.exists():
        semhinet("predict", str(args.model), str(args.pool), "--out", str(verdicts_file))
    verdicts = [json.loads(line) for line in verdicts_file.read_text().splitlines() if line.strip()]
    wrong = {v["path"] for v in verdicts if v["class"] != truth_of(v["path"], args.pool)}
    n_pool, n_wrong = len(verdicts), len(wrong)

    rows = []
    for budget in budgets:
        folder = args.work / f"q{budget}"
        if not (folder / "queue.jsonl").exists():
            semhinet("review", "queue", str(args.model), str(args.pool), "--out", str(folder), "--max", str(budget))
        queue = [json.loads(line) for line in (folder / "queue.jsonl").read_text().splitlines() if line.strip()]
        found = [e for e in queue if e["verdict"] != truth_of(e["path"], args.pool)]
        by_reason: dict[str, list[int]] = {}
        for e in queue:
            reason = e["why"][0].split(":")[0]
            counts = by_reason.setdefault(reason, [0, 0])
            counts[0] += 1
            counts[1] += e["verdict"] != truth_of(e["path"], args.pool)
        dist = hypergeom(n_pool, n_wrong, len(queue))
        rows.append({"budget": budget, "queued": len(queue), "found": len(found), "random_mean": dist.mean(),
                     "random_lo": int(dist.ppf(0.025)), "random_hi": int(dist.ppf(0.975)),
                     "p_random_at_least": float(dist.sf(len(found) - 1)), "by_reason": by_reason})

    lines = ["# What reviewing the queue finds: the model's mistakes among the frames it shows (issue 24)", "",
             f"Model `{args.model}`; pool `{args.pool}`: {n_pool} labelled frames, of which the model gets "
             f"{n_wrong} wrong ({n_wrong / n_pool:.1%}). Each budget is one `semhinet review queue MODEL POOL "
             f"--max B` (default audit 2% and 10 boundary frames a head); random = B frames drawn uniformly "
             f"(expected errors, and the 2.5-97.5% range of one draw).", "",
             "| budget | queued | errors in the queue | share | random: expected [range] | queue / random | "
             "share of all the pool's errors caught | P(random finds as many) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['queued']} | {r['found']} | {r['found'] / max(r['queued'], 1):.0%} | "
                     f"{r['random_mean']:.1f} [{r['random_lo']}, {r['random_hi']}] | "
                     f"{r['found'] / max(r['random_mean'], 1e-9):.1f}x | {r['found'] / max(n_wrong, 1):.0%} "
                     f"(random {r['queued'] / n_pool:.0%}) | {r['p_random_at_least']:.1g} |")
    lines += ["", "Errors by why a frame was queued (its first reason): errors / frames.", "",
              "| budget | " + " | ".join(sorted({k for r in rows for k in r["by_reason"]})) + " |",
              "|---|" + "---|" * len({k for r in rows for k in r["by_reason"]})]
    reasons = sorted({k for r in rows for k in r["by_reason"]})
    for r in rows:
        cells = [f"{r['by_reason'][k][1]} / {r['by_reason'][k][0]}" if k in r["by_reason"] else "" for k in reasons]
        lines.append(f"| {r['budget']} | " + " | ".join(cells) + " |")
    plot = args.out.with_suffix(".png")
    _plot(rows, n_pool, n_wrong, plot)
    lines += [*(["", args.note] if args.note else []), "", f"![errors found against frames reviewed]({plot.name})", "",
              f"Machine: {platform.machine()}, {platform.platform()}, CPU only."]
    write_result(lines, args.out)


def _plot(rows: list[dict], n_pool: int, n_wrong: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queued = [r["queued"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(queued, [r["found"] for r in rows], "o-", label="review queue")
    ax.plot(queued, [r["random_mean"] for r in rows], "s--", color="grey", label="random frames (expected)")
    ax.fill_between(queued, [r["random_lo"] for r in rows], [r["random_hi"] for r in rows], color="grey",
                    alpha=0.2, label="random, 95% of draws")
    ax.axhline(n_wrong, color="black", lw=0.8, ls=":", label=f"all {n_wrong} errors in {n_pool} frames")
    ax.set_xlabel("frames reviewed")
    ax.set_ylabel("model errors among them")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
