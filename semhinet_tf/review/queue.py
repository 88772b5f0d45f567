"""The review queue: which new frames an engineer should look at, and why (issue 24.1).

Selection is pure numpy on the model's leaf and head probabilities, so it is tested on hand-made numbers
without a model. Four reasons, each recorded with the frame:

* "review": the top leaf probability is under the review threshold (the model itself asks for a person);
  "not-ready": a verdict of a class the model's contract does not list as ready (class readiness), which goes
  to a person whatever its probability; "unfamiliar": a frame whose unfamiliar-frame score is above the
  contract's threshold (model.ood: unlike every class the model was trained on), queued first among these.
* "boundary:<head>": among the confident verdicts, the frames with the smallest margin between the top two
  probabilities of a head that applies to the verdict (the heads on the predicted leaf's path): the frames
  nearest that head's decision boundary, where a label teaches the model most.
* "audit": a uniform random sample of the confident verdicts (default 2%), drawn independently of the other
  reasons, so the share of them a person corrects estimates the error rate of what is classified automatically.
* "suspect": (added by the caller, `find_suspects`) a labelled frame whose folder label the model disputes: a
  held-out frame by the model's own verdict, a training frame by out-of-fold predictions (a linear probe on the
  model's pooled features, one per fold), since the model itself has learnt its training frames' labels.

The budget (`max_items`) keeps, in this order: the audit sample (without it no estimate), the unfamiliar frames,
the frames under review from the least probable up, then the boundary frames from the smallest margin up, one head
after another in turn. The audit takes at most AUDIT_BUDGET_SHARE of the budget: 2% of a large pool's confident
verdicts can be the whole budget (measured: 8-45 of 80 frames a round in experiments/review_loop.py on a 4,000-frame
pool), and audit frames are random ones, which teach the model no more than random selection; audits of successive
rounds add up to the estimate. The unfamiliar frames queued first are at most UNFAMILIAR_BUDGET_SHARE of it (the
least probable first; the others keep their place among the frames under review): the score's threshold allows 1%
of normal frames, defect and bogus frames exceed it more often, and put first they filled whole budgets with
verdicts that were mostly right (measured: the quickstart model on 2,000 new frames flagged 82, 10 of them wrong,
and `--max 80` found fewer errors than 80 random frames; experiments/results/queue_yield.md), while a score that
finds a new kind of frame needs a person to see some of it, not all. A frame with several reasons is one entry
listing them all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semhinet_tf.artifacts.files import file_sha256
from semhinet_tf.review import SERVED_ELSEWHERE, ReviewInputError
from semhinet_tf.taxonomy import Taxonomy

DEFAULT_AUDIT = 0.02
AUDIT_BUDGET_SHARE = 0.25  # at most this share of a budget (--max) goes to the audit sample (at least one frame)
UNFAMILIAR_BUDGET_SHARE = 0.25  # ... and this share to the frames queued first for being unfamiliar (the rest follow
#                                 with the frames under review, by probability)
DEFAULT_BOUNDARY = 10
REASON_REVIEW, REASON_AUDIT, REASON_SUSPECT, REASON_NOT_READY = "review", "audit", "suspect", "not-ready"
REASON_UNFAMILIAR = "unfamiliar"
BOUNDARY_PREFIX = "boundary:"


@dataclass
class Selection:
    """Chosen frame indices in queue order, the reasons of each, the margin of each head that applies to each
    chosen frame's verdict, and the counts needed to read the audit (how many verdicts were confident)."""

    order: list[int]
    reasons: dict[int, list[str]]
    margins: dict[int, dict[str, float]] = field(default_factory=dict)
    n_frames: int = 0
    n_confident: int = 0
    n_audit: int = 0
    audit_asked: int = 0  # the audit sample the fraction asked for, before the budget's share capped it
    dropped: int = 0  # frames selected but left out by the budget


