"""Write an experiment's Markdown result with the command that reproduces it (shared by the scripts here)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def write_result(lines: list[str], out: Path) -> None:
    """Append the reproducing command line, write `out` (creating its folder) and print the whole table."""
    lines = [*lines, "", "Reproduce: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
