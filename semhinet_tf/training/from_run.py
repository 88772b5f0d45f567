"""`semhinet train DATA --from RUN --labels REVIEW/labels.jsonl`: fine-tune RUN on its data plus the reviewed frames.

What it keeps from RUN, and why:
* the split: RUN's validation frames stay validation frames (a reviewed frame among them stays there and is not
  trained on; a corrected label replaces its folder's as the label it is scored against, for both runs: eval,
  convert and promote read it from the new run's manifest), so RUN and the new run are scored on the same
  held-out frames and `promote` can compare them fairly; a reviewed frame byte-identical to one of them is kept
  out too;
* the architecture and preprocessing (input size, width, heads, info bar, fit) and the taxonomy: the new run
  starts from RUN's float weights, which only fit the same model; asking for another is refused;
* everything else (sampler, augmentation, loss) unless given again; the float phase and QAT run a third of the
  epochs RUN ran (rounded up; its configured epochs when train_state.json is missing; an early-stopped phase
  counts the epochs it ran) at a third of RUN's peak learning rate unless --epochs / --qat-epochs / --lr say; of
  a fine-tuned RUN, a third of the full training its chain started from (recorded as `from.base`), not of RUN's.

What the answers change: a reviewed frame inside RUN's training split gets the reviewed leaf (the manifest keeps
both: `leaf` and `folder_leaf`); a reviewed frame outside DATA (a new frame from the line) joins training under
its absolute path. Each answer is checked against the taxonomy (an unknown leaf stops, naming the labels file and
its line) and against the file (a frame whose sha256 changed since review is skipped and reported). A run made
this way carries RUN's reviewed frames forward, so `--from RUN2` keeps them without the old labels file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from semhinet_tf.artifacts.files import file_sha256
from semhinet_tf.artifacts.run import (
    CONFIG,
    FLOAT_MODEL,
    SPLIT,
    STATE,
    TAXONOMY,
    TRAIN_RESULT,
    RunDirError,
    being_trained,
)
from semhinet_tf.data.discover import DatasetError, Entry, Manifest, discover, load_split, save_split
from semhinet_tf.review.labels import Replay, replay
from semhinet_tf.training.config import TrainConfig

# The options that decide the model's shape or its pixels: RUN's weights fit only the same ones.
ARCHITECTURE = ("img_size", "alpha", "minimalistic", "head_units", "dropout", "flat", "databar", "fit")
FINE_TUNE_SHARE = 3  # epochs and peak learning rate are RUN's divided by this, unless given


class LabelsError(ValueError):
    """A labels file that cannot be used; str() is one line naming the file (and the line)."""


@dataclass
class SourceRun:
    """RUN as `train --from` reads it: its configuration, taxonomy, split and manifest."""

    dir: Path
    config: dict
    cfg: TrainConfig
    taxonomy: Any
    split: dict
    manifest: Manifest
    seconds: float | None  # RUN's own training wall time, for the comparison `train --from` prints
    epochs_run: dict[str, int] = field(default_factory=dict)  # phase -> epochs RUN ran (train_state.json)

    @classmethod
    def load(cls, run_dir: str | Path) -> SourceRun:
        from semhinet_tf.taxonomy import Taxonomy

        run_dir = Path(run_dir)
        if busy := being_trained(run_dir):
            raise RunDirError(f"{run_dir}: --from needs a finished run, and this one is {busy}")
        missing = [n for n in (CONFIG, TAXONOMY, SPLIT, FLOAT_MODEL) if not (run_dir / n).exists()]
        if missing:
            raise RunDirError(f"{run_dir}: --from needs a finished run directory (missing {', '.join(missing)})")
        try:
            config = json.loads((run_dir / CONFIG).read_text())
            cfg = TrainConfig.from_dict(config["train"])
            taxonomy = Taxonomy.from_spec(json.loads((run_dir / TAXONOMY).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{run_dir}: its {CONFIG} or {TAXONOMY} cannot be read ({exc})") from exc
        seconds, ran = None, {}
        try:
            if (run_dir / TRAIN_RESULT).exists():
                seconds = json.loads((run_dir / TRAIN_RESULT).read_text()).get("seconds")
            if (run_dir / STATE).exists():
                ran = {phase: int(p["epoch"]) for phase, p in json.loads((run_dir / STATE).read_text()).items()
                       if isinstance(p, dict) and p.get("epoch")}
        except (OSError, ValueError, TypeError, KeyError):
            pass  # only the defaults of the fine-tuning depend on them
        return cls(run_dir, config, cfg, taxonomy, load_split(run_dir), Manifest.load(run_dir), seconds, ran)

    @property
    def base(self) -> dict[str, float]:
        """The full training at the root of RUN's chain of fine-tunings: its peak learning rate and the float and
        QAT epochs it ran. A fine-tuning's defaults are a share of these, not of RUN's own, which are themselves
        a share: taken from RUN, the fourth round of a review loop trained at 1/81 of the learning rate and
        learned next to nothing (measured: leaf accuracy flat from 240 to 560 labelled frames)."""
        recorded = (self.config.get("from") or {}).get("base")
        if isinstance(recorded, dict) and {"lr", "epochs", "qat_epochs"} <= set(recorded):
            return {k: recorded[k] for k in ("lr", "epochs", "qat_epochs")}
        if self.config.get("from"):  # fine-tuned before the chain's root was recorded: its own, times the share
            return {"lr": self.cfg.lr * FINE_TUNE_SHARE,
                    "epochs": self.epochs_run.get("float", self.cfg.epochs) * FINE_TUNE_SHARE,
                    "qat_epochs": self.epochs_run.get("qat", self.cfg.qat_epochs) * FINE_TUNE_SHARE}
        return {"lr": self.cfg.lr, "epochs": self.epochs_run.get("float", self.cfg.epochs),
                "qat_epochs": self.epochs_run.get("qat", self.cfg.qat_epochs)}


def fine_tune_config(source: SourceRun, cfg: TrainConfig, given: set[str], taxonomy: Any = None) -> TrainConfig:
    """The new run's options: RUN's, with the ones the user typed (`given`) on top; changing the architecture or
    the taxonomy is refused, each change named."""
    saved = source.cfg
    changed = [f"{name} {getattr(saved, name)!r} -> {getattr(cfg, name)!r}" for name in ARCHITECTURE
               if name in given and getattr(cfg, name) != getattr(saved, name)]
    if taxonomy is not None and taxonomy.to_spec() != source.taxonomy.to_spec():
        changed.append("taxonomy differs from the run's")
    if changed:
        raise RunDirError(f"{source.dir}: --from fine-tunes this run's weights, which fit only its own model; "
                          f"refused: {'; '.join(changed)} (train a new run without --from instead)")
    out = replace(saved, **{name: getattr(cfg, name) for name in given if hasattr(saved, name)})
    base = source.base
    if "epochs" not in given:
        out = replace(out, epochs=max(1, math.ceil(base["epochs"] / FINE_TUNE_SHARE)))
    if "qat_epochs" not in given and saved.qat_epochs:
        out = replace(out, qat_epochs=max(1, math.ceil(base["qat_epochs"] / FINE_TUNE_SHARE)))
    if "lr" not in given and base["lr"]:
        out = replace(out, lr=base["lr"] / FINE_TUNE_SHARE)
    bn = source.config.get("model", {}).get("backbone", {}).get("bn_momentum")
    if "bn_momentum" not in given and bn is not None:  # the same model as RUN's, not one sized for fewer steps
        out = replace(out, bn_momentum=float(bn))
    return replace(out, weights=str((source.dir / FLOAT_MODEL).resolve()))


# ---------------------------------------------------------------------------------------------- the answers
@dataclass
class Review:
    """What the answers did, for the manifest, the config and the printout."""

    labels_file: str = ""
    labels_sha256: str = ""
    added: list[str] = field(default_factory=list)  # frames that joined training (new to RUN's training split)
    relabelled: list[list[str]] = field(default_factory=list)  # [path, folder leaf, reviewed leaf]
    confirmed: int = 0  # answers that agree with the frame's label already in training
    kept_held_out: list[str] = field(default_factory=list)  # reviewed frames in RUN's validation split
    relabelled_held_out: list[list[str]] = field(default_factory=list)  # [path, folder leaf, reviewed leaf]
    not_used: list[list[str]] = field(default_factory=list)  # [path, reason]: changed since review, missing ...
    carried: int = 0  # reviewed frames of RUN itself (a --from of a --from run) kept
    unreadable_lines: list[list[Any]] = field(default_factory=list)  # torn or foreign lines of the log

    def to_dict(self) -> dict:
        return {"labels_file": self.labels_file, "labels_sha256": self.labels_sha256, "added": self.added,
                "relabelled": self.relabelled, "confirmed": self.confirmed, "kept_held_out": self.kept_held_out,
                "relabelled_held_out": self.relabelled_held_out,
                "not_used": self.not_used, "carried_from_run": self.carried,
                "unreadable_lines": self.unreadable_lines}

    def lines(self) -> list[str]:
        """What a person reads after training starts: one line per kind of outcome that happened."""
        out = [f"review: {len(self.added)} reviewed frame(s) added to training, {len(self.relabelled)} training "
               f"label(s) corrected, {self.confirmed} confirmed"
               + (f", {self.carried} carried over from the run" if self.carried else "")]
        if self.kept_held_out:
            out.append(f"  {len(self.kept_held_out)} reviewed frame(s) are held-out frames of the run (or copies of "
                       f"one): kept out of training so the old and new run are scored on the same frames, e.g. "
                       f"{self.kept_held_out[0]}")
        if self.relabelled_held_out:
            path, old, new = self.relabelled_held_out[0]
            out.append(f"  {len(self.relabelled_held_out)} held-out label(s) corrected: both runs are scored against "
                       f"the reviewed label from now on (e.g. {path}: {old} -> {new})")
        for path, reason in self.not_used[:10]:
            out.append(f"  not used: {path}: {reason}")
        if len(self.not_used) > 10:
            out.append(f"  ... and {len(self.not_used) - 10} more not used (listed in the manifest.json's review)")
        for number, reason in self.unreadable_lines[:5]:
            out.append(f"  {self.labels_file} line {number} skipped: {reason}")
        return out


def _label_lines(log: Path) -> dict[tuple[str, str], int]:
    """(path, label) -> the last line that gave it, to name the line of a bad label."""
    out: dict[tuple[str, str], int] = {}
    with open(log, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("action") == "label":
                out[(str(obj.get("path")), str(obj.get("label")))] = number
    return out


def read_answers(log: Path, taxonomy: Any) -> tuple[Replay, dict[str, str]]:
    """The standing answers of the log and each labelled frame's leaf (aliases such as `IncEtch` accepted);
    an answer naming no class of the taxonomy stops with the file and its line."""
    if not log.is_file():
        raise LabelsError(f"{log}: labels file not found")
    answers = replay(log)
    if answers.bad_lines and not (answers.labels or answers.skipped):
        number, reason = answers.bad_lines[0]
        raise LabelsError(f"{log}: not one readable answer in it ({len(answers.bad_lines)} unreadable line(s), line "
                          f"{number}: {reason}); give the labels.jsonl that `review serve` writes")
    leaves: dict[str, str] = {}
    lines = None
    for path, answer in answers.labels.items():
        leaf = answer.label if answer.label in taxonomy.leaves else taxonomy.match_folder(answer.label or "")
        if leaf is None:
            lines = lines or _label_lines(log)
            where = lines.get((path, str(answer.label)))
            raise LabelsError(f"{log}{f' line {where}' if where else ''}: label {answer.label!r} of {path} is not a "
                              f"class of this taxonomy ({', '.join(taxonomy.leaves)})")
        leaves[path] = leaf
    return answers, leaves


def _resolve(path: str, log: Path, data_root: Path) -> Path:
    """A logged path: absolute as it is; relative to the labels file's folder, else to DATA, else to the current
    folder (the first that exists; the labels file's folder when none does)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in (log.parent, data_root, Path.cwd()):
        if (base / p).is_file():
            return base / p
    return log.parent / p


# ---------------------------------------------------------------------------------------------- the data
def plan_data(data_dir: str | Path, source: SourceRun, taxonomy: Any, labels: Path | None, pre: Any,
              progress: bool = True, strict: bool = False) -> tuple[Manifest, dict, Review]:
    """DATA's manifest with the answers applied, the split to train on (RUN's, plus the added frames) and what
    the answers did. No decoding here: that is the caller's, through the frame cache."""
    from semhinet_tf.data.decode import ImageError, image_size

    manifest = discover(data_dir, taxonomy, strict=strict, check_images=False, pre=pre, progress=progress)
    root = Path(manifest.root)
    if Path(source.split["root"]).resolve() != root.resolve():
        raise DatasetError(f"{source.dir} was trained on {source.split['root']}, not {root}: --from keeps the run's "
                           f"validation frames, which live in its own data folder")
    review = Review()
    by_path = {e.path: e for e in manifest.entries}
    held_out = set(source.split["val"])
    held_out_hashes = {by_path[p].sha256 for p in held_out if p in by_path}
    train = [p for p in source.split["train"] if p in by_path]
    in_train = set(train)
    notes = []
    gone = [p for p in source.split["train"] if p not in by_path and not Path(p).is_absolute()]
    if gone:
        notes.append(f"{len(gone)} training frame(s) of the run are no longer in {root}, e.g. {gone[0]}")
    # a file RUN could not read (skipped.csv) is no new frame: this scan does not decode, so it is listed here
    # and the decoding below skips it again
    skipped_by_run = {path for path, _ in source.manifest.skipped}
    outside = [p for p in by_path if p not in in_train and p not in held_out and p not in skipped_by_run]
    if outside:
        notes.append(f"{len(outside)} frame(s) of {root} are in neither side of the run's split (added since); left "
                     f"out: label them through review, or train a new run to use them")

    def use(path_key: str, leaf: str, entry: Entry | None, file: Path, digest: str, carried: bool) -> None:
        if entry is not None:  # a frame of DATA: its label corrected in place
            if entry.leaf != leaf:
                by_path[path_key] = replace(entry, leaf=leaf, labels=taxonomy.leaf_targets(leaf),
                                            folder_leaf=entry.folder_leaf or entry.leaf)
                if not carried:
                    review.relabelled.append([path_key, entry.folder_leaf or entry.leaf, leaf])
            elif not carried:
                review.confirmed += 1
        else:
            try:
                width, height = image_size(file)
            except (ImageError, OSError, ValueError) as exc:
                review.not_used.append([str(file), f"unreadable ({exc})"])
                return
            by_path[path_key] = Entry(path_key, leaf, taxonomy.leaf_targets(leaf), width, height, digest,
                                      folder_leaf="")
        if path_key not in in_train:
            train.append(path_key)
            in_train.add(path_key)
            if not carried:
                review.added.append(path_key)
        review.carried += carried

    def place(file: Path, leaf: str, expected_sha: str, carried: bool) -> None:
        shown = str(file)
        if not file.is_file():
            review.not_used.append([shown, "not found"])
            return
        digest = file_sha256(file)
        if expected_sha and digest != expected_sha:
            review.not_used.append([shown, "the file changed since it was reviewed (sha256 differs): review it again"])
            return
        try:
            rel = file.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = None
        if (rel is not None and rel in held_out) or digest in held_out_hashes:
            review.kept_held_out.append(rel or shown)
            entry = by_path.get(rel) if rel is not None and rel in held_out else None
            if entry is not None and entry.leaf != leaf:  # a wrong folder label: scored against the answer
                by_path[rel] = replace(entry, leaf=leaf, labels=taxonomy.leaf_targets(leaf),
                                       folder_leaf=entry.folder_leaf or entry.leaf)
                if not carried:
                    review.relabelled_held_out.append([rel, entry.folder_leaf or entry.leaf, leaf])
            return
        if rel is not None and rel not in by_path:  # inside DATA but not a class frame: train on it by path
            rel = None
        key = rel if rel is not None else str(file.resolve())
        use(key, leaf, by_path.get(key), file, digest, carried)

    # RUN's own reviewed frames first (a chain of --from runs keeps them), then this labels file on top
    for e in source.manifest.entries:
        if Path(e.path).is_absolute():
            place(Path(e.path), e.leaf, e.sha256, carried=True)
        elif e.folder_leaf and e.path in by_path:
            place(root / e.path, e.leaf, e.sha256, carried=True)
    if labels is not None:
        answers, leaves = read_answers(labels, taxonomy)
        review.labels_file = str(labels)
        review.labels_sha256 = file_sha256(labels)
        review.unreadable_lines = [[n, r] for n, r in answers.bad_lines]
        for path, answer in sorted(answers.labels.items()):
            place(_resolve(path, labels, root), leaves[path], answer.sha256, carried=False)
    manifest.entries = [by_path[p] for p in sorted(by_path, key=lambda p: (Path(p).is_absolute(), p))]
    manifest.review = {"from": str(source.dir.resolve()), **review.to_dict(), "notes": notes}
    split = {"root": manifest.root, "seed": source.split.get("seed"), "val_fraction": source.split.get("val_fraction"),
             "from": str(source.dir.resolve()), "train": sorted(train), "val": sorted(source.split["val"]),
             "warnings": notes}
    return manifest, split, review


def prepare_from_run(data_dir: str | Path, run_dir: Path, source: SourceRun, labels: Path | None, taxonomy: Any,
                     cfg: TrainConfig, progress: bool = True, cache: Any = None, strict: bool = False) -> dict:
    """`prepare_dataset`'s counterpart for --from: RUN's split with the answers applied, decoded through the frame
    cache; manifest (with the review) and split written to the new run."""
    from semhinet_tf.data.dataset import decode_manifest, split_arrays
    from semhinet_tf.data.decode import Preprocess

    pre = Preprocess.from_dict(source.config["preprocess"])
    manifest, split, review = plan_data(data_dir, source, taxonomy, labels, pre, progress, strict)
    frames, rows = decode_manifest(manifest, pre, progress, cache)
    manifest.save(run_dir)
    save_split(split, run_dir)
    print(f"data: {manifest.summary()} (split of {source.dir})", flush=True)
    for line in review.lines():
        print(line, flush=True)
    for w in split["warnings"]:
        print(f"  warning: {w}", flush=True)
    train, val = split_arrays(split, frames, rows, manifest, taxonomy)
    if not len(val[1]):
        raise DatasetError(f"{data_dir}: none of {source.dir}'s validation frames could be read")
    print(f"split: {len(train[1])} train / {len(val[1])} val images (the validation frames of {source.dir})",
          flush=True)
    return {"train": train, "val": val, "preprocess": pre.to_dict(), "manifest": manifest, "review": review}


def load_run_weights(model: Any, source: SourceRun) -> str:
    """RUN's float weights into the freshly built model (same architecture: checked by `fine_tune_config`)."""
    from semhinet_tf.model.io import load_model

    trained = load_model(source.dir / FLOAT_MODEL)
    try:
        model.set_weights(trained.get_weights())
    except ValueError as exc:
        raise RunDirError(f"{source.dir / FLOAT_MODEL}: does not fit the model of its own {CONFIG} ({exc})") from exc
    return f"the float weights of {source.dir} (fine-tuning)"


def record(source: SourceRun, review: Review) -> dict:
    """The `from` section of the new run's config.json."""
    labels = str(Path(review.labels_file).resolve()) if review.labels_file else None
    return {"run": str(source.dir.resolve()), "labels": labels,
            "labels_sha256": review.labels_sha256 or None, "run_seconds": source.seconds,
            "added": len(review.added), "relabelled": len(review.relabelled), "base": source.base}
