"""The backbone as data, ImageNet transfer without internet, masked losses, QAT wrapping."""

from __future__ import annotations

import numpy as np
import pytest

from semhinet_tf.model import keras
from semhinet_tf.model.heads import ModelConfig, build_model, is_head_layer
from semhinet_tf.model.mobilenet_v3 import (
    SMALL_BLOCKS,
    BackboneConfig,
    auto_bn_momentum,
    build_backbone,
    load_backbone_weights,
    load_imagenet_weights,
    make_divisible,
    save_backbone_weights,
)
from semhinet_tf.taxonomy import Taxonomy


def test_block_table_is_mobilenet_v3_small():
    assert len(SMALL_BLOCKS) == 11
    assert [b.filters for b in SMALL_BLOCKS] == [16, 24, 24, 40, 40, 40, 48, 48, 96, 96, 96]
    assert sum(b.stride == 2 for b in SMALL_BLOCKS) == 4
    assert make_divisible(72 / 16 * 16) == 72 and make_divisible(88) == 88


@pytest.mark.parametrize("alpha,minimalistic", [(1.0, False), (0.75, True)])
def test_backbone_output_shape_follows_alpha(alpha, minimalistic):
    model = build_backbone(64, BackboneConfig(alpha=alpha, minimalistic=minimalistic))
    channels = make_divisible(make_divisible(96 * alpha) * 6)
    assert model.output_shape == (None, 2, 2, channels)
    names = {layer.name for layer in model.layers}
    assert ("expanded_conv_3/squeeze_excite/Mul" in names) is (not minimalistic)


def test_imagenet_transfer_matches_keras_applications(tmp_path):
    """Random keras.applications weights -> file -> our grey backbone: same features on grey input."""
    size = 64
    keras.utils.set_random_seed(3)
    reference = keras.applications.MobileNetV3Small(input_shape=(size, size, 3), include_top=False, weights=None,
                                                     include_preprocessing=False)
    # give BatchNorm non-trivial statistics so the test checks them too
    for layer in reference.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([g, b, rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 1.5, v.shape)])
    path = tmp_path / "mnv3s.h5"
    reference.save_weights(path)
    cfg = BackboneConfig()
    ours = build_backbone(size, cfg)
    copied = load_imagenet_weights(ours, size, cfg, str(path))
    assert copied == sum(1 for layer in reference.layers if layer.get_weights())
    grey = np.random.default_rng(0).integers(0, 256, (2, size, size, 1)).astype(np.float32)
    expected = reference.predict(np.repeat(grey / 128 - 1.0, 3, axis=-1), verbose=0)  # our RESCALE_STEPS
    got = ours.predict(grey, verbose=0)
    assert np.abs(got - expected).max() < 1e-4


def test_backbone_weights_round_trip_and_skip_heads(tmp_path):
    tax = Taxonomy.default()
    a = build_model(tax, ModelConfig(img_size=32))
    b = build_model(tax, ModelConfig(img_size=48))
    path = tmp_path / "backbone.npz"
    save_backbone_weights(a, path, keep=lambda name: not is_head_layer(name))
    assert load_backbone_weights(b, path) > 30
    assert np.array_equal(a.get_layer("Conv").get_weights()[0], b.get_layer("Conv").get_weights()[0])
    assert not np.array_equal(a.get_layer("h1").get_weights()[0], b.get_layer("h1").get_weights()[0])


def test_a_width_without_shipped_sem_weights_says_it_trains_from_random_weights(capsys):
    from semhinet_tf.training.config import TrainConfig
    from semhinet_tf.training.weights import initial_weights

    shipped = ModelConfig(img_size=32)
    assert initial_weights(build_model(Taxonomy.default(), shipped), TrainConfig(img_size=32), shipped).startswith(
        "SEM-pretrained backbone")
    assert "warning" not in capsys.readouterr().out
    narrow = ModelConfig(img_size=32, backbone=BackboneConfig(alpha=0.75))
    start = initial_weights(build_model(Taxonomy.default(), narrow), TrainConfig(img_size=32, alpha=0.75), narrow)
    assert start.startswith("random initialisation")
    out = capsys.readouterr().out
    assert "warning: no SEM-pretrained backbone is shipped for alpha=0.75" in out
    assert "tools/pretrain_sem.py" in out


