"""`semhinet promote RUN2 --over RUN --data DATA`: make RUN2 the current model only when it is not worse.

Both runs are scored, float and int8, on RUN's held-out frames (the validation side of RUN's saved split of DATA,
what `eval` scores by default), the same frames for both, so every figure is a paired comparison; a held-out
frame whose folder label RUN2's review corrected is scored against the reviewed label, for both. A figure is a
headline one of `eval` (leaf accuracy, the gatekeeper's recall per class, the router's accuracy, each
specialist leaf's precision); RUN2 fails on it when it fell by more than `tolerance` points and, with `paired`,
McNemar's exact one-sided test also finds the fall significant (stats.fails). A precision is counted on each
model's own predictions, so it has no McNemar test of its own; it falls when the new model raises more false
alarms of the leaf or finds fewer of its frames, and both are paired on the same frames: its p-value is the
smaller of those two one-sided McNemar tests, doubled (Bonferroni). Without that, a precision on 30 predictions
moving by one frame (3 points) refused a model that was no worse (measured: a fine-tuned run at 128 px).

The record of what is current is `promoted.json` in the folder that holds the runs: a small JSON file rather
than a `current -> RUN2` symlink because it works on every file system the runs may be copied to (SMB shares,
FAT-formatted cards for the board), is replaced atomically, and carries the figures that justified it. Every
decision, promotion or refusal, is appended to `CHANGELOG.jsonl` beside it (append-only, like the reviewer's
labels) and `CHANGELOG.md` is rewritten from it, so a person reads the history without tools.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from semhinet_tf import stats
from semhinet_tf.artifacts.files import append_line, atomic_write_text, to_jsonable, write_json
from semhinet_tf.artifacts.run import (
    CHANGELOG,
    CHANGELOG_MD,
    CONFIG,
    FLOAT_MODEL,
    INT8_MODEL,
    MANIFEST_JSON,
    PROMOTED,
    SPLIT,
    RunDirError,
    being_trained,
    is_run_dir,
)
from semhinet_tf.taxonomy import IGNORE, Taxonomy

DEFAULT_TOLERANCE = 1.0  # points


@dataclass
class Figure:
    """One headline figure of one model: k of n, and, for a paired figure, which images were right."""

    name: str
    k: int
    n: int
    parts: list[np.ndarray]  # right/wrong over images chosen by the truth alone (the same for every model)

    @property
    def value(self) -> float | None:
        return None if self.n == 0 else self.k / self.n


def headline_figures(truth: np.ndarray, probs: Mapping[str, np.ndarray], taxonomy: Taxonomy) -> list[Figure]:
    """The figures `eval` headlines (evaluate.summary_metrics), with the counts and per-image results behind them.

    Leaf accuracy, root recall per class and router accuracy are counted on images chosen by the truth alone,
    so two models' results on them pair up; a leaf's precision is counted on what each model predicted."""
    from semhinet_tf.evaluate import leaf_predictions, root_head, router_heads, specialist_leaves

    truth = np.asarray(truth, dtype=np.int64)
    probs = taxonomy.as_head_probabilities(probs)
    pred, _, _ = leaf_predictions(probs, taxonomy)
    labels = taxonomy.head_labels(truth)
    out = [Figure("leaf accuracy", int((pred == truth).sum()), len(truth), [pred == truth])]
    root = root_head(taxonomy)
    root_pred = np.asarray(probs[root]).argmax(1)
    for i, cls in enumerate(taxonomy.head(root).classes):
        on = labels[root] == i
        out.append(Figure(f"{root} recall {cls}", int((root_pred[on] == i).sum()), int(on.sum()), [root_pred[on] == i]))
    for name in router_heads(taxonomy):
        on = labels[name] != IGNORE
        right = np.asarray(probs[name]).argmax(1)[on] == labels[name][on]
        out.append(Figure(f"{name} router accuracy", int(right.sum()), int(on.sum()), [right]))
    for leaf in specialist_leaves(taxonomy):
        j = taxonomy.leaf_index(leaf)
        said = pred == j
        # no false alarm on the other frames; a hit on the leaf's own
        parts = [~said[truth != j], said[truth == j]]
        out.append(Figure(f"precision {leaf}", int((truth[said] == j).sum()), int(said.sum()), parts))
    return out


def decide(truth: np.ndarray, old_probs: Mapping[str, np.ndarray], new_probs: Mapping[str, np.ndarray],
           taxonomy: Taxonomy, tolerance: float = DEFAULT_TOLERANCE, paired: bool = True,
           alpha: float = stats.ALPHA) -> dict[str, Any]:
    """Compare two models' outputs on the same images, figure by figure; `passed` when none fails.

    Pure arrays in, a JSON-able dict out: the decision is testable on hand-made probabilities."""
    rows = []
    for old, new in zip(headline_figures(truth, old_probs, taxonomy), headline_figures(truth, new_probs, taxonomy),
                        strict=True):
        p_worse = None
        if old.n and new.n:
            tests = [stats.mcnemar_worse(*stats.discordant(a, b)) for a, b in zip(old.parts, new.parts, strict=True)
                     if a.size]
            p_worse = min(1.0, len(tests) * min(tests)) if tests else None
        drop = None if old.value is None or new.value is None else 100.0 * (old.value - new.value)
        rows.append({"figure": old.name, "before": old.value, "after": new.value,
                     "before_n": old.n, "after_n": new.n, "before_ci": stats.interval(old.k, old.n),
                     "after_ci": stats.interval(new.k, new.n),
                     "delta_points": None if drop is None else -drop, "p_worse": p_worse,
                     "failed": stats.fails(drop, tolerance, p_worse, paired, alpha)})
    return {"tolerance": tolerance, "paired": paired, "alpha": alpha, "figures": rows,
            "passed": not any(r["failed"] for r in rows)}


def failure_line(row: Mapping[str, Any], tolerance: float) -> str:
    """'h1 recall defect 0.97 -> 0.93 (-4.0 points, tolerance 1.0, McNemar p=0.01)'."""
    test = "no paired test" if row["p_worse"] is None else f"McNemar p={row['p_worse']:.2g}"
    return (f"{row['figure']} {row['before']:.3f} -> {row['after']:.3f} ({row['delta_points']:+.1f} points, "
            f"tolerance {tolerance:g}, {test})")


# ---------------------------------------------------------------------------------------------- the runs
def _check_run(run: Path, what: str) -> None:
    if not is_run_dir(run):
        raise RunDirError(f"{run}: {what} is not a run directory of this project")
    if busy := being_trained(run):
        raise RunDirError(f"{run}: {what} is {busy}; promote it when its training has ended")
    missing = [n for n in (FLOAT_MODEL, SPLIT) if not (run / n).exists()]
    if missing:
        raise RunDirError(f"{run}: {what} has no {', '.join(missing)} (train it to the end first)")
    if not (run / INT8_MODEL).exists():
        raise RunDirError(f"{run}: {what} has no {INT8_MODEL}; promote scores the model the board runs: "
                          f"`semhinet convert {run}` first")


def _check_fair(new_run: Path, old_run: Path) -> list[str]:
    """Refuse when RUN2 trained on a frame RUN holds out (its figures would flatter it); note other differences."""
    from semhinet_tf.data.discover import load_split

    old, new = load_split(old_run), load_split(new_run)
    if Path(old["root"]).resolve() == Path(new["root"]).resolve():
        leaked = sorted(set(old["val"]) & set(new["train"]))
        if leaked:
            raise RunDirError(f"{new_run}: trained on {len(leaked)} of {old_run}'s held-out frames (e.g. {leaked[0]}); "
                              f"the comparison would flatter it. Make it with `train --from {old_run}`")
        if set(old["val"]) != set(new["val"]):
            return [f"{new_run} was validated on other frames than {old_run}; both are scored on {old_run}'s"]
        return []
    return [f"{new_run} was trained on {new['root']}, {old_run} on {old['root']}: only {old_run}'s held-out frames "
            f"are scored, and {new_run} may have seen copies of them"]


def _with_reviewed_labels(items: list, data: str | Path, new_run: Path, notes: list[str]) -> list:
    """RUN's held-out (path, leaf) items with the labels RUN2's review corrected: both runs are scored against the
    reviewed label (a wrong folder label would otherwise count a right answer as a miss, for both)."""
    from semhinet_tf.data.dataset import reviewed_labels

    root = Path(data).resolve()
    corrected = {str(root / p): leaf for p, leaf in reviewed_labels(new_run).items()}
    out = [(path, corrected.get(str(Path(path).resolve()), leaf)) for path, leaf in items]
    changed = sum(a[1] != b[1] for a, b in zip(items, out, strict=True))
    if changed:
        notes.append(f"{changed} held-out frame(s) scored against the label {new_run}'s review gave them, not their "
                     f"folder's")
    return out


def _what_changed(new_run: Path) -> dict[str, Any]:
    """Frames and labels the new run added (train --from --labels), from its config and manifest."""
    try:
        config = json.loads((new_run / CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    source = config.get("from")
    if not source:
        return {"fine_tuned": False}
    out = {"fine_tuned": True, **source}
    try:
        review = json.loads((new_run / MANIFEST_JSON).read_text()).get("review") or {}
        out["relabelled_frames"] = review.get("relabelled", [])[:50]
        out["kept_held_out"] = len(review.get("kept_held_out", []))
        out["not_used"] = len(review.get("not_used", []))
    except (OSError, ValueError):
        pass
    return out


def _score(engines: dict, items: list, taxonomy: Taxonomy, notes: list[str], decoded: dict, progress: bool) -> dict:
    """Head probabilities of float and int8 on the items; `decoded` keeps the frames of each preprocessing, so
    four models of one preprocessing decode the frames once."""
    from semhinet_tf.workflow import decode_items

    out = {}
    for kind, engine in engines.items():
        key = json.dumps(engine.preprocess.to_dict(), sort_keys=True)
        if key not in decoded:
            decoded[key] = decode_items(items, engine.preprocess, taxonomy, notes, progress)
        frames, paths, truth = decoded[key]
        out[kind] = (engine.predict(frames), paths, truth)
    return out


def promote(new_run: str | Path, old_run: str | Path, data: str | Path, tolerance: float = DEFAULT_TOLERANCE,
            paired: bool = True, alpha: float = stats.ALPHA, dry_run: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Score both runs (float and int8) on RUN's held-out frames, decide, and (unless `dry_run`) record it.

    `overwrite`: replace a promoted.json that names a run other than `old_run` as current (without it that is
    refused: RUN2 was compared with RUN, not with what is current)."""
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.engines import load_model

    new_run, old_run = Path(new_run), Path(old_run)
    if new_run.resolve() == old_run.resolve():
        raise RunDirError(f"{new_run}: promote compares two runs; --over names the same one")
    _check_run(new_run, "the run to promote")
    _check_run(old_run, "--over")
    from semhinet_tf.data.discover import load_split

    trained_on = load_split(old_run)["root"]
    if Path(trained_on).resolve() != Path(data).resolve():
        raise RunDirError(f"{old_run} was trained on {trained_on}, not {data}: promote scores its held-out frames, "
                          f"so --data is that folder")
    notes = _check_fair(new_run, old_run)
    home = new_run.resolve().parent
    if old_run.resolve().parent != home:
        notes.append(f"the runs live in different folders; the record is kept in {home}")
    current = _current(home, overwrite or dry_run)
    if not dry_run and current and current != old_run.resolve() and not overwrite:
        if current == new_run.resolve():
            raise RunDirError(f"{home / PROMOTED}: {new_run} is already the current model")
        raise RunDirError(f"{home / PROMOTED}: the current model is {current}, not {old_run}; promote over it "
                          f"(--over {current}) or pass --overwrite to replace the record")
    engines = {run: {"float": load_model(run / FLOAT_MODEL, progress=progress),
                     "int8": load_model(run / INT8_MODEL, progress=progress)} for run in (old_run, new_run)}
    taxonomy = engines[old_run]["float"].taxonomy
    if engines[new_run]["float"].taxonomy.to_spec() != taxonomy.to_spec():
        raise RunDirError(f"{new_run}: its taxonomy differs from {old_run}'s; their figures do not compare")
    items, split_used, eval_notes = eval_items(data, taxonomy, old_run, "val")
    notes += eval_notes
    items = _with_reviewed_labels(items, data, new_run, notes)
    if not items:
        raise ValueError(f"{data}: none of {old_run}'s held-out frames found")
    decoded: dict = {}
    scores = {run: _score(engines[run], items, taxonomy, notes, decoded, progress) for run in (old_run, new_run)}
    decisions = {}
    for kind in ("float", "int8"):
        (old_p, old_paths, truth), (new_p, new_paths, _) = scores[old_run][kind], scores[new_run][kind]
        if old_paths != new_paths:
            raise ValueError(f"{data}: the two runs decode different frames (their preprocessing differs and some "
                             f"file is unreadable under one of them); fix or remove it")
        decisions[kind] = decide(truth, old_p, new_p, taxonomy, tolerance, paired, alpha)
    passed = all(d["passed"] for d in decisions.values())
    few = sorted({r["figure"] for d in decisions.values() for r in d["figures"]
                  if r["p_worse"] is not None and 0 < r["before_n"] < stats.FEW_FRAMES})
    if few and paired:
        notes.append(f"on fewer than {stats.FEW_FRAMES} frames, a fall must be large to be significant: "
                     f"{', '.join(few)} (--no-paired judges by --tolerance alone)")
    failures = [f"{kind}: {failure_line(r, tolerance)}" for kind, d in decisions.items() for r in d["figures"]
                if r["failed"]]
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "decision": "promoted" if passed else "refused", "run": str(new_run.resolve()),
             "over": str(old_run.resolve()), "data": str(Path(data).resolve()), "held_out": split_used,
             "frames": len(scores[old_run]["float"][1]), "changes": _what_changed(new_run), "failures": failures,
             "float": decisions["float"], "int8": decisions["int8"], "notes": notes}
    if not dry_run:  # the decision's line first, then the record it names, then the Markdown made from both
        append_line(home / CHANGELOG, json.dumps(to_jsonable(entry), allow_nan=False))
        if passed:
            write_json({"current": new_run.resolve().name, "run": str(new_run.resolve()),
                        "model": str((new_run / INT8_MODEL).resolve()), "previous": str(old_run.resolve()),
                        "time": entry["time"], "tolerance": tolerance, "paired": paired}, home / PROMOTED)
        write_changelog_markdown(home)
    return {"passed": passed, "entry": entry, "failures": failures, "notes": notes, "table": format_table(entry),
            "record": str(home / PROMOTED), "changelog": str(home / CHANGELOG_MD)}


