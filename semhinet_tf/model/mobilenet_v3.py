"""MobileNetV3Small built from a block table, on the input tensor (no nested Model), QAT-friendly.

Layer names follow keras.applications so ImageNet weights transfer by name. The stem takes one
grey channel of raw 0..255 pixels and rescales inside the model, so the int8 model takes uint8
pixels straight from the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semhinet_tf.model import keras
from semhinet_tf.model.layers import ChannelGate, HardSigmoid, HardSwish

layers = keras.layers


@dataclass(frozen=True)
class Block:
    """One inverted-residual block: (kernel, expansion, filters, squeeze-excite, stride, activation)."""

    kernel: int
    expansion: float
    filters: int
    se: bool
    stride: int
    activation: str  # "relu" or "hswish"


# MobileNetV3-Small, Howard et al. 2019, table 2 (the same table keras.applications stacks).
SMALL_BLOCKS: tuple[Block, ...] = tuple(Block(*row) for row in [
    (3, 1, 16, True, 2, "relu"),
    (3, 72 / 16, 24, False, 2, "relu"),
    (3, 88 / 24, 24, False, 1, "relu"),
    (5, 4, 40, True, 2, "hswish"),
    (5, 6, 40, True, 1, "hswish"),
    (5, 6, 40, True, 1, "hswish"),
    (5, 3, 48, True, 1, "hswish"),
    (5, 3, 48, True, 1, "hswish"),
    (5, 6, 96, True, 2, "hswish"),
    (5, 6, 96, True, 1, "hswish"),
    (5, 6, 96, True, 1, "hswish"),
])
SE_RATIO = 0.25
STEM_FILTERS = 16
BN_EPSILON = 1e-3


@dataclass(frozen=True)
class BackboneConfig:
    alpha: float = 1.0
    minimalistic: bool = False
    bn_momentum: float = 0.99
    batchnorm: bool = True  # False: BatchNorm folded into the convolutions (see fold_batchnorm)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "minimalistic": self.minimalistic, "bn_momentum": self.bn_momentum,
                "batchnorm": self.batchnorm}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without dropping more than 10% (as in the paper's code)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def auto_bn_momentum(total_steps: int) -> float:
    """BatchNorm momentum whose moving average spans ~10% of training, at most ~100 steps.

    Keras' 0.999 averages over ~1000 steps; a from-scratch run of a few hundred steps then
    evaluates with statistics of the random initialisation and collapses to one class. Long runs
    need the cap too: seen here, a 24-epoch run at 0.999 evaluated as one class for its first
    epochs because the statistics trailed weights that were still moving fast.
    """
    window = max(10.0, total_steps / 10.0)
    return float(np.clip(1.0 - 1.0 / window, 0.9, 0.99))


def _activation(kind: str, name: str) -> layers.Layer:
    if kind == "relu":
        return layers.ReLU(name=name)
    return HardSwish(name=name)


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, cfg: BackboneConfig, depthwise: bool = False):
    bias = not cfg.batchnorm
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=bias, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=bias, name=name)(x)
    if not cfg.batchnorm:
        return x
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=cfg.bn_momentum, name=f"{name}/BatchNorm")(x)


def fold_batchnorm(trained: keras.Model, folded: keras.Model) -> keras.Model:
    """Copy `trained` (convolutions followed by BatchNorm) into `folded` (the same model built with
    batchnorm=False): kernel * gamma / sqrt(var + eps) per output channel, bias = beta - mean * that scale.

    Why: the converter folds BatchNorm into the kernels anyway. With per-channel weight scales that is
    harmless; with one scale per tensor, channels whose BatchNorm scale is small are rounded away, so a
    per-tensor QAT model must be trained on the folded kernels it will be deployed with."""
    source = {layer.name: layer for layer in trained.layers}
    for layer in folded.layers:
        if not layer.weights:
            continue
        src = source.get(layer.name)
        if src is None:
            raise ValueError(f"layer {layer.name!r} is missing from the trained model")
        bn = source.get(f"{layer.name}/BatchNorm")
        if bn is None:
            layer.set_weights(src.get_weights())
            continue
        gamma, beta, mean, var = bn.get_weights()
        scale = gamma / np.sqrt(var + bn.epsilon)
        kernel = src.get_weights()[0]
        if isinstance(layer, layers.DepthwiseConv2D):  # (k, k, channels, 1): one filter per input channel
            kernel = kernel * scale[None, None, :, None]
        else:
            kernel = kernel * scale
        layer.set_weights([kernel.astype(np.float32), (beta - mean * scale).astype(np.float32)])
    return folded


def _squeeze_excite(x, channels: int, prefix: str):
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}squeeze_excite/AvgPool")(x)
    s = layers.Conv2D(make_divisible(channels * SE_RATIO), 1, padding="same", name=f"{prefix}squeeze_excite/Conv")(s)
    s = layers.ReLU(name=f"{prefix}squeeze_excite/Relu")(s)
    s = layers.Conv2D(channels, 1, padding="same", name=f"{prefix}squeeze_excite/Conv_1")(s)
    s = HardSigmoid(name=f"{prefix}squeeze_excite/HardSigmoid")(s)
    return ChannelGate(name=f"{prefix}squeeze_excite/Mul")([x, s])


def _inverted_residual(x, block: Block, block_id: int, cfg: BackboneConfig):
    prefix = "expanded_conv/" if block_id == 0 else f"expanded_conv_{block_id}/"
    act = "relu" if cfg.minimalistic else block.activation
    kernel = 3 if cfg.minimalistic else block.kernel
    in_ch = x.shape[-1]
    filters = make_divisible(block.filters * cfg.alpha)
    shortcut = x
    if block_id:
        x = _conv_bn(x, make_divisible(in_ch * block.expansion), 1, 1, f"{prefix}expand", cfg)
        x = _activation(act, f"{prefix}expand/{act}")(x)
    x = _conv_bn(x, 0, kernel, block.stride, f"{prefix}depthwise", cfg, depthwise=True)
    x = _activation(act, f"{prefix}depthwise/{act}")(x)
    if block.se and not cfg.minimalistic:
        x = _squeeze_excite(x, make_divisible(in_ch * block.expansion), prefix)
    x = _conv_bn(x, filters, 1, 1, f"{prefix}project", cfg)
    if block.stride == 1 and in_ch == filters:
        x = layers.Add(name=f"{prefix}Add")([shortcut, x])
    return x


# Raw 0..255 pixels -> [-1, 127/128] in two steps, (name, scale, offset). Why 1/128 and not keras.applications'
# 1/127.5, and why two layers: in the int8 model every step lands exactly on its grid (scale 1/128, integer zero
# points: grey value v becomes v - 128 at both), so no engine rounds the input. One x/127.5 - 1 layer is lowered
# to MUL then ADD, the MUL's grid comes from the calibration images, and -1 falls half-way between two steps of
# the 1/127.5 grid: measured, grey levels merged at the MUL and ties at the ADD that onnxruntime and TFLite round
# apart (see model/quant.py). ImageNet weights expect x/127.5 - 1: a 0.4% difference in scale.
RESCALE_STEPS: tuple[tuple[str, float, float], ...] = (("rescale_scale", 1.0 / 128, 0.0), ("rescale", 1.0, -1.0))


def rescaled_ranges(pixel_range: tuple[float, float] = (0.0, 255.0)) -> dict[str, tuple[float, float]]:
    """Each rescale step's output range for raw pixels in `pixel_range` (the int8 model's fixed grids)."""
    lo, hi = pixel_range
    out = {}
    for name, scale, offset in RESCALE_STEPS:
        lo, hi = lo * scale + offset, hi * scale + offset
        out[name] = (lo, hi)
    return out


def backbone_features(image, cfg: BackboneConfig, blocks: tuple[Block, ...] = SMALL_BLOCKS, rescale: bool = True):
    """Stack the backbone on `image` (raw 0..255 pixels); returns the last feature map (576 ch at alpha 1)."""
    act = "relu" if cfg.minimalistic else "hswish"
    x = image
    for name, scale, offset in RESCALE_STEPS if rescale else ():
        x = layers.Rescaling(scale=scale, offset=offset, name=name)(x)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "Conv", cfg)
    x = _activation(act, f"Conv/{act}")(x)
    for i, block in enumerate(blocks):
        x = _inverted_residual(x, block, i, cfg)
    x = _conv_bn(x, make_divisible(x.shape[-1] * 6), 1, 1, "Conv_1", cfg)
    return _activation(act, f"Conv_1/{act}")(x)


def build_backbone(img_size: int, cfg: BackboneConfig, channels: int = 1, rescale: bool = True) -> keras.Model:
    """The bare backbone as its own model (feature extractor; also used by `bench` for the head cost)."""
    image = keras.Input((img_size, img_size, channels), name="image")
    return keras.Model(image, backbone_features(image, cfg, rescale=rescale), name="mobilenet_v3_small")


# ---------------------------------------------------------------- ImageNet / foreign weights
def _keras_app(img_size: int, cfg: BackboneConfig, weights: str | None) -> keras.Model:
    return keras.applications.MobileNetV3Small(
        input_shape=(img_size, img_size, 3), alpha=cfg.alpha, minimalistic=cfg.minimalistic,
        include_top=False, weights=weights, include_preprocessing=False)


def transfer_from_keras_app(model: keras.Model, source: keras.Model) -> int:
    """Copy weights layer by layer (same names); the RGB stem kernel is summed to one grey channel.

    Summing is exact for a grey image replicated to RGB: conv(k_r*g + k_g*g + k_b*g) = conv((k_r+k_g+k_b)*g).
    Returns the number of layers copied.
    """
    src = {layer.name: layer for layer in source.layers if layer.get_weights()}
    copied = 0
    for layer in model.layers:
        name = layer.name.removeprefix("quant_")
        if name not in src or not layer.get_weights():
            continue
        weights = src[name].get_weights()
        target_shapes = [w.shape for w in layer.get_weights()]
        if name == "Conv" and weights[0].shape[2] == 3 and target_shapes[0][2] == 1:
            weights = [weights[0].sum(axis=2, keepdims=True)] + weights[1:]
        if [w.shape for w in weights] != target_shapes:
            raise ValueError(f"layer {name}: weight shapes {[w.shape for w in weights]} do not match {target_shapes}")
        layer.set_weights(weights)
        copied += 1
    return copied


def load_imagenet_weights(model: keras.Model, img_size: int, cfg: BackboneConfig, weights: str) -> int:
    """`weights` is "imagenet" (downloaded by Keras) or a local .h5 of keras.applications' MobileNetV3Small."""
    # Keras only ships ImageNet weights for these sizes; convolution weights do not depend on the size.
    size = img_size if weights != "imagenet" or img_size in (96, 128, 160, 192, 224) else 224
    if weights == "imagenet":
        try:
            source = _keras_app(size, cfg, "imagenet")
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise RuntimeError(f"cannot download ImageNet weights ({type(exc).__name__}: {exc}); "
                               "pass --weights PATH to a local keras.applications MobileNetV3Small .h5") from exc
    else:
        source = _keras_app(size, cfg, None)
        source.load_weights(str(weights), by_name=Path(weights).suffix == ".h5", skip_mismatch=False)
    return transfer_from_keras_app(model, source)


