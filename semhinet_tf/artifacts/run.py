"""The run directory: the names of the files `semhinet train` and `convert` write, and the rules for making,
replacing and resuming one.

A run directory is recognised by its marker file (written first, before anything else) or, for runs made
before the marker existed, by a config.json with a "train" section next to a taxonomy.json. `--overwrite`
only ever empties a folder recognised as a run directory, and never one that is, holds or lies inside an
input of the command. The process writing a run holds its lock (RunLock), so a second `train` into the same
folder, a `--resume` or `--overwrite` of a run still training, or a `convert` of it (which holds the lock shared
while it reads the models and writes beside them) is refused in one line.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from semhinet_tf.artifacts.files import is_inside, write_json
from semhinet_tf.data import decode

MARKER = ".semhinet-run"
LOCK = ".semhinet-lock"  # held (flock) by the process writing the folder: a second one is refused, not mixed in
QUICKSTART_MARKER = ".semhinet-quickstart"
QUICKSTART_SUMMARY = "quickstart_summary.json"
# What `quickstart --overwrite` may replace: what the quickstart itself writes. Anything else a user put in the
# folder (the README's review/ answers, a run2/ trained from them, promote's CHANGELOG.jsonl) is theirs.
QUICKSTART_FILES = frozenset({"data", "run", QUICKSTART_SUMMARY, QUICKSTART_MARKER})
CONFIG = "config.json"
TAXONOMY = "taxonomy.json"
SPLIT = "split.json"
MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
SKIPPED_CSV = "skipped.csv"
HISTORY = "history.csv"
STATE = "train_state.json"
CHECKPOINT = "checkpoint"
FLOAT_MODEL = "float.keras"
QAT_MODEL = "qat.h5"  # tfmot wrappers reload reliably from HDF5, not from .keras
REVIEW_THRESHOLD = "review_threshold.json"
TRAIN_RESULT = "train_result.json"
INT8_MODEL = "model_int8.tflite"
INT8_FLOAT_HEADS_MODEL = "model_int8_float_heads.tflite"
# A review folder (`semhinet review queue --out REVIEW`): the queue, what it was made from, the reviewer's answers.
REVIEW_QUEUE = "queue.jsonl"
REVIEW_INFO = "review.json"
REVIEW_LABELS = "labels.jsonl"
# Beside the runs (in the folder that holds them), written by `semhinet promote`
PROMOTED = "promoted.json"  # which run is current, and what it was promoted over
CHANGELOG = "CHANGELOG.jsonl"  # every promote decision, one line each, append-only
CHANGELOG_MD = "CHANGELOG.md"  # the same for people, rewritten from CHANGELOG.jsonl

# What `semhinet train` writes into a run: every other command reads these, and no output may replace them.
TRAINED_FILES = frozenset({MARKER, CONFIG, TAXONOMY, SPLIT, MANIFEST_CSV, MANIFEST_JSON, SKIPPED_CSV, HISTORY, STATE,
                           FLOAT_MODEL, QAT_MODEL, REVIEW_THRESHOLD, TRAIN_RESULT})

# What the commands write into a run besides TRAINED_FILES, by kind: evaluations and contracts (.json), tables
# (.csv), models and exports (.keras, .h5, .tflite, .onnx), weights (.npz); a report folder holds index.html.
RUN_OUTPUT_SUFFIXES = frozenset({".json", ".csv", ".keras", ".h5", ".tflite", ".onnx", ".npz"})

# What a run that failed while reading its data leaves behind; such a folder may be reused without --overwrite.
DATA_REPORT_FILES = frozenset({MANIFEST_CSV, MANIFEST_JSON, SKIPPED_CSV, SPLIT})
# ... and one that failed before its first epoch was saved (bad weights file, out of memory while building):
# nothing in it can be resumed or is worth keeping, so a corrected rerun may reuse the folder too.
UNSTARTED_RUN_FILES = DATA_REPORT_FILES | {CONFIG, TAXONOMY, CHECKPOINT, MARKER, LOCK}


class RunDirError(FileExistsError):
    """A run directory that may not be created, replaced or resumed as asked; str() is one line."""


def conversion_files(model: str | Path) -> list[Path]:
    """What `convert` writes for the model `model` (.tflite): the model, its contract JSON and its NPU report."""
    model = Path(model)
    return [model, model.with_suffix(".json"), model.with_suffix(".npu.json")]


def model_inputs(model: str | Path) -> list[Path]:
    """The files a command reads when it is given `model` (a model file or a run folder), for
    artifacts.files.check_outputs: the model and the TRAINED_FILES of the run it is or lies in (the engines read
    its config, taxonomy, split and thresholds). A run's other files are not read: its conversions and their
    contract and NPU report may be replaced by `convert --overwrite` or `npu-check --json`, an earlier eval's
    JSON by the next eval."""
    model = Path(model)
    found = [] if model.is_dir() else [model]
    for folder in (model, model.parent):
        if folder.is_dir() and is_run_dir(folder):
            found += [folder / name for name in sorted(TRAINED_FILES) if (folder / name).is_file()]
            break
    return found


def is_run_dir(path: str | Path) -> bool:
    """A folder this project made as a run directory: its marker, or a pre-marker run's config + taxonomy."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "train" in config and (path / TAXONOMY).is_file()


