"""Which frames a model was trained on, carried in its contract: a Bloom filter of their sha256 digests.

Why: "the file alone is the deployment", so a .tflite copied out of its run directory no longer finds the run's
split, and `eval` of it on the data folder it was trained on scored its own training frames as if they were new.
The filter answers "was this file a training frame?" without the run: never "no" for a training frame, and "yes"
for another frame with a small probability (`false_match`, recorded with it; 1e-4 up to ~27,000 frames, growing
past that because the filter is capped at 64 KiB so that it stays a small part of a 2 MB model).

Positions come from the digest itself (two 64-bit halves, double hashing), so the filter needs no hash library
beyond hashlib and reads the same on every machine. stdlib + base64 only (the board imports artifacts/).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping
from typing import Any

FALSE_MATCH = 1e-4  # the design rate while the cap allows it
MAX_BYTES = 64 * 1024
MIN_BYTES = 64
KEYS = {"method", "count", "bits", "hashes", "false_match", "filter"}
METHOD = "bloom-sha256"


def build(digests: Iterable[str]) -> dict[str, Any]:
    """The contract's `trained_frames` block for these sha256 hex digests (duplicates counted once)."""
    unique = sorted({d.lower() for d in digests})
    n = max(1, len(unique))
    want_bits = math.ceil(-n * math.log(FALSE_MATCH) / math.log(2) ** 2)
    n_bytes = min(MAX_BYTES, max(MIN_BYTES, math.ceil(want_bits / 8)))
    bits = n_bytes * 8
    hashes = max(1, min(16, round(bits / n * math.log(2))))
    table = bytearray(n_bytes)
    for digest in unique:
        for pos in _positions(digest, bits, hashes):
            table[pos >> 3] |= 1 << (pos & 7)
    false_match = (1 - math.exp(-hashes * len(unique) / bits)) ** hashes
    return {"method": METHOD, "count": len(unique), "bits": bits, "hashes": hashes,
            "false_match": float(f"{false_match:.3g}"), "filter": base64.b64encode(bytes(table)).decode("ascii")}


def contains(record: Mapping[str, Any], digest: str) -> bool:
    """Whether the file with this sha256 may be one of the record's training frames (see the module's note)."""
    table = base64.b64decode(record["filter"])
    return all(table[pos >> 3] >> (pos & 7) & 1 for pos in _positions(digest.lower(), record["bits"],
                                                                        record["hashes"]))


def check(record: Any) -> str | None:
    """What is wrong with a `trained_frames` block (None when it is sound): for the contract's validation."""
    if not isinstance(record, dict) or set(record) != KEYS:
        return f"must be an object with {', '.join(sorted(KEYS))}"
    if record["method"] != METHOD:
        return f"method must be {METHOD!r}"
    for key in ("count", "bits", "hashes"):
        if isinstance(record[key], bool) or not isinstance(record[key], int) or record[key] < 1:
            return f"{key} must be a positive integer"
    if not isinstance(record["filter"], str):
        return "filter must be base64 text"
    try:
        table = base64.b64decode(record["filter"], validate=True)
    except ValueError:
        return "filter is not base64"
    if len(table) * 8 != record["bits"]:
        return f"filter holds {len(table) * 8} bits, not {record['bits']}"
    return None


def _positions(digest: str, bits: int, hashes: int) -> list[int]:
    first, second = int(digest[:16], 16), int(digest[16:32], 16) | 1
    return [(first + i * second) % bits for i in range(hashes)]
