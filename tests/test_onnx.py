"""ONNX export (tf2onnx) from the int8 .tflite and from Keras runs, checked against TFLite and Keras outputs."""

from __future__ import annotations

import json
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert.interpreter")

from semhinet_tf.engines.onnx import OnnxEngine  # noqa: E402
from semhinet_tf.export.onnx import EXPORT_KEY, export_onnx  # noqa: E402
from semhinet_tf.export.tflite_meta import read_contract  # noqa: E402
from semhinet_tf.taxonomy import Taxonomy  # noqa: E402

SIZE = 32
HEADS = ["h1", "h2", "h3", "h4", "h5"]


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """The session's tiny run (float.keras and a PTQ model_int8.tflite with a contract) plus a QAT model.

    The .tflite is post-training quantized from the float model: converting the QAT model costs ~50 s
    of CPU here against ~15 s, and tf2onnx sees the same int8 ops either way (the QAT .tflite of a real
    run is measured in the report). QAT ranges come from one training-mode pass (what a fit step sets).
    """
    from semhinet_tf.model.io import save_model
    from semhinet_tf.model.quant import quantize_model

    d = tiny_run.copy_to(tmp_path_factory.mktemp("onnx_run") / "run")
    qat = quantize_model(tiny_run.float_model)
    qat(tiny_run.frames(16, 1)[..., None].astype(np.float32), training=True)  # moving-average ranges from frames
    save_model(qat, d / "qat.h5", quantized=True)
    return {"dir": d, "float": tiny_run.float_model, "qat": qat, "frames": tiny_run.frames(12, 4)}


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    d = run["dir"]
    return {
        "tflite": export_onnx(d / "model_int8.tflite", out / "int8.onnx", tflite_tables=True),
        "qat": export_onnx(d, out / "qat.onnx"),  # a run directory resolves to its QAT model
        "float": export_onnx(d / "float.keras", out / "float.onnx"),
    }


def _keras_probs(model, frames: np.ndarray) -> dict[str, np.ndarray]:
    out = model(frames[..., None].astype(np.float32), training=False)
    return {k.removeprefix("quant_"): np.asarray(v) for k, v in out.items()}


def test_names_types_and_contract(run, exported):
    tfl = exported["tflite"]
    assert tfl["source"] == "tflite" and tfl["outputs"] == HEADS and tfl["contract"]
    assert tfl["input"] == {"name": "image", "dtype": "uint8", "shape": [1, SIZE, SIZE, 1]}
    for key in ("qat", "float"):
        info = exported[key]
        assert info["source"] == "keras" and info["outputs"] == HEADS and info["contract"]
        assert info["input"] == {"name": "image", "dtype": "float32", "shape": ["N", SIZE, SIZE, 1]}
    assert exported["qat"]["model"].endswith("qat.h5")

    model = OnnxEngine(tfl["path"], threads=1)
    assert model.input_size == SIZE and model.input_dtype == np.uint8 and not model.dynamic_batch
    assert model.contract == read_contract(run["dir"] / "model_int8.tflite")  # the very same contract
    assert [o.name for o in model.session.get_outputs()] == HEADS
    assert all(o.type == "tensor(float)" for o in model.session.get_outputs())
    meta = model.session.get_modelmeta().custom_metadata_map
    assert json.loads(meta[EXPORT_KEY])["source"] == "tflite"

    qat = OnnxEngine(exported["qat"]["path"])
    assert qat.dynamic_batch and qat.input_dtype == np.float32
    # max_pixels is a host option, not the model's: dropped from contracts
    preprocess = json.loads((run["dir"] / "config.json").read_text())["preprocess"]
    assert "max_pixels" in preprocess and qat.contract["preprocess"] == {
        k: v for k, v in preprocess.items() if k != "max_pixels"}
    assert qat.contract["outputs"] == HEADS
    assert qat.contract["quantization"]["source"] == "qat" and qat.contract["input"]["dtype"] == "float32"
    assert OnnxEngine(exported["float"]["path"]).contract["quantization"] is None
    ops = {n.op_type for n in __import__("onnx").load(exported["qat"]["path"]).graph.node}
    assert "QuantizeLinear" in ops  # fake-quant nodes became QDQ pairs


