"""The record of a model's training frames in its contract (artifacts.trained_frames): never misses a training
frame, rarely takes a new one for one, refused when malformed; eval of a copy without it says it cannot tell."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from semhinet_tf.artifacts import trained_frames as tf_record
from semhinet_tf.artifacts.contract import ContractError, validate_contract


def _digests(n: int, seed: int) -> list[str]:
    return [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]


@pytest.mark.parametrize("n", [1, 960, 30_000])
def test_every_training_frame_is_found_and_new_ones_rarely(n):
    trained, new = _digests(n, 0), _digests(20_000, 1)
    record = tf_record.build(trained)
    assert record["count"] == n and len(json.dumps(record)) <= 4 * tf_record.MAX_BYTES // 3 + 400
    assert all(tf_record.contains(record, d) for d in trained)
    false = sum(tf_record.contains(record, d) for d in new) / len(new)
    assert false <= max(5 * record["false_match"], 5e-4), (false, record["false_match"])
    assert tf_record.check(record) is None


def test_a_malformed_record_is_refused_by_the_contract(tiny_run):
    from semhinet_tf.export.tflite_meta import read_contract

    raw = read_contract(tiny_run.tflite)
    good = tf_record.build(_digests(10, 0))
    assert validate_contract({**raw, "trained_frames": good}, "m").trained_frames == good
    for bad in ({**good, "bits": good["bits"] + 8}, {**good, "filter": "not base64!"}, {**good, "method": "x"},
                {k: v for k, v in good.items() if k != "hashes"}, [1, 2]):
        with pytest.raises(ContractError, match="trained_frames"):
            validate_contract({**raw, "trained_frames": bad}, "m")


def test_a_copy_without_the_record_says_it_cannot_tell(tiny_run, tmp_path):
    """A model converted before the record (or from a run without its split) copied out of its run: eval scores
    everything and warns that nothing tells its training frames apart."""
    from semhinet_tf.cli import main
    from semhinet_tf.export.tflite_meta import read_contract

    assert "trained_frames" not in read_contract(tiny_run.tflite)
    deployed = tmp_path / "deploy" / "model_int8.tflite"
    deployed.parent.mkdir()
    deployed.write_bytes(tiny_run.tflite.read_bytes())
    data = tmp_path / "data"
    for leaf, frame in zip(("normal", "bogus", "bridge", "open"), tiny_run.frames(4, 5), strict=True):
        (data / leaf).mkdir(parents=True)
        Image.fromarray(frame).save(data / leaf / "f.png")
    result = CliRunner().invoke(main, ["eval", str(deployed), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "(all split)" in result.output and f"warning: no run directory found for {deployed}" in result.output
