"""`semhinet` and `python -m semhinet_tf`: the click CLI.

The base install is the board's (numpy, Pillow); on it a host command ends with one line naming the extra
to install instead of an ImportError traceback.
"""

from __future__ import annotations

import sys

# Top-level modules that only the host extra installs: one of them missing means the extra is missing, not a bug.
HOST_ONLY = frozenset({"click", "tensorflow", "tf_keras", "tensorflow_model_optimization", "ai_edge_litert",
                       "tf2onnx", "onnx", "onnxruntime", "sklearn", "scipy", "tifffile", "yaml", "matplotlib",
                       "tqdm", "flask", "werkzeug", "cleanlab", "pandas"})
HOST_HINT = ("pip install 'semhinet-tf[host]' (from a checkout: pip install -r requirements.txt -e .); "
             "the board needs only `python -m semhinet_tf.board`")


def run(argv: list[str] | None = None) -> None:
    """Run the CLI; a host module missing from this install exits 2 with one line saying what to install, and a
    Ctrl-C before a command started exits 130 in one line (after that, the command's own handler says more)."""
    try:
        from semhinet_tf.cli import main

        main(args=argv, prog_name="semhinet")
    except KeyboardInterrupt:  # Ctrl-C before the command's own handler is in place (while TensorFlow imports)
        print("interrupted: nothing was started; run the command again", file=sys.stderr)
        sys.exit(130)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in HOST_ONLY:
            raise
        print(f"error: this command needs the host install ({missing} is not installed): {HOST_HINT}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
