"""Recall by attribute tercile (issue 26.2): a hand-made CSV with known values gives known recalls; a bad file is
refused in one line before any inference; eval reads a synth dataset.json by itself and writes JSON, report and
printed tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from semhinet_tf.attributes import (
    AttributeFileError,
    attribute_results,
    dataset_attributes,
    format_attribute_tables,
    read_attribute_csv,
    recall_by_tercile,
    tercile_index,
)
from semhinet_tf.taxonomy import Taxonomy

LEAVES = list(Taxonomy.default().leaves)
BRIDGE, OPEN_, CMP, NORMAL = (LEAVES.index(c) for c in ("bridge", "open", "cmp", "normal"))


def test_terciles_are_equal_counts_and_keep_ties_in_the_lower_one():
    assert tercile_index(np.arange(6.0)[::-1]).tolist() == [2, 2, 1, 1, 0, 0]
    assert np.bincount(tercile_index(np.arange(7.0)), minlength=3).tolist() == [3, 2, 2]
    assert np.bincount(tercile_index(np.arange(4.0)), minlength=3).tolist() == [2, 1, 1]
    assert tercile_index(np.array([1.0, 1, 1, 2])).tolist() == [0, 0, 0, 2]  # a tie run is never split
    assert tercile_index(np.array([5.0, 5, 5])).tolist() == [0, 0, 0]


def _hand_made(tmp_path: Path) -> tuple[list[str], np.ndarray, np.ndarray, Path]:
    """12 evaluated images; a CSV naming them absolute, relative to its folder, relative to --data, by bare file name,
    plus one row of an image that was not evaluated, a text column (the operator) and an identifier column (a text
    of more values than MAX_CATEGORIES: skipped)."""
    data = tmp_path / "data"
    paths = [str(data / "bridge" / f"b{i}.png") for i in range(6)]  # sizes 1..6
    paths += [str(data / "open" / f"o{i}.png") for i in range(4)]  # sizes 1, 1, 1, 2 (ties)
    paths += [str(data / "cmp" / "c0.png"), str(data / "normal" / "n0.png")]
    true = np.array([BRIDGE] * 6 + [OPEN_] * 4 + [CMP, NORMAL])
    #                bridge: wrong right right right wrong wrong | open: right wrong right wrong | cmp right | normal
    pred = np.array([NORMAL, BRIDGE, BRIDGE, BRIDGE, NORMAL, CMP, OPEN_, NORMAL, OPEN_, NORMAL, CMP, NORMAL])
    (tmp_path / "tool").mkdir()
    csv_file = tmp_path / "tool" / "defects.csv"
    lines = ["Path;size_um;operator;contrast",
             f"{paths[0]};1;ann;0.5",  # absolute
             "../data/bridge/b1.png;2;ann;",  # relative to the CSV's folder
             "bridge/b2.png;3;bob;x",  # relative to --data
             "C:\\fab\\export\\b3.png;4;bob;0.1",  # a Windows tool's path: found by its unique file name
             "bridge/b4.png;5;ann;0.2", "bridge/b5.png;6;ann;0.3",
             "open/o0.png;1;ann;", "open/o1.png;1;ann;", "open/o2.png;1;ann;", "open/o3.png;2;;",
             "cmp/c0.png;7.5;ann;", "normal/n0.png;n/a;ann;",
             "train_only/t0.png;9;ann;"]  # not evaluated
    wafers = [f"W{k:03d}" for k in range(len(lines) - 1)]  # one wafer a row: an identifier, not a group
    lines = [lines[0] + ";wafer"] + [f"{line};{w}" for line, w in zip(lines[1:], wafers, strict=True)]
    csv_file.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return paths, true, pred, csv_file


def test_the_attributes_table_with_a_hand_made_csv(tmp_path):
    paths, true, pred, csv_file = _hand_made(tmp_path)
    table = read_attribute_csv(csv_file)
    assert table.columns == ["size_um", "contrast"] and table.categories == ["operator"]
    assert table.skipped_columns == ["wafer"]  # a different value in every row
    block, sources = attribute_results(true, pred, LEAVES, [table], paths, tmp_path / "data")
    assert sources[0]["rows"] == 13 and sources[0]["matched"] == 12 and sources[0]["unmatched"] == 1
    assert sources[0]["matched_by_file_name"] == 1 and sources[0]["unmatched_examples"] == ["train_only/t0.png"]
    size = block["size_um"]
    assert size["n"] == 11  # normal's cell is text
    assert set(size["classes"]) == {"bridge", "open", "cmp"}  # normal has no value: left out

    bridge = size["classes"]["bridge"]
    assert bridge["n"] == 6 and bridge["recall"] == pytest.approx(3 / 6)
    assert [t["range"] for t in bridge["terciles"]] == [[1, 2], [3, 4], [5, 6]]
    assert [t["n"] for t in bridge["terciles"]] == [2, 2, 2]
    assert [t["recall"] for t in bridge["terciles"]] == [0.5, 1.0, 0.0]
    assert bridge["terciles"][1]["recall_ci"][1] == 1.0 and bridge["terciles"][2]["recall_ci"][0] == 0.0

    opened = size["classes"]["open"]  # values 1,1,1,2: the three tied 1s stay together, the middle third is empty
    assert [t["n"] for t in opened["terciles"]] == [3, 0, 1]
    assert [t["recall"] for t in opened["terciles"]] == [pytest.approx(2 / 3), None, 0.0]
    assert [t["range"] for t in opened["terciles"]] == [[1, 1], None, [2, 2]]

    assert size["classes"]["cmp"] == {"n": 1, "without_value": 0, "recall": 1.0, "recall_ci": [pytest.approx(0.2065,
                                      abs=1e-3), 1.0], "terciles": []}  # fewer than 3 frames: n, no terciles
    contrast = block["contrast"]["classes"]["bridge"]  # 0.5, '', 'x', 0.1, 0.2, 0.3: four valued frames
    assert contrast["n"] == 4 and contrast["without_value"] == 2
    assert [t["n"] for t in contrast["terciles"]] == [2, 1, 1]
    text = format_attribute_tables(block)
    assert "recall by size_um tercile" in text and "0.50 n=2 [1..2]" in text and "fewer than 3" in text

    # the text column: recall per value, with the verdicts the misses got
    operator = block["operator"]
    assert operator["kind"] == "value" and block["size_um"]["kind"] == "tercile"
    assert operator["n"] == 11  # open/o3's cell is empty
    by_value = {g["value"]: g for g in operator["classes"]["bridge"]["groups"]}
    assert list(by_value) == ["ann", "bob"]
    assert (by_value["ann"]["n"], by_value["ann"]["correct"]) == (4, 1)  # b0 b1 b4 b5: wrong right wrong wrong
    assert by_value["ann"]["called"] == {"normal": 2, "cmp": 1}
    assert (by_value["bob"]["n"], by_value["bob"]["recall"], by_value["bob"]["called"]) == (2, 1.0, {})
    assert by_value["bob"]["recall_ci"][1] == 1.0
    opened = operator["classes"]["open"]
    assert opened["n"] == 3 and opened["without_value"] == 1 and opened["groups"][0]["called"] == {"normal": 1}
    assert "normal" in operator["classes"] and "recall by operator" in format_attribute_tables(block)
    assert "0.25 n=4 (normal 2, cmp 1)" in format_attribute_tables(block)


def test_a_later_table_overrides_an_earlier_one_cell_by_cell(tmp_path):
    paths, true, pred, csv_file = _hand_made(tmp_path)
    first = read_attribute_csv(csv_file)
    second_file = tmp_path / "override.csv"
    second_file.write_text("file,size_um\nbridge/b0.png,100\n")
    block, _ = attribute_results(true, pred, LEAVES, [first, read_attribute_csv(second_file)], paths,
                                 tmp_path / "data")
    bridge = block["size_um"]["classes"]["bridge"]
    assert [t["range"] for t in bridge["terciles"]] == [[2, 3], [4, 5], [6, 100]]
    assert block["size_um"]["sources"] == [str(csv_file), str(second_file)]


@pytest.mark.parametrize("content, message", [
    (None, "no such attributes file"),
    ("", "no header row"),
    ("name,size\na.png,1\n", "no column naming the file"),
    ("path,size,size\na.png,1,2\n", "named twice"),
    ("path,size\n", "no row naming a file"),
    ("path,size,who\na.png,,\nb.png, ,\n", "no column with a number"),
    ("path,lot\n" + "".join(f"f{k}.png,L{k}\n" for k in range(25)), "no column with a number"),  # an identifier
    (b"path,size\n\xff\xfe,1\n", "not UTF-8"),
    ("path,size\na.png,1\n\"" + "x" * 200_000 + "\",2\n", "not a readable CSV .field larger than field limit"),
])
def test_bad_attribute_files_are_named_in_one_line(tmp_path, content, message):
    f = tmp_path / "attrs.csv"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(AttributeFileError, match=message) as err:
        read_attribute_csv(f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_or_foreign_dataset_json_never_stops_eval(tmp_path):
    assert dataset_attributes(tmp_path) == (None, None)
    (tmp_path / "dataset.json").write_text("{broken")
    table, note = dataset_attributes(tmp_path)
    assert table is None and "not read for attributes" in note
    (tmp_path / "dataset.json").write_text(json.dumps({"frames": [{"path": "a.png", "severity": 1}]}))
    assert dataset_attributes(tmp_path) == (None, None)  # not synth's


def test_recall_by_tercile_skips_classes_without_values():
    out = recall_by_tercile(np.array([NORMAL, BRIDGE]), np.array([NORMAL, BRIDGE]), np.array([np.nan, 0.3]), LEAVES)
    assert list(out) == ["bridge"] and out["bridge"]["terciles"] == []


# ---------------------------------------------------------------- through the CLI, on the shared tiny model
def _synth_like(tmp_path: Path) -> Path:
    """Class folders of 32 px frames and a dataset.json as `semhinet synth` writes it (severity, visibility)."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    frames = []
    for leaf in ("normal", "bridge", "open"):
        (data / leaf).mkdir(parents=True)
        for k in range(6):
            rel = f"{leaf}/{leaf}_{k:05d}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(data / rel)
            rec = {"path": rel, "class": leaf, "index": k, "format": "png", "pattern": "holes" if k < 2 else "lines"}
            if leaf != "normal":
                rec.update(severity=round(0.1 * (k + 1), 4), visibility=round(2.0 - 0.2 * k, 4), draw=1, scenes=1)
            frames.append(rec)
    (data / "dataset.json").write_text(json.dumps({"generator": "semhinet_tf.data.synth", "frames": frames}))
    return data