def test_onnx_from_tflite_matches_tflite(run, exported):
    from semhinet_tf.board.runtime import BoardModel

    frames = run["frames"]
    ref = BoardModel(run["dir"] / "model_int8.tflite", threads=1).predict(frames)
    got = OnnxEngine(exported["tflite"]["path"], threads=1).predict(frames)  # batch-1 graph: looped
    assert sorted(got) == HEADS
    # the two-class heads must tell apart, or a head mix-up (outputs taken by position) would go unseen
    assert min(np.abs(ref[a] - ref[b]).max() for a, b in [("h3", "h4"), ("h3", "h5"), ("h4", "h5")]) > 8 / 256
    for h in HEADS:
        assert got[h].shape == ref[h].shape == (len(frames), len(ref[h][0])) and got[h].dtype == np.float32
        diff = np.abs(got[h] - ref[h])
        assert np.mean(diff <= 2 / 256 + 1e-6) >= 0.95, (h, diff.max())
        assert diff.max() <= 8 / 256, h
    tax = Taxonomy.default()
    assert np.mean(tax.leaf_probabilities(got).argmax(1) == tax.leaf_probabilities(ref).argmax(1)) >= 0.9


def test_onnx_from_float_keras_matches_keras(run, exported):
    frames = run["frames"]
    ref = _keras_probs(run["float"], frames)
    got = OnnxEngine(exported["float"]["path"]).predict(frames)  # dynamic batch: one call
    for h in HEADS:
        np.testing.assert_allclose(got[h], ref[h], atol=1e-4)


def test_onnx_from_qat_keras_emulates_fake_quant(run, exported):
    """Run without graph rewrites, the QDQ graph computes what the fake-quant nodes compute (bar rounding ties)."""
    frames = run["frames"]
    ref = _keras_probs(run["qat"], frames)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exported["qat"]["path"], opts, providers=["CPUExecutionProvider"])
    got = dict(zip(HEADS, session.run(HEADS, {"image": frames[..., None].astype(np.float32)}), strict=True))
    same_rows = np.all([np.abs(got[h] - ref[h]).max(1) <= 1e-4 for h in HEADS], axis=0)
    assert same_rows.mean() >= 0.75
    default = OnnxEngine(exported["qat"]["path"]).predict(frames)  # integer kernels: quantization error
    for h in HEADS:
        assert np.mean(np.abs(default[h] - ref[h]) <= 4 / 256 + 1e-6) >= 0.9


def test_refuses_overwrite_and_bad_input(run, exported, tmp_path):
    path = exported["float"]["path"]
    before = os.path.getmtime(path)
    with pytest.raises(FileExistsError, match="exists"):
        export_onnx(run["dir"] / "float.keras", path)
    assert os.path.getmtime(path) == before
    with pytest.raises(ValueError, match="cannot export"):
        export_onnx(exported["tflite"]["path"], tmp_path / "x.onnx")
    for missing in ("missing.keras", "missing.tflite"):
        with pytest.raises(FileNotFoundError, match=f"{missing}: model file not found"):
            export_onnx(tmp_path / missing, tmp_path / "y.onnx")
    assert not list(tmp_path.iterdir())


def test_predict_edges(exported, tmp_path):
    model = OnnxEngine(exported["tflite"]["path"])
    empty = model.predict(np.zeros((0, SIZE, SIZE), np.uint8))
    assert sorted(empty) == HEADS and empty["h1"].shape == (0, 3)
    with pytest.raises(ValueError, match=r"expected \(N, 32, 32\)"):
        model.predict(np.zeros((2, SIZE + 1, SIZE + 1), np.uint8))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: not a loadable ONNX model"):
        OnnxEngine(bad)


