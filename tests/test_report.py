"""The human report: files written, HTML and Markdown with the same content, history parsing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.evaluate import EvaluationError, evaluate
from semhinet_tf.report import read_history, write_report
from semhinet_tf.taxonomy import Taxonomy

TAX = Taxonomy.default()
PNGS = ["leaf_confusion.png", "head_confusion.png", "per_class.png", "coverage.png", "training_curves.png",
        "worst_mistakes.png"]


def fabricated_case(root: Path, n: int = 160, seed: int = 0, accuracy: float = 0.8):
    """Images on disk, true leaves and head outputs of a plausible model (mostly right, some confident errors)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, len(TAX.leaves), n)
    true[true == TAX.leaf_index("crack")] = TAX.leaf_index("cmp")  # one class absent from the split
    pred = np.where(rng.random(n) < accuracy, true, rng.integers(0, len(TAX.leaves), n))
    conf = np.where(pred == true, rng.uniform(0.8, 0.99, n), rng.uniform(0.45, 0.97, n))
    probs = {}
    for head in TAX.heads:
        k = head.num_classes
        p = rng.dirichlet(np.ones(k), n) * (1 - conf[:, None])
        for i, leaf_i in enumerate(pred):
            target = TAX.leaf_targets(TAX.leaves[leaf_i])[head.name]
            p[i, target if target >= 0 else rng.integers(k)] += conf[i]
        probs[head.name] = p
    paths = []
    yy, xx = np.mgrid[0:96, 0:96]
    for i in range(n):
        folder = root / "images" / TAX.leaves[true[i]]
        folder.mkdir(parents=True, exist_ok=True)
        img = (127 + 100 * np.sin(xx / (3 + true[i]) + i) * np.cos(yy / 7)).clip(0, 255).astype(np.uint8)
        path = folder / f"sem_{i:04d}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return true, probs, paths


def write_history(path: Path) -> Path:
    rows = ["epoch,h1_accuracy,loss,lr,val_h1_accuracy,val_h1_loss,val_h2_accuracy,val_h2_loss,val_loss,phase"]
    for phase, epochs, base in (("float", 8, 2.0), ("qat", 4, 0.7)):
        for e in range(epochs):
            loss = base * 0.8 ** e
            rows.append(f"{e},{0.6 + 0.03 * e},{loss},0.001,{0.55 + 0.03 * e},{loss / 2},{0.5 + 0.04 * e},"
                        f"{loss / 3},{loss * 1.1},{phase}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    true, probs, paths = fabricated_case(root)
    results = evaluate(true, probs, TAX, "tiny-qat", "tflite")
    index = write_report(root / "out", results, paths, true, probs, TAX, history_csv=write_history(root / "h.csv"),
                         title="Fabricated report")
    return index, results


def test_writes_all_files(report):
    index, _ = report
    out = index.parent
    assert index == out / "index.html"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["index.html", "README.md", *PNGS])  # nothing else, no temporary files
    for name in PNGS:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 200


def test_html_images_have_alt_text_and_exist(report):
    index, _ = report
    text = index.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text and 'class="summary"' in text
    imgs = re.findall(r'<img src="([^"]+)" alt="([^"]*)">', text)
    assert sorted(src for src, _ in imgs) == sorted(PNGS)
    assert all(len(alt) > 10 for _, alt in imgs)
    assert text.index('class="summary"') < text.index("<h2>")  # summary block on top


def test_markdown_has_the_same_content(report):
    index, results = report
    html_text = index.read_text()
    md = (index.parent / "README.md").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html_text) == re.findall(r"^## (.*)$", md, flags=re.M)
    assert sorted(re.findall(r"!\[[^\]]+\]\(([^)]+)\)", md)) == sorted(PNGS)
    acc = f"{results['leaf']['accuracy']:.3f}"
    assert acc in md and acc in html_text
    assert "crack" in md and "no image in this split" in md and "no image in this split" in html_text
    op = results["coverage"]["operating_point"]
    assert f"{op['threshold']:.3f}" in md and f"{op['threshold']:.3f}" in html_text
    assert "float 8, qat 4" in md  # training phases recognised


def test_worst_mistakes_listed_most_confident_first(report):
    index, _ = report
    md = (index.parent / "README.md").read_text()
    section = md.split("## Most confident mistakes")[1]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ") and "sem_" in line]
    assert 0 < len(rows) <= 16
    p_pred = [float(r[5]) for r in rows]
    assert p_pred == sorted(p_pred, reverse=True)
    assert all(r[3].strip() != r[4].strip() for r in rows)  # true != predicted


def test_no_history_no_mistakes_and_unreadable_images(tmp_path):
    true, probs, paths = fabricated_case(tmp_path, n=40, accuracy=1.0)
    results = evaluate(true, probs, TAX, "m", "keras")
    assert results["leaf"]["accuracy"] == 1.0
    index = write_report(tmp_path / "a", results, paths, true, probs, TAX)
    names = {p.name for p in index.parent.iterdir()}
    assert "training_curves.png" not in names and "worst_mistakes.png" not in names
    assert "No misclassified image." in index.read_text()
    # a model that gets things wrong on files that cannot be read still gives a report
    true2, probs2, _ = fabricated_case(tmp_path / "b", n=40, accuracy=0.3, seed=4)
    res2 = evaluate(true2, probs2, TAX, "m", "keras")
    index2 = write_report(tmp_path / "c", res2, [str(tmp_path / "gone.png")] * 40, true2, probs2, TAX,
                          image_loader=lambda p: np.asarray(Image.open(p)))
    assert (index2.parent / "worst_mistakes.png").stat().st_size > 0


def test_bad_inputs(tmp_path):
    true, probs, paths = fabricated_case(tmp_path, n=10)
    results = evaluate(true, probs, TAX, "m", "keras")
    with pytest.raises(EvaluationError, match="missing.csv"):
        write_report(tmp_path / "o", results, paths, true, probs, TAX, history_csv=tmp_path / "missing.csv")
    with pytest.raises(EvaluationError, match="disagree"):
        write_report(tmp_path / "o", results, paths[:5], true, probs, TAX)


def test_read_history_phases_from_column_or_epoch_restart(tmp_path):
    cols, phases = read_history(write_history(tmp_path / "h.csv"))
    assert phases == [("float", 0, 8), ("qat", 8, 12)]
    assert "val_loss" in cols and "phase" not in cols and len(cols["loss"]) == 12
    plain = tmp_path / "p.csv"
    plain.write_text("epoch,loss,val_loss\n0,1.0,1.1\n1,0.8,0.9\n0,0.5,0.6\n1,0.4,\n")
    cols, phases = read_history(plain)
    assert phases == [("phase 1", 0, 2), ("phase 2", 2, 4)]
    assert np.isnan(cols["val_loss"][3])
    single = tmp_path / "s.csv"
    single.write_text("epoch,loss\n0,1.0\n1,0.5\n")
    assert read_history(single)[1] == [("", 0, 2)]