def _plain_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a .npz, never unpickled: a pickle runs code as it loads, so one is refused by name."""
    from semhinet_tf.safe_load import UnsafeFileError

    key = None
    try:
        with np.load(str(path), allow_pickle=False) as data:
            out = {}
            for key in data.files:
                out[key] = data[key]
            return out
    except ValueError as exc:
        if "allow_pickle" not in str(exc):  # numpy's refusal of pickled data; anything else is a bad file
            raise
        what = f"array {key!r}" if key is not None else "it"
        raise UnsafeFileError(f"{path}: refused: {what} holds pickled Python objects, which would run code as "
                              f"they load; backbone weights are plain numbers") from exc


def load_backbone_weights(model: keras.Model, path: str | Path) -> int:
    """Load backbone weights saved by `save_backbone_weights` (a .npz of layer name -> arrays)."""
    grouped: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key, array in _plain_arrays(path).items():
        name, _, idx = key.rpartition("::")
        grouped.setdefault(name, []).append((int(idx), array))
    copied = 0
    for layer in model.layers:
        name = layer.name.removeprefix("quant_")
        if name in grouped and layer.get_weights():
            arrays = [a for _, a in sorted(grouped[name])]
            if [a.shape for a in arrays] == [w.shape for w in layer.get_weights()]:
                layer.set_weights(arrays)
                copied += 1
    return copied


def save_backbone_weights(model: keras.Model, path: str | Path, keep: Callable[[str], bool] | None = None) -> int:
    """Save backbone layer weights as .npz (portable, a few MB, independent of the head layout)."""
    arrays = {}
    for layer in model.layers:
        if (keep is None or keep(layer.name)) and layer.get_weights():
            for i, w in enumerate(layer.get_weights()):
                arrays[f"{layer.name}::{i}"] = w
    from semhinet_tf.artifacts.files import atomic_save

    atomic_save(path, lambda tmp: np.savez_compressed(tmp, **arrays))
    return len({k.rpartition('::')[0] for k in arrays})