def test_eval_reads_dataset_json_and_a_csv_into_json_report_and_stdout(tiny_run, tmp_path):
    from semhinet_tf.cli import main

    data = _synth_like(tmp_path)
    csv_file = tmp_path / "tool.csv"
    csv_file.write_text("path,defect_size_nm\n" + "".join(f"bridge_{k:05d}.png,{10 * k}\n" for k in range(6)))
    out, rep = tmp_path / "eval.json", tmp_path / "report"
    res = CliRunner().invoke(main, ["eval", str(tiny_run.tflite), "--data", str(data), "--split", "all",
                                    "--json", str(out), "--report", str(rep), "--attributes", str(csv_file)])
    assert res.exit_code == 0, res.output
    assert "recall by severity tercile" in res.output and "recall by defect_size_nm tercile" in res.output
    assert "6 of 6 rows matched evaluated images (6 by file name alone)" in res.output
    result = json.loads(out.read_text())
    assert "readiness" in result and "per_class" in result  # the existing keys stay
    assert set(result["attributes"]) == {"severity", "visibility", "pattern", "defect_size_nm"}
    pattern = result["attributes"]["pattern"]
    assert pattern["kind"] == "value" and pattern["n"] == 18 and "recall by pattern" in res.output
    groups = pattern["classes"]["normal"]["groups"]
    assert [(g["value"], g["n"]) for g in groups] == [("holes", 2), ("lines", 4)]
    assert all(g["correct"] + sum(g["called"].values()) == g["n"] for g in groups)
    sev = result["attributes"]["severity"]["classes"]
    assert set(sev) == {"bridge", "open"} and [t["n"] for t in sev["bridge"]["terciles"]] == [2, 2, 2]
    assert sev["open"]["terciles"][0]["range"] == [0.1, 0.2]
    assert [s["kind"] for s in result["attribute_sources"]] == ["dataset.json", "csv"]
    assert (rep / "attributes.png").stat().st_size > 1000
    md = (rep / "README.md").read_text()
    assert "## Recall by attribute" in md and "(attributes.png)" in md and "defect_size_nm" in md
    assert "By pattern:" in md
    assert 'src="attributes.png"' in (rep / "index.html").read_text()


@pytest.mark.parametrize("content", [None, "name,size\na.png,1\n"])
def test_a_bad_attributes_file_is_refused_in_one_line_before_inference(tiny_run, tmp_path, monkeypatch, content):
    from semhinet_tf import engines
    from semhinet_tf.cli import main

    def no_inference(*args, **kwargs):
        raise AssertionError("the model was loaded before the attributes file was checked")

    monkeypatch.setattr(engines, "load_model", no_inference)
    data = _synth_like(tmp_path)
    bad = tmp_path / "attrs.csv"
    if content is not None:
        bad.write_text(content)
    res = CliRunner().invoke(main, ["eval", str(tiny_run.tflite), "--data", str(data), "--attributes", str(bad)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "Traceback" not in res.output