def test_a_changed_weight_is_refused_by_the_graph_digest(exported, tmp_path):
    import onnx

    from semhinet_tf.artifacts.contract import ModelRefusedError

    for key in ("tflite", "float"):
        proto = onnx.load(exported[key]["path"])
        weights = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        raw = bytearray(weights.raw_data)
        raw[len(raw) // 2] ^= 0x01
        weights.raw_data = bytes(raw)
        damaged = tmp_path / f"{key}_damaged.onnx"
        onnx.save(proto, damaged)
        with pytest.raises(ModelRefusedError, match=f"{key}_damaged.onnx: damaged or modified"):
            OnnxEngine(damaged)
        OnnxEngine(exported[key]["path"])  # the untouched export loads


def test_load_model_gives_the_onnx_engine(exported):
    from semhinet_tf.engines import load_model

    pred = load_model(exported["float"]["path"], threads=1)
    assert pred.format == "onnx" and pred.input_size == SIZE
    out = pred.predict(np.full((3, SIZE, SIZE), 128, np.uint8))
    assert sorted(out) == HEADS and out["h2"].shape == (3, 3)
    np.testing.assert_allclose(out["h1"].sum(1), 1.0, atol=1e-5)


def _as_onnx_codes(codes: np.ndarray, onnx_type: str) -> np.ndarray:
    """TFLite's int8 codes as an ONNX tensor of `onnx_type` holds them (uint8: + 128, the export's activations)."""
    if onnx_type == "tensor(uint8)" and codes.dtype == np.int8:
        return (codes.astype(np.int16) + 128).astype(np.uint8)
    return codes


@pytest.mark.parametrize("only_where_needed", [True, False])
def test_tables_are_the_tflite_operators(run, exported, tmp_path, only_where_needed):
    """Each int8 hard-swish / add of the .tflite became a table in the ONNX graph or was found exact as QDQ, and
    either way that ONNX piece gives the operator's own TFLite output on random codes (so a table's index order,
    offsets and operand order are right, and an operator kept as QDQ was rightly kept). The default export keeps
    those onnxruntime already gets right; with every operator tabulated, the two-input tables are checked too."""
    import onnx
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    from semhinet_tf.export.onnx_tables import (
        TABULATED_OPS,
        operator_names,
        single_operator_model,
        table_name,
        tabulate_elementwise,
    )

    tflite = run["dir"] / "model_int8.tflite"
    onnx_path = exported["tflite"]["path"]
    report = exported["tflite"]["tables"]
    if not only_where_needed:
        proto = onnx.load(export_onnx(tflite, tmp_path / "plain.onnx", tflite_tables=False)["path"])
        report = tabulate_elementwise(proto, tflite, only_where_needed=False).as_dict()
        assert report["exact"] == {}
        onnx_path = tmp_path / "all_tables.onnx"
        onnx.save(proto, onnx_path)
    model = flatbuffer_utils.read_model(str(tflite))
    names = operator_names(model)
    wanted = [i for i, n in enumerate(names) if n in TABULATED_OPS]
    assert {"HARD_SWISH", "ADD"} <= {names[i] for i in wanted}
    tabulated = sum(report["tabulated"].values())
    assert report["left"] == {} and tabulated + sum(report["exact"].values()) == len(wanted)
    assert tabulated and report["table_bytes"] >= 256 * tabulated
    graph = onnx.load(onnx_path).graph
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {t.name for t in graph.initializer}
    rng = np.random.default_rng(0)
    binary_seen = False
    for index in wanted:
        tag = table_name(index)
        out = model.subgraphs[0].tensors[model.subgraphs[0].operators[index].outputs[0]].name.decode()
        last = producer[out]
        if last.op_type == "Gather":
            assert last.input[0] == f"{tag}_values"
            casts = sorted((n for n in graph.node if n.output[0].startswith(f"{tag}_code")), key=lambda n: n.output[0])
            sources = [c.input[0] for c in casts]  # operand order, as the table's index is built
        else:  # kept as tf2onnx wrote it: QuantizeLinear <- [Clip] <- op <- DequantizeLinear(s)
            assert last.op_type == "QuantizeLinear"
            op = producer[last.input[0]]
            op = producer[op.input[0]] if op.op_type == "Clip" else op
            assert op.op_type in ("HardSwish", "Add"), op.op_type
            sources = [producer[i].input[0] for i in op.input if producer[i].input[0] not in initializers]
        piece = tmp_path / f"{tag}.onnx"
        onnx.utils.extract_model(str(onnx_path), str(piece), sources, [out])
        live = single_operator_model(model, index, tmp_path / f"{tag}.tflite")
        assert len(live) == len(sources)
        binary_seen |= len(live) == 2 and last.op_type == "Gather"
        interpreter = Interpreter(model_path=str(tmp_path / f"{tag}.tflite"))
        interpreter.allocate_tensors()
        session = ort.InferenceSession(str(piece), providers=["CPUExecutionProvider"])
        onnx_feeds = {}
        for detail, source, onnx_in in zip(interpreter.get_input_details(), sources, session.get_inputs(), strict=True):
            info = np.iinfo(detail["dtype"])
            codes = rng.integers(info.min, info.max + 1, detail["shape"]).astype(detail["dtype"])
            interpreter.set_tensor(detail["index"], codes)
            shape = [d if isinstance(d, int) else 1 for d in onnx_in.shape]
            # ONNX may hold the tensor channels-first; an elementwise table does not care where a code sits
            onnx_feeds[source] = _as_onnx_codes(codes.reshape(-1)[:int(np.prod(shape))].reshape(shape), onnx_in.type)
        interpreter.invoke()
        want = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1)
        got = session.run(None, onnx_feeds)[0].reshape(-1)
        want = _as_onnx_codes(want[:got.size], session.get_outputs()[0].type)
        assert got.dtype == want.dtype and np.array_equal(got, want), (names[index], index)
    assert binary_seen or only_where_needed  # a two-input add table (residual / pooled-feature sums) checked


