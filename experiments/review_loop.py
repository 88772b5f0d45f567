"""Does the review queue pick better frames to label than chance? (issue 24, "Measured")

    python experiments/review_loop.py --start START_A,START_B,START_C --pool POOL --test TEST --work DIR \
        [--seeds 0,1,2] [--rounds 4] [--budget 80] [--img-size 64] [--epochs 30] [--ft-epochs 10] [--reference] \
        [--out experiments/results/review_loop.md]

Per seed: a round-0 model is trained on that seed's labelled start set (`semhinet train START`); then, for each
strategy, four rounds of: predict the pool frames not yet reviewed with the current model, choose `--budget` of
them, answer them with the generator's label (the frame's class folder: the expert is never wrong), append the
answers to a labels.jsonl (semhinet_tf.review.labels) and fine-tune with `semhinet train START --from PREV
--labels LABELS` (the from-run path; each round starts from the previous round's run, whose reviewed frames it
carries, and the labels file holds every answer so far). Strategies:

* queue: `semhinet_tf.review.queue.select` on the current model's leaf and head probabilities, with the model's
  review threshold, the default audit share and boundary count and `max_items=--budget` (what `semhinet review
  queue --max BUDGET` chooses, without a contract's class readiness: the runs are not converted);
* random: the same number of pool frames drawn uniformly (numpy default_rng([seed, round])).

With --reference, each seed also gets one full training (round 0's recipe) on its start set plus the frames the
random strategy reviewed by the last round: the accuracy fine-tuning could reach with the same labels.

After every round, leaf accuracy and the gatekeeper's (h1's own argmax) recall of bogus / normal / defect on the
fixed test set. Rows go to DIR/rows.jsonl as they finish (a rerun with the same DIR skips them), and the table
and plot are written from whatever rows exist (`--report-only` writes them without training).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from results_file import write_result

STRATEGIES = ("queue", "random")
REFERENCE = "retrain"  # --reference: a full training on the random strategy's frames at the last round
GATE = ("bogus", "normal", "defect")


def decode_folder(folder: Path, pre, taxonomy):
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.workflow import decode_items

    items, _, notes = eval_items(folder, taxonomy, None, "all")
    frames, paths, truth = decode_items(items, pre, taxonomy, notes, progress=False)
    return frames, [str(Path(p).resolve()) for p in paths], truth


def engine_of(run: Path):
    from semhinet_tf.engines import load_model

    return load_model(run / "float.keras")


def scores(engine, frames: np.ndarray, truth: np.ndarray) -> dict:
    tax = engine.taxonomy
    probs = engine.predict(frames, verbose=0)
    leaf = tax.leaf_probabilities(probs).argmax(1)
    h1_classes = list(tax.heads[0].classes)
    gate_truth = np.array([h1_classes.index(tax.path(tax.leaves[t])[0][1]) for t in truth])
    gate_pred = np.asarray(probs[tax.heads[0].name]).argmax(1)
    out = {"leaf_accuracy": float(np.mean(leaf == truth))}
    for c, name in enumerate(h1_classes):
        out[f"recall_{name}"] = float(np.mean(gate_pred[gate_truth == c] == c))
    return out


def train_cli(args: list[str]) -> float:
    import keras

    from semhinet_tf.cli import main as cli

    t = time.time()
    print("$ semhinet train " + " ".join(args), flush=True)
    cli(["train", *args], standalone_mode=False)
    keras.backend.clear_session()
    return time.time() - t


def train_round0(seed: int, start: Path, run0: Path, args) -> None:
    if run0.exists():
        shutil.rmtree(run0)
    train_cli([str(start), "--out", str(run0), "--img-size", str(args.img_size), "--epochs", str(args.epochs),
               "--qat-epochs", "0", "--seed", str(seed), "--cache-dir", str(run0.parent / "cache")])


def load_rows(path: Path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r["seed"], r["strategy"], r["round"])] = r
    return rows


def add_row(path: Path, rows: dict, row: dict) -> None:
    rows[(row["seed"], row["strategy"], row["round"])] = row
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"  seed {row['seed']} {row['strategy']} round {row['round']}: {row['labelled']} labelled, leaf "
          f"{row['leaf_accuracy']:.3f}, h1 recall defect {row['recall_defect']:.3f} bogus {row['recall_bogus']:.3f} "
          f"normal {row['recall_normal']:.3f} ({row['seconds']:.0f} s)", flush=True)


def run_seed(seed: int, start: Path, args, pool, test, rows: dict, rows_file: Path) -> None:
    from semhinet_tf.review.labels import Answer, append_answer, now, replay
    from semhinet_tf.review.queue import file_sha256, select

    pool_frames, pool_paths, pool_truth = pool
    test_frames, test_truth = test
    work = args.work / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    cache = ["--cache-dir", str(work / "cache")]  # one cache a seed: seeds may run in parallel
    run0 = work / "round0"
    n_start = sum(1 for p in start.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".tif", ".bmp"))
    if (seed, "start", 0) not in rows:
        t = time.time()
        if not (run0 / "float.keras").exists():
            train_round0(seed, start, run0, args)
        add_row(rows_file, rows, {"seed": seed, "strategy": "start", "round": 0, "labelled": n_start, "reviewed": 0,
                                  **scores(engine_of(run0), test_frames, test_truth), "seconds": time.time() - t})
    taxonomy = engine_of(run0).taxonomy
    for strategy in STRATEGIES:
        prev = run0
        for k in range(1, args.rounds + 1):
            run = work / f"{strategy}{k}"
            labels = work / f"{strategy}_labels_r{k}.jsonl"
            if (seed, strategy, k) in rows and run.exists():
                prev = run
                continue
            t = time.time()
            before = work / f"{strategy}_labels_r{k - 1}.jsonl"
            if k > 1:
                shutil.copyfile(before, labels)
            elif labels.exists():
                labels.unlink()
            reviewed = set(replay(labels).labels) if labels.exists() else set()
            remaining = np.array([i for i, p in enumerate(pool_paths) if p not in reviewed])
            reasons: dict[str, int] = {}
            if strategy == "queue":
                engine = engine_of(prev)
                probs = engine.predict(pool_frames[remaining], verbose=0)
                leaf_p = taxonomy.leaf_probabilities(probs)
                sel = select(leaf_p, {h: np.asarray(probs[h]) for h in taxonomy.head_names}, taxonomy,
                             engine.review_threshold, max_items=args.budget, seed=seed * 100 + k)
                chosen = remaining[np.array(sel.order, dtype=np.int64)]
                for i in sel.order:
                    for why in sel.reasons[i]:
                        why = why.split(":")[0]
                        reasons[why] = reasons.get(why, 0) + 1
                threshold = float(engine.review_threshold)
                del engine
            else:
                rng = np.random.default_rng([seed, k])
                chosen = rng.choice(remaining, size=min(args.budget, remaining.size), replace=False)
                threshold = None
            for i in chosen:
                path = pool_paths[i]
                append_answer(labels, Answer("label", path, file_sha256(path), taxonomy.leaves[pool_truth[i]],
                                             time=now(), reviewer="generator"))
            if run.exists():
                shutil.rmtree(run)
            train_cli([str(start), "--from", str(prev), "--labels", str(labels), "--out", str(run),
                       "--epochs", str(args.ft_epochs), "--qat-epochs", "0", *cache])
            chosen_leaves = np.bincount(pool_truth[chosen], minlength=len(taxonomy.leaves))
            add_row(rows_file, rows, {
                "seed": seed, "strategy": strategy, "round": k, "labelled": n_start + len(reviewed) + len(chosen),
                "reviewed": len(chosen), "review_threshold": threshold, "reasons": reasons,
                "chosen_by_class": dict(zip(taxonomy.leaves, chosen_leaves.tolist(), strict=True)),
                **scores(engine_of(run), test_frames, test_truth), "seconds": time.time() - t})
            prev = run
    if args.reference and (seed, REFERENCE, args.rounds) not in rows:
        retrain_reference(seed, start, work, args, (test_frames, test_truth), rows, rows_file, n_start)


def retrain_reference(seed: int, start: Path, work: Path, args, test, rows: dict, rows_file: Path,
                      n_start: int) -> None:
    """A full training (round 0's recipe, from the SEM-pretrained start) on the start set plus the frames the random
    strategy reviewed by the last round: what fine-tuning round by round leaves on the table."""
    from semhinet_tf.review.labels import replay

    t = time.time()
    labels = replay(work / f"random_labels_r{args.rounds}.jsonl").labels
    data = work / "retrain_data"
    if data.exists():
        shutil.rmtree(data)
    for p in start.rglob("*"):
        if p.is_file() and p.parent != start:
            (data / p.parent.name).mkdir(parents=True, exist_ok=True)
            (data / p.parent.name / p.name).hardlink_to(p)
    for path, answer in labels.items():
        (data / answer.label).mkdir(parents=True, exist_ok=True)
        (data / answer.label / f"pool_{Path(path).parent.name}_{Path(path).name}").hardlink_to(path)
    run = work / f"{REFERENCE}{args.rounds}"
    train_round0(seed, data, run, args)
    add_row(rows_file, rows, {"seed": seed, "strategy": REFERENCE, "round": args.rounds,
                              "labelled": n_start + len(labels), "reviewed": len(labels),
                              **scores(engine_of(run), *test), "seconds": time.time() - t})


def paired_last_round(args) -> dict[int, dict]:
    """Per seed, queue against random at the last round on the same test frames: the frames only one of them gets
    right (leaf) and the exact two-sided McNemar p, from the runs themselves (the rows keep no per-frame result)."""
    from semhinet_tf.stats import mcnemar

    out: dict[int, dict] = {}
    test = None
    for seed in args.seed_list:
        runs = {st: args.work / f"seed{seed}" / f"{st}{args.rounds}" for st in STRATEGIES}
        if not all((r / "float.keras").exists() for r in runs.values()):
            continue
        correct = {}
        for st, run in runs.items():
            engine = engine_of(run)
            if test is None:
                frames, _, truth = decode_folder(args.test, engine.preprocess, engine.taxonomy)
                test = (frames, truth)
            leaf = engine.taxonomy.leaf_probabilities(engine.predict(test[0], verbose=0)).argmax(1)
            correct[st] = leaf == test[1]
        only_queue = int(np.sum(correct["queue"] & ~correct["random"]))
        only_random = int(np.sum(~correct["queue"] & correct["random"]))
        out[seed] = {"only_queue": only_queue, "only_random": only_random, "p": mcnemar(only_random, only_queue)}
    return out


def report(rows: dict, args, wall: float | None, paired: dict[int, dict] | None = None) -> None:
    seeds = sorted({s for s, _, _ in rows})
    rounds = sorted({k for _, _, k in rows})
    lines = ["# Review loop: the queue's selection against random selection (issue 24, Measured)", ""]
    complete = all((s, st, args.rounds) in rows for s in args.seed_list for st in STRATEGIES)
    if not complete:
        lines += ["**PARTIAL**: not every seed reached the last round; the rows below are the ones that finished.", ""]
    lines += [
        f"Synthetic data (`semhinet synth`, {args.img_size} px frames, default visible labels judged at "
        f"{args.img_size} px): labelled start sets `{', '.join(str(p) for p in args.start_list)}` (one per seed), "
        f"pool `{args.pool}` ({args.n_pool} frames, uniform class mix, another seed), fixed test set `{args.test}` "
        f"({args.n_test} frames). Model: the default MobileNetV3Small five-head recipe at --img-size {args.img_size}, "
        f"SEM-pretrained start, round 0 trained {args.epochs} epochs on the start set; each round fine-tuned "
        f"{args.ft_epochs} epochs with `train --from PREV --labels LABELS` (float only: --qat-epochs 0). "
        f"{args.rounds} rounds of {args.budget} reviewed frames; the expert's answer is the generator's label. "
        "Queue = `review.queue.select` (review threshold of the current run, default audit 2% and 10 boundary "
        "frames a head, budget as max; no class-readiness input since the runs are not converted). Random = the "
        "same number drawn uniformly from the frames not yet reviewed. Gatekeeper recall = h1's own argmax "
        "against the frame's h1 class."
        + (f" Retrain (reference) = a full training with round 0's recipe ({args.epochs} epochs from the "
           "SEM-pretrained start) on the start set plus the random strategy's reviewed frames of the last round: "
           "what fine-tuning round by round leaves on the table." if args.reference else ""), ""]
    lines += ["| seed | round | labelled | strategy | leaf acc | h1 defect recall | h1 bogus recall | "
              "h1 normal recall | queue reasons |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        for k in rounds:
            for st in (("start",) if k == 0 else (*STRATEGIES, REFERENCE)):
                r = rows.get((s, st, k))
                if r is None:
                    continue
                why = ", ".join(f"{a} {b}" for a, b in sorted(r.get("reasons", {}).items()))
                lines.append(f"| {s} | {k} | {r['labelled']} | {st} | {r['leaf_accuracy']:.3f} | "
                             f"{r['recall_defect']:.3f} | {r['recall_bogus']:.3f} | {r['recall_normal']:.3f} | {why} |")
    lines += ["", "Mean over seeds (rows present for every seed only):", "",
              "| round | strategy | leaf acc | h1 defect recall | h1 bogus recall | h1 normal recall |",
              "|---|---|---|---|---|---|"]
    for k in rounds:
        for st in (("start",) if k == 0 else (*STRATEGIES, REFERENCE)):
            got = [rows[(s, st, k)] for s in seeds if (s, st, k) in rows]
            if len(got) != len(seeds):
                continue
            m = {key: np.mean([r[key] for r in got]) for key in ("leaf_accuracy", "recall_defect", "recall_bogus",
                                                                 "recall_normal")}
            lines.append(f"| {k} | {st} | {m['leaf_accuracy']:.3f} | {m['recall_defect']:.3f} | "
                         f"{m['recall_bogus']:.3f} | {m['recall_normal']:.3f} |")
    paired = paired or {}
    lines += ["", f"Target (issue 24): at round {args.rounds} the queue beats random on leaf accuracy and on h1 "
              "defect recall on every seed. Paired: of the test frames exactly one of the two gets right (leaf), "
              "how many each, and the exact two-sided McNemar p.", "",
              "| seed | leaf acc queue − random | defect recall queue − random | met | only queue right / only "
              "random right | McNemar p |", "|---|---|---|---|---|---|"]
    verdicts = []
    for s in seeds:
        q, r = rows.get((s, "queue", args.rounds)), rows.get((s, "random", args.rounds))
        if q is None or r is None:
            lines.append(f"| {s} | not run | not run | – | – | – |")
            continue
        dl, dd = q["leaf_accuracy"] - r["leaf_accuracy"], q["recall_defect"] - r["recall_defect"]
        met = dl > 0 and dd > 0
        verdicts.append(met)
        pr = paired.get(s)
        pair = f"{pr['only_queue']} / {pr['only_random']} | {pr['p']:.2f}" if pr else "– | –"
        lines.append(f"| {s} | {dl:+.3f} | {dd:+.3f} | {'yes' if met else 'no'} | {pair} |")
    if verdicts:
        lines += ["", f"Target met on {sum(verdicts)} of {len(verdicts)} finished seeds"
                  + (f" (of {len(args.seed_list)} planned)." if len(verdicts) < len(args.seed_list) else ".")]
    lines += ["", "![leaf accuracy and defect recall against labelled frames](review_loop.png)", "",
              f"Machine: {platform.machine()} {platform.processor() or ''} CPU, 2 cores shared with other jobs, no GPU"
              f" ({platform.platform()})." + (f" Wall time of this invocation: {wall / 60:.1f} min." if wall else ""),
              "Per-row seconds (selection + fine-tune + test): "
              + ", ".join(f"{r['seconds']:.0f}" for r in rows.values()) + "."]
    if args.ran:
        lines += ["", "Rows made by: " + args.ran]
    write_result(lines, args.out)
    plot(rows, seeds, rounds, args.out.with_suffix(".png"))


def plot(rows: dict, seeds: list, rounds: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"queue": "tab:blue", "random": "tab:orange"}
    for ax, key, title in zip(axes, ("leaf_accuracy", "recall_defect"), ("leaf accuracy", "h1 defect recall"),
                              strict=True):
        for st in STRATEGIES:
            curves = []
            for s in seeds:
                pts = [rows[(s, "start", 0)]] if (s, "start", 0) in rows else []
                pts += [rows[(s, st, k)] for k in rounds if k > 0 and (s, st, k) in rows]
                if pts:
                    ax.plot([p["labelled"] for p in pts], [p[key] for p in pts], color=colors[st], alpha=0.3, lw=1)
                    curves.append(pts)
            full = [c for c in curves if len(c) == max(map(len, curves))] if curves else []
            if full:
                x = [p["labelled"] for p in full[0]]
                y = np.mean([[p[key] for p in c] for c in full], axis=0)
                ax.plot(x, y, color=colors[st], lw=2.5, marker="o", label=f"{st} (mean of {len(full)} seeds)")
        ref = [rows[(s, REFERENCE, k)] for s in seeds for k in rounds if (s, REFERENCE, k) in rows]
        if ref:
            ax.scatter([r["labelled"] for r in ref], [r[key] for r in ref], color="tab:green", marker="*", s=90,
                       zorder=3, label="full retrain on random's frames (one a seed)")
        ax.set_xlabel("labelled frames (start set + reviewed)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("review queue vs random selection (thin: one seed)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", required=True, help="labelled start folders, comma-separated, one per seed")
    ap.add_argument("--pool", type=Path, required=True, help="unlabelled pool (class folders = the expert's answers)")
    ap.add_argument("--test", type=Path, required=True, help="fixed test set")
    ap.add_argument("--work", type=Path, required=True, help="runs, labels files and rows.jsonl")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--budget", type=int, default=80, help="frames reviewed a round")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30, help="round-0 training epochs")
    ap.add_argument("--ft-epochs", type=int, default=10, help="fine-tune epochs a round")
    ap.add_argument("--reference", action="store_true",
                    help="also a full retraining on the random strategy's frames at the last round")
    ap.add_argument("--report-only", action="store_true", help="write the table and plot from rows.jsonl")
    ap.add_argument("--ran", default="", help="with --report-only: how the rows were made, quoted in the table")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "review_loop.md")
    args = ap.parse_args()
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.start_list = [Path(p) for p in args.start.split(",")]
    if len(args.start_list) != len(args.seed_list):
        raise SystemExit("error: give one --start folder per seed")
    args.work.mkdir(parents=True, exist_ok=True)
    rows_file = args.work / "rows.jsonl"
    rows = load_rows(rows_file)
    args.n_pool = sum(1 for p in args.pool.rglob("*.png"))
    args.n_test = sum(1 for p in args.test.rglob("*.png"))
    t0 = time.time()
    if not args.report_only:
        seed, start = args.seed_list[0], args.start_list[0]
        run0 = args.work / f"seed{seed}" / "round0"
        if not (run0 / "float.keras").exists():  # the first round-0 run fixes the preprocessing every run shares
            train_round0(seed, start, run0, args)
        engine = engine_of(run0)
        pre, taxonomy = engine.preprocess, engine.taxonomy
        t = time.time()
        pool = decode_folder(args.pool, pre, taxonomy)
        test_frames, _, test_truth = decode_folder(args.test, pre, taxonomy)
        print(f"decoded pool {len(pool[1])} and test {len(test_truth)} frames in {time.time() - t:.0f} s", flush=True)
        for seed, start in zip(args.seed_list, args.start_list, strict=True):
            run_seed(seed, start, args, pool, (test_frames, test_truth), rows, rows_file)
            report(rows, args, time.time() - t0)
    report(rows, args, (time.time() - t0) if not args.report_only else None, paired_last_round(args))


if __name__ == "__main__":
    main()