def test_heads_follow_the_taxonomy():
    spec = {"heads": [{"name": "gate", "classes": ["junk", "good", "bad"]},
                      {"name": "kind", "parent": "gate.bad", "classes": ["scratch", "particle"]}]}
    model = build_model(Taxonomy.from_spec(spec), ModelConfig(img_size=32, head_units=0))
    out = model.predict(np.zeros((1, 32, 32, 1), np.float32), verbose=0)
    assert {k: v.shape for k, v in out.items()} == {"gate": (1, 3), "kind": (1, 2)}


def test_bn_momentum_tracks_training_length():
    assert auto_bn_momentum(100) == pytest.approx(0.9)
    assert auto_bn_momentum(500) == pytest.approx(0.98)
    assert auto_bn_momentum(10**7) == pytest.approx(0.99)


def test_masked_loss_ignores_images_a_head_does_not_apply_to():
    from semhinet_tf.losses import MaskedAccuracy, masked_sparse_crossentropy

    loss = masked_sparse_crossentropy()
    pred = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    only_first = float(np.mean(loss(np.array([0, -1, -1]), pred)))
    assert only_first == pytest.approx(-np.log(0.9), rel=1e-5)  # mean over the one applicable image
    wrong_masked = float(np.mean(loss(np.array([0, 0, -1]), pred)))
    assert wrong_masked == pytest.approx((-np.log(0.9) - np.log(0.2)) / 2, rel=1e-5)
    acc = MaskedAccuracy()
    acc.update_state(np.array([0, 0, -1]), pred)
    assert float(acc.result()) == pytest.approx(0.5)


def test_avg_and_max_pooling_feed_separate_dense_layers():
    """Same function as one Dense on their concatenation, but the int8 model keeps a scale per pooled tensor."""
    model = build_model(Taxonomy.default(), ModelConfig(img_size=32, pooling="avgmax"))
    names = {layer.name for layer in model.layers}
    assert {"h1_hidden_avg", "h1_hidden_max", "h1_hidden"} <= names and "pool_concat" not in names
    assert not model.get_layer("h1_hidden_max").use_bias
    linear = build_model(Taxonomy.default(), ModelConfig(img_size=32, pooling="avgmax", head_units=0))
    assert linear.get_layer("h1").__class__.__name__ == "Softmax"
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype(np.float32)
    assert np.allclose(linear.predict(x, verbose=0)["h3"].sum(axis=1), 1.0, atol=1e-5)


def test_qat_model_keeps_head_outputs_and_weights():
    from semhinet_tf.model.quant import quantize_model

    tax = Taxonomy.default()
    model = build_model(tax, ModelConfig(img_size=32))
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1)).astype(np.float32)
    for granularity in ("per-channel", "per-tensor"):
        qat = quantize_model(model, granularity)
        out = qat.predict(x, verbose=0)
        assert set(out) == set(tax.head_names)
    with pytest.raises(ValueError, match="granularity"):
        quantize_model(model, "per-pixel")


def test_qat_quantizes_depthwise_weights_per_channel():
    """tfmot's per-axis quantizer would give a depthwise kernel (kh, kw, C, 1) one range (its last axis is the
    depth multiplier); ours keeps one per channel, each the channel's largest |weight| after a training step."""
    from semhinet_tf.model.quant import quantize_model

    model = build_model(Taxonomy.default(), ModelConfig(img_size=32))
    x = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 1)).astype(np.float32)
    qat = quantize_model(model)
    qat(x, training=True)
    depthwise = [layer for layer in qat.layers if layer.name.endswith("/depthwise")]
    assert len(depthwise) == 11
    for layer in depthwise:
        named = {v.name.split("/")[-1].split(":")[0]: v.numpy() for v in layer.weights}
        kernel = named["depthwise_kernel"]
        largest = np.abs(kernel).max(axis=(0, 1)).ravel()
        assert named["depthwise_kernel_max"].shape == (kernel.shape[2],), layer.name
        assert np.allclose(named["depthwise_kernel_max"], largest) and np.allclose(named["depthwise_kernel_min"],
                                                                                   -largest)
        assert largest.max() > largest.min(), layer.name  # one range per channel, not one shared
    per_tensor = quantize_model(model, "per-tensor")
    per_tensor(x, training=True)
    layer = per_tensor.get_layer("quant_expanded_conv/depthwise")
    named = {v.name.split("/")[-1].split(":")[0]: v for v in layer.weights}
    assert named["depthwise_kernel_max"].shape.rank == 0


