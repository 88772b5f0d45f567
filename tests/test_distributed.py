"""Two-worker training on loopback addresses with MultiWorkerMirroredStrategy (TF_CONFIG), as across machines."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest import as_user_env

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_on_loopback_train_together(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    subprocess.run([sys.executable, "-m", "semhinet_tf", "synth", str(data), "--per-class", "4", "--size", "40",
                    "--seed", "5", "--workers", "1", "--labels", "cause"],  # the subject: data, not labels
                   check=True, capture_output=True)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    cmd = [sys.executable, "-m", "semhinet_tf", "train", str(data), "--out", str(run), "--img-size", "32",
           "--epochs", "2", "--qat-epochs", "0", "--batch-size", "8", "--steps-per-epoch", "3", "--weights",
           "none", "--seed", "2", "--val-split", "0.25", "--strategy", "multiworker"]
    procs = []
    for index in range(2):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**as_user_env(), "TF_CONFIG": json.dumps(task), "SEMHINET_QUIET": "1",  # traced, as users train
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two workers did not finish within 400 s")
    for index, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"worker {index} failed:\n{out[-3000:]}"
    # Both workers ran both epochs in lockstep; only the chief (worker 0) wrote the run directory.
    history = (run / "history.csv").read_text().strip().splitlines()
    assert len(history) == 1 + 2, history
    assert (run / "float.keras").exists()
    assert json.loads((run / "train_result.json").read_text())["float_seconds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"], "a worker's scratch directory was left"
    for out in outputs:
        assert "[float] epoch 2/2" in out
