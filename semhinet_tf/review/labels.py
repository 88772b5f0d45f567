"""The reviewer's answers: an append-only log, `labels.jsonl`, one JSON object a line.

Append-only because the log must survive a killed server or a closed tab: each answer is one line
written and flushed at once, nothing is ever rewritten, and an undo is itself a line. Reading replays
the log, so the last word on a frame wins. A torn last line (power cut mid-write) is ignored and
reported, never fatal. Numpy-free: the review server and the trainer both read it.

A line: {"action": "label" | "skip" | "undo", "path": str, "sha256": hex of the file's bytes,
         "label": leaf name (action "label" only), "verdict": the model's leaf, "time": ISO-8601 UTC,
         "reviewer": name or null}
An undo line's path names the frame whose answer it withdraws (for the record; replay does not need it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from semhinet_tf.artifacts.files import append_line

ACTIONS = ("label", "skip", "undo")


@dataclass(frozen=True)
class Answer:
    """One line of the log."""

    action: str
    path: str
    sha256: str
    label: str | None = None
    verdict: str | None = None
    time: str = ""
    reviewer: str | None = None

    def to_json(self) -> str:
        return json.dumps({"action": self.action, "path": self.path, "sha256": self.sha256, "label": self.label,
                           "verdict": self.verdict, "time": self.time, "reviewer": self.reviewer})


@dataclass
class Replay:
    """The log replayed: the standing label of each frame (path -> Answer of action 'label'), the frames
    skipped, every answer in order (for undo), and the lines that could not be read (line number, reason)."""

    labels: dict[str, Answer] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    history: list[Answer] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)

    @property
    def answered(self) -> set[str]:
        """Frames with a standing answer (labelled or skipped): a resumed session starts after them."""
        return set(self.labels) | self.skipped


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_answer(log: str | Path, answer: Answer) -> None:
    """Append one answer and flush it to disk before returning, so an answer acknowledged is an answer kept."""
    if answer.action not in ACTIONS:
        raise ValueError(f"unknown action {answer.action!r} (expected one of {', '.join(ACTIONS)})")
    if answer.action == "label" and not answer.label:
        raise ValueError("a 'label' answer needs a label")
    append_line(log, answer.to_json())


def _parse(line: str) -> Answer:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    action, path = obj.get("action"), obj.get("path")
    if action not in ACTIONS:
        raise ValueError("needs 'action' (label/skip/undo)")
    if not isinstance(path, str) or (not path and action != "undo"):
        raise ValueError(f"a '{action}' line needs a 'path'")
    if action == "label" and not isinstance(obj.get("label"), str):
        raise ValueError("a 'label' line needs a string 'label'")
    return Answer(action=action, path=path, sha256=str(obj.get("sha256") or ""), label=obj.get("label"),
                  verdict=obj.get("verdict"), time=str(obj.get("time") or ""), reviewer=obj.get("reviewer"))


def replay(log: str | Path) -> Replay:
    """Read the log and apply it in order; 'undo' withdraws the most recent answer still standing."""
    out = Replay()
    log = Path(log)
    if not log.exists():
        return out
    standing: list[Answer] = []  # answers not undone, in order
    with open(log, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                answer = _parse(line)
            except (ValueError, json.JSONDecodeError) as exc:
                out.bad_lines.append((number, str(exc).splitlines()[0]))
                continue
            if answer.action == "undo":
                if standing:
                    standing.pop()
            else:
                standing.append(answer)
    for answer in standing:  # later answers on the same frame override earlier ones
        out.labels.pop(answer.path, None)
        out.skipped.discard(answer.path)
        if answer.action == "label":
            out.labels[answer.path] = answer
        else:
            out.skipped.add(answer.path)
    out.history = standing
    return out