def test_the_default_tables_export_gives_tflite_outputs(run, exported, tmp_path):
    """The tables export (the default: uint8 activations and weights, TFLite's tables) gives the .tflite's outputs
    bit for bit on these frames (measured so on 1,200-2,000 benchmark frames too); tf2onnx's plain graph does not
    have to."""
    from semhinet_tf.board.runtime import BoardModel

    default = export_onnx(run["dir"] / "model_int8.tflite", tmp_path / "default.onnx")
    assert default["tables"] and default["tables"]["uint8_weights"]
    plain = export_onnx(run["dir"] / "model_int8.tflite", tmp_path / "plain.onnx", tflite_tables=False)
    assert plain["tables"] is None
    assert "HardSwish" in {n.op_type for n in __import__("onnx").load(plain["path"]).graph.node}
    frames = run["frames"]
    ref = BoardModel(run["dir"] / "model_int8.tflite", threads=1).predict(frames)
    tabled = OnnxEngine(exported["tflite"]["path"], threads=1).predict(frames)
    qdq = OnnxEngine(plain["path"], threads=1).predict(frames)
    off_tabled = sum(int(np.sum(np.abs(tabled[h] - ref[h]) > 1e-6)) for h in HEADS)
    off_plain = sum(int(np.sum(np.abs(qdq[h] - ref[h]) > 1e-6)) for h in HEADS)
    assert off_tabled == 0 and off_tabled <= off_plain, (off_tabled, off_plain)


def test_tables_export_is_exact_where_u8s8_kernels_would_saturate(exported, tmp_path):
    """On x86 CPUs without VNNI, onnxruntime's fused U8S8 kernels sum pairs of uint8 x int8 products in int16 and
    saturate (export/onnx_tables.py); the tables export holds the weights as uint8 so that they do not. Here the
    export's stem convolution gets every weight at the top code and bright frames (pairs of 2 x 215 x 127 > 32767
    with int8 weights): its fused codes must be exactly those of onnxruntime's unfused QDQ path, as they are
    not (every element off) when the weights are int8. On a CPU with VNNI nothing saturates either way."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(exported["tflite"]["path"])
    graph = proto.graph
    init = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    stem = next(n for n in graph.node if n.op_type == "Conv")
    weights = init[producer[stem.input[1]].input[0]]
    codes = numpy_helper.to_array(weights)
    assert codes.dtype == np.uint8  # held as uint8 (an int8 weight would be a U8S8 kernel)
    weights.CopyFrom(numpy_helper.from_array(np.full_like(codes, 255), weights.name))  # real value: the top code
    stem_codes = next(n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == stem.output[0])
    graph.output.append(onnx.helper.make_empty_tensor_value_info(stem_codes))
    path = tmp_path / "bright_stem.onnx"
    onnx.save(proto, path)
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    unfused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["QDQSelectorActionTransformer"])
    feed = fused.get_inputs()[0].name
    bright = np.clip(235 + np.random.default_rng(7).normal(0, 12, (3, 1, SIZE, SIZE, 1)), 0, 255).astype(np.uint8)
    for frame in bright:
        a, b = fused.run([stem_codes], {feed: frame})[0], unfused.run([stem_codes], {feed: frame})[0]
        assert a.max() > a.min()  # the stem's codes are not all clipped to one value
        np.testing.assert_array_equal(a, b)


def test_a_tables_export_from_before_uint8_weights_is_mended_in_memory(run, exported, tmp_path, monkeypatch):
    """Exports written before 2026-12-07 hold int8 weights beside uint8 activations (saturating U8S8 kernels on x86
    CPUs without VNNI): the engine holds their weights as uint8 in memory, says so once and leaves the file as it
    is; a current export is loaded as written, without a note."""
    import onnx

    import semhinet_tf.export.onnx_tables as onnx_tables
    from semhinet_tf.board.runtime import BoardModel

    tflite = run["dir"] / "model_int8.tflite"
    monkeypatch.setattr(onnx_tables, "uint8_weights", lambda proto: 0)
    old = export_onnx(tflite, tmp_path / "old.onnx", tflite_tables=True)["path"]
    monkeypatch.undo()
    proto = onnx.load(old)
    for prop in proto.metadata_props:
        if prop.key == EXPORT_KEY:  # as such exports were written: no uint8_weights entry
            export = json.loads(prop.value)
            del export["match_tflite"]["uint8_weights"]
            prop.value = json.dumps(export)
    onnx.save(proto, old)
    before = open(old, "rb").read()
    notes: list[str] = []
    engine = OnnxEngine(old, threads=1, warn=notes.append)
    assert len(notes) == 1 and "exported before its weights were held as uint8" in notes[0], notes
    assert open(old, "rb").read() == before
    ref = BoardModel(tflite, threads=1).predict(run["frames"])
    got = engine.predict(run["frames"])
    for head in HEADS:
        np.testing.assert_array_equal(got[head], ref[head], err_msg=head)
    current: list[str] = []
    OnnxEngine(exported["tflite"]["path"], threads=1, warn=current.append)
    assert current == []