def test_frozen_batchnorm_keeps_the_float_statistics_through_qat_steps():
    from semhinet_tf.model.quant import freeze_batchnorm, quantize_model

    model = build_model(Taxonomy.default(), ModelConfig(img_size=32))
    x = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 1)).astype(np.float32)

    def moving_stats(qat):
        return [w.numpy().copy() for w in qat.weights if "moving_" in w.name]

    for freeze in (False, True):
        qat = quantize_model(model)
        if freeze:
            assert freeze_batchnorm(qat) == 34
        before = moving_stats(qat)
        qat(x, training=True)
        same = all(np.array_equal(a, b) for a, b in zip(before, moving_stats(qat), strict=True))
        assert same == freeze


def test_qat_ranges_start_from_the_float_models_activations():
    """tfmot starts every range at [-6, 6] and a short QAT phase barely moves it; calibration sets them."""
    from semhinet_tf.model.quant import calibrate_ranges, quantize_model

    model = build_model(Taxonomy.default(), ModelConfig(img_size=32))
    qat = quantize_model(model)

    def ranges(layer):
        named = {v.name.split("/")[-1].split(":")[0]: v for v in qat.get_layer(layer).weights}
        return {k: float(v.numpy()) for k, v in named.items() if k.endswith(("_min", "_max")) and v.shape.rank == 0}

    def all_maxima():
        return {f"{layer.name}/{k}": v for layer in qat.layers for k, v in ranges(layer.name).items()
                if k.endswith("_max")}

    assert ranges("quant_Conv/BatchNorm")["output_max"] == pytest.approx(6.0)
    before = all_maxima()
    batches = list(np.random.default_rng(2).integers(0, 256, (3, 8, 32, 32, 1)).astype(np.float32))
    assigned = calibrate_ranges(qat, model, batches)
    moved = sum(v != before[k] for k, v in all_maxima().items())
    assert assigned > 30 and moved == assigned  # what it reports is what it set (an untrained model has dead ones)
    assert ranges("quant_Conv/BatchNorm")["output_max"] != pytest.approx(6.0)
    assert not ranges("quant_rescale") and not ranges("quant_rescale_scale")  # fixed grids, see RESCALE_STEPS
    gate = ranges("quant_expanded_conv/squeeze_excite/HardSigmoid")  # a gate in [0, 1]
    assert gate["output_min"] == 0.0 and 0.0 < gate["output_max"] <= 1.0
    logits = ranges("quant_h1")  # the softmax head's range is its logits', not its probabilities'
    assert logits["pre_activation_min"] < 0.0 < logits["pre_activation_max"]


def test_head_class_weights_balance_the_gatekeeper_under_leaf_balanced_sampling():
    from semhinet_tf.losses import head_class_weights

    tax = Taxonomy.default()
    leaf_ids = np.repeat(np.arange(8), 10)
    weights = head_class_weights(tax.label_matrix(), leaf_ids, "balanced", [h.num_classes for h in tax.heads])
    h1 = np.array(weights[0])
    # leaf-balanced sampling: bogus 1/8, normal 1/8, defect 6/8 of h1's samples; weighted, each class counts 1/3
    freq = np.array([1, 1, 6]) / 8
    assert np.allclose(h1 * freq / (h1 * freq).sum(), 1 / 3)
    assert np.isclose((h1 * freq).sum(), 1.0)  # the average sample keeps weight 1
    assert np.allclose(weights[1], 1.0)  # the router's families are already balanced (2 leaves each)


def test_class_weighted_masked_loss_is_a_weighted_mean():
    from semhinet_tf.losses import masked_sparse_crossentropy

    loss = masked_sparse_crossentropy(class_weights=[3.0, 1.0])
    pred = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    got = float(np.mean(loss(np.array([0, 1, -1]), pred)))
    assert got == pytest.approx((3 * -np.log(0.9) + 1 * -np.log(0.8)) / 4, rel=1e-5)


def test_joint_head_loss_is_the_negative_log_of_the_leaf_product():
    """--head-loss joint: the heads' batch-mean losses sum to -log P(leaf), the flat softmax's objective."""
    from semhinet_tf.losses import masked_sparse_crossentropy

    taxonomy = Taxonomy.default()
    rng = np.random.default_rng(0)
    leaves = rng.integers(0, len(taxonomy.leaves), 24)
    probs = {}
    for head in taxonomy.heads:
        logits = rng.normal(size=(24, head.num_classes))
        probs[head.name] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    labels = taxonomy.head_labels(leaves)
    loss = masked_sparse_crossentropy(per_applicable=False)
    total = sum(float(np.mean(loss(labels[h], probs[h]))) for h in taxonomy.head_names)
    leaf_p = taxonomy.leaf_probabilities(probs)[np.arange(24), leaves]
    assert total == pytest.approx(float(np.mean(-np.log(leaf_p))), rel=1e-5)
    default = sum(float(np.mean(masked_sparse_crossentropy()(labels[h], probs[h]))) for h in taxonomy.head_names)
    assert default != pytest.approx(total, rel=1e-3)  # the masked mean weighs the specialists up


