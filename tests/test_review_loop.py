"""Issue 24 "done when": the README's review-loop section, run as written on the quickstart's layout (the session's
tiny run stands in for semhinet_quickstart/run, which takes minutes to train), with the labelling step driven by
the test through the page's own HTTP calls.

Every `semhinet ...` line of the section's block runs (a serve line as a server with --port 0 added, labelled, then
stopped with Ctrl-C); comment lines are the places kept for the loop's later steps (train --from, promote, convert):
once they become commands, this test runs them too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from semhinet_tf.cli import main
from semhinet_tf.review.labels import replay
from semhinet_tf.review.queue import file_sha256

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def loop_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## The review loop"):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in the README's review loop section"
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert all(ln.startswith(("semhinet ", "#")) for ln in lines), lines
    return lines


def _call(base: str, token: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path.lstrip("/"), headers={"X-Review-Token": token,
                                                                     "Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def label_everything(argv: list[str], cwd: Path) -> dict[str, str]:
    """Start the README's serve line, answer every queued frame as a reviewer would (the model's verdict on most,
    another leaf on every third, one answer undone and given again), stop it with Ctrl-C; the answers given."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "semhinet_tf", *argv, "--port", "0"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        base, token = match.groups()
        state = _call(base, token, "/api/state")
        leaves = [leaf["name"] for leaf in state["leaves"]]
        given: dict[str, str] = {}
        position = state["position"]
        for step in range(state["total"]):
            item = _call(base, token, f"/api/item/{position}")
            label = item["verdict"] if step % 3 else leaves[(leaves.index(item["verdict"]) + 1) % len(leaves)]
            if step == 1:  # a slip of the finger, undone
                _call(base, token, "/api/answer", {"index": position, "action": "label", "label": "bogus"})
                assert _call(base, token, "/api/undo", {})["index"] == position
            answer = _call(base, token, "/api/answer", {"index": position, "action": "label", "label": label})
            given[item["path"]] = label
            position = answer["next"]
        assert position == state["total"]  # every frame answered
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped" in err
    return given


def test_the_readmes_review_loop_runs_as_written(tiny_run, tmp_path, monkeypatch):
    commands = loop_commands()
    assert any(c.startswith("semhinet review queue") for c in commands)
    assert any(c.startswith("semhinet review serve") for c in commands)
    tiny_run.copy_to(tmp_path / "semhinet_quickstart" / "run")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    given: dict[str, str] = {}
    review = None
    for command in commands:
        if command.startswith("#"):
            continue
        argv = shlex.split(command)[1:]
        if argv[:2] == ["review", "serve"]:
            given = label_everything(argv, tmp_path)
            review = tmp_path / argv[2]
            continue
        result = runner.invoke(main, argv)
        assert result.exit_code == 0, f"{command}\n{result.output}"
    queue = [json.loads(s) for s in (review / "queue.jsonl").read_text().splitlines()]
    info = json.loads((review / "review.json").read_text())
    assert info["n_frames"] == 160 and len(queue) == info["n_queued"] > 0
    assert info["n_audit"] == (max(1, int(0.02 * info["n_confident"] + 0.5)) if info["n_confident"] else 0)
    r = replay(review / "labels.jsonl")
    assert not r.bad_lines and not r.skipped
    assert {p: a.label for p, a in r.labels.items()} == given and set(given) == {e["path"] for e in queue}
    for path, answer in r.labels.items():
        assert answer.reviewer == "ana" and answer.sha256 == file_sha256(path)
        assert Path(path).is_relative_to(tmp_path / "semhinet_quickstart" / "new")
