"""A YOLOv8-style decode head on the digits CNN: what the jetson-orin lowering must leave alone.

YOLOv8n (nudenet) lost box IoU to Model Optimizer's all-INT8 build while keeping 45 convs in FP16:
- its anchor grid and strides are computed from the feature map's shape (Shape -> Range -> Reshape):
  tensors TensorRT folds into constants, which we quantized as activations (anchor points moved by
  0.3 cells through an INT8 Concat/Add);
- its DFL Softmax (a distribution over box distances) got the entropy threshold ~0.5 as amax, which
  clips every confident peak (Model Optimizer: 1.0);
- its output Concat joins boxes (0..320) and class scores (0..1): one INT8 scale zeroes the scores;
- DMPQ's per-slice NMSE divided by the power of class-score slices of absent classes (~1e-9): one
  INT8 concat scored 2e7, and the whole model's budget went to noise.
Here the digits CNN's pooled features feed the same three constructs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dscompile.calibration.collect import calibrate
from dscompile.compiler.capabilities import INT8
from dscompile.compiler.ingest import IngestOptions, ingest
from dscompile.compiler.layers import find_layers
from dscompile.compiler.sensitivity import nmse
from dscompile.planning import prepared
from dscompile.targets.tensorrt import TARGET
from dscompile.targets.tensorrt_plan import default_plan
from dscompile.targets.tensorrt_qdq import lower_plan

GRID = "grid"  # the anchor x coordinates: Range over the feature map's width
PROBS = "dfl_probs"  # Softmax over channels, read by the DFL conv


def _with_head(digits_onnx: str, path) -> str:
    """digits CNN + softmax over the pooled channels -> 1x1 'DFL' conv (expected bin) + anchor grid."""
    model = onnx.load(digits_onnx)
    g = model.graph
    pooled = next(n for n in g.node if n.op_type == "MaxPool").output[0]
    last_conv = [n for n in g.node if n.op_type == "Conv"][-1]  # the one the MaxPool pools
    channels = next(t for t in g.initializer if t.name == last_conv.input[1]).dims[0]
    bins = np.arange(channels, dtype=np.float32).reshape(1, channels, 1, 1)
    g.initializer.extend([
        numpy_helper.from_array(bins, "dfl_bins"),
        numpy_helper.from_array(np.array([3], np.int64), "axis_w"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1, 1, 1, -1], np.int64), "grid_shape"),
    ])
    g.node.extend([
        helper.make_node("Softmax", [pooled], [PROBS], "dfl_softmax", axis=1),
        helper.make_node("Conv", [PROBS, "dfl_bins"], ["dist"], "dfl_conv"),
        helper.make_node("Shape", [pooled], ["pooled_shape"], "grid_shape_of"),
        helper.make_node("Gather", ["pooled_shape", "axis_w"], ["width"], "grid_width"),
        helper.make_node("Squeeze", ["width"], ["width_scalar"], "grid_width_scalar"),
        helper.make_node("Range", ["zero", "width_scalar", "one"], ["grid_int"], "grid_range"),
        helper.make_node("Cast", ["grid_int"], ["grid_flat"], "grid_cast", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["grid_flat", "grid_shape"], [GRID], "grid_reshape"),
        helper.make_node("Add", ["dist", GRID], ["box_x"], "decode_add"),
        helper.make_node("Sigmoid", ["dist"], ["score"], "score_sigmoid"),
        helper.make_node("Concat", ["box_x", "score"], ["det"], "det_concat", axis=1),  # boxes beside scores
    ])
    g.output.append(helper.make_tensor_value_info("det", TensorProto.FLOAT, [1, 2, "h", "w"]))
    out = str(path / "digits_head.onnx")
    onnx.save(model, out)
    return out


@pytest.fixture(scope="module")
def head(digits, tmp_path_factory):
    # not simplified: as in YOLOv8 (dynamic height and width), the grid stays a Shape -> Range computation
    path = _with_head(str(digits.onnx), tmp_path_factory.mktemp("head"))
    graph = prepared(ingest(path, IngestOptions(simplify=False)).graph)
    feeds = [{"x": digits.calib[i : i + 1]} for i in range(32)]
    table = calibrate(graph.model, feeds, model_sha256=graph.sha256, data_sha256="zoo", progress=False)
    return graph, table


def _quantized(model: onnx.ModelProto) -> dict[str, float]:
    """Activation tensor -> scale of the QuantizeLinear reading it."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]].ravel()[0]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_shape_derived_anchor_grid_is_no_activation(head):
    graph, table = head
    assert "decode_add" not in {lay.name for lay in find_layers(graph)}
    model, _ = lower_plan(graph, default_plan(graph, table, "jetson-orin", "jetson-agx-orin-64gb"), table)
    quantized = _quantized(model)
    assert PROBS in quantized  # the DFL conv is INT8
    assert GRID not in quantized, "the constant-foldable anchor grid got Q/DQ"


def test_output_concat_of_boxes_and_scores_stays_float(head):
    graph, table = head
    caps = TARGET.capabilities(graph, "jetson-agx-orin-64gb")
    concat = next(lay for lay in find_layers(graph) if lay.name == "det_concat")
    assert INT8 not in caps.layer_menu(concat)
    plan = default_plan(graph, table, "jetson-orin", "jetson-agx-orin-64gb")
    assert plan.layer("det_concat").precision != INT8
    model, _ = lower_plan(graph, plan, table)
    assert "score" not in _quantized(model)  # one scale for 0..8 and 0..1 would round the scores away


