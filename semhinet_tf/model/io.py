"""Saving and loading our Keras models (float and QAT), atomically, from a file or a run directory."""

from __future__ import annotations

from pathlib import Path

from semhinet_tf.artifacts.run import FLOAT_MODEL, QAT_MODEL
from semhinet_tf.model import keras
from semhinet_tf.safe_load import KERAS_ARCHIVE_CONFIG, KERAS_ARCHIVE_WEIGHTS


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
    import zlib

    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        return True  # unknown: load in the quantization scope, which also covers float models
    try:
        with zipfile.ZipFile(path) as z:
            return KERAS_ARCHIVE_CONFIG in z.namelist() and b"QuantizeWrapper" in z.read(KERAS_ARCHIVE_CONFIG)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError):
        return True  # a damaged archive: the safety check (or the load) names the file and what is wrong


def resolve_model_file(path: str | Path) -> Path:
    """A run directory resolves to its QAT model (what gets deployed), else its float model."""
    path = Path(path)
    if path.is_dir():
        for name in (QAT_MODEL, FLOAT_MODEL):
            if (path / name).exists():
                return path / name
        from semhinet_tf.artifacts.contract import ModelRefusedError

        raise ModelRefusedError(f"{path}: not a model: a folder without qat.h5 or float.keras (give a run directory "
                                f"or a model file)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file not found")
    return path


def allowed_classes(objects: dict, quantized: bool) -> set[str]:
    """Names our model files may contain besides the Keras built-ins: our layers and quantize configs
    (by class name and by the name they are registered under, which .h5 files store), MaskedAccuracy."""
    every = dict(objects)
    if quantized:  # only then: quant imports tensorflow-model-optimization
        from semhinet_tf.model.quant import scope_objects

        every.update(scope_objects())
    return set(every) | {keras.utils.get_registered_name(obj) for obj in every.values()}


def _load(path: Path, safe_mode: bool) -> keras.Model:
    if path.suffix == ".keras":
        return _load_keras_archive(path, safe_mode)
    return keras.models.load_model(path, compile=False, safe_mode=safe_mode)


def _load_keras_archive(path: Path, safe_mode: bool) -> keras.Model:
    """What keras.models.load_model does with a .keras archive (the config, then the weights file), with the
    weights read from a real file instead of through the zip.

    Why: tf-keras hands h5py the weights as a member of the zip, and on Python < 3.12 every backward seek in a zip
    member re-reads it from the start: 11 of the 13 s it took to load a 20 MB float.keras went there (measured
    2026-12-07). The unpacked weights go to a temporary file that is removed at once.
    """
    import json
    import shutil
    import tempfile
    import zipfile

    with zipfile.ZipFile(path) as archive:
        if sorted(archive.namelist()) != sorted([KERAS_ARCHIVE_CONFIG, KERAS_ARCHIVE_WEIGHTS, "metadata.json"]):
            return keras.models.load_model(path, compile=False, safe_mode=safe_mode)  # assets or .npz: as Keras does
        config = json.loads(archive.read(KERAS_ARCHIVE_CONFIG))
        config["compile_config"] = None  # compile=False
        from tf_keras.src.saving.serialization_lib import ObjectSharingScope  # as Keras' loader does

        with ObjectSharingScope():
            model = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
        with tempfile.TemporaryDirectory(prefix="semhinet-weights-") as tmp:
            weights = Path(tmp) / "model.weights.h5"  # the suffix load_weights reads as a weights file
            with archive.open(KERAS_ARCHIVE_WEIGHTS) as src, open(weights, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            model.load_weights(weights)
    return model


def load_model(path: str | Path, trust_code: bool = False) -> keras.Model:
    """Load a .keras/.h5 model written by save_model (or a run directory's best model), without compiling.

    Refuses (UnsafeModelError) a file holding a Lambda or any class our models are not built from: Keras
    would run their code while loading, even for .h5 files in its safe mode. `trust_code=True` (or
    `semhinet --trust-model-code`) loads such a file anyway, for models whose code you wrote yourself.
    """
    from semhinet_tf.losses import MaskedAccuracy
    from semhinet_tf.model.layers import CUSTOM_OBJECTS
    from semhinet_tf.safe_load import check_model_file, trust_model_code

    path = resolve_model_file(path)
    objects = {**CUSTOM_OBJECTS, "MaskedAccuracy": MaskedAccuracy}
    trusted = trust_code or trust_model_code()
    quantized = _is_quantized_file(path)
    if not trusted:
        check_model_file(path, allowed_classes(objects, quantized))  # before Keras reads anything of it
    try:
        if quantized:
            from semhinet_tf.model.quant import quant_scope

            with quant_scope(), keras.utils.custom_object_scope(objects):
                return _load(path, safe_mode=not trusted)
        with keras.utils.custom_object_scope(objects):
            return _load(path, safe_mode=not trusted)
    except Exception as exc:  # noqa: BLE001 - h5py, zipfile and Keras deserialization each raise their own types
        # Keras' messages quote the whole model config: keep the first sentence
        reason = " ".join(str(exc).split()).split(". ")[0][:200]
        from semhinet_tf.artifacts.contract import ModelRefusedError

        raise ModelRefusedError(f"{path}: cannot load it as a model of this package ({type(exc).__name__}: "
                                f"{reason})") from exc
