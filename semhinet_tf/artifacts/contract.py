"""The model contract: the one place that builds, validates and reads it (numpy + stdlib only; the board uses it).

The contract travels inside the .tflite (metadata `semhinet_contract`) and the .onnx (metadata property of the
same name) and says everything a consumer needs: taxonomy, input, preprocessing, test-time views, review
thresholds, quantization, and a digest of the file. Every consumer (board, predict, eval, compare, bench, the ONNX
runtime) reads it through `validate_contract`, so a malformed contract is refused at load, field by field, with
one line naming the file and the field, never a TypeError deep inside inference.

Digest of a .tflite: sha256 of the whole file with the 64 hex characters of the digest value replaced by "0"s.
`seal_tflite` fills the placeholder that `build_contract` leaves, in place (same length, same layout);
`verify_tflite` zeroes the value again, hashes and compares, wherever the flatbuffer put the contract.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily at run time: the CLI imports this module for ModelRefusedError alone
    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.taxonomy import Taxonomy

CONTRACT_FORMAT = "semhinet-contract/1"
_FORMAT_PREFIX = "semhinet-contract/"
DIGEST_ALGORITHM = "sha256"
DIGEST_PLACEHOLDER = "0" * 64
DEFAULT_REVIEW_THRESHOLD = 0.5
VIEW_COUNTS = ("1", "2", "4", "8")
INPUT_DTYPES = ("uint8", "int8", "float32")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEXT_FIELDS = ("version", "run_id", "created", "leaf_probability")
KNOWN_FIELDS = frozenset({"format", "taxonomy", "input", "outputs", "preprocess", "views", "review_threshold",
                          "review_threshold_by_views", "quantization", "digest", "ready_classes", "ood",
                          "trained_frames", *_TEXT_FIELDS})
_OOD_KEYS = {"output", "threshold", "false_alarm", "leaves", "dims", "frames", "reference_frames", "method"}
# Image-size limits are a host option, not the model's to decide: accepted in old contracts and dropped.
_IGNORED_PREPROCESS = ("max_pixels",)


class ModelRefusedError(ValueError):
    """A model file that must not be run: damaged, modified, without a contract, or with a malformed one.
    The CLI and the board exit 2 (bad model) on it."""


class ContractError(ModelRefusedError):
    """A contract field of the wrong type, out of range, or unknown; str() is one line naming file and field."""

    def __init__(self, where: str, name: str, problem: str):
        super().__init__(f"{where}: contract field '{name}' {problem}")
        self.field = name


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _probability(where: str, name: str, value: Any) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ContractError(where, name, f"must be a number in 0..1, got {_short(value)}")
    return float(value)


def _text(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ContractError(where, name, f"must be a string, got {_short(value)}")
    return value


# ---------------------------------------------------------------- field by field
def _check_format(where: str, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith(_FORMAT_PREFIX):
        raise ContractError(where, "format", f"must be '{CONTRACT_FORMAT}', got {_short(value)} "
                                             f"(not a semhinet model contract)")
    if value != CONTRACT_FORMAT:
        raise ContractError(where, "format", f"is '{value}', written by a newer semhinet; this one reads "
                                             f"'{CONTRACT_FORMAT}' (update semhinet to run this model)")


def _check_taxonomy(where: str, value: Any) -> Taxonomy:
    from semhinet_tf.taxonomy import Taxonomy

    if not isinstance(value, Mapping):
        raise ContractError(where, "taxonomy", f"must be an object with 'heads', got {_short(value)}")
    try:
        return Taxonomy.from_spec(value)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ContractError(where, "taxonomy", f"is not a valid taxonomy ({_one_line(exc)})") from None


def _check_preprocess(where: str, value: Any) -> dict:
    from semhinet_tf.data.decode import Preprocess

    if not isinstance(value, Mapping):
        raise ContractError(where, "preprocess", f"must be an object, got {_short(value)}")
    pre = {k: v for k, v in value.items() if k not in _IGNORED_PREPROCESS}
    try:
        Preprocess.from_dict({"size": 160, **pre})
    except (ValueError, TypeError) as exc:
        raise ContractError(where, "preprocess", f"is not valid ({_one_line(exc)})") from None
    return pre


def _check_views(where: str, value: Any) -> tuple[str, ...]:
    from semhinet_tf.data.views import VIEW_TABLE

    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ContractError(where, "views", f"must be a non-empty list of view names, got {_short(value)}")
    unknown = [v for v in value if v not in VIEW_TABLE]
    if unknown:
        raise ContractError(where, "views", f"names unknown views {_short(unknown)} "
                                            f"(known: {', '.join(VIEW_TABLE)})")
    if value[0] != "identity" or len(set(value)) != len(value):
        raise ContractError(where, "views", f"must start with 'identity' and name each view once, "
                                            f"got {_short(value)}")
    return tuple(value)


def _check_by_views(where: str, value: Any) -> dict[str, float]:
    name = "review_threshold_by_views"
    if not isinstance(value, Mapping):
        raise ContractError(where, name, f"must be an object {{\"2\": t, \"4\": t, \"8\": t}}, got {_short(value)}")
    out = {}
    for count, threshold in value.items():
        if count not in VIEW_COUNTS:
            raise ContractError(where, name, f"has a key {_short(count)}; keys are view counts "
                                             f"{', '.join(VIEW_COUNTS)}")
        out[count] = _probability(where, f"{name}.{count}", threshold)
    return out


def _check_input(where: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise ContractError(where, "input", f"must be an object, got {_short(value)}")
    shape = value.get("shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 4
                              or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise ContractError(where, "input.shape", f"must be a list of 4 integers, got {_short(shape)}")
    dtype = value.get("dtype")
    if dtype is not None and dtype not in INPUT_DTYPES:
        raise ContractError(where, "input.dtype", f"must be one of {', '.join(INPUT_DTYPES)}, got {_short(dtype)}")
    for key in ("name", "pixels"):
        if key in value:
            _text(where, f"input.{key}", value[key])
    return dict(value)


def _check_outputs(where: str, value: Any, taxonomy) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ContractError(where, "outputs", f"must be a list of output names, got {_short(value)}")
    if taxonomy is not None and tuple(value) != taxonomy.head_names:
        raise ContractError(where, "outputs", f"is {_short(value)}, but the taxonomy's heads are "
                                              f"{_short(list(taxonomy.head_names))}")
    return tuple(value)


def _check_ready(where: str, value: Any, taxonomy) -> tuple[str, ...]:
    """The leaves ready for automatic classification: a list of distinct leaf names of the model's taxonomy."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        raise ContractError(where, "ready_classes", f"must be a list of distinct leaf names, got {_short(value)}")
    if taxonomy is None:
        from semhinet_tf.taxonomy import Taxonomy

        taxonomy = Taxonomy.default()
    unknown = [v for v in value if v not in taxonomy.leaves]
    if unknown:
        raise ContractError(where, "ready_classes", f"names {_short(unknown)}, not leaves of the taxonomy "
                                                    f"({', '.join(taxonomy.leaves)})")
    return tuple(value)


