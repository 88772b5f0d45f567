"""Heads built from the taxonomy, and the whole classifier (backbone + heads) as one functional model."""

from __future__ import annotations

from dataclasses import dataclass, field

from semhinet_tf.data.decode import DEFAULT_IMG_SIZE
from semhinet_tf.model import keras
from semhinet_tf.model.layers import HardSwish
from semhinet_tf.model.mobilenet_v3 import BackboneConfig, backbone_features
from semhinet_tf.taxonomy import Taxonomy

layers = keras.layers


@dataclass(frozen=True)
class ModelConfig:
    img_size: int = DEFAULT_IMG_SIZE
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head_units: int = 128  # hidden width of each head; 0 = a linear head straight on the pooled features
    dropout: float = 0.2
    flat: bool = False  # one softmax over the leaves instead of the hierarchy (baseline for experiments)
    pooling: str = "avgmax"  # "avg", or "avgmax": average and max pooling side by side (see build_model)

    def to_dict(self) -> dict:
        return {"img_size": self.img_size, "backbone": self.backbone.to_dict(), "head_units": self.head_units,
                "dropout": self.dropout, "flat": self.flat, "pooling": self.pooling}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(img_size=int(d["img_size"]), backbone=BackboneConfig(**d.get("backbone", {})),
                   head_units=int(d.get("head_units", 128)), dropout=float(d.get("dropout", 0.2)),
                   flat=bool(d.get("flat", False)), pooling=str(d.get("pooling", "avg")))


def _head(pooled: list, name: str, num_classes: int, cfg: ModelConfig):
    if cfg.head_units:
        x = _dense_on(pooled, cfg.head_units, f"{name}_hidden")
        x = HardSwish(name=f"{name}_hidden/hswish")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name=f"{name}_dropout")(x)
        return layers.Dense(num_classes, activation="softmax", name=name)(x)
    if cfg.dropout:
        pooled = [(tag, layers.Dropout(cfg.dropout, name=f"{name}_dropout_{tag}")(x)) for tag, x in pooled]
    if len(pooled) == 1:
        return layers.Dense(num_classes, activation="softmax", name=name)(pooled[0][1])
    return layers.Softmax(name=name)(_dense_on(pooled, num_classes, f"{name}_logits"))


def _dense_on(pooled: list, units: int, name: str):
    """A Dense on the pooled features. Average and max pooling each get their own Dense, summed: the same
    function as one Dense on their concatenation, but each pooled tensor keeps its own int8 scale. Concatenated
    (one scale, the max-pooled range), the averages kept a median 1.7 quantization steps of spread between
    frames, and a one-step rounding difference between int8 engines flipped verdicts."""
    if len(pooled) == 1:
        return layers.Dense(units, name=name)(pooled[0][1])
    parts = [layers.Dense(units, use_bias=i == 0, name=f"{name}_{tag}")(x) for i, (tag, x) in enumerate(pooled)]
    return layers.Add(name=name)(parts)


def _pool(features, pooling: str) -> list:
    """[(tag, pooled features)]. Average pooling dilutes a defect covering one cell of the final map by the map's
    area; max pooling keeps it. Both are NPU operators (MEAN, REDUCE_MAX) and cost nothing next to the backbone."""
    avg = layers.GlobalAveragePooling2D(name="pool")(features)
    if pooling == "avg":
        return [("avg", avg)]
    if pooling != "avgmax":
        raise ValueError(f"pooling must be 'avg' or 'avgmax', not {pooling!r}")
    return [("avg", avg), ("max", layers.GlobalMaxPooling2D(name="pool_max")(features))]


def output_names(taxonomy: Taxonomy, flat: bool = False) -> tuple[str, ...]:
    return ("leaf",) if flat else taxonomy.head_names


def build_model(taxonomy: Taxonomy, cfg: ModelConfig) -> keras.Model:
    """Grey image of raw pixels (S, S, 1) -> dict of softmax outputs named after the heads (h1..h5)."""
    image = keras.Input((cfg.img_size, cfg.img_size, 1), name="image")
    features = backbone_features(image, cfg.backbone)
    pooled = _pool(features, cfg.pooling)
    if cfg.flat:
        outputs = {"leaf": _head(pooled, "leaf", len(taxonomy.leaves), cfg)}
    else:
        outputs = {h.name: _head(pooled, h.name, h.num_classes, cfg) for h in taxonomy.heads}
    return keras.Model(image, outputs, name="semhinet_flat" if cfg.flat else "semhinet")


def is_head_layer(name: str) -> bool:
    """True for layers that belong to a head (not to the backbone)."""
    base = name.removeprefix("quant_").split("/")[0]
    return base.startswith("pool") or base.split("_")[0] == "leaf" or (base.startswith("h") and base[1:2].isdigit())
