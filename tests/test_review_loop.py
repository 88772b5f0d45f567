"""Issue 24 "done when": the README's review-loop section, run as written on the quickstart's layout (a tiny run,
32 px and one epoch a phase, trained here on a tiny synthetic set, stands in for semhinet_quickstart/run, which
takes minutes to train), with the labelling step driven by the test through the page's own HTTP calls.

Every `semhinet ...` line of the section's block runs (a serve line as a server with --port 0 added, labelled, then
stopped with Ctrl-C): synth, review queue, review serve, train --from, convert, promote.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import as_user_env

from semhinet_tf.artifacts.files import file_sha256
from semhinet_tf.cli import main
from semhinet_tf.review.labels import replay

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
pytestmark = pytest.mark.slow


def _ok(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def quickstart(trained_run) -> Path:
    """semhinet_quickstart/{data,run} as the quickstart lays them out, at test scale: the session's trained run
    (conftest.trained_run: 6 cause-labelled frames a class, a 32 px run trained one epoch a phase, converted). The
    loop adds new/, review/, run2/ and the changelog beside them and must change nothing in them (checked)."""
    return trained_run.root


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


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
    proc = subprocess.Popen([sys.executable, "-m", "semhinet_tf", *argv, "--port", "0"], cwd=cwd, env=as_user_env(),
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
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in err
    return given


def test_the_readmes_review_loop_runs_as_written(quickstart, monkeypatch):
    commands = loop_commands()
    firsts = [shlex.split(c)[1:3] for c in commands]
    assert firsts == [["synth", "semhinet_quickstart/new"], ["review", "queue"], ["review", "serve"],
                      ["train", "semhinet_quickstart/data"], ["convert", "semhinet_quickstart/run2"],
                      ["promote", "semhinet_quickstart/run2"]], firsts  # the whole loop, in its order
    monkeypatch.chdir(quickstart)
    qs = quickstart / "semhinet_quickstart"
    before = {name: _contents(qs / name) for name in ("data", "run")}
    runner = CliRunner()
    given: dict[str, str] = {}
    review = None
    exit_codes = {}
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[:2] == ["review", "serve"]:
            given = label_everything(argv, quickstart)
            review = quickstart / argv[2]
            continue
        result = runner.invoke(main, argv)
        exit_codes[argv[0]] = result.exit_code
        # promote: 0 promoted, 1 refused (a worse model); both are the loop working, anything else is not
        assert result.exit_code in ((0, 1) if argv[0] == "promote" else (0,)), f"{command}\n{result.output}"
    queue = [json.loads(s) for s in (review / "queue.jsonl").read_text().splitlines()]
    info = json.loads((review / "review.json").read_text())
    assert info["n_frames"] == 160 and len(queue) == info["n_queued"] > 0
    assert info["n_audit"] == (max(1, int(0.02 * info["n_confident"] + 0.5)) if info["n_confident"] else 0)
    r = replay(review / "labels.jsonl")
    assert not r.bad_lines and not r.skipped
    assert {p: a.label for p, a in r.labels.items()} == given and set(given) == {e["path"] for e in queue}
    for path, answer in r.labels.items():
        assert answer.reviewer == "ana" and answer.sha256 == file_sha256(path)
        assert Path(path).is_relative_to(qs / "new")
    # train --from: the reviewed frames joined training, the old run's validation frames stayed where they were
    run, run2 = qs / "run", qs / "run2"
    assert sorted(json.loads((run2 / "split.json").read_text())["val"]) == sorted(
        json.loads((run / "split.json").read_text())["val"])
    manifest = (run2 / "manifest.csv").read_text()
    assert all(path in manifest for path in given)
    assert json.loads((run2 / "config.json").read_text())["from"]["labels_sha256"] == file_sha256(
        review / "labels.jsonl")
    assert (run2 / "model_int8.tflite").exists()
    # promote: one decision in the changelog, and promoted.json only when it promoted
    entries = [json.loads(s) for s in (qs / "CHANGELOG.jsonl").read_text().splitlines()]
    assert len(entries) == 1
    promoted = exit_codes["promote"] == 0
    assert entries[0]["decision"] == ("promoted" if promoted else "refused")
    assert (qs / "promoted.json").exists() == promoted
    assert (qs / "CHANGELOG.md").exists()
    # the old run and its data are read, never written (the run lock's file aside)
    after = {name: _contents(qs / name) for name in ("data", "run")}
    for contents in (before, after):
        contents["run"].pop(".semhinet-lock", None)
    assert after == before
