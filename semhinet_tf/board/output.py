"""Verdict rows as JSON lines or CSV, the same for the board and `semhinet predict` (stdlib only)."""

from __future__ import annotations

import csv
import json

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ["path", "verdict", "family", "class", "probability", "review", "error", "infer_ms", "ood", "unfamiliar"]


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


