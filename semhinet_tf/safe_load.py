"""Refuse files that would run code when loaded: models, weights, taxonomies (issue 22).

tf-keras' `safe_mode` covers only the .keras format: a legacy .h5 `Lambda` layer's marshalled bytecode
runs as the model is rebuilt. So a model's configuration is read here as plain JSON, without Keras, and
every serialized object in it must be a class our own models are built from; anything else (Lambda,
TFOpLambda, another project's custom layer) is refused before Keras sees the file.

Importing this module never imports TensorFlow: the CLI sets the opt-in here before any command runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

KERAS_ARCHIVE_CONFIG = "config.json"  # the model config inside a .keras zip: Keras' name, not a run-directory file
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # the weights inside a .keras zip (Keras' name)
TRUST_HINT = "load it with --trust-model-code (Python: trust_code=True) only if you wrote it"

# Every class found in the configs of our float and QAT models as save_model writes them (.keras and .h5;
# both backbones, per-channel and per-tensor QAT, every head layout, float heads). Our own layers and
# quantize configs are added by the loader from the objects it registers (semhinet_tf.model.io).
# TFOpLambda and SlicingOpLambda never occur in them, so they are refused with Lambda.
KERAS_CLASSES = frozenset({
    "Functional", "InputLayer", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU", "Add", "Dense",
    "Dropout", "Softmax", "Rescaling", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "GlorotUniform", "Zeros", "Ones",
    # tensorflow-model-optimization's QAT wrappers, their quantize configs and quantizers
    "QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer", "QuantizeAwareActivation", "NoOpActivation",
    "AllValuesQuantizer", "Default8BitQuantizeConfig", "Default8BitConvQuantizeConfig",
    "Default8BitOutputQuantizeConfig", "NoOpQuantizeConfig",
})
CODE_CLASSES = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__", "function"})
MODULE_PREFIXES = ("keras.", "tf_keras.", "tensorflow_model_optimization.", "semhinet_tf.")

_trust_model_code = False


class UnsafeFileError(ValueError):
    """A file that would run code when loaded; the CLI refuses it with exit code 2."""


class ModelFileError(ValueError):
    """A file that is not a readable model (not a zip or HDF5 file, damaged, no model configuration); the CLI
    refuses it with exit code 2, as it does a bad .tflite (artifacts.contract.ModelRefusedError)."""


class UnsafeModelError(UnsafeFileError):
    """A model file whose configuration holds classes that could run code on load."""


def set_trust_model_code(trust: bool) -> None:
    """Process-wide opt-in (`semhinet --trust-model-code`): load model files as Keras would, code and all."""
    global _trust_model_code
    _trust_model_code = bool(trust)


def trust_model_code() -> bool:
    return _trust_model_code


def model_file_format(path: Path) -> str:
    """"keras" or "h5", decided as tf-keras' load_model decides it; anything else (a SavedModel) is refused."""
    import zipfile

    import h5py

    if path.is_file() and path.suffix == ".keras" and zipfile.is_zipfile(path):
        return "keras"
    if path.is_file() and h5py.is_hdf5(path):
        return "h5"
    raise ModelFileError(f"{path}: not a .keras (zip) or .h5 (HDF5) model file")


def read_model_config(path: Path) -> dict:
    """The model's configuration as plain JSON: nothing in it is deserialized."""
    import zipfile

    import h5py

    if model_file_format(path) == "keras":
        import zlib

        try:
            with zipfile.ZipFile(path) as z:
                if KERAS_ARCHIVE_CONFIG not in z.namelist():
                    raise ModelFileError(f"{path}: no config.json in this .keras archive")
                text = z.read(KERAS_ARCHIVE_CONFIG)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:  # a flipped byte: "Bad CRC-32 ..."
            raise ModelFileError(f"{path}: damaged .keras archive ({' '.join(str(exc).split())[:160]})") from None
        config = _parse(path, text)
        config.pop("compile_config", None)  # not read: models are loaded with compile=False
        return config
    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get("model_config")
    except OSError as exc:  # h5py's own words ("truncated file: eof = ...") without the path
        reason = " ".join(str(exc).split())[:160]
        raise ModelFileError(f"{path}: not a readable HDF5 model file ({reason})") from None
    if text is None:
        raise ModelFileError(f"{path}: no model in this HDF5 file (a weights-only file?)")
    return _parse(path, text)


def _parse(path: Path, text: str | bytes) -> dict:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: its model configuration is not valid JSON") from exc
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: its model configuration is not a mapping")
    return config


def serialized_objects(config: dict) -> Iterator[tuple[object, object, object, str]]:
    """(class_name, module, registered_name, enclosing layer name) of every serialized object, nested ones too
    (layers of nested models, a QuantizeWrapper's inner layer, initializers, quantizers)."""
    stack: list[tuple[object, str]] = [(config, "?")]
    while stack:
        node, layer = stack.pop()
        if isinstance(node, dict):
            if "class_name" in node:
                inner = node.get("config")
                name = inner.get("name") if isinstance(inner, dict) else None
                layer = name if isinstance(name, str) else layer
                yield node["class_name"], node.get("module"), node.get("registered_name"), layer
            stack.extend((value, layer) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, layer) for value in node)


def check_model_config(config: dict, allowed: Iterable[str], source: Path) -> None:
    """Raise UnsafeModelError at the first object that is not one of `allowed` or KERAS_CLASSES."""
    names = KERAS_CLASSES | set(allowed)
    for class_name, module, registered, layer in serialized_objects(config):
        if class_name in CODE_CLASSES:
            raise UnsafeModelError(f"{source}: refused: layer {layer!r} ({class_name}) carries Python code that "
                                   f"would run on load; {TRUST_HINT}")
        unknown = class_name not in names or (registered is not None and registered not in names)
        if unknown or (module is not None and not str(module).startswith(MODULE_PREFIXES)):
            what = class_name if isinstance(class_name, str) else repr(class_name)[:80]
            raise UnsafeModelError(f"{source}: refused: not a SEM-HiNet model: layer {layer!r} ({what}) is no class "
                                   f"its models are built from, and an unknown class can run code on load; "
                                   f"{TRUST_HINT}")


def check_model_file(path: str | Path, allowed: Iterable[str]) -> str:
    """Check a .keras/.h5 file before Keras loads it; returns its format ("keras" or "h5")."""
    path = Path(path)
    check_model_config(read_model_config(path), allowed, path)
    return model_file_format(path)