def _check_trained_frames(where: str, value: Any) -> dict:
    from semhinet_tf.artifacts.trained_frames import check

    wrong = check(value)
    if wrong:
        raise ContractError(where, "trained_frames", wrong)
    return value


def _check_ood(where: str, value: Any, taxonomy) -> dict:
    """The unfamiliar-frame score: which output holds it, the threshold above which a frame goes to review, and
    the leaves it was fitted on (a verdict of another leaf, such as bogus, is never sent to review by it)."""
    if not isinstance(value, Mapping) or not {"output", "threshold", "leaves"} <= set(value):
        raise ContractError(where, "ood", f"must be an object with output, threshold and leaves, got {_short(value)}")
    unknown = sorted(set(value) - _OOD_KEYS)
    if unknown:
        raise ContractError(where, f"ood.{unknown[0]}", f"is unknown (known: {', '.join(sorted(_OOD_KEYS))})")
    _text(where, "ood.output", value["output"])
    if not _is_number(value["threshold"]) or not math.isfinite(value["threshold"]) or value["threshold"] < 0:
        raise ContractError(where, "ood.threshold", f"must be a finite number >= 0, got {_short(value['threshold'])}")
    if "false_alarm" in value:
        _probability(where, "ood.false_alarm", value["false_alarm"])
    leaves = value["leaves"]
    known = (taxonomy if taxonomy is not None else _default_taxonomy()).leaves
    if not isinstance(leaves, list) or not leaves or not all(isinstance(v, str) and v in known for v in leaves):
        raise ContractError(where, "ood.leaves", f"must be a non-empty list of leaves of the taxonomy "
                                                 f"({', '.join(known)}), got {_short(leaves)}")
    return dict(value)