def _current(home: Path, overwrite: bool = False) -> Path | None:
    """The run promoted.json names as current; None when there is none. A record that exists but cannot be read
    is refused (RunDirError) unless `overwrite`: it may be the only note of which model the line runs."""
    record = home / PROMOTED
    if not record.exists():
        return None
    try:
        return Path(json.loads(record.read_text(encoding="utf-8"))["run"]).resolve()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if overwrite:
            return None
        reason = " ".join(str(exc).split())[:120]
        raise RunDirError(f"{record}: not a promotion record this version can read ({type(exc).__name__}: "
                          f"{reason}); repair it, or pass --overwrite to replace it") from None


# ---------------------------------------------------------------------------------------------- the changelog
def append_changelog(home: Path, entry: Mapping[str, Any]) -> None:
    """Append one decision to CHANGELOG.jsonl (one line, flushed to disk) and rewrite CHANGELOG.md from it."""
    append_line(home / CHANGELOG, json.dumps(to_jsonable(entry), allow_nan=False))
    write_changelog_markdown(home)


def write_changelog_markdown(home: Path) -> None:
    """CHANGELOG.md from every decision in CHANGELOG.jsonl that is a JSON object (a torn line of an interrupted
    append, or a line someone wrote by hand that is not an object, is left out of the Markdown, never fatal)."""
    entries = []
    for line in (home / CHANGELOG).read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    atomic_write_text(home / CHANGELOG_MD, changelog_markdown(entries))