def head_margins(head_probs: Mapping[str, np.ndarray], taxonomy: Taxonomy, pred_leaf: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Per head, top-1 minus top-2 probability for each frame whose predicted leaf lies below that head (the
    head applies to the verdict); NaN where it does not."""
    pred_leaf = np.asarray(pred_leaf, dtype=np.int64)
    out = {}
    for head in taxonomy.heads:
        p = np.sort(np.asarray(head_probs[head.name], dtype=np.float64), axis=1)
        margin = p[:, -1] - p[:, -2]
        applies = np.array([any(h == head.name for h, _ in taxonomy.path(taxonomy.leaves[j])) for j in pred_leaf],
                           dtype=bool)
        out[head.name] = np.where(applies, margin, np.nan)
    return out


def select(leaf_probs: np.ndarray, head_probs: Mapping[str, np.ndarray], taxonomy: Taxonomy, threshold: float,
           *, audit: float = DEFAULT_AUDIT, boundary: int = DEFAULT_BOUNDARY, max_items: int | None = None,
           seed: int = 0, not_ready: np.ndarray | None = None, unfamiliar: np.ndarray | None = None) -> Selection:
    """Choose the frames to review (see the module docstring); the same inputs and seed give the same queue.

    `audit` is the fraction of confident verdicts sampled (rounded to the nearest count, at least one when the
    fraction is above 0 and any verdict is confident); `boundary` frames per head; `max_items` the budget.
    `not_ready` (bool per frame): verdicts of a class the model's contract does not list as ready, which go to
    review whatever their probability; queued with the frames under the threshold, reason "not-ready".
    `unfamiliar` (bool per frame): frames the unfamiliar-frame score sends to review; queued the same way, reason
    "unfamiliar", before every other frame under review (a kind of frame never seen is what a person must see)."""
    if not 0.0 <= audit <= 1.0:
        raise ValueError(f"the audit fraction must be between 0 and 1, got {audit}")
    leaf_probs = np.asarray(leaf_probs, dtype=np.float64)
    n = leaf_probs.shape[0]
    pred = leaf_probs.argmax(axis=1) if n else np.zeros(0, np.int64)
    top = leaf_probs.max(axis=1) if n else np.zeros(0)
    not_ready = np.zeros(n, dtype=bool) if not_ready is None else np.asarray(not_ready, dtype=bool)
    unfamiliar = np.zeros(n, dtype=bool) if unfamiliar is None else np.asarray(unfamiliar, dtype=bool)
    confident = (top >= threshold) & ~not_ready & ~unfamiliar
    margins = head_margins(head_probs, taxonomy, pred) if n else {h: np.zeros(0) for h in taxonomy.head_names}
    reasons: dict[int, list[str]] = {}

    def add(i: int, why: str) -> None:
        reasons.setdefault(int(i), []).append(why)

    conf_idx = np.flatnonzero(confident)
    n_audit = 0
    if audit > 0 and conf_idx.size:
        n_audit = min(conf_idx.size, max(1, int(math.floor(audit * conf_idx.size + 0.5))))
    audit_asked = n_audit
    if max_items is not None and n_audit:
        n_audit = min(n_audit, max(1, int(math.floor(AUDIT_BUDGET_SHARE * max_items))))
    rng = np.random.default_rng([seed, 24])
    audit_idx = np.sort(rng.choice(conf_idx, size=n_audit, replace=False)) if n_audit else np.zeros(0, np.int64)
    for i in audit_idx:
        add(i, REASON_AUDIT)
    review_idx = np.flatnonzero(~confident)
    review_idx = review_idx[np.lexsort((top[review_idx], ~unfamiliar[review_idx]))]  # unfamiliar first, then by p
    if max_items is not None:  # a budget: the first unfamiliar frames, then every other one by its probability
        n_first = max(1, int(math.floor(UNFAMILIAR_BUDGET_SHARE * max_items)))
        first = review_idx[unfamiliar[review_idx]][:n_first]
        rest = review_idx[~np.isin(review_idx, first)]
        review_idx = np.concatenate([first, rest[np.argsort(top[rest], kind="stable")]])
    for i in review_idx:
        if unfamiliar[i]:
            add(i, REASON_UNFAMILIAR)
        if top[i] < threshold:
            add(i, REASON_REVIEW)
        elif not_ready[i]:
            add(i, REASON_NOT_READY)
    per_head: list[list[int]] = []
    for head in taxonomy.head_names:
        m = margins[head]
        ok = np.flatnonzero(confident & np.isfinite(m))
        chosen = ok[np.argsort(m[ok], kind="stable")][:boundary]
        for i in chosen:
            add(i, BOUNDARY_PREFIX + head)
        per_head.append([int(i) for i in chosen])
    order: list[int] = []
    seen: set[int] = set()

    def take(items: Iterable[int]) -> None:
        for i in items:
            if int(i) not in seen:
                seen.add(int(i))
                order.append(int(i))

    take(audit_idx)
    take(review_idx)
    for rank in range(max((len(c) for c in per_head), default=0)):  # heads in turn: every head gets its nearest
        take(c[rank] for c in per_head if rank < len(c))
    dropped = 0
    if max_items is not None and len(order) > max_items:
        dropped = len(order) - max_items
        order = order[:max_items]
    kept = set(order)
    return Selection(order=order, reasons={i: r for i, r in reasons.items() if i in kept},
                     margins={i: {h: round(float(margins[h][i]), 6) for h in taxonomy.head_names
                                  if np.isfinite(margins[h][i])} for i in order},
                     n_frames=n, n_confident=int(confident.sum()),
                     n_audit=sum(REASON_AUDIT in reasons[i] for i in order), audit_asked=audit_asked,
                     dropped=dropped)


# ---------------------------------------------------------------- rows in, queue out
def rows_to_arrays(rows: Sequence[Mapping[str, Any]], taxonomy: Taxonomy, where: str = "verdicts"
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Leaf probabilities (N, leaves) and head probabilities from verdict rows (`predict`'s JSON lines), checked
    against the taxonomy: a row from another model is refused in one line naming it."""
    leaf = np.zeros((len(rows), len(taxonomy.leaves)))
    heads = {h.name: np.zeros((len(rows), h.num_classes)) for h in taxonomy.heads}
    for i, row in enumerate(rows):
        try:
            lp, hp = row["leaf_probabilities"], row["heads"]
            leaf[i] = [float(lp[leaf_name]) for leaf_name in taxonomy.leaves]
            for h in taxonomy.heads:
                heads[h.name][i] = [float(hp[h.name][c]) for c in h.classes]
        except (KeyError, TypeError, ValueError) as exc:
            name = row.get("path", f"row {i + 1}")
            raise ReviewInputError(f"{where}: the verdict of {name} does not fit the model's taxonomy (no "
                                   f"probability for {exc}); give the model that wrote it") from None
    return leaf, heads


def _read_json_lines(path: str | Path, what: str, required: Sequence[str]) -> list[dict]:
    """The JSON objects of a JSON-lines file, blank lines skipped; a line that is not JSON, not an object or lacks
    a `required` key is an error naming the file, the line and `what` it should have been."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ReviewInputError(f"{path}: not a text file of JSON lines ({exc.reason} at byte {exc.start}); give "
                               f"a folder of images, or the JSON lines `semhinet predict` writes") from None
    except OSError as exc:
        raise ReviewInputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReviewInputError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        missing = [key for key in required if not isinstance(row, dict) or key not in row]
        if missing or not isinstance(row.get("path"), str):
            raise ReviewInputError(f"{path}: line {number} is not {what} (no '{(missing or ['path'])[0]}')")
        rows.append(row)
    return rows


def read_verdicts(path: str | Path) -> list[dict]:
    """`semhinet predict`'s JSON lines (rows with an 'error' are kept aside by the caller); a line that is not a
    verdict is an error naming the file and line."""
    return _read_json_lines(path, "a verdict of `semhinet predict`", ("path",))


def queue_entries(rows: Sequence[Mapping[str, Any]], selection: Selection, hashes: Mapping[int, str]
                  ) -> list[dict]:
    """The lines of queue.jsonl for the chosen rows, in queue order."""
    out = []
    for i in selection.order:
        row = rows[i]
        out.append({"path": row["path"], "sha256": hashes[i], "verdict": row["class"],
                    "probability": row["probability"], "review": bool(row.get("review")),
                    "leaf_probabilities": row["leaf_probabilities"], "heads": row["heads"],
                    "why": selection.reasons[i], "margins": selection.margins.get(i, {})})
    return out


def read_queue(path: str | Path) -> list[dict]:
    """queue.jsonl as written by `review queue`; a damaged line is an error naming the file and line."""
    rows = _read_json_lines(path, "a queue entry", ("path", "sha256", "verdict", "leaf_probabilities", "heads"))
    for number, row in enumerate(rows, start=1):
        heads = row["heads"]
        if not (isinstance(row["sha256"], str) and isinstance(row["verdict"], str)
                and _numbers_by_name(row["leaf_probabilities"]) and isinstance(heads, dict)
                and all(isinstance(k, str) and _numbers_by_name(v) for k, v in heads.items())):
            raise ReviewInputError(f"{path}: entry {number} is not a queue entry as `semhinet review queue` writes "
                                   f"it (sha256 and verdict texts, leaf_probabilities and heads mappings of "
                                   f"numbers)")
    return rows


def _numbers_by_name(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (int, float))
                                           and not isinstance(v, bool) for k, v in value.items())


# ---------------------------------------------------------------- suspects: labels the model disputes
def label_issues(labels: np.ndarray, leaf_probs: np.ndarray) -> np.ndarray:
    """Indices of frames whose given label is likely wrong, most suspicious first: cleanlab's confident learning
    (`find_label_issues`, ranked by self-confidence) on out-of-sample leaf probabilities.

    Classes no frame is labelled with are left out of the columns (and the rows renormalised), since confident
    learning estimates a per-class threshold from each class's own frames."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, np.int64)
    present = np.unique(labels)
    if present.size < 2:
        return np.zeros(0, np.int64)
    remap = {int(c): k for k, c in enumerate(present)}
    probs = np.asarray(leaf_probs, dtype=np.float64)[:, present]
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about small classes; the result still stands
        found = find_label_issues(np.array([remap[int(c)] for c in labels]), probs,
                                  return_indices_ranked_by="self_confidence")
    return np.asarray(found, dtype=np.int64)


PROBE_FOLDS = 5  # folds of the out-of-fold probe that judges training frames


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, n_leaves: int, seed: int = 0
                              ) -> np.ndarray | None:
    """(N, n_leaves) leaf probabilities of each frame from a linear probe (standardised features, multinomial
    logistic regression) fitted on the other folds (stratified, PROBE_FOLDS or as many as the rarest class
    allows). None when a present class has a single frame or only one class is present.

    Why a probe and not the model: the model was trained on these frames and agrees with their labels, wrong or
    right; confident learning needs predictions made without the frame's own label (Northcutt et al., 2021).
    Why not a model per fold: five trainings of the network for one queue; the probe reads the network's features,
    which have seen the labels too, so it finds fewer mislabels than full cross-validation would, never more."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_leaves)
    present = counts[counts > 0]
    if present.size < 2 or present.min() < 2:
        return None
    folds = int(min(PROBE_FOLDS, present.min()))
    out = np.zeros((len(labels), n_leaves))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(features[train], labels[train])
        out[np.ix_(test, probe.classes_)] = probe.predict_proba(features[test])
    return out


def _suspect_entry(path: str, row: Mapping[str, Any], folder_leaf: str, **extra: Any) -> dict:
    return {"path": path, "sha256": file_sha256(path), "verdict": row["class"], "probability": row["probability"],
            "review": row["review"], "leaf_probabilities": row["leaf_probabilities"], "heads": row["heads"],
            "why": [REASON_SUSPECT], "margins": {}, "folder_label": folder_leaf, **extra}


def find_suspects(engine: Any, data: str | Path, run_dir: Path | None, progress: bool = True, seed: int = 0
                  ) -> tuple[list[dict], str, list[str]]:
    """Labelled frames of DATA (class folders) whose folder label the model disputes, as queue entries with
    why ["suspect"] and their `folder_label`, found by confident learning (`label_issues`).

    When DATA is the folder the model's run was trained on: its validation frames are judged by the model's own
    verdicts, its training frames by out-of-fold predictions (`out_of_fold_probabilities` on the run's float
    model's pooled features; the entry's verdict and leaf probabilities are then the probe's, `judged_by` says
    so). On any other folder every frame is judged by the model. Returns (entries, frames judged, notes)."""
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.workflow import decode_items

    taxonomy = engine.taxonomy
    items, split_used, notes = eval_items(data, taxonomy, run_dir, None)
    frames, paths, leaf_ids = decode_items(items, engine.preprocess, taxonomy, notes, progress)
    out = []
    if len(frames):
        probs = engine.predict(frames)
        rows = taxonomy.decode(probs, engine.review_threshold)
        for i in label_issues(leaf_ids, taxonomy.leaf_probabilities(probs)):
            out.append(_suspect_entry(str(Path(paths[i]).resolve()), rows[i], taxonomy.leaves[int(leaf_ids[i])]))
    if split_used != "val":
        return out, split_used, notes
    trained = _training_suspects(engine, data, run_dir, progress, seed, notes)
    if trained is None:
        return out, split_used, notes
    return out + trained, "val+train", notes


def _training_suspects(engine: Any, data: str | Path, run_dir: Path, progress: bool, seed: int,
                       notes: list[str]) -> list[dict] | None:
    """The run's training frames whose label the out-of-fold probe disputes (None, with a note, when they cannot
    be judged: no float model in the run, too few frames a class)."""
    from semhinet_tf.artifacts.run import FLOAT_MODEL
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.model.io import load_model
    from semhinet_tf.model.ood import feature_tap, pooled_features
    from semhinet_tf.progress import step
    from semhinet_tf.workflow import decode_items

    taxonomy = engine.taxonomy
    if not (run_dir / FLOAT_MODEL).exists():
        notes.append(f"training frames not judged: {run_dir / FLOAT_MODEL} is missing (its features judge them)")
        return None
    items, _, item_notes = eval_items(data, taxonomy, run_dir, "train")
    notes.extend(n for n in item_notes if n not in notes)
    frames, paths, leaf_ids = decode_items(items, engine.preprocess, taxonomy, notes, progress)
    if not len(frames):
        return None
    with step(f"judging {len(frames)} training frames out of fold", enabled=progress):
        tap = feature_tap(load_model(run_dir / FLOAT_MODEL))
        features, _ = pooled_features(tap.predict(frames[..., None].astype(np.float32), batch_size=32, verbose=0))
        oof = out_of_fold_probabilities(features, leaf_ids, len(taxonomy.leaves), seed)
    if oof is None:
        notes.append("training frames not judged: a class has fewer than 2 of them")
        return None
    found = label_issues(leaf_ids, oof)
    if not len(found):
        return []
    rows = taxonomy.decode(engine.predict(frames[found]), engine.review_threshold)
    out = []
    for i, row in zip(found, rows, strict=True):
        leaf_p = {leaf: round(float(p), 6) for leaf, p in zip(taxonomy.leaves, oof[i], strict=True)}
        best = max(leaf_p, key=leaf_p.get)
        probe_row = {**row, "class": best, "probability": leaf_p[best], "review": True, "leaf_probabilities": leaf_p}
        out.append(_suspect_entry(str(Path(paths[i]).resolve()), probe_row, taxonomy.leaves[int(leaf_ids[i])],
                                  judged_by="out-of-fold linear probe on the model's features (a training frame)",
                                  model_verdict=row["class"]))
    return out


# ---------------------------------------------------------------- the command's job
def build_queue(model: str | Path, images: str | Path, out: str | Path, *, audit: float = DEFAULT_AUDIT,
                boundary: int = DEFAULT_BOUNDARY, max_items: int | None = None, seed: int = 0, views: int = 1,
                allow_no_contract: bool = False, overwrite: bool = False, progress: bool = True,
                suspects: str | Path | None = None) -> dict:
    """`semhinet review queue`: classify IMAGES (a folder, or `predict`'s JSON lines) with MODEL, select, and write
    REVIEW/queue.jsonl and REVIEW/review.json. Frames are referenced by absolute path, never copied or moved.

    `suspects`: a labelled data set (class folders); its frames whose folder label the model disputes
    (`find_suspects`) are queued after the new frames, within what is left of `max_items`.
    Returns the counts written to review.json."""
    from semhinet_tf.artifacts.files import atomic_open, check_outputs, write_json
    from semhinet_tf.artifacts.run import REVIEW_INFO, REVIEW_QUEUE, RunLock, model_inputs
    from semhinet_tf.engines import find_run_dir, load_model
    from semhinet_tf.progress import bar
    from semhinet_tf.review.labels import now

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    check_outputs([out / REVIEW_QUEUE, out / REVIEW_INFO], overwrite, inputs=[*model_inputs(model), images, suspects])
    if out.is_dir():  # a page serving this folder is refused now, before the work (and held off while writing)
        RunLock(out, kind="review folder", busy=SERVED_ELSEWHERE).release()
    engine = load_model(model, views=views, allow_no_contract=allow_no_contract, progress=False)
    taxonomy = engine.taxonomy
    images = Path(images)
    rows: list[dict] = []
    unreadable: list[dict] = []
    if images.is_file():
        for row in read_verdicts(images):
            (unreadable if "error" in row else rows).append(row)
        threshold = engine.review_threshold
    else:
        if not images.exists():
            raise ReviewInputError(f"{images}: no such folder or file")
        with bar(desc="classifying", unit="img", enabled=progress) as counter:
            for row in engine.classify([images]):
                (unreadable if "error" in row else rows).append(row)
                counter.update(1)
        threshold = engine.review_threshold
    if not rows:
        raise ReviewInputError(f"{images}: no readable image to queue"
                               + (f" ({len(unreadable)} unreadable, e.g. {unreadable[0]['path']}: "
                                  f"{unreadable[0]['error']})" if unreadable else ""))
    for row in rows:
        row["path"] = str(Path(row["path"]).resolve())
    leaf, heads = rows_to_arrays(rows, taxonomy, str(images))
    not_ready = np.array([row.get("ready") is False for row in rows], dtype=bool)
    unfamiliar = np.array([row.get("unfamiliar") is True for row in rows], dtype=bool)
    sel = select(leaf, heads, taxonomy, threshold, audit=audit, boundary=boundary, max_items=max_items, seed=seed,
                 not_ready=not_ready, unfamiliar=unfamiliar)
    hashes, missing = {}, []
    for i in sel.order:
        try:
            hashes[i] = file_sha256(rows[i]["path"])
        except OSError as exc:
            missing.append(f"{rows[i]['path']} ({exc.strerror or exc})")
    if missing:
        sel.order = [i for i in sel.order if i in hashes]
    entries = queue_entries(rows, sel, hashes)
    queued = {e["path"] for e in entries}
    suspect_notes, suspect_split = [], None
    if suspects is not None:
        found, suspect_split, suspect_notes = find_suspects(engine, suspects, find_run_dir(model), progress, seed)
        room = len(found) if max_items is None else max(0, max_items - len(entries))
        for row in [r for r in found if r["path"] not in queued][:room]:
            entries.append(row)
            queued.add(row["path"])
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, kind="review folder", busy=SERVED_ELSEWHERE), atomic_open(out / REVIEW_QUEUE, "w") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    info = {"made_by": "semhinet review queue", "created": now(), "model": str(Path(model).resolve()),
            "images": str(images.resolve()), "taxonomy": taxonomy.to_spec(), "review_threshold": float(threshold),
            "views": views, "audit": audit, "boundary": boundary, "max": max_items, "seed": seed,
            "n_frames": sel.n_frames, "n_confident": sel.n_confident, "n_audit": sel.n_audit,
            "audit_asked": sel.audit_asked,
            "n_review": sum(REASON_REVIEW in e["why"] for e in entries),
            "n_not_ready": sum(REASON_NOT_READY in e["why"] for e in entries),
            "n_unfamiliar": sum(REASON_UNFAMILIAR in e["why"] for e in entries),
            "n_suspects": sum(REASON_SUSPECT in e["why"] for e in entries),
            "n_queued": len(entries), "dropped_by_budget": sel.dropped, "unreadable": len(unreadable),
            "missing": missing, "suspects": None if suspects is None else str(Path(suspects).resolve()),
            "suspects_split": suspect_split, "notes": suspect_notes}
    write_json(info, out / REVIEW_INFO)
    return info
