"""Saving and loading our Keras models (float and QAT), atomically, from a file or a run directory."""

from __future__ import annotations

from pathlib import Path

from semhinet_tf.model import keras


def save_model(model: keras.Model, path: str | Path, quantized: bool = False) -> Path:
    """Write to a temporary file first, then rename: an interrupted save never leaves a corrupt model."""
    from semhinet_tf.artifacts.files import atomic_save

    if not quantized:
        return atomic_save(path, model.save)
    import warnings

    from semhinet_tf.model.quant import quant_scope

    with quant_scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 is legacy": chosen on purpose for QAT models
        return atomic_save(path, model.save)


def _is_quantized_file(path: Path) -> bool:
    import zipfile

    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        return True  # unknown: load in the quantization scope, which also covers float models
    with zipfile.ZipFile(path) as z:
        return b"QuantizeWrapper" in z.read("config.json")


def resolve_model_file(path: str | Path) -> Path:
    """A run directory resolves to its QAT model (what gets deployed), else its float model."""
    path = Path(path)
    if path.is_dir():
        for name in ("qat.h5", "float.keras"):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"{path}: no qat.h5 or float.keras in this run directory")
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file not found")
    return path


def load_model(path: str | Path) -> keras.Model:
    """Load a .keras model written by save_model (or a run directory's best model), without compiling."""
    from semhinet_tf.losses import MaskedAccuracy
    from semhinet_tf.model.layers import CUSTOM_OBJECTS

    path = resolve_model_file(path)
    objects = {**CUSTOM_OBJECTS, "MaskedAccuracy": MaskedAccuracy}
    try:
        if _is_quantized_file(path):
            from semhinet_tf.model.quant import quant_scope

            with quant_scope(), keras.utils.custom_object_scope(objects):
                return keras.models.load_model(path, compile=False)
        with keras.utils.custom_object_scope(objects):
            return keras.models.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - h5py, zipfile and Keras deserialization each raise their own types
        # Keras' messages quote the whole model config: keep the first sentence
        reason = " ".join(str(exc).split()).split(". ")[0][:200]
        raise ValueError(f"{path}: cannot load it as a model of this package ({type(exc).__name__}: {reason})") from exc
