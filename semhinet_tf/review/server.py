"""`semhinet review serve REVIEW`: the review page, a small Flask app on 127.0.0.1 (issue 24.2).

One frame at a time, decoded by the project's own decoder (any format it reads, 16-bit TIFF included) and sent as
PNG at full resolution; beside it the model's verdict, the leaf probabilities and the path down the heads. Every
answer is appended to REVIEW/labels.jsonl and flushed to disk before the page hears back (review/labels.py), so
a killed server or a closed tab loses nothing, and the page reopens at the first frame without an answer.

Safety: every request must carry the session's random token (query `token` or header `X-Review-Token`); the app
serves only the frames listed in the queue, by their exact queued path, and refuses one that has become a link
or whose bytes changed since it was queued; it listens on 127.0.0.1 unless told otherwise explicitly.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import string
import threading
from pathlib import Path
from typing import Any

from semhinet_tf.artifacts.files import file_sha256
from semhinet_tf.artifacts.run import REVIEW_INFO, REVIEW_LABELS, REVIEW_QUEUE
from semhinet_tf.review import SERVED_ELSEWHERE, ReviewInputError
from semhinet_tf.review.labels import Answer, append_answer, now, replay
from semhinet_tf.review.queue import read_queue
from semhinet_tf.taxonomy import Taxonomy, TaxonomyError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_HEADER = "X-Review-Token"
# Keys the page keeps for itself: s skip, u undo, z zoom (fit / 1:1); Enter, arrows, + and - are not letters.
RESERVED_KEYS = frozenset("suz")


class FrameRefusedError(PermissionError):
    """A frame the app will not send; `status` is the HTTP code (404 not in the queue, 403 changed into a link,
    409 its bytes changed since it was queued)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def leaf_keys(leaves: list[str] | tuple[str, ...]) -> dict[str, str]:
    """A key per leaf, for any taxonomy: 1..9 and 0 for the first ten, then the letters the page does not keep."""
    pool = list("1234567890") + [c for c in string.ascii_lowercase if c not in RESERVED_KEYS]
    if len(leaves) > len(pool):
        raise ReviewInputError(f"the taxonomy has {len(leaves)} leaves; the page has keys for {len(pool)}")
    return {leaf: pool[i] for i, leaf in enumerate(leaves)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score interval of a proportion: sound for the few frames of an audit, even at 0 of n."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _read_info(info_file: Path) -> dict[str, Any]:
    """review.json (the model, its taxonomy and threshold, the counts) or {} without one; one line if damaged."""
    if not info_file.is_file():
        return {}
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReviewInputError(f"{info_file}: not readable JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(info, dict):
        raise ReviewInputError(f"{info_file}: not a JSON object as `semhinet review queue` writes it")
    return info


class ReviewSession:
    """The queue of a review folder and its answers log; what the web app calls (and tests call directly)."""

    def __init__(self, review_dir: str | Path, reviewer: str | None = None):
        self.dir = Path(review_dir)
        queue_file = self.dir / REVIEW_QUEUE
        if not queue_file.is_file():
            raise ReviewInputError(f"{queue_file}: no review queue here; make one with `semhinet review queue`")
        self.queue = read_queue(queue_file)
        if not self.queue:
            raise ReviewInputError(f"{queue_file}: the queue is empty: nothing to review")
        self.info = _read_info(self.dir / REVIEW_INFO)
        try:
            self.taxonomy = (Taxonomy.from_spec(self.info["taxonomy"]) if "taxonomy" in self.info
                             else Taxonomy.default())
        except TaxonomyError as exc:
            raise ReviewInputError(f"{self.dir / REVIEW_INFO}: its taxonomy is malformed ({exc})") from None
        unknown = sorted({e["verdict"] for e in self.queue} - set(self.taxonomy.leaves))
        if unknown:
            raise ReviewInputError(f"{queue_file}: verdicts {', '.join(unknown)} are not leaves of the queue's "
                                   f"taxonomy")
        self.keys = leaf_keys(self.taxonomy.leaves)
        self.index_of = {e["path"]: i for i, e in enumerate(self.queue)}
        self.labels_file = self.dir / REVIEW_LABELS
        self.reviewer = reviewer
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- state
    def answers(self) -> dict[int, str]:
        """Queue index -> standing answer (a leaf name, or "skip"), from the log as it is on disk now. An answer
        counts only for the bytes it was given on: a frame re-queued after its file changed is asked again (train
        --from would drop the old answer as "changed since reviewed", so the frame would never be labelled)."""
        r = replay(self.labels_file)
        skips = {a.path: a for a in r.history if a.action == "skip" and a.path in r.skipped}
        out = {}
        for answer, label in [(a, a.label) for a in r.labels.values()] + [(a, "skip") for a in skips.values()]:
            i = self.index_of.get(answer.path)
            if i is not None and answer.sha256 == self.queue[i]["sha256"]:
                out[i] = label
        return out

    def next_open(self, after: int = -1, answers: dict[int, str] | None = None) -> int:
        """The first queue index without an answer after `after` (wrapping round); len(queue) when all have one."""
        answers = self.answers() if answers is None else answers
        n = len(self.queue)
        for k in range(1, n + 1):
            i = (after + k) % n
            if i not in answers:
                return i
        return n

    def audit(self, answers: dict[int, str] | None = None) -> dict:
        """What the labelled audit frames say about the verdicts left to the model: of the audit sample's frames
        labelled so far, how many the reviewer corrected, the error rate of automatic verdicts that estimates,
        and its 95% Wilson interval (None before any audit frame is labelled)."""
        answers = self.answers() if answers is None else answers
        audit = [i for i, e in enumerate(self.queue) if "audit" in e.get("why", [])]
        labelled = [i for i in audit if answers.get(i, "skip") != "skip"]
        wrong = sum(answers[i] != self.queue[i]["verdict"] for i in labelled)
        return {"sampled": len(audit), "labelled": len(labelled), "corrected": wrong,
                "error_rate": wrong / len(labelled) if labelled else None,
                "interval95": wilson_interval(wrong, len(labelled)),
                "of_confident": self.info.get("n_confident")}

    def state(self) -> dict:
        answers = self.answers()
        return {"total": len(self.queue), "answered": len(answers), "position": self.next_open(-1, answers),
                "audit": self.audit(answers),
                "answers": {str(i): a for i, a in answers.items()}, "reviewer": self.reviewer,
                "leaves": [{"name": leaf, "key": self.keys[leaf]} for leaf in self.taxonomy.leaves],
                "model": self.info.get("model"), "review_threshold": self.info.get("review_threshold")}

    def item(self, index: int) -> dict:
        """Queue entry `index` with the path down the heads of its verdict and its standing answer."""
        if not 0 <= index < len(self.queue):
            raise FrameRefusedError(f"no frame {index} in the queue (0..{len(self.queue) - 1})", 404)
        entry = self.queue[index]
        down = [{"head": head, "class": cls, "p": entry["heads"].get(head, {}).get(cls),
                 "probs": entry["heads"].get(head, {})} for head, cls in self.taxonomy.path(entry["verdict"])]
        leaves = sorted(entry["leaf_probabilities"].items(), key=lambda kv: -kv[1])
        return {"index": index, "path": entry["path"], "verdict": entry["verdict"],
                "probability": entry.get("probability"), "why": entry.get("why", []),
                "margins": entry.get("margins", {}), "path_down": down,
                "leaf_probabilities": [{"leaf": k, "p": v, "key": self.keys.get(k)} for k, v in leaves],
                "folder_label": entry.get("folder_label"), "judged_by": entry.get("judged_by"),
                "answer": self.answers().get(index)}

    # ---------------------------------------------------------------- answers
    def answer(self, index: int, action: str, label: str | None = None) -> dict:
        """Append one answer (label or skip) on frame `index`; on disk before this returns."""
        if not 0 <= index < len(self.queue):
            raise FrameRefusedError(f"no frame {index} in the queue", 404)
        if action not in ("label", "skip"):
            raise ValueError(f"unknown action {action!r}")
        if action == "label" and label not in self.taxonomy.leaves:
            raise ValueError(f"{label!r} is not a leaf of the taxonomy ({', '.join(self.taxonomy.leaves)})")
        entry = self.queue[index]
        with self._lock:
            append_answer(self.labels_file, Answer(action=action, path=entry["path"], sha256=entry["sha256"],
                                                   label=label if action == "label" else None,
                                                   verdict=entry["verdict"], time=now(), reviewer=self.reviewer))
        answers = self.answers()
        return {"next": self.next_open(index, answers), "answered": len(answers)}

    def undo(self) -> dict:
        """Withdraw the most recent standing answer; the page goes back to its frame."""
        with self._lock:
            history = replay(self.labels_file).history
            if not history:
                return {"index": None, "answered": len(self.answers())}
            last = history[-1]
            append_answer(self.labels_file, Answer(action="undo", path=last.path, sha256=last.sha256, time=now(),
                                                   reviewer=self.reviewer))
        return {"index": self.index_of.get(last.path), "answered": len(self.answers())}

    # ---------------------------------------------------------------- frames
    def frame_file(self, path: str) -> Path:
        """The queued file at `path`, checked: listed in the queue under exactly this path, not a link now (nor
        below one), and the same bytes as when it was queued. FrameRefusedError otherwise."""
        index = self.index_of.get(path)
        if index is None:
            raise FrameRefusedError("not a frame of this review queue", 404)
        p = Path(path)
        if os.path.realpath(p) != os.path.abspath(p) or not p.is_file():
            raise FrameRefusedError("this queued frame is now a link or is gone; queue the frames again", 403)
        if file_sha256(p) != self.queue[index]["sha256"]:
            raise FrameRefusedError("this frame changed since it was queued; queue the frames again", 409)
        return p

    def frame_png(self, path: str) -> bytes:
        """The frame decoded as training decodes it (grey, bit depth to 0..255), at full resolution, as PNG."""
        from PIL import Image

        from semhinet_tf.data.decode import read_grey, to_uint8

        p = self.frame_file(path)
        grey = to_uint8(read_grey(p))
        buf = io.BytesIO()
        Image.fromarray(grey).save(buf, format="PNG")
        return buf.getvalue()


def page_html() -> str:
    """The page (package data: semhinet_tf/review/page.html)."""
    return (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")


def create_app(session: ReviewSession, token: str):
    """The Flask app for one review session; every route requires `token`."""
    from flask import Flask, Response, abort, jsonify, request

    app = Flask("semhinet_review", static_folder=None)  # no /static route: only the page and queued frames

    @app.before_request
    def check_token():
        given = request.args.get("token") or request.headers.get(TOKEN_HEADER) or ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            abort(403)

    @app.errorhandler(FrameRefusedError)
    def refused(exc: FrameRefusedError):
        return jsonify({"error": str(exc)}), exc.status

    @app.errorhandler(ValueError)
    def bad_request(exc: ValueError):
        return jsonify({"error": str(exc)}), 400

    @app.get("/")
    def index():
        return Response(page_html(), mimetype="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    def state():
        return jsonify(session.state())

    @app.get("/api/item/<int:index>")
    def item(index: int):
        return jsonify(session.item(index))

    @app.get("/image")
    def image():
        png = session.frame_png(request.args.get("path", ""))
        return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/api/answer")
    def answer():
        body = request.get_json(silent=True) or {}
        try:
            index = int(body["index"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("an answer needs the frame's 'index'") from None
        return jsonify(session.answer(index, str(body.get("action", "label")), body.get("label")))

    @app.post("/api/undo")
    def undo():
        return jsonify(session.undo())

    return app


def check_host(host: str, allow_remote: bool) -> None:
    """Listen on this machine only, unless the user asked for another address explicitly."""
    if host not in LOCAL_HOSTS and not allow_remote:
        raise ReviewInputError(f"--host {host}: the review page listens on 127.0.0.1 only; add --allow-remote to let "
                         f"other machines reach it (anyone with the printed URL can then label)")


def _check_listen(host: str, port: int) -> None:
    """Bind once before werkzeug does: its own failure prints two lines and exits, without naming the option."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ReviewInputError(f"--host {host}: cannot be resolved ({exc.strerror or exc})") from None
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug binds
        probe.bind(address)
    except OSError as exc:
        hint = "; another program (or review page) listens there: pick another --port" if port else ""
        raise ReviewInputError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc}){hint}") from None
    finally:
        probe.close()


def serve(review_dir: str | Path, host: str = "127.0.0.1", port: int = 8765, reviewer: str | None = None,
          allow_remote: bool = False, announce=print, token: str | None = None) -> None:
    """Run the review page until Ctrl-C; `announce(url)` is told the address (with its token) once listening."""
    from semhinet_tf.artifacts.run import RunLock

    check_host(host, allow_remote)
    session = ReviewSession(review_dir, reviewer)
    with RunLock(review_dir, kind="review folder", busy=SERVED_ELSEWHERE):
        _serve(session, host, port, announce, token)


def _serve(session: ReviewSession, host: str, port: int, announce, token: str | None) -> None:
    import logging

    from werkzeug.serving import make_server

    token = token or secrets.token_urlsafe(24)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # request lines would print the token
    _check_listen(host, port)
    server = make_server(host, port, create_app(session, token), threaded=True)
    # Ctrl-C must stop at once: every answer is on disk before its reply, so a request still open (a browser's
    # kept-alive connection, a slow client) is not waited for. CI saw a stop wait past 20 s under load.
    server.daemon_threads, server.block_on_close = True, False
    shown = f"[{host}]" if ":" in host else host
    state = session.state()
    # Ctrl-C (and a polite kill) stop it even when started with SIGINT ignored (a background job, a test
    # runner's worker): Python only turns SIGINT into KeyboardInterrupt if it was not ignored at start-up. Set
    # before the address is announced, so a Ctrl-C the moment it shows is a clean stop too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        announce(f"http://{shown}:{server.server_port}/?token={token}",
                 f"{state['answered']} of {state['total']} frames answered; answers go to {session.labels_file}")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