def is_quickstart_dir(path: str | Path) -> bool:
    """A folder `semhinet quickstart` made: its marker, or (before the marker) its data set next to its run."""
    path = Path(path)
    return (path / QUICKSTART_MARKER).is_file() or ((path / "data" / decode.DATASET_RECORD).is_file()
                                                    and is_run_dir(path / "run"))


def refuse_inputs_overlap(out: Path, inputs: Iterable[str | Path | None], what: str = "--out") -> None:
    """Refuse an output folder that is, holds or lies inside any input of the command."""
    for item in inputs:
        if item is None:
            continue
        if is_inside(out, item) or is_inside(item, out):
            raise RunDirError(f"{out}: {what} is, holds or lies inside the input {item}; choose another folder")


class RunLock:
    """One process's claim on a folder it works in: an flock on the folder's LOCK file, released by `release`, by
    leaving a `with` block or by the process ending however it ends (a killed run leaves no stale lock).

    `shared=False` (train, quickstart: they write the folder) is exclusive; `shared=True` (convert: it reads the
    run's models and writes beside them) lets other shared holders in and keeps the exclusive ones out. Where
    flock is unavailable (Windows, a file system without it) or the lock file cannot be made (a read-only run,
    which nothing can train into anyway), nothing is locked."""

    def __init__(self, folder: str | Path, kind: str = "run directory", shared: bool = False,
                 busy: str = "wait for it to end or choose another --out") -> None:
        self.path = Path(folder) / LOCK
        self._file = None
        try:
            import fcntl
        except ImportError:
            return
        if shared and not self.path.exists() and not is_run_dir(folder):
            return  # not a run (the caller says so in its own words): no lock file is written into it
        try:
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the claim's life
        except OSError as exc:
            if not shared:
                raise RunDirError(f"{folder}: cannot be written ({exc.strerror or exc}); choose another --out"
                                  ) from None
            return
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunDirError(f"{folder}: {kind} is {_in_use(self.path)}; "
                              f"{busy}") from None
        except OSError:  # no flock on this file system: work unlocked rather than not at all
            handle.close()
            return
        self._file = handle
        if not shared:
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                         "command": " ".join(["semhinet", *sys.argv[1:3]])}) + "\n")
                handle.flush()
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def being_trained(run_dir: str | Path) -> str | None:
    """'in use by another semhinet process (pid N, ...)' when a process holds `run_dir`'s lock exclusively (a
    training or quickstart writing it), else None: a command that needs a finished run (train --from, promote)
    refuses one whose models are still being replaced."""
    lock_file = Path(run_dir) / LOCK
    return _in_use(lock_file) if _held(lock_file) else None