def _default_taxonomy():
    from semhinet_tf.taxonomy import Taxonomy

    return Taxonomy.default()


def _check_quantization(where: str, value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ContractError(where, "quantization", f"must be an object or null, got {_short(value)}")
    for key in ("source", "granularity", "io"):
        if key in value:
            _text(where, f"quantization.{key}", value[key])
    if "float_heads" in value and not isinstance(value["float_heads"], bool):
        raise ContractError(where, "quantization.float_heads", f"must be true or false, got "
                                                               f"{_short(value['float_heads'])}")
    return dict(value)


def _check_digest(where: str, value: Any) -> str:
    if not isinstance(value, Mapping) or set(value) != {"algorithm", "value"}:
        raise ContractError(where, "digest", f"must be {{\"algorithm\": \"sha256\", \"value\": <64 hex>}}, "
                                             f"got {_short(value)}")
    if value.get("algorithm") != DIGEST_ALGORITHM:
        raise ContractError(where, "digest.algorithm", f"must be '{DIGEST_ALGORITHM}', "
                                                       f"got {_short(value.get('algorithm'))}")
    hexdigest = value.get("value")
    if not isinstance(hexdigest, str) or not _HEX64.fullmatch(hexdigest):
        raise ContractError(where, "digest.value", f"must be 64 lowercase hex characters, got {_short(hexdigest)}")
    return hexdigest


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


# ---------------------------------------------------------------- the validated contract
@dataclass(frozen=True)
class Contract:
    """A validated contract. `views` is None for a model converted before views were recorded; `digest` None for
    one converted before digests; `ready_classes` None for one converted before class readiness (every class
    ready); `present` False for the defaults a contract-less model runs with."""

    taxonomy_spec: dict | None = None
    preprocess: dict = field(default_factory=dict)
    views: tuple[str, ...] | None = None
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    review_threshold_by_views: dict[str, float] = field(default_factory=dict)
    input: dict | None = None
    outputs: tuple[str, ...] | None = None
    quantization: dict | None = None
    digest: str | None = None
    ready_classes: tuple[str, ...] | None = None
    ood: dict | None = None
    trained_frames: dict | None = None  # artifacts.trained_frames: which files the model was trained on
    present: bool = True
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def taxonomy(self) -> Taxonomy:
        """The model's Taxonomy (the default one when the contract names none)."""
        from semhinet_tf.taxonomy import Taxonomy

        return Taxonomy.from_spec(self.taxonomy_spec) if self.taxonomy_spec is not None else Taxonomy.default()

    def preprocessing(self, size: int) -> Preprocess:
        """The Preprocess for frames of `size` px (the model file's input decides the size, never the contract)."""
        from semhinet_tf.data.decode import Preprocess

        return Preprocess.from_dict({**self.preprocess, "size": int(size)})

    def threshold(self, views: int = 1) -> float:
        """The review threshold chosen for this many test-time views, else the one-view one."""
        return self.review_threshold_by_views.get(str(views), self.review_threshold)

    def view_names(self) -> list[str]:
        return list(self.views or ["identity"])

    def is_unfamiliar(self, leaf: str, score: float | None) -> bool:
        """Does the unfamiliar-frame score send this verdict to review? (never without a score in the contract,
        nor for a verdict of a leaf the score was not fitted on, such as bogus)"""
        return self.ood is not None and score is not None and leaf in self.ood["leaves"] and \
            score > float(self.ood["threshold"])

    def is_ready(self, leaf: str) -> bool:
        """May a verdict of this class stand without a person? (every class, for a contract without the list)"""
        return self.ready_classes is None or leaf in self.ready_classes


def validate_contract(d: Any, where: str) -> Contract:
    """Check a contract read from `where` field by field; a ContractError (one line naming the field) otherwise.

    Unknown top-level fields are refused: under this format they can only be a typo or a hand edit (a misspelt
    'review_threshold' would otherwise silently fall back to 0.5); a newer format is refused by its name."""
    if not isinstance(d, Mapping):
        raise ContractError(where, "(contract)", f"must be a JSON object, got {_short(d)}")
    _check_format(where, d.get("format"))
    unknown = sorted(set(d) - KNOWN_FIELDS)
    if unknown:
        raise ContractError(where, unknown[0], f"is unknown to '{CONTRACT_FORMAT}' (known: "
                                               f"{', '.join(sorted(KNOWN_FIELDS))})")
    for name in _TEXT_FIELDS:
        if name in d:
            _text(where, name, d[name])
    taxonomy = _check_taxonomy(where, d["taxonomy"]) if "taxonomy" in d else None
    return Contract(
        taxonomy_spec=dict(d["taxonomy"]) if taxonomy is not None else None,
        preprocess=_check_preprocess(where, d["preprocess"]) if "preprocess" in d else {},
        views=_check_views(where, d["views"]) if "views" in d else None,
        review_threshold=_probability(where, "review_threshold", d.get("review_threshold", DEFAULT_REVIEW_THRESHOLD)),
        review_threshold_by_views=_check_by_views(where, d.get("review_threshold_by_views") or {}),
        input=_check_input(where, d["input"]) if "input" in d else None,
        outputs=_check_outputs(where, d["outputs"], taxonomy) if "outputs" in d else None,
        quantization=_check_quantization(where, d.get("quantization")),
        digest=_check_digest(where, d["digest"]) if "digest" in d else None,
        ready_classes=_check_ready(where, d["ready_classes"], taxonomy) if "ready_classes" in d else None,
        ood=_check_ood(where, d["ood"], taxonomy) if d.get("ood") is not None else None,
        trained_frames=_check_trained_frames(where, d["trained_frames"]) if "trained_frames" in d else None,
        raw=dict(d),
    )


def default_contract() -> Contract:
    """What a model without a contract runs with (only when the user allows it)."""
    return Contract(present=False)


def describe_defaults(contract: Contract) -> str:
    """One line saying what a contract-less model runs with, for the user who allowed it."""
    tax = contract.taxonomy()
    return (f"taxonomy '{tax.name}' (heads {', '.join(tax.head_names)}), preprocessing "
            f"{json.dumps(contract.preprocessing(160).to_dict() | {'size': 'the model input'})}, "
            f"review threshold {contract.review_threshold:g}, one view")


def threshold_for_views(contract: Contract | Mapping, views: int = 1, where: str = "contract") -> float:
    """The review threshold for `views` from a Contract or a contract dict (only its threshold fields checked)."""
    if isinstance(contract, Contract):
        return contract.threshold(views)
    one = _probability(where, "review_threshold", contract.get("review_threshold", DEFAULT_REVIEW_THRESHOLD))
    return _check_by_views(where, contract.get("review_threshold_by_views") or {}).get(str(views), one)


# ---------------------------------------------------------------- building
def build_contract(*, run_id: str, taxonomy_spec: dict, img_size: int, io_type: str, preprocess: Mapping,
                   views: Sequence[str], review_threshold: float, review_threshold_by_views: Mapping[str, float],
                   quantization: dict | None, version: str, batch: int = 1, digest: bool = True,
                   ready_classes: Sequence[str] | None = None, ood: Mapping | None = None,
                   trained_frames: Mapping | None = None) -> dict:
    """The contract `semhinet convert` embeds (and export-onnx carries). With `digest`, the digest value is the
    placeholder `seal_tflite` fills once the contract sits in the file. `ready_classes`: the leaves whose verdicts
    may stand without review (None: not judged, every class). `trained_frames`: the record of the training
    frames (artifacts.trained_frames), so `eval` of a copy of the model outside its run still leaves them out.
    Validated before it is returned."""
    contract = {
        "format": CONTRACT_FORMAT,
        "version": version,
        "run_id": run_id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "taxonomy": taxonomy_spec,
        "input": {"name": "image", "shape": [batch, img_size, img_size, 1], "dtype": io_type,
                  "pixels": "raw grey 0..255 (the model rescales inside)"},
        "outputs": [h["name"] for h in taxonomy_spec["heads"]],
        "preprocess": {k: v for k, v in preprocess.items() if k not in _IGNORED_PREPROCESS},
        "views": list(views),
        "review_threshold": float(review_threshold),
        "review_threshold_by_views": {str(k): float(v) for k, v in review_threshold_by_views.items()},
        "quantization": quantization,
        "leaf_probability": "P(leaf) = product of head probabilities along the leaf's path",
    }
    if ready_classes is not None:
        contract["ready_classes"] = list(ready_classes)
    if ood is not None:
        contract["ood"] = dict(ood)
    if trained_frames is not None:
        contract["trained_frames"] = dict(trained_frames)
    if digest:
        contract["digest"] = {"algorithm": DIGEST_ALGORITHM, "value": DIGEST_PLACEHOLDER}
    validate_contract(json.loads(json.dumps(contract)), "new contract")
    return contract


# ---------------------------------------------------------------- digests
def digest_with_zeroed(data: bytes, start: int) -> str:
    """sha256 hex of `data` with the 64 bytes at `start` (the digest value itself) read as '0's."""
    h = hashlib.sha256()
    h.update(memoryview(data)[:start])
    h.update(DIGEST_PLACEHOLDER.encode())
    h.update(memoryview(data)[start + 64:])
    return h.hexdigest()


def _placeholder_position(data: bytes) -> int:
    from semhinet_tf.export.tflite_meta import CONTRACT_NAME, read_model

    model = read_model(data)
    index = model.metadata.get(CONTRACT_NAME)
    if index is None:
        raise ValueError("the model has no contract to seal")
    start, size = model.buffer_spans[index]
    marker = f'"digest":{{"algorithm":"{DIGEST_ALGORITHM}","value":"{DIGEST_PLACEHOLDER}"'.encode()
    at = data.find(marker, start, start + size)
    if at < 0:
        raise ValueError("the model's contract has no digest placeholder")
    return at + len(marker) - 65


def seal_tflite(data: bytes) -> bytes:
    """The .tflite with its contract's digest placeholder replaced by the file's digest (same length and layout)."""
    at = _placeholder_position(data)
    value = digest_with_zeroed(data, at)
    return data[:at] + value.encode() + data[at + 64:]


def verify_tflite(data: bytes, contract: Contract, where: str, warn: Callable[[str], None] | None = None) -> None:
    """Refuse (ModelRefusedError) a file whose bytes do not hash to its contract's digest; warn for a contract that
    predates digests (such models are in use on boards, so they still load)."""
    if contract.digest is None:
        if warn is not None:
            warn(f"warning: {where}: no weights digest (converted before models carried one; convert again to let "
                 f"the board detect a damaged file)")
        return
    value = contract.digest.encode()
    at = data.find(value)
    if at < 0 or data.find(value, at + 1) >= 0 or digest_with_zeroed(data, at) != contract.digest:
        raise ModelRefusedError(f"{where}: damaged or modified: its weights digest does not match its contract "
                                f"({DIGEST_ALGORITHM} {contract.digest[:12]}...); copy the file again or convert "
                                f"again")


def embed_sealed(tflite_bytes: bytes, contract: dict) -> bytes:
    """Host only (TensorFlow's schema): the model with `contract` embedded and, when it has a digest, sealed."""
    from semhinet_tf.export.tflite_meta import embed_contract

    if "digest" not in contract:
        return embed_contract(tflite_bytes, contract)
    placeholder = {**contract, "digest": {"algorithm": DIGEST_ALGORITHM, "value": DIGEST_PLACEHOLDER}}
    return seal_tflite(embed_contract(tflite_bytes, placeholder))


def load_tflite_contract(data: bytes, where: str | Path, *, allow_missing: bool = False,
                         warn: Callable[[str], None] | None = None) -> Contract:
    """Read, validate and verify the contract of .tflite bytes. No contract: ModelRefusedError unless `allow_missing`,
    then the defaults (said through `warn`)."""
    from semhinet_tf.export.tflite_meta import read_contract

    where = str(where)
    try:
        raw = read_contract(data)
    except ValueError as exc:
        raise ModelRefusedError(f"{where}: {str(exc).removeprefix('<bytes>: ')}") from None
    if raw is None:
        if not allow_missing:
            raise ModelRefusedError(f"{where}: no contract in this .tflite (not written by `semhinet convert`, or "
                               f"damaged); pass --allow-no-contract to run it with default settings")
        contract = default_contract()
        if warn is not None:
            warn(f"warning: {where}: no contract; running with defaults: {describe_defaults(contract)}")
        return contract
    contract = validate_contract(raw, where)
    verify_tflite(data, contract, where, warn)
    return contract