def _num(value: Any, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "-"
    value = 0.0 if round(value, digits) == 0 else value  # no "-0.0"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_table(entry: Mapping[str, Any]) -> str:
    """Before/after of every figure, float and int8, with intervals and the paired test (Markdown)."""
    lines = ["| figure | model | before [95% CI] | after [95% CI] | Δ points | McNemar p (worse) | |",
             "|---|---|---|---|---|---|---|"]
    for kind in ("float", "int8"):
        for r in entry[kind]["figures"]:
            p = "-" if r["p_worse"] is None else f"{r['p_worse']:.3g}"
            lines.append(f"| {r['figure']} | {kind} | {_num(r['before'])} {stats.format_interval(r['before_ci'])} "
                         f"(n={r['before_n']}) | {_num(r['after'])} {stats.format_interval(r['after_ci'])} "
                         f"(n={r['after_n']}) | {_num(r['delta_points'], 1, sign=True)} | {p} | "
                         f"{'WORSE' if r['failed'] else ''} |")
    return "\n".join(lines)


def changelog_markdown(entries: list[Mapping[str, Any]]) -> str:
    """The changelog for people, newest first: decision, what the new run added, figures before and after."""
    parts = ["# Model changelog", "Written by `semhinet promote` from CHANGELOG.jsonl beside it; newest first."]
    for e in reversed(entries):
        try:
            parts.extend(_entry_markdown(e))
        except (AttributeError, KeyError, TypeError, ValueError):  # a line written by hand or by another version
            parts.append(f"## {str(e.get('time', '?'))[:40]}: an entry this version cannot show (CHANGELOG.jsonl "
                         f"has it as written)")
    return "\n\n".join(parts) + "\n"


def _entry_markdown(e: Mapping[str, Any]) -> list[str]:
    """One decision's section of CHANGELOG.md."""
    parts = []
    run, over = Path(e.get("run", "?")).name, Path(e.get("over", "?")).name
    parts.append(f"## {e.get('time', '?')}: {run} {e.get('decision', '?')} over {over}")
    changes = e.get("changes") or {}
    if changes.get("fine_tuned"):
        labels = changes.get("labels")
        added = (f"{changes.get('added', 0)} reviewed frame(s) added to training, "
                 f"{changes.get('relabelled', 0)} training label(s) corrected")
        parts.append(f"- {run} fine-tuned from {Path(changes.get('run', '?')).name}: {added}"
                     + (f" (labels {labels}, sha256 {str(changes.get('labels_sha256'))[:12]})" if labels else ""))
    elif changes:
        parts.append(f"- {run} is not a fine-tuned run (trained without --from)")
    parts.extend(f"- worse: {line}" for line in e.get("failures", []))
    try:
        tolerance = e["float"]["tolerance"]
        parts.append(f"- scored on {e.get('frames')} held-out frames of {over} ({e.get('data')}); tolerance "
                     f"{tolerance:g} point{'' if tolerance == 1 else 's'}, paired test "
                     f"{'on' if e['float']['paired'] else 'off'}")
        parts.append(format_table(e))
    except (KeyError, TypeError, ValueError):  # a line written by hand or by another version: shown, not fatal
        parts.append("- (no figures this version can read in this entry; CHANGELOG.jsonl has it as written)")
    return parts
