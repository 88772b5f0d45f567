"""What the install files promise: the board extra has no TensorFlow and decodes with the host's Pillow, test
tools stay out of the runtime, and a host command on the base install says in one line what to install."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST_ONLY_STACK = {"tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert", "tf2onnx", "onnx",
                   "onnxruntime", "scikit-learn", "scipy", "matplotlib"}


def _extras() -> dict[str, dict[str, str]]:
    """extra -> {requirement name: the rest of its line (pin and marker)}; repeated names keep every line."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    out: dict[str, dict[str, str]] = {}
    for extra, text in cfg["options.extras_require"].items():
        reqs: dict[str, str] = {}
        for line in filter(None, (ln.strip() for ln in text.splitlines())):
            name, rest = re.match(r"([A-Za-z0-9_.-]+)(.*)", line).groups()
            reqs[name.lower()] = reqs.get(name.lower(), "") + rest + "\n"
        out[extra] = reqs
    return out


def test_the_board_extra_has_no_tensorflow_and_the_hosts_pillow():
    extras = _extras()
    board, host = extras["board"], extras["host"]
    assert not HOST_ONLY_STACK & set(board), board
    assert "tflite-runtime" in board and "<2" in board["numpy"]
    host_pillow = re.search(r"==([0-9.]+)", host["pillow"]).group(1)
    assert f'=={host_pillow}; python_version >= "3.11"' in board["pillow"].splitlines()


def test_test_tools_are_a_dev_extra_and_requirements_install_host_and_dev():
    extras = _extras()
    assert {"pytest", "ruff"} <= set(extras["dev"]) and not {"pytest", "ruff"} & set(extras["host"])
    assert HOST_ONLY_STACK <= set(extras["host"])  # scipy declared: data/synth.py imports it
    lines = [ln for ln in (REPO / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == ["-e .[host,dev]"]


# A Python whose host-only modules cannot be found, as on the base install.
WITHOUT = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
from semhinet_tf.__main__ import run
run(sys.argv[1:])
"""


@pytest.mark.parametrize("blocked, args", [
    (("click",), ["--help"]),  # the base install has no click: even `semhinet --help` says what to install
    (("tensorflow", "tf_keras"), ["train", "DATA", "--out", "RUN", "--img-size", "32"]),
])
def test_a_host_command_without_the_host_extra_says_what_to_install(tmp_path, blocked, args):
    from PIL import Image

    from semhinet_tf.taxonomy import Taxonomy

    data = tmp_path / "data"
    for leaf in Taxonomy.default().leaves:
        (data / leaf).mkdir(parents=True)
        Image.new("L", (40, 40), 128).save(data / leaf / "a.png")
    args = [str(data) if a == "DATA" else str(tmp_path / "run") if a == "RUN" else a for a in args]
    proc = subprocess.run([sys.executable, "-c", WITHOUT.format(blocked=set(blocked)), *args], cwd=tmp_path,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: this command needs the host install") and "semhinet-tf[host]" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written before it stopped


def test_ctrl_c_while_the_cli_is_still_importing_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in the first second of a command (TensorFlow still importing, before the command's own handler)
    printed a KeyboardInterrupt traceback (found by a walkthrough: `timeout -s INT 0.3 semhinet train ...`)."""
    import semhinet_tf.cli
    from semhinet_tf.__main__ import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(semhinet_tf.cli, "main", interrupted)
    with pytest.raises(SystemExit) as stopped:
        run(["train", "DATA"])
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "interrupted: nothing was started; run the command again\n"
