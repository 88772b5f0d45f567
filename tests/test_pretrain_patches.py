"""tools/pretrain_sem_patches.py: crops sit on the defect, twins are labelled normal, the weights load back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from semhinet_tf.data.synth import DEFECTS
from tools import pretrain_sem_patches as tool

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "pretrain_sem_patches.py"


def test_pairs_cover_every_defect_and_size_and_crops_differ_only_on_the_defect_side():
    pairs = tool.make_pairs(per_class=2, seed=7, sizes=[96, 128], workers=1)
    assert sorted({label for *_, label in pairs}) == list(range(1, len(DEFECTS) + 1))
    assert sorted({img.shape[0] for img, *_ in pairs}) == [96, 128]  # image k of a class at sizes[k % 2]
    x, y = tool.crops(pairs, crop=32, rng=np.random.default_rng(0))
    assert x.shape == (2 * len(pairs), 32, 32, 1)
    assert (y[1::2] == 0).all() and (y[0::2] >= 1).all()  # the twin's crop is the normal example
    # each crop pair is cut at the same place of a frame and its twin, near the defect: they differ
    differ = np.abs(x[0::2] - x[1::2]).reshape(len(pairs), -1).max(axis=1)
    assert (differ > 0).mean() >= 0.9


def test_cli_writes_backbone_weights_that_load_into_the_classifier(tmp_path):
    out = tmp_path / "crops.npz"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--per-class", "1", "--epochs", "1", "--img-sizes", "96",
                           "--crop", "32", "--workers", "1", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and out.with_suffix(".json").exists()

    from semhinet_tf.model.heads import ModelConfig, build_model
    from semhinet_tf.model.mobilenet_v3 import load_backbone_weights
    from semhinet_tf.taxonomy import Taxonomy

    model = build_model(Taxonomy.default(), ModelConfig(img_size=64))
    keys = {k.rpartition("::")[0] for k in np.load(out).files}
    assert not any(k.startswith("crop_") for k in keys)  # the crop classifier is not part of the backbone
    assert load_backbone_weights(model, out) == len(keys)
