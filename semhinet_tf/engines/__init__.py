"""One way to run any model: Keras, TFLite and ONNX engines behind the small interface of `base.Engine`.

`load_model(path)` picks the engine from the path (a run directory, .keras, .h5, .tflite or .onnx); eval,
compare, predict, bench and the board all run models through an Engine, so the same frames, views, review
thresholds and unreadable-file rows reach every format. Importing this package imports neither TensorFlow
nor onnxruntime: each engine imports its runtime when it is built (the board's TFLite engine has no TensorFlow).
"""

from __future__ import annotations

from pathlib import Path

from semhinet_tf.engines.base import Engine, find_run_dir, iter_image_paths

__all__ = ["FORMATS", "Engine", "find_run_dir", "iter_image_paths", "load_model", "model_format"]

FORMATS = ("keras", "tflite", "onnx")


def model_format(path: str | Path) -> str:
    """"keras" for a run directory, .keras or .h5; "tflite"; "onnx"; anything else is refused as a bad model
    (ModelRefusedError, a ValueError: exit 2, as the README's exit codes say)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model file or run directory")
    if p.is_dir() or p.suffix in (".keras", ".h5"):
        return "keras"
    if p.suffix == ".tflite":
        return "tflite"
    if p.suffix == ".onnx":
        return "onnx"
    from semhinet_tf.artifacts.contract import ModelRefusedError

    raise ModelRefusedError(f"{p}: unknown model format (expected a run directory, .keras, .h5, .tflite or .onnx)")


def _readable_keras_file(path: Path) -> None:
    """Read the model configuration of a .keras/.h5 file (or a run directory's best model) as plain JSON, without
    TensorFlow: ModelRefusedError naming the file when it is not a readable model (the full safety check of its
    classes comes with the load)."""
    from semhinet_tf.artifacts.run import FLOAT_MODEL, QAT_MODEL
    from semhinet_tf.safe_load import read_model_config

    if path.is_dir():
        path = next((path / name for name in (QAT_MODEL, FLOAT_MODEL) if (path / name).exists()), None)
        if path is None:
            return  # the loader names the folder and what it lacks
    read_model_config(path)


def load_model(path: str | Path, *, threads: int | None = None, views: int = 1,
               review_threshold: float | None = None, allow_no_contract: bool = False, trust_code: bool = False,
               progress: bool = True, warn=None) -> Engine:
    """The engine for `path`: KerasEngine, BoardModel (TFLite) or OnnxEngine.

    `views`: test-time views each image is scored on (and the review threshold chosen for them);
    `review_threshold` overrides the model's; `threads`: CPU threads of the TFLite / ONNX runtime;
    `allow_no_contract` runs a .tflite without a contract on the defaults; `trust_code` loads a Keras file
    holding layer code this package does not know (never for a file you did not write); `progress` shows a
    bar on stderr for long inference."""
    kind = model_format(path)
    if kind == "keras":
        _readable_keras_file(Path(path))  # a damaged or foreign file is refused before TensorFlow loads (~10 s)
        from semhinet_tf.engines.keras import KerasEngine

        return KerasEngine(path, review_threshold=review_threshold, views=views, trust_code=trust_code,
                           progress=progress, warn=warn)
    if kind == "tflite":
        from semhinet_tf.board.runtime import BoardModel

        return BoardModel(path, threads=threads, review_threshold=review_threshold, views=views, warn=warn,
                          allow_no_contract=allow_no_contract, progress=progress)
    from semhinet_tf.engines.onnx import OnnxEngine

    return OnnxEngine(path, threads=threads, review_threshold=review_threshold, views=views, progress=progress,
                      warn=warn)