def test_softmax_output_keeps_its_peak(head):
    graph, table = head
    tr = table.range(PROBS)
    assert tr.threshold("entropy") < 0.9 * tr.absmax  # the KL threshold clips the peaks
    model, _ = lower_plan(graph, default_plan(graph, table, "jetson-orin", "jetson-agx-orin-64gb"), table)
    assert _quantized(model)[PROBS] == pytest.approx(tr.absmax / 127, rel=1e-6)


def test_absent_class_slice_does_not_dominate_nmse():
    """[1, 4 boxes + 2 classes, anchors]: class 1 absent (sigmoid ~1e-9), off by 1e-9 everywhere."""
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 320, (1, 4, 100)), rng.uniform(0, 1, (1, 1, 100)),
                          np.full((1, 1, 100), 1e-9)], axis=1)
    noise = ref.copy()
    noise[:, 5] += 1e-9  # invisible: 100% of an absent class's score
    assert nmse(ref, noise) < 1e-6
    boxes = ref.copy()
    boxes[:, :4] += 3.0  # three pixels off every box: that is what must count
    assert nmse(ref, boxes) > 100 * nmse(ref, noise)


def _concats(path) -> str:
    """x -> conv a, conv b -> Concat 'c2f_cat' -> conv c -> Concat 'head_cat'(c, a) -> Reshape -> Sigmoid: the
    first Concat feeds a conv (as YOLOv8's C2f blocks), the second only an activation (as its per-scale head
    Concats of box logits and class logits)."""
    rng = np.random.default_rng(0)
    w = {name: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
         for name, shape in (("wa", (4, 2, 1, 1)), ("wb", (4, 2, 1, 1)), ("wc", (4, 8, 1, 1)))}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], "conv_a"), helper.make_node("Conv", ["x", "wb"], ["b"], "conv_b"),
             helper.make_node("Concat", ["a", "b"], ["ab"], "c2f_cat", axis=1),
             helper.make_node("Conv", ["ab", "wc"], ["c"], "conv_c"),
             helper.make_node("Concat", ["c", "a"], ["ca"], "head_cat", axis=1),
             helper.make_node("Reshape", ["ca", "flat"], ["r"], "head_reshape"),
             helper.make_node("Sigmoid", ["r"], ["y"], "head_sigmoid"),
             # a box-decode Add of two activations (x1y1 + x2y2) and
             # a transformer's residual: tokens -> MatMul -> bias Add -> Add(tokens) (-> LayerNorm, no GEMM)
             helper.make_node("Reshape", ["a", "tok_shape"], ["a3"], "tok_reshape"),
             helper.make_node("Transpose", ["a3"], ["tok"], "tok_transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["tok", "wm"], ["mm"], "dense"),
             helper.make_node("Add", ["mm", "bm"], ["mmb"], "dense_bias"),
             helper.make_node("Add", ["mmb", "tok"], ["res"], "residual_add"), helper.make_node("Relu", ["res"], ["y2"], "res_relu"),
             helper.make_node("Sigmoid", ["a"], ["sa"], "sig_a"), helper.make_node("Sigmoid", ["b"], ["sb"], "sig_b"),
             helper.make_node("Add", ["sa", "sb"], ["dec"], "decode_add"), helper.make_node("Relu", ["dec"], ["y3"], "dec_relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 64, 4]),
                           helper.make_tensor_value_info("y3", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [*w.values(), numpy_helper.from_array(np.array([1, 8, 64], np.int64), "flat"),
                           numpy_helper.from_array(np.array([1, 4, 64], np.int64), "tok_shape"),
                           numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "wm"),
                           numpy_helper.from_array(np.full(4, 0.5, np.float32), "bm")])
    out = str(path / "concats.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), out)
    return out


def test_concat_feeding_no_conv_stays_float(tmp_path):
    """A Concat whose output reaches no Conv/Gemm/MatMul gains nothing from INT8 (TensorRT would only round
    it; its shared scale rounds the smaller-range input hardest): YOLOv8n's head Concats in INT8 cost top-10
    box IoU 0.892 -> 0.925. A Concat feeding a conv stays INT8, and so does a residual Add on a weighted layer's output."""
    graph = prepared(ingest(_concats(tmp_path), IngestOptions()).graph)
    caps = TARGET.capabilities(graph, "jetson-agx-orin-64gb")
    layers = {lay.name: lay for lay in find_layers(graph)}
    assert INT8 in caps.layer_menu(layers["c2f_cat"])
    assert INT8 not in caps.layer_menu(layers["head_cat"])
    assert INT8 in caps.layer_menu(layers["residual_add"])  # fused into the dense layer's epilogue
    assert INT8 not in caps.layer_menu(layers["decode_add"])  # YOLOv8's x1y1 + x2y2 in pixels: 0.925 -> 0.939
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 2, 8, 8)).astype(np.float32)} for i in range(8)]
    table = calibrate(graph.model, feeds, model_sha256=graph.sha256, data_sha256="t", progress=False)
    plan = default_plan(graph, table, "jetson-orin", "jetson-agx-orin-64gb")
    assert plan.layer("c2f_cat").precision == INT8 and plan.layer("head_cat").precision != INT8
    model, _ = lower_plan(graph, plan, table)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    cat = {n.name: n for n in model.graph.node if n.op_type == "Concat"}
    assert all(producer.get(t) == "DequantizeLinear" for t in cat["c2f_cat"].input)
    assert not any(producer.get(t) == "DequantizeLinear" for t in cat["head_cat"].input)
