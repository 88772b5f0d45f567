"""Issue 24.2: the review app serves only the queue's frames and only with its token; answers survive kill -9;
keys for any taxonomy; --host refused unless asked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.artifacts.run import RunDirError
from semhinet_tf.review.labels import replay
from semhinet_tf.review.server import FrameRefusedError, ReviewSession, check_host, create_app, leaf_keys
from semhinet_tf.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[1]
TAX = Taxonomy.default()


def make_review(tmp_path: Path, n: int = 6, taxonomy: Taxonomy = TAX) -> Path:
    """A review folder by hand: n frames (one a 16-bit TIFF) queued with made-up verdicts; no model needed."""
    from semhinet_tf.artifacts.files import file_sha256

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        path = frames / (f"f{i}.tif" if i == 1 else f"f{i}.png")
        if i == 1:
            Image.fromarray((rng.integers(0, 4000, (40, 56))).astype(np.uint16)).save(path)
        else:
            Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(path)
        leaf = taxonomy.leaves[i % len(taxonomy.leaves)]
        lp = {lf: (0.6 if lf == leaf else 0.4 / (len(taxonomy.leaves) - 1)) for lf in taxonomy.leaves}
        heads = {h.name: {c: 1.0 / h.num_classes for c in h.classes} for h in taxonomy.heads}
        entries.append({"path": str(path.resolve()), "sha256": file_sha256(path), "verdict": leaf, "probability": 0.6,
                        "review": False, "leaf_probabilities": lp, "heads": heads, "why": ["audit"], "margins": {}})
    review = tmp_path / "REVIEW"
    review.mkdir()
    (review / "queue.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (review / "review.json").write_text(json.dumps({"taxonomy": taxonomy.to_spec(), "review_threshold": 0.5}))
    return review


@pytest.fixture()
def app_client(tmp_path):
    review = make_review(tmp_path)
    session = ReviewSession(review, reviewer="ana")
    return create_app(session, "secret-token").test_client(), session, review


def test_every_request_needs_the_token(app_client):
    client, session, _ = app_client
    frame = session.queue[0]["path"]
    assert client.get("/").status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    assert client.get("/api/state", headers={"X-Review-Token": "secret-token-"}).status_code == 403
    assert client.get("/image", query_string={"path": frame}).status_code == 403
    assert client.post("/api/answer", json={"index": 0, "action": "skip"}).status_code == 403
    assert not session.labels_file.exists()  # nothing written without the token
    assert client.get("/?token=secret-token").status_code == 200
    ok = client.get("/image", query_string={"path": frame, "token": "secret-token"})
    assert ok.status_code == 200 and ok.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(__import__("io").BytesIO(ok.data)).size == (64, 48)  # full resolution, not the model's size
    tiff = client.get("/image", query_string={"path": session.queue[1]["path"], "token": "secret-token"})
    assert tiff.status_code == 200 and Image.open(__import__("io").BytesIO(tiff.data)).mode == "L"  # 16-bit shown


def test_only_the_queues_frames_are_served(app_client, tmp_path):
    client, session, review = app_client
    frames = Path(session.queue[0]["path"]).parent
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)

    def get(path):
        return client.get("/image", query_string={"path": str(path), "token": "secret-token"}).status_code

    assert get(outside) == 404                                     # a file not in the queue
    assert get(frames / ".." / "secret.png") == 404                # .. out of the frames' folder
    assert get(frames / ".." / "frames" / "f0.png") == 404         # .. back to a queued frame: not its queued path
    assert get("frames/f0.png") == 404                             # relative spelling
    assert get(review / "queue.jsonl") == 404
    link = frames / "link.png"
    link.symlink_to(outside)
    assert get(link) == 404                                        # a link to elsewhere
    # a queued frame replaced by a link after queueing: refused, even to identical bytes
    target = Path(session.queue[2]["path"])
    copy = tmp_path / "copy.png"
    copy.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(copy)
    assert get(target) == 403
    with pytest.raises(FrameRefusedError, match="link"):
        session.frame_file(str(target))
    # a queued frame edited since
    edited = Path(session.queue[3]["path"])
    Image.fromarray(np.full((48, 64), 7, np.uint8)).save(edited)
    assert get(edited) == 409
    assert get(session.queue[0]["path"]) == 200


def test_answers_undo_and_resume(app_client):
    client, session, review = app_client
    h = {"X-Review-Token": "secret-token"}
    assert client.get("/api/state", headers=h).json["position"] == 0
    r = client.post("/api/answer", json={"index": 0, "action": "label", "label": "crack"}, headers=h).json
    assert r == {"next": 1, "answered": 1}
    client.post("/api/answer", json={"index": 1, "action": "skip"}, headers=h)
    client.post("/api/answer", json={"index": 2, "action": "label", "label": "ler"}, headers=h)
    assert client.post("/api/undo", headers=h).json["index"] == 2
    assert client.post("/api/answer", json={"index": 0, "action": "label", "label": "nonsense"},
                       headers=h).status_code == 400
    state = client.get("/api/state", headers=h).json
    assert state["answered"] == 2 and state["position"] == 2 and state["answers"] == {"0": "crack", "1": "skip"}
    # a new session on the same folder (the server restarted) sees the same
    again = ReviewSession(review)
    assert again.state()["position"] == 2
    r = replay(review / "labels.jsonl")
    assert r.labels[session.queue[0]["path"]].label == "crack"
    assert r.labels[session.queue[0]["path"]].reviewer == "ana"
    assert r.labels[session.queue[0]["path"]].verdict == session.queue[0]["verdict"]
    assert r.labels[session.queue[0]["path"]].sha256 == session.queue[0]["sha256"]
    item = client.get("/api/item/0", headers=h).json
    assert item["answer"] == "crack" and [d["head"] for d in item["path_down"]] == ["h1"]  # bogus: h1 only
    assert [d["head"] for d in client.get("/api/item/2", headers=h).json["path_down"]] == ["h1", "h2", "h3"]


def test_an_answer_counts_only_for_the_bytes_it_was_given_on(app_client):
    """A frame queued again after its file changed was shown as answered (matched by path) and skipped; train
    --from then dropped the old answer as changed since reviewed, so the frame was never labelled."""
    client, session, review = app_client
    h = {"X-Review-Token": "secret-token"}
    client.post("/api/answer", json={"index": 0, "action": "label", "label": "crack"}, headers=h)
    client.post("/api/answer", json={"index": 1, "action": "skip"}, headers=h)
    assert session.answers() == {0: "crack", 1: "skip"}
    lines = (review / "queue.jsonl").read_text().splitlines()
    for k in (0, 1):  # the files changed and were queued again (labels.jsonl kept)
        entry = json.loads(lines[k])
        lines[k] = json.dumps({**entry, "sha256": "0" * 64})
    (review / "queue.jsonl").write_text("\n".join(lines) + "\n")
    again = ReviewSession(review)
    assert again.answers() == {} and again.state()["position"] == 0


def test_the_app_has_no_static_route(tmp_path, monkeypatch):
    """Flask's default /static/<path> served the working directory's static/ folder (with the token)."""
    session = ReviewSession(make_review(tmp_path))
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "x.txt").write_text("not a queued frame")
    monkeypatch.chdir(tmp_path)
    client = create_app(session, "secret-token").test_client()
    assert client.get("/static/x.txt", query_string={"token": "secret-token"}).status_code == 404


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "review.json").write_text("[1, 2]"), "review.json: not a JSON object"),
    (lambda r: (r / "review.json").write_text("{not json"), "review.json: not readable JSON"),
    (lambda r: (r / "review.json").write_text('{"taxonomy": {"heads": ["h1"]}}'), "its taxonomy is malformed"),
    (lambda r: _edit_first_entry(r, verdict=["bogus"]), "entry 1 is not a queue entry"),
    (lambda r: _edit_first_entry(r, heads=[1, 2]), "entry 1 is not a queue entry"),
    (lambda r: _edit_first_entry(r, leaf_probabilities={"bogus": "high"}), "entry 1 is not a queue entry"),
])
def test_a_damaged_review_folder_is_named_in_one_line(tmp_path, damage, message):
    """Each of these was an AttributeError/TypeError traceback, or an HTTP 500 on the page."""
    from semhinet_tf.review import ReviewInputError

    review = make_review(tmp_path)
    damage(review)
    with pytest.raises(ReviewInputError, match=message) as err:
        ReviewSession(review)
    assert str(review) in str(err.value) and "\n" not in str(err.value)


def _edit_first_entry(review: Path, **fields) -> None:
    lines = (review / "queue.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **fields})
    (review / "queue.jsonl").write_text("\n".join(lines) + "\n")


def test_keys_for_any_taxonomy():
    keys = leaf_keys(TAX.leaves)
    assert list(keys.values()) == list("12345678")
    many = leaf_keys([f"c{i}" for i in range(20)])
    assert len(set(many.values())) == 20 and not {"s", "u", "z"} & set(many.values())
    with pytest.raises(ValueError, match="leaves"):
        leaf_keys([f"c{i}" for i in range(40)])


def test_remote_host_needs_the_explicit_option():
    check_host("127.0.0.1", False)
    check_host("localhost", False)
    with pytest.raises(ValueError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    check_host("0.0.0.0", True)


def _start_server(review: Path) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "semhinet_tf", "review", "serve", str(review), "--port", "0",
                             "--reviewer", "bo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, match.group(1), match.group(2)


def _post(base: str, token: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path.lstrip("/"), data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Review-Token": token})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_a_killed_server_loses_no_answer(tmp_path):
    review = make_review(tmp_path, n=8)
    queue = [json.loads(s) for s in (review / "queue.jsonl").read_text().splitlines()]
    proc, base, token = _start_server(review)
    try:
        given = {0: "bridge", 1: "normal", 2: "cmp", 3: "ler"}
        for i, label in given.items():
            _post(base, token, "/api/answer", {"index": i, "action": "label", "label": label})
        _post(base, token, "/api/answer", {"index": 4, "action": "skip"})
        with pytest.raises(urllib.error.HTTPError) as bad:  # wrong token: refused by the real server too
            _post(base, "nope", "/api/answer", {"index": 5, "action": "skip"})
        assert bad.value.code == 403
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    r = replay(review / "labels.jsonl")
    assert {queue.index(next(e for e in queue if e["path"] == p)): a.label for p, a in r.labels.items()} == given
    assert len(r.skipped) == 1 and not r.bad_lines
    proc, base, token2 = _start_server(review)  # restarted: a new token, the same answers, resumes at frame 5
    try:
        assert token2 != token
        req = urllib.request.Request(base + "api/state", headers={"X-Review-Token": token2})
        with urllib.request.urlopen(req, timeout=10) as resp:
            state = json.loads(resp.read())
        assert state["answered"] == 5 and state["position"] == 5
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def test_the_page_follows_any_taxonomy(tmp_path):
    tax = Taxonomy.from_spec({"name": "wafer", "heads": [
        {"name": "top", "classes": ["good", "bad"]},
        {"name": "kind", "parent": "top.bad", "classes": ["scratch", "dust", "stain"]}]})
    review = make_review(tmp_path, n=4, taxonomy=tax)
    client = create_app(ReviewSession(review), "t").test_client()
    h = {"X-Review-Token": "t"}
    state = client.get("/api/state", headers=h).json
    assert [(leaf["name"], leaf["key"]) for leaf in state["leaves"]] == [("good", "1"), ("scratch", "2"),
                                                                         ("dust", "3"), ("stain", "4")]
    assert [d["head"] for d in client.get("/api/item/1", headers=h).json["path_down"]] == ["top", "kind"]
    ok = client.post("/api/answer", json={"index": 1, "action": "label", "label": "dust"}, headers=h)
    assert ok.status_code == 200
    assert client.post("/api/answer", json={"index": 2, "action": "label", "label": "bridge"},
                       headers=h).status_code == 400  # a leaf of another taxonomy
    assert replay(review / "labels.jsonl").labels[ReviewSession(review).queue[1]["path"]].label == "dust"


def test_the_audit_estimates_the_error_rate_of_automatic_verdicts(tmp_path):
    from semhinet_tf.review.server import wilson_interval

    review = make_review(tmp_path, n=6)  # every frame of make_review is an audit frame
    session = ReviewSession(review)
    assert session.audit()["labelled"] == 0 and session.audit()["error_rate"] is None
    for i in range(4):  # the model's verdict confirmed on three frames, corrected on one; one skipped
        e = session.queue[i]
        session.answer(i, "label", e["verdict"] if i else ("normal" if e["verdict"] != "normal" else "bogus"))
    session.answer(4, "skip")
    audit = session.audit()
    assert audit["sampled"] == 6 and audit["labelled"] == 4 and audit["corrected"] == 1
    assert audit["error_rate"] == 0.25 and audit["interval95"] == pytest.approx(wilson_interval(1, 4))
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.15 < high < 0.17  # 0 of 20 still allows about 16%
    assert wilson_interval(0, 0) is None


def test_a_second_page_on_a_served_folder_is_refused_in_one_line(tmp_path):
    """Two pages on one folder would each resume from labels.jsonl and undo without the other's answers; a queue
    rebuilt with --overwrite would replace queue.jsonl under the page. Both are refused while a page serves it,
    naming the server's pid; once it stops (even killed), a page starts again."""
    from semhinet_tf.review.queue import build_queue

    review = make_review(tmp_path, n=4)
    proc, base, token = _start_server(review)
    try:
        second = subprocess.run([sys.executable, "-m", "semhinet_tf", "review", "serve", str(review), "--port", "0"],
                                capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert second.returncode == 2, second.stdout + second.stderr
        line = (second.stdout + second.stderr).strip()
        assert "\n" not in line and "review folder is in use" in line and f"pid {proc.pid}" in line, line
        assert "already serves it" in line
        with pytest.raises(RunDirError, match="already serves it"):
            build_queue(tmp_path / "model.tflite", tmp_path / "images", review, overwrite=True)
        _post(base, token, "/api/answer", {"index": 0, "action": "label", "label": "bridge"})  # still serving
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    proc, base, token = _start_server(review)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert replay(review / "labels.jsonl").labels


def test_a_port_in_use_or_an_unknown_host_is_one_line_naming_the_option():
    import socket

    from semhinet_tf.review import ReviewInputError
    from semhinet_tf.review.server import _check_listen

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ReviewInputError, match=f"--port {port}: cannot listen") as err:
            _check_listen("127.0.0.1", port)
        assert "\n" not in str(err.value)
    finally:
        taken.close()
    with pytest.raises(ReviewInputError, match="--host no-such-host.invalid: cannot be resolved"):
        _check_listen("no-such-host.invalid", 8765)
    _check_listen("127.0.0.1", 0)  # a free port: no complaint
