"""Progress on stderr for every step that takes more than a few seconds, so stdout stays for results.

`bar` counts things (frames decoded, calibrated, classified); `step` shows a ticking clock for one call that
reports nothing while it runs (the TFLite converter, tf2onnx), so a person can tell a slow step from a hang.
Both stay silent when disabled (`--quiet`, tests) and draw nothing but a final line when stderr is not a
terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TICK_SECONDS = 0.5


def bar(total: int | None = None, desc: str = "", unit: str = "img", enabled: bool = True, leave: bool = False,
        **options: Any) -> Any:
    """A tqdm bar on stderr (a no-op bar when disabled); `options` go to tqdm."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, file=sys.stderr,
                dynamic_ncols=True, **options)


class Step:
    """The handle `step` yields: `note("12/16 frames calibrated")` shows progress inside an opaque call."""

    def __init__(self, ticker: Any = None) -> None:
        self._ticker = ticker

    def note(self, text: str) -> None:
        if self._ticker is not None:
            self._ticker.set_postfix_str(text, refresh=False)


@contextmanager
def step(desc: str, enabled: bool = True) -> Iterator[Step]:
    """Show `desc` with the elapsed time while the body runs; one line with its duration when it succeeds.

    On a terminal the clock ticks in place; into a file or pipe only the final line is written. A step that
    fails leaves no line, so the error stays the one line a person reads."""
    if not enabled:
        yield Step()
        return
    if not _is_terminal():
        started = time.monotonic()
        yield Step()
        print(f"{desc}: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        return
    ticker = bar(desc=desc, unit="s", enabled=True, leave=True, bar_format="{desc}: {elapsed}{postfix}")
    done = threading.Event()

    def tick() -> None:
        while not done.wait(TICK_SECONDS):
            ticker.refresh()

    thread = threading.Thread(target=tick, name="semhinet-progress", daemon=True)
    thread.start()
    ok = False
    try:
        yield Step(ticker)
        ok = True
    finally:
        done.set()
        thread.join()
        ticker.leave = ok
        ticker.close()


def _is_terminal() -> bool:
    from semhinet_tf.console import stderr_is_terminal

    return stderr_is_terminal()