def _in_use(lock_file: Path) -> str:
    return f"in use by another semhinet process{_holder(lock_file)}"


def _held(lock_file: Path) -> bool:
    """True when some process holds `lock_file`'s flock (probed with a shared lock, released at once)."""
    try:
        import fcntl

        with open(lock_file, encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except (ImportError, OSError):
        pass
    return False


def _holder(lock_file: Path) -> str:
    """' (pid N, since T: command)' of the exclusive holder the lock file names, if that process is alive (a
    shared holder writes nothing, and the file may name a run that ended long ago)."""
    try:
        holder = json.loads(lock_file.read_text(encoding="utf-8"))
        pid = int(holder["pid"])
        os.kill(pid, 0)
        return f" (pid {pid}, since {holder['since']}: {holder['command']})"
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return ""


def claims_run(shared: bool, busy: str) -> Callable:
    """Decorator: the function (its first argument a run folder) runs holding that folder's RunLock."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def claimed(run_dir, *args, **kwargs):
            with RunLock(run_dir, shared=shared, busy=busy):
                return fn(run_dir, *args, **kwargs)
        return claimed
    return wrap


def prepare_run_dir(run_dir: Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                    resume: bool = False, kind: str = "run directory", marker: str = MARKER,
                    recognise: Callable[[Path], bool] = is_run_dir, resumable: bool = True,
                    replaces: Collection[str] | Callable[[Path], bool] | None = None) -> RunLock:
    """Make `run_dir` ready for a new run (or check it for --resume) without ever removing what we did not write,
    and claim it: the returned RunLock is held while the caller writes (`with prepare_run_dir(...):`), so a second
    train, --resume or --overwrite of the same folder is refused instead of mixing its files with the first's.

    Empty or missing: created. A failed run's leftovers (UNSTARTED_RUN_FILES): reused. A run directory with more:
    refused unless `overwrite` (emptied) or `resume` (kept). Anything else that is not empty is refused even with
    `overwrite`: it is not ours to delete (and no lock file is written into it). A folder is ours by its marker
    (written before anything else) or by `recognise`. `resumable`: whether the refusal may suggest --resume (the
    quickstart has none). `replaces`: the names `overwrite` may remove, or a test of each entry (None: every
    entry); with other entries present, or a sub-folder among them being written by another process, `overwrite`
    is refused and nothing is removed."""
    run_dir = Path(run_dir)
    exists = (f"exists and is not empty (use {'--resume to continue it or ' if resumable else ''}--overwrite to "
              f"replace it)")
    refuse_inputs_overlap(run_dir, inputs)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a folder")
    if run_dir.exists() and not _ours(run_dir, marker, recognise) and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: exists, is not empty and is not a {kind} of this project; it is left "
                          f"untouched (choose another --out)")
    if resume and not _ours(run_dir, marker, recognise):
        raise RunDirError(f"{run_dir}: not a {kind} of this project; --resume continues one made by "
                          f"`semhinet train`")
    if (run_dir.exists() and not resume and not overwrite
            and {p.name for p in run_dir.iterdir()} - UNSTARTED_RUN_FILES):  # refused without touching the run
        busy = being_trained(run_dir)
        raise RunDirError(f"{run_dir}: {kind} " + (f"is {busy}" if busy else exists))
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, kind)
    try:  # decided again under the lock: another process may have written the folder meanwhile
        entries = {p.name for p in run_dir.iterdir()} - {LOCK}
        if resume:
            return lock
        if entries - UNSTARTED_RUN_FILES and not overwrite:
            raise RunDirError(f"{run_dir}: {kind} {exists}")
        if overwrite:
            _refuse_what_overwrite_may_not_remove(run_dir, entries, replaces, kind)
        for name in entries if overwrite else ():  # emptied, not removed: the lock file (the claim) stays
            entry = run_dir / name
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        write_marker(run_dir, marker)
    except BaseException:
        lock.release()
        raise
    return lock


def _refuse_what_overwrite_may_not_remove(run_dir: Path, entries: set[str],
                                          replaces: Collection[str] | Callable[[Path], bool] | None,
                                          kind: str) -> None:
    """Refuse --overwrite of a folder that holds what it may not remove: entries `replaces` does not cover, or a
    sub-folder another process is writing (a training's run/)."""
    if replaces is None:
        foreign = []
    elif callable(replaces):
        foreign = sorted(name for name in entries - {LOCK} if not replaces(run_dir / name))
    else:
        foreign = sorted(entries - set(replaces) - {LOCK})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(f"{run_dir}: also holds {shown}, not outputs of the {kind}; --overwrite removed "
                          f"nothing (move those elsewhere first, or choose another --out)")
    for name in sorted(entries):
        busy = being_trained(run_dir / name) if (run_dir / name).is_dir() else None
        if busy:
            raise RunDirError(f"{run_dir / name}: {busy}; --overwrite removed nothing")


def is_run_output(entry: Path) -> bool:
    """Whether `train --overwrite` may remove this entry of a run directory: what training, convert, eval, compare,
    export-onnx and bench write there (by name or kind), a report folder, an interrupted atomic write. A user's
    notes (my_notes.txt, signoff.md) are not, and `--overwrite` is refused while they are there."""
    name = entry.name
    if name in TRAINED_FILES or name in (LOCK, CHECKPOINT):
        return True
    if entry.is_symlink() or not entry.is_dir():
        return entry.suffix in RUN_OUTPUT_SUFFIXES or (name.startswith(".") and ".tmp" in name)
    inside = list(entry.iterdir())
    return not inside or (entry / "index.html").is_file()


def _ours(folder: Path, marker: str, recognise: Callable[[Path], bool]) -> bool:
    """A folder this project wrote: its marker (the first thing a run writes, so a failed run has it too) or a
    recognised pre-marker run. Files with our names alone (a user's config.json) do not make a folder ours."""
    return folder.is_dir() and ((folder / marker).is_file() or recognise(folder))


def write_marker(folder: Path, marker: str = MARKER) -> None:
    from semhinet_tf import __version__

    write_json({"made_by": "semhinet", "version": __version__}, folder / marker)


# ---------------------------------------------------------------- what validation chose (review_threshold.json)
def validation_thresholds_by_views(run_dir: Path, default: float = 0.5) -> dict[str, float]:
    """{"2": t, "4": t, "8": t}: the review thresholds chosen on validation for test-time views, if written; a
    count whose threshold never reached the purity target gets `default`, as the one-view threshold does."""
    p = run_dir / REVIEW_THRESHOLD
    if not p.exists():
        return {}
    try:
        by_views = json.loads(p.read_text()).get("by_views") or {}
        return {n: default if point.get("threshold") is None else float(point["threshold"])
                for n, point in by_views.items()}
    except (ValueError, AttributeError, TypeError):
        return {}


def validation_threshold(run_dir: Path, default: float = 0.5) -> float:
    """The review threshold chosen on validation by `eval` (target purity), if one was written."""
    p = run_dir / REVIEW_THRESHOLD
    if p.exists():
        try:
            return float(json.loads(p.read_text())["threshold"])
        except (ValueError, KeyError, TypeError):  # threshold null: the split was empty
            pass
    return default


def validation_target_purity(run_dir: Path, default: float = 0.99) -> float:
    """The purity the run's review threshold was chosen for, which class readiness also asks of each class."""
    try:
        return float(json.loads((Path(run_dir) / REVIEW_THRESHOLD).read_text()).get("target_purity", default))
    except (OSError, ValueError, TypeError, AttributeError):
        return default
