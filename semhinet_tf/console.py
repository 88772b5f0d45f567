"""What a person sees on the terminal: TensorFlow's C++ log lines kept out of it unless asked for.

TensorFlow and its TFLite converter write their C++ logs (``I0000 00:00:... cudart_stub.cc:31] Could not find
cuda drivers``, ``failed call to cuInit``, converter internals) straight to file descriptor 2, some of them before
any log level applies, so no Python setting can silence them. `quiet_native_logs` puts a pipe on descriptor 2 and a
thread that forwards every line except those, so progress bars and our own messages still reach the terminal.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time

# absl/glog line prefix: severity letter, MMDD, time, thread id, file:line]. Before absl's logging is set up
# the time is "00:00:<seconds since the epoch>" ("I0000 00:00:1796581451.262283   10638 cudart_stub.cc:31] ").
NATIVE_LOG_LINE = re.compile(rb"^\s*[IWEF]\d{4} \d\d:\d\d:\d+(?:\.\d+)?\s+\d+ [^\s:]+:\d+\] ")
NATIVE_NOISE = (
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    NATIVE_LOG_LINE,
    # the second line of cpu_feature_guard's message, which has no prefix of its own
    re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"),
    re.compile(rb"^INFO: (Created|Initialized) TensorFlow Lite"),  # TFLite's own logger (XNNPACK delegate)
    re.compile(rb"^fully_quantize: \d+, inference_type: \d+, "),  # the converter's quantizer, unprefixed
)

_NATIVE_ANYWHERE = tuple(re.compile(p.pattern.removeprefix(b"^")) for p in NATIVE_NOISE)


def is_native_log(line: bytes) -> bool:
    """A line TensorFlow's C++ runtime wrote (not ours, not a progress bar)."""
    return any(p.match(line) for p in NATIVE_NOISE)


def without_native_log(piece: bytes) -> bytes:
    """What to forward of one piece of descriptor 2: nothing of a native log line, even one that was written
    right after a progress bar's unfinished redraw (the bar's part is kept)."""
    if is_native_log(piece):
        return b""
    starts = [m.start() for p in _NATIVE_ANYWHERE if (m := p.search(piece))]
    return piece[:min(starts)] if starts else piece


class _Filter:
    """Descriptor 2 through a pipe; a thread forwards all but native log lines to the real stderr."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        self.busy = False
        self.thread = threading.Thread(target=self._pump, name="semhinet-stderr-filter", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            self.busy = False
            try:
                chunk = os.read(self.read_end, 65536)
            except OSError:
                break
            self.busy = True
            if not chunk:
                break
            pending += chunk
            # a progress bar redraws with \r, a line ends with \n: forward each piece as soon as it is whole
            pieces = re.split(rb"(?<=[\r\n])", pending)
            pending = pieces.pop()
            out = b"".join(without_native_log(p) for p in pieces)
            if out:
                os.write(self.saved, out)
        if pending and (rest := without_native_log(pending)):
            os.write(self.saved, rest)

    def settle(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until what was written to descriptor 2 so far has been forwarded."""
        import fcntl
        import struct
        import termios

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = struct.unpack("i", fcntl.ioctl(self.read_end, termios.FIONREAD, b"\0\0\0\0"))[0]
            if not waiting and not self.busy:
                return
            time.sleep(0.002)

    def close(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)  # closes the pipe's last write end: the thread drains it and stops
        self.thread.join(timeout=5)
        os.close(self.read_end)
        os.close(self.saved)


_active: _Filter | None = None


def quiet_native_logs() -> None:
    """Keep TensorFlow's C++ log lines off the terminal for the rest of this process (idempotent)."""
    global _active
    if _active is not None:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # what a log level can still silence, it silences
    try:
        if sys.stderr.fileno() != 2:  # stderr redirected inside Python (a test runner): leave the descriptors alone
            return
    except (AttributeError, OSError, ValueError):
        return
    try:
        _active = _Filter()
    except OSError:  # no descriptor 2 (a daemon): nothing to protect
        _active = None
        return
    import atexit

    atexit.register(restore_native_logs)


def settle_stderr(timeout: float = 0.2) -> None:
    """Let the filter forward what stderr holds before a line goes to stdout: a progress bar's last redraw (or its
    erasing) passes through the filter's thread and could otherwise land after the line, on the same row."""
    try:
        sys.stderr.flush()
        if _active is not None:
            _active.settle(timeout)
    except (OSError, ValueError):
        pass


def stderr_is_terminal() -> bool:
    """Whether a person watches stderr: under the filter descriptor 2 is a pipe, so ask of the stderr it
    forwards to (bars that asked sys.stderr.isatty() hid themselves on every terminal)."""
    try:
        if _active is not None:
            return os.isatty(_active.saved)
        return sys.stderr.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def restore_native_logs() -> None:
    """Put descriptor 2 back as it was (after draining what the filter holds)."""
    global _active
    if _active is not None:
        _active.close()
        _active = None
