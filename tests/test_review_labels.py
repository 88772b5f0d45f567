"""The answers log: replay order, undo, overrides, torn lines."""

from semhinet_tf.review.labels import Answer, append_answer, replay


def _label(path, label):
    return Answer(action="label", path=path, sha256="ab", label=label, verdict="normal", time="t")


def test_replay_applies_labels_skips_overrides_and_undo(tmp_path):
    log = tmp_path / "labels.jsonl"
    append_answer(log, _label("a.png", "bridge"))
    append_answer(log, _label("b.png", "open"))
    append_answer(log, Answer(action="skip", path="c.png", sha256="cd"))
    append_answer(log, _label("a.png", "crack"))  # a later answer on a frame wins
    append_answer(log, Answer(action="undo", path="", sha256=""))  # withdraws a.png=crack ...
    r = replay(log)
    assert r.labels["a.png"].label == "bridge"  # ... so the earlier answer stands again
    assert r.labels["b.png"].label == "open"
    assert r.skipped == {"c.png"}
    assert r.answered == {"a.png", "b.png", "c.png"}
    append_answer(log, Answer(action="undo", path="", sha256=""))
    append_answer(log, Answer(action="undo", path="", sha256=""))
    r = replay(log)
    assert set(r.labels) == {"a.png"} and not r.skipped


def test_torn_or_foreign_lines_are_reported_not_fatal(tmp_path):
    log = tmp_path / "labels.jsonl"
    append_answer(log, _label("a.png", "bridge"))
    with open(log, "a") as f:
        f.write('{"action": "label", "path": "b.png"}\n[1, 2]\n{"action": "lab')
    r = replay(log)
    assert set(r.labels) == {"a.png"}
    assert [n for n, _ in r.bad_lines] == [2, 3, 4]


def test_an_answer_after_a_torn_last_line_is_kept(tmp_path):
    """A power cut tore the last line; the next answers must not be glued to it (and lost with it)."""
    log = tmp_path / "labels.jsonl"
    append_answer(log, _label("a.png", "bridge"))
    with open(log, "a") as f:
        f.write('{"action": "label", "path": "x.png", "sha')
    append_answer(log, _label("b.png", "open"))
    append_answer(log, _label("c.png", "crack"))
    r = replay(log)
    assert r.labels == {"a.png": r.labels["a.png"], "b.png": r.labels["b.png"], "c.png": r.labels["c.png"]}
    assert r.labels["b.png"].label == "open" and [n for n, _ in r.bad_lines] == [2]


def test_the_promote_changelog_survives_a_torn_last_line(tmp_path):
    import json

    from semhinet_tf.promote import CHANGELOG, append_changelog

    (tmp_path / CHANGELOG).write_text('{"time": "torn')
    append_changelog(tmp_path, {"time": "t1", "decision": "promoted"})
    lines = (tmp_path / CHANGELOG).read_text().splitlines()
    assert lines[0] == '{"time": "torn' and json.loads(lines[1])["decision"] == "promoted"
    assert "t1: ? promoted" in (tmp_path / "CHANGELOG.md").read_text()  # an entry without figures is shown


def test_the_promote_changelog_survives_lines_it_cannot_show(tmp_path):
    """JSON lines that are not decisions this version can show (not an object; changes a list; failures a
    number) raised AttributeError/TypeError after the decision's line was appended, so promoted.json was never
    written though the changelog said promoted."""
    import json

    from semhinet_tf.promote import CHANGELOG, append_changelog

    (tmp_path / CHANGELOG).write_text('[1, 2]\n"text"\n{"time": "t0", "changes": [1]}\n'
                                      '{"time": "t00", "failures": 3}\n')
    append_changelog(tmp_path, {"time": "t1", "decision": "promoted"})
    assert json.loads((tmp_path / CHANGELOG).read_text().splitlines()[-1])["decision"] == "promoted"
    md = (tmp_path / "CHANGELOG.md").read_text()
    assert "t1: ? promoted" in md
    assert "t0: an entry this version cannot show" in md and "t00: an entry this version cannot show" in md


def test_missing_log_is_empty(tmp_path):
    assert not replay(tmp_path / "none.jsonl").labels
