"""`bench`: latency figures of the int8 model and of its bare backbone, on the session's tiny model."""

from __future__ import annotations

import shutil

import pytest

from semhinet_tf.export import bench as B
from semhinet_tf.export.tflite_meta import read_contract

SIZE = 32
ALPHA = 0.35
TIMING_KEYS = {"threads", "load_ms", "warmup_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s"}


@pytest.fixture(scope="module")
def tiny_tflite(tiny_run, tmp_path_factory):
    """The session's tiny classifier (MobileNetV3Small alpha 0.35 + five heads, 32 px, sealed contract), copied
    into a folder of its own: bench caches the backbone next to the model. bare.tflite is it without a contract."""
    path = tmp_path_factory.mktemp("bench") / "model_int8.tflite"
    shutil.copy(tiny_run.tflite, path)
    path.with_name("bare.tflite").write_bytes(tiny_run.bare)
    return path


@pytest.fixture(scope="module")
def result(tiny_tflite):
    # a stale cache (another model under the cache name, no bench tag) must be rebuilt, not used
    shutil.copy(tiny_tflite, B.backbone_cache_path(tiny_tflite))
    return B.bench(tiny_tflite, threads=(1, 2), runs=5, warmup=2)


def test_full_and_backbone_figures(result, tiny_tflite):
    assert result["img_size"] == SIZE and result["input_dtype"] == "uint8" and result["runs"] == 5
    for part in ("full", "backbone"):
        fig = result[part]
        assert fig["bytes"] > 0 and fig["macs"] > 0
        assert [t["threads"] for t in fig["timings"]] == [1, 2]
        for t in fig["timings"]:
            assert TIMING_KEYS <= set(t)
            assert 0 < t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"]
            assert t["warmup_ms"] > 0 and t["load_ms"] > 0 and t["images_per_s"] > 0
    assert result["full"]["bytes"] == tiny_tflite.stat().st_size
    assert result["backbone"]["macs"] < result["full"]["macs"]


def test_head_cost(result):
    head = result["head"]
    assert [t["threads"] for t in head["timings"]] == [1, 2]
    for t, f, b in zip(head["timings"], result["full"]["timings"], result["backbone"]["timings"], strict=True):
        assert t["ratio"] > 0
        assert t["ratio"] == pytest.approx(f["p50_ms"] / b["p50_ms"])
        assert t["pct"] == pytest.approx(100 * (1 - 1 / t["ratio"]))
    assert head["mac_ratio"] > 1 and 0 < head["mac_pct"] < 100
    # the backbone built for the bench is the one inside the model: same MACs once the heads are taken off
    assert head["backbone_matches"] and head["head_macs"] > 0


def test_backbone_is_cached_next_to_the_model_and_reused(result, tiny_tflite):
    cache = B.backbone_cache_path(tiny_tflite)
    assert cache.name == "model_int8.backbone.tflite" and cache.parent == tiny_tflite.parent
    bb = result["backbone"]
    assert bb["cache"] == "built" and bb["path"] == str(cache)
    assert (bb["alpha"], bb["minimalistic"], bb["config_source"]) == (ALPHA, False, "inferred from the model")
    assert read_contract(cache, B.BENCH_TAG) == {"img_size": SIZE, "alpha": ALPHA, "minimalistic": False}
    again = B.bench(tiny_tflite, threads=(1,), runs=2, warmup=0)
    assert again["backbone"]["cache"] == "hit" and again["backbone"]["macs"] == bb["macs"]


def test_format_bench_prints_a_table(result):
    text = B.format_bench(result)
    lines = text.splitlines()
    assert lines[0].startswith("bench model_int8.tflite: 32x32 uint8")
    assert lines[1].split()[:3] == ["model", "threads", "load"]
    rows = [ln.split() for ln in lines if ln.startswith(("full ", "backbone "))]
    assert [(r[0], r[1]) for r in rows] == [("full", "1"), ("full", "2"), ("backbone", "1"), ("backbone", "2")]
    assert "head cost: latency full/backbone p50" in text and "head cost: MACs full/backbone" in text
    assert "warning" not in text


def test_bench_without_backbone_needs_no_conversion(tiny_tflite):
    r = B.bench(tiny_tflite, threads=[1], runs=3, warmup=0, backbone=False)
    assert r["backbone"] is None and r["head"] is None and len(r["full"]["timings"]) == 1
    assert "backbone" not in B.format_bench(r).split("\n", 2)[2]


def test_backbone_config_inferred_from_the_weights(tiny_tflite):
    assert B.infer_backbone_config(tiny_tflite) == (ALPHA, False)


def test_alpha_channel_rule_matches_the_model_code():
    from semhinet_tf.model.mobilenet_v3 import make_divisible

    for alpha in (*B.STANDARD_ALPHAS, 0.1, 0.3, 0.6, 0.9, 1.1, 1.7):
        assert B._channels_for_alpha(alpha) == make_divisible(make_divisible(96 * alpha) * 6)


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": (0,)}, "thread counts"),
    ({"threads": ()}, "thread counts"),
    ({"runs": 0}, "runs must be"),
])
def test_bad_arguments_are_one_line_errors(tiny_tflite, kwargs, message):
    with pytest.raises(ValueError, match=message):
        B.bench(tiny_tflite, backbone=False, **kwargs)


def test_a_model_without_contract_is_benched_only_when_allowed(tiny_tflite, capsys):
    from semhinet_tf.artifacts.contract import ModelRefusedError

    bare = tiny_tflite.with_name("bare.tflite")
    with pytest.raises(ModelRefusedError, match="bare.tflite: no contract.*--allow-no-contract"):
        B.bench(bare, threads=[1], runs=1, warmup=0, backbone=False)
    r = B.bench(bare, threads=[1], runs=1, warmup=0, backbone=False, allow_no_contract=True)
    assert r["full"]["timings"][0]["p50_ms"] > 0
    assert "no contract; running with defaults" in capsys.readouterr().err


def test_missing_or_bad_model_file(tmp_path):
    with pytest.raises(ValueError, match="no such model file"):
        B.bench(tmp_path / "nope.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="bad.tflite"):
        B.bench(bad)
