"""The class hierarchy as data: heads, leaves, label vectors, loss masks and leaf probabilities.

Everything that knows which classes exist (labels, losses, metrics, decoding, the board runtime)
asks this module, so a fab can swap in its own hierarchy from a YAML/JSON file. numpy only: the
board runtime imports it.

A taxonomy is a tree of *heads*. Each head is a softmax over its classes and, except the root, is
*gated* by one class of a parent head (it only applies to images of that parent class). A class that
gates no head is a *leaf*: the eight folder names of the default taxonomy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semhinet_tf.safe_load import UnsafeFileError

# The seed's hierarchy. `parent` is "head.class" of the head that gates this one.
DEFAULT_SPEC: dict[str, Any] = {
    "name": "sem-default",
    "heads": [
        {"name": "h1", "role": "gatekeeper", "classes": ["bogus", "normal", "defect"]},
        {"name": "h2", "role": "router", "parent": "h1.defect", "classes": ["line", "area", "edge"]},
        {"name": "h3", "role": "specialist", "parent": "h2.line", "classes": ["bridge", "open"]},
        {"name": "h4", "role": "specialist", "parent": "h2.area", "classes": ["cmp", "crack"]},
        {"name": "h5", "role": "specialist", "parent": "h2.edge", "classes": ["ler", "inc_etch"]},
    ],
    # Folder spellings seen in the wild, beyond the case/separator-insensitive match of the name.
    "aliases": {
        "inc_etch": ["incomplete_etch", "incompleteetch", "underetch", "under_etch"],
        "bogus": ["junk", "invalid", "not_sem"],
        "normal": ["good", "ok", "clean"],
        "cmp": ["cmp_residue", "residue"],
        "ler": ["line_edge_roughness", "roughness"],
    },
    # Default per-head loss weights: specialists weighted above the gatekeeper and router.
    "loss_weights": {"h1": 1.0, "h2": 1.0, "h3": 2.0, "h4": 2.0, "h5": 2.0},
}

IGNORE = -1  # label value of a head that does not apply to an image
# The model output holding the unfamiliar-frame score (semhinet_tf.model.ood): a model output name like the
# heads', so no head may take it.
OOD_OUTPUT = "ood"


class TaxonomyError(ValueError):
    """A taxonomy file that does not describe a valid tree."""


class UnsafeTaxonomyError(TaxonomyError, UnsafeFileError):
    """A YAML taxonomy with a tag asking for a Python object (`!!python/...`): refused, never constructed."""


def _refuse_tags(path: Path, exc: Exception) -> None:
    """yaml.safe_load constructs no tagged object; say so in one line instead of quoting the parser."""
    if type(exc).__module__.startswith("yaml"):
        import yaml

        if isinstance(exc, yaml.constructor.ConstructorError):
            mark = exc.problem_mark
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise UnsafeTaxonomyError(f"{path}: refused: {exc.problem}{where}; a taxonomy is plain data, tagged "
                                      f"objects are never built (a Python tag would run code)") from exc


@dataclass(frozen=True)
class Head:
    name: str
    classes: tuple[str, ...]
    parent: tuple[str, str] | None = None  # (head name, class name) that gates this head
    role: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def normalize_name(name: str) -> str:
    """Fold case and separators so 'Inc-Etch', 'inc_etch' and 'IncEtch' compare equal."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _head_from_spec(h: Any, i: int) -> Head:
    if not isinstance(h, Mapping):
        raise TaxonomyError(f"heads[{i}] is a {type(h).__name__}: each head is a mapping with 'name' and 'classes'")
    name = h.get("name")
    if not isinstance(name, str) or not name:
        raise TaxonomyError(f"heads[{i}] has no 'name' (a text)")
    parent = h.get("parent")
    if parent not in (None, ""):
        if not isinstance(parent, str) or "." not in parent:
            raise TaxonomyError(f"head {name!r}: 'parent' must be written 'head.class' (e.g. h2.line), got {parent!r}")
        head_name, _, class_name = parent.partition(".")
        parent = (head_name, class_name)
    else:
        parent = None
    role = h.get("role", "")
    if not isinstance(role, str):
        raise TaxonomyError(f"head {name!r}: 'role' must be a text, got {role!r}")
    return Head(name, _names(h.get("classes"), f"head {name!r}: 'classes'"), parent, role)


