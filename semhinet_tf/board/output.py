"""Verdict rows as JSON lines or CSV, the same for the board and `semhinet predict` (stdlib only)."""

from __future__ import annotations

import csv
import json

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ["path", "verdict", "family", "class", "probability", "review", "error", "infer_ms", "ood", "unfamiliar",
              "ready"]
# Why a verdict went to review, one reason a row (the first that holds), for the summary line a person reads.
REVIEW_REASONS = (("unfamiliar", "unfamiliar"), ("not-ready", "of a class not ready for automatic classification"),
                  ("threshold", "under the review threshold"))


class Writer:
    """One row per image, flushed at once so a reader (or an interrupted run) sees whole rows."""

    def __init__(self, stream, fmt: str):
        self.stream, self.fmt = stream, fmt
        if fmt == "csv":
            self.csv = csv.DictWriter(stream, fieldnames=CSV_FIELDS, extrasaction="ignore")
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.fmt == "csv":
            self.csv.writerow(row)
        else:
            self.stream.write(json.dumps(row) + "\n")
        self.stream.flush()




def review_reason(row: dict) -> str | None:
    """"unfamiliar", "not-ready" or "threshold" for a verdict sent to review; None for one that was not."""
    if not row.get("review"):
        return None
    if row.get("unfamiliar"):
        return "unfamiliar"
    return "not-ready" if row.get("ready") is False else "threshold"


def review_summary(reasons: dict[str, int]) -> str:
    """"731 for review (34 unfamiliar, 650 of a class not ready ..., 47 under the review threshold)": with the
    quickstart's model most verdicts go to review because few classes are ready yet, which the count alone hides."""
    n = sum(reasons.values())
    parts = [f"{reasons[key]} {label}" for key, label in REVIEW_REASONS if reasons.get(key)]
    return f"{n} for review" + (f" ({', '.join(parts)})" if n else "")