def test_logit_adjusted_loss_balances_a_head_without_reweighting_images():
    """With the sampler's prior folded into the loss, an output that knows nothing learns equal classes (not the
    prior), and a single image's loss is the cross-entropy of output x prior, renormalised."""
    from semhinet_tf.losses import head_class_priors, masked_sparse_crossentropy

    taxonomy = Taxonomy.default()
    leaves = np.arange(len(taxonomy.leaves))
    prior = head_class_priors(taxonomy.label_matrix(), leaves, "balanced", [h.num_classes for h in taxonomy.heads])
    assert prior[0] == pytest.approx([1 / 8, 1 / 8, 6 / 8]) and prior[1] == pytest.approx([1 / 3] * 3)
    loss = masked_sparse_crossentropy(train_prior=prior[0], per_applicable=False)
    labels = taxonomy.head_labels(leaves)["h1"]  # one image of each leaf: the sampler's frequencies
    uniform = np.full((8, 3), 1 / 3, np.float32)
    at_prior = np.tile(np.array(prior[0], np.float32), (8, 1))
    assert float(np.mean(loss(labels, uniform))) < float(np.mean(loss(labels, at_prior)))
    one = float(np.mean(loss(np.array([1]), np.array([[0.2, 0.3, 0.5]], np.float32))))
    adjusted = np.array([0.2, 0.3, 0.5]) * prior[0]
    assert one == pytest.approx(-np.log(adjusted[1] / adjusted.sum()), rel=1e-5)


def test_pretrained_starts_are_fine_tuned_at_a_lower_rate():
    from semhinet_tf.train import default_lr

    assert default_lr("none") == pytest.approx(1e-3)
    for start in ("sem", "imagenet", "weights/backbone.npz"):
        assert default_lr(start) == pytest.approx(3e-4)


def test_folding_batchnorm_into_the_convolutions_keeps_the_outputs():
    """Per-tensor QAT starts from the folded model; it must compute what the trained model computes."""
    from dataclasses import replace

    from semhinet_tf.model.mobilenet_v3 import fold_batchnorm

    taxonomy = Taxonomy.default()
    cfg = ModelConfig(img_size=32)
    trained = build_model(taxonomy, cfg)
    rng = np.random.default_rng(0)
    for layer in trained.layers:  # BatchNorm statistics far from the identity, as after training
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.2, 2.0, n), rng.normal(0, 0.3, n), rng.normal(0, 0.5, n),
                               rng.uniform(0.1, 3.0, n)])
    folded = fold_batchnorm(trained, build_model(taxonomy, replace(cfg, backbone=replace(cfg.backbone,
                                                                                        batchnorm=False))))
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    x = rng.integers(0, 256, (4, 32, 32, 1)).astype(np.float32)
    a, b = trained(x, training=False), folded(x, training=False)
    for head in taxonomy.head_names:
        np.testing.assert_allclose(np.asarray(a[head]), np.asarray(b[head]), atol=1e-4)


def test_keras_archives_load_as_keras_loads_them(tiny_run, tmp_path):
    """load_model reads a .keras archive's weights from an unpacked file (the zip member is slow to seek on Python
    3.11): the model must be the one keras.models.load_model gives, weight for weight; an archive holding more than
    config, metadata and weights goes to Keras itself."""
    import zipfile

    from semhinet_tf.losses import MaskedAccuracy
    from semhinet_tf.model.io import load_model
    from semhinet_tf.model.layers import CUSTOM_OBJECTS

    path = tiny_run.dir / "float.keras"
    ours = load_model(path)
    with keras.utils.custom_object_scope({**CUSTOM_OBJECTS, "MaskedAccuracy": MaskedAccuracy}):
        theirs = keras.models.load_model(path, compile=False)
    assert ours.get_config() == theirs.get_config()
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    frames = tiny_run.frames(3, 1).astype("float32")[..., None]
    for a, b in zip(ours(frames, training=False), theirs(frames, training=False), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with_assets = tmp_path / "with_assets.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(with_assets, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr("assets/note.txt", "an asset Keras would load")
    again = load_model(with_assets)
    np.testing.assert_array_equal(again.weights[0].numpy(), theirs.weights[0].numpy())