def _names(value: Any, what: str, one_allowed: bool = False) -> tuple[str, ...]:
    """A list of names (texts or numbers); with `one_allowed` a single text is a list of one (an alias)."""
    if one_allowed and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise TaxonomyError(f"{what} must be a list of names, got {value!r:.80}")
    return tuple(str(v) for v in value)


def _mapping(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise TaxonomyError(f"'{key}' must be a mapping, got {type(value).__name__}")
    return value


def _weight(value: Any, head: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TaxonomyError(f"loss_weights.{head} must be a number >= 0, got {value!r:.40}")
    return float(value)


@dataclass
class Taxonomy:
    heads: tuple[Head, ...]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_loss_weights: dict[str, float] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self) -> None:
        self._validate()
        self._head_by_name = {h.name: h for h in self.heads}
        self.leaves: tuple[str, ...] = tuple(self._leaf_order())
        self._paths = {leaf: self._path_to(leaf) for leaf in self.leaves}
        self._folder_index = self._build_folder_index()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Taxonomy:
        """A taxonomy from its spec (DEFAULT_SPEC's structure); a malformed one raises TaxonomyError in one line
        naming the field, never a bare AttributeError from a list where a mapping belongs."""
        if not isinstance(spec, Mapping):
            raise TaxonomyError(f"expected a mapping with a 'heads' list, got {type(spec).__name__}")
        heads_spec = spec.get("heads")
        if not isinstance(heads_spec, list):
            raise TaxonomyError("'heads' must be a list of heads, each a mapping with 'name' and 'classes'")
        heads = tuple(_head_from_spec(h, i) for i, h in enumerate(heads_spec))
        aliases = {k: _names(v, f"aliases.{k}", one_allowed=True) for k, v in _mapping(spec, "aliases").items()}
        weights = {k: _weight(v, k) for k, v in _mapping(spec, "loss_weights").items()}
        return cls(heads, aliases, weights, str(spec.get("name", "custom")))

    @classmethod
    def default(cls) -> Taxonomy:
        return cls.from_spec(DEFAULT_SPEC)

    @classmethod
    def from_file(cls, path: str | Path) -> Taxonomy:
        """Load a taxonomy from JSON or YAML (same structure as DEFAULT_SPEC)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise TaxonomyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the taxonomy as "
                                f"UTF-8 YAML or JSON") from None
        except OSError as exc:
            raise TaxonomyError(f"{path}: cannot read taxonomy file ({exc.strerror})") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                spec = yaml.safe_load(text)
            else:
                spec = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parser error becomes one clear line
            _refuse_tags(path, exc)
            kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"  # other suffixes are read as JSON
            raise TaxonomyError(f"{path}: not valid {kind} (a taxonomy is a .yaml, .yml or .json file): {exc}") from exc
        if not isinstance(spec, dict):
            raise TaxonomyError(f"{path}: expected a mapping with a 'heads' list")
        try:
            return cls.from_spec(spec)
        except TaxonomyError as exc:
            raise TaxonomyError(f"{path}: {exc}") from exc

    def to_spec(self) -> dict[str, Any]:
        heads = []
        for h in self.heads:
            d: dict[str, Any] = {"name": h.name, "classes": list(h.classes)}
            if h.role:
                d["role"] = h.role
            if h.parent:
                d["parent"] = f"{h.parent[0]}.{h.parent[1]}"
            heads.append(d)
        return {"name": self.name, "heads": heads,
                "aliases": {k: list(v) for k, v in self.aliases.items()},
                "loss_weights": dict(self.default_loss_weights)}

    def _validate(self) -> None:
        names = [h.name for h in self.heads]
        if not self.heads:
            raise TaxonomyError("taxonomy has no heads")
        if len(set(names)) != len(names):
            raise TaxonomyError(f"duplicate head names in {names}")
        if OOD_OUTPUT in names:
            raise TaxonomyError(f"head name {OOD_OUTPUT!r} is reserved for the unfamiliar-frame score output")
        roots = [h for h in self.heads if h.parent is None]
        if len(roots) != 1:
            raise TaxonomyError(f"expected exactly one root head, found {[h.name for h in roots]}")
        by_name = {h.name: h for h in self.heads}
        all_classes: list[str] = []
        for h in self.heads:
            if len(h.classes) < 2:
                raise TaxonomyError(f"head {h.name} needs at least two classes")
            all_classes.extend(h.classes)
            if h.parent:
                p_head, p_class = h.parent
                if p_head not in by_name or p_class not in by_name[p_head].classes:
                    raise TaxonomyError(f"head {h.name}: parent {p_head}.{p_class} does not exist")
        if len(set(all_classes)) != len(all_classes):
            raise TaxonomyError("class names must be unique across heads")
        gates = [h.parent for h in self.heads if h.parent]
        if len(set(gates)) != len(gates):
            raise TaxonomyError("two heads are gated by the same parent class")
        # every head must be reachable from the root without cycles
        for h in self.heads:
            seen, cur = set(), h
            while cur.parent:
                if cur.name in seen:
                    raise TaxonomyError(f"cycle through head {cur.name}")
                seen.add(cur.name)
                cur = by_name[cur.parent[0]]

    # ---------------------------------------------------------------- structure
    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    def head(self, name: str) -> Head:
        return self._head_by_name[name]

    def child_head(self, head: str, cls: str) -> Head | None:
        for h in self.heads:
            if h.parent == (head, cls):
                return h
        return None

    def _leaf_order(self) -> list[str]:
        """Leaves in depth-first order of the tree (bogus, normal, bridge, open, cmp, ...)."""
        root = next(h for h in self.heads if h.parent is None)
        out: list[str] = []

        def walk(head: Head) -> None:
            for c in head.classes:
                child = self.child_head(head.name, c)
                if child is None:
                    out.append(c)
                else:
                    walk(child)

        walk(root)
        return out

    def _path_to(self, leaf: str) -> list[tuple[str, str]]:
        """[(head, class), ...] from the root down to the leaf."""
        owner = next(h for h in self.heads if leaf in h.classes)
        path = [(owner.name, leaf)]
        while owner.parent:
            path.append(owner.parent)
            owner = self.head(owner.parent[0])
        return path[::-1]

    def path(self, leaf: str) -> list[tuple[str, str]]:
        return list(self._paths[leaf])

    def leaf_index(self, leaf: str) -> int:
        return self.leaves.index(leaf)

    # ---------------------------------------------------------------- labels and masks
    def leaf_targets(self, leaf: str) -> dict[str, int]:
        """Class index per head for one leaf; IGNORE where the head does not apply."""
        targets = {h.name: IGNORE for h in self.heads}
        for head, cls in self._paths[leaf]:
            targets[head] = self.head(head).classes.index(cls)
        return targets

    def label_matrix(self) -> np.ndarray:
        """(num_leaves, num_heads) int array of head targets per leaf, IGNORE where masked."""
        return np.array([[self.leaf_targets(leaf)[h] for h in self.head_names] for leaf in self.leaves],
                        dtype=np.int32)

    def head_labels(self, leaf_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Per-head int labels (IGNORE where masked) for an array of leaf indices."""
        table = self.label_matrix()[np.asarray(leaf_ids, dtype=np.int64)]
        return {h: table[:, i] for i, h in enumerate(self.head_names)}

    # ---------------------------------------------------------------- probabilities
    def check_outputs(self, names: Sequence[str], source: str) -> None:
        """A model of this taxonomy has one output per head (or a flat 'leaf' softmax); anything else is a model
        of another project, refused here in one line rather than later as a missing key."""
        names = list(names)
        if "leaf" in names or all(h.name in names for h in self.heads):
            return
        raise ValueError(f"{source}: not a SEM-HiNet model of this taxonomy: its outputs are "
                         f"{', '.join(names) or 'none'}, expected one per head ({', '.join(self.head_names)})")

    def leaf_probabilities(self, head_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """P(leaf) = product of the head probabilities along its path; shape (N, num_leaves).
        A flat model's 'leaf' softmax is returned as it is."""
        if self.heads[0].name not in head_probs and "leaf" in head_probs:
            return np.asarray(head_probs["leaf"], dtype=np.float64)
        first = np.asarray(head_probs[self.heads[0].name])
        out = np.ones((first.shape[0], len(self.leaves)), dtype=np.float64)
        for j, leaf in enumerate(self.leaves):
            for head, cls in self._paths[leaf]:
                out[:, j] *= np.asarray(head_probs[head], dtype=np.float64)[:, self.head(head).classes.index(cls)]
        return out

    def as_head_probabilities(self, probs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Head outputs as they are; a flat model's 'leaf' softmax turned into each head's conditional
        probabilities (the mass of the leaves under each class, renormalised within the head), so a flat
        baseline is scored by exactly the same code. The product along a path gives back P(leaf)."""
        if "leaf" not in probs or all(h.name in probs for h in self.heads):
            return dict(probs)
        leaf_p = np.asarray(probs["leaf"], dtype=np.float64)
        out = {}
        for head in self.heads:
            mass = np.zeros((leaf_p.shape[0], head.num_classes))
            for j, leaf in enumerate(self.leaves):
                for name, cls in self._paths[leaf]:
                    if name == head.name:
                        mass[:, head.classes.index(cls)] += leaf_p[:, j]
            total = mass.sum(axis=1, keepdims=True)
            out[head.name] = np.where(total > 0, mass / np.maximum(total, 1e-300), 1.0 / head.num_classes)
        return out

    def decode(self, head_probs: Mapping[str, np.ndarray], review_threshold: float = 0.5) -> list[dict]:
        """Turn raw head outputs into per-image verdicts (what `predict` prints).

        verdict = root-head class on the winning leaf's path (bogus / normal / defect),
        family = second level class for deeper leaves, class = the leaf itself.
        """
        leaf_p = self.leaf_probabilities(head_probs)
        best = leaf_p.argmax(axis=1)
        results = []
        for i, j in enumerate(best):
            leaf = self.leaves[j]
            path = self._paths[leaf]
            p = float(leaf_p[i, j])
            results.append({
                "verdict": path[0][1],
                "family": path[1][1] if len(path) > 2 else None,
                "class": leaf,
                "probability": round(p, 6),
                "review": bool(p < review_threshold),
                "leaf_probabilities": {lf: round(float(leaf_p[i, k]), 6) for k, lf in enumerate(self.leaves)},
                "heads": {h.name: {c: round(float(np.asarray(head_probs[h.name])[i, k]), 6)
                                   for k, c in enumerate(h.classes)} for h in self.heads},
            })
        return results

    # ---------------------------------------------------------------- folders
    def _build_folder_index(self) -> dict[str, str]:
        index = {normalize_name(leaf): leaf for leaf in self.leaves}
        for leaf, names in self.aliases.items():
            if leaf not in self.leaves:
                raise TaxonomyError(f"alias given for unknown leaf {leaf!r}")
            for n in names:
                index.setdefault(normalize_name(n), leaf)
        return index

    def match_folder(self, folder_name: str) -> str | None:
        """The leaf a folder name stands for (case and separator insensitive), or None."""
        return self._folder_index.get(normalize_name(folder_name))

    def loss_weights(self, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        weights = {h: self.default_loss_weights.get(h, 1.0) for h in self.head_names}
        for k, v in (overrides or {}).items():
            if k not in weights:
                raise TaxonomyError(f"loss weight given for unknown head {k!r} (heads: {', '.join(weights)})")
            if not float(v) >= 0:
                raise TaxonomyError(f"loss weight of head {k!r} must be 0 or more, not {v}")
            weights[k] = float(v)
        return weights


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """The default taxonomy, or the one in a JSON/YAML file."""
    return Taxonomy.default() if path is None else Taxonomy.from_file(path)
