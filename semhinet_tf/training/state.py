"""The run directory's training files: train_state.json (how far each phase got, its best score),
history.csv (one row an epoch, both phases) and the configuration a --resume continues with."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from semhinet_tf.artifacts import run as run_files
from semhinet_tf.artifacts.files import atomic_write_text, write_json
from semhinet_tf.artifacts.run import CONFIG as CONFIG_FILE
from semhinet_tf.artifacts.run import STATE as STATE_FILE
from semhinet_tf.artifacts.run import TAXONOMY as TAXONOMY_FILE
from semhinet_tf.training.config import RESUMABLE_CHANGES, TrainConfig


def read_state(run_dir: Path) -> dict:
    """Every phase's saved progress ({} for a new run)."""
    p = run_dir / STATE_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def write_phase_state(run_dir: Path, phase: str, progress: dict[str, Any]) -> None:
    """Replace one phase's progress, keeping the other's, atomically."""
    state = read_state(run_dir)
    state[phase] = progress
    write_json(state, run_dir / STATE_FILE)


def append_history(path: Path, row: dict) -> None:
    """Add a row to history.csv, widening the header to the union of every row's columns; the file is
    rewritten atomically, so a reader never sees half a row."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: str(v) for k, v in row.items()})
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def resumed_config(run_dir: Path, cfg: TrainConfig, data_dir: str | Path, given: set[str] | None = None,
                   taxonomy: Any = None) -> TrainConfig:
    """The configuration a --resume continues with: the run's own, with the epoch counts the user typed (an epoch
    count not typed stays the run's: `train DATA --out RUN --resume` alone finishes the run as it was started).

    `given` names the options the user set on purpose (None: every field of `cfg`); any of them that differs
    from the run's, other than the epoch counts, is refused, each named, as are another data folder or taxonomy."""
    from semhinet_tf.taxonomy import Taxonomy

    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text())
        saved = TrainConfig.from_dict(config["train"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise run_files.RunDirError(f"{run_dir}: cannot be resumed: its {CONFIG_FILE} is missing or unreadable "
                                    f"(the run stopped before its first epoch; start it again with --overwrite)"
                                    ) from exc
    fields = set(cfg.to_dict()) if given is None else set(given) & set(cfg.to_dict())
    changed = [f"{name} {getattr(saved, name)!r} -> {getattr(cfg, name)!r}"
               for name in sorted(fields - RESUMABLE_CHANGES)
               if getattr(cfg, name) != getattr(saved, name) and not (name == "lr" and getattr(cfg, name) is None)]
    saved_data = config.get("data_dir")
    if saved_data and Path(saved_data).resolve() != Path(data_dir).resolve():
        changed.append(f"data {saved_data} -> {Path(data_dir).resolve()}")
    if taxonomy is not None:
        saved_tax = Taxonomy.from_spec(json.loads((run_dir / TAXONOMY_FILE).read_text()))
        if saved_tax.to_spec() != taxonomy.to_spec():
            changed.append("taxonomy differs from the run's")
    if changed:
        raise run_files.RunDirError(f"{run_dir}: --resume continues the same run; only --epochs and --qat-epochs may "
                                    f"change, but: {'; '.join(changed)}")
    typed = set(cfg.to_dict()) if given is None else set(given)  # an epoch count not typed stays the run's
    return replace(saved, **{name: getattr(cfg, name) for name in ("epochs", "qat_epochs") if name in typed})
