"""Layers as runtimes fuse them, normalisation, and the exact allocation."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dscompile.compiler.allocate import Budget, Choice, allocate, parse_budget
from dscompile.compiler.graph import ModelGraph, SourceInfo, graph_inputs, graph_outputs
from dscompile.compiler.layers import ACT_MATMUL, find_layers
from dscompile.compiler.normalize import normalize, onnx_opset
from dscompile.errors import InputError

RNG = np.random.default_rng(1)


def _graph(model: onnx.ModelProto, layer_map: dict | None = None) -> ModelGraph:
    model = normalize(model)
    return ModelGraph(model, graph_inputs(model), graph_outputs(model), SourceInfo("m", "0", "onnx"), layer_map or {})


def _init(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def test_conv_bn_relu_and_matmul_bias_fuse_into_one_layer_each():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fw"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fb"], ["y"], name="fc_bias"),
    ]
    inits = [_init("w", 4, 1, 3, 3), _init("b", 4), _init("s", 4), _init("bb", 4), _init("m", 4),
             numpy_helper.from_array(np.ones(4, np.float32), "v"), _init("fw", 64, 10), _init("fb", 10)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    original = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph = _graph(original, {"conv": "features.0"})
    layers = find_layers(graph)
    # BatchNormalization is folded into the conv (it would block the integer kernel)
    assert [(lay.op, lay.nodes) for lay in layers] == [("Conv", ("conv", "relu")), ("MatMul", ("fc", "fc_bias"))]
    conv, fc = layers
    assert conv.inputs == ("x",) and conv.outputs == ("r",) and conv.weights[0] == "conv_W_bnfold" and conv.module == "features.0"
    import onnxruntime as ort

    x = {"x": RNG.standard_normal((1, 1, 4, 4)).astype(np.float32)}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0] for m in (original, graph.model)]
    np.testing.assert_allclose(run[0], run[1], rtol=1e-5, atol=1e-5)
    assert fc.outputs == ("y",) and fc.params == 640 and fc.macs == 640


def test_activation_matmul_recurrent_and_control_flow_layers():
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["s"], name="scores"),
        helper.make_node("GRU", ["s", "W", "R"], ["h", "hn"], name="gru", hidden_size=4),
        helper.make_node("ReduceSum", ["a"], ["red"], name="red", keepdims=0),
        helper.make_node("Cast", ["red"], ["cond"], name="cast", to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then, else_branch=then),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 3]),
                                       helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3, 3])],
                          [helper.make_tensor_value_info("hn", TensorProto.FLOAT, None), helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                          [_init("W", 1, 12, 3), _init("R", 1, 12, 4)])
    layers = find_layers(_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])))
    ops = {lay.name: lay.op for lay in layers}
    assert ops == {"scores": ACT_MATMUL, "gru": "GRU", "branch": "If"}
    from dscompile.targets.ort_cpu import MENU, REASONS

    assert MENU.for_op("GRU") == ("fp32",) and "GRU" in REASONS and "If" in REASONS
    assert MENU.for_op(ACT_MATMUL) == ("fp32", "int8")


def test_normalize_upgrades_old_opsets_and_names_nodes():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    m = normalize(helper.make_model(g, opset_imports=[helper.make_opsetid("", 10)]))
    assert onnx_opset(m) >= 13
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == 2
    assert [n.name for n in normalize(m).graph.node] == names  # stable: plans keep naming the same nodes


def _brute(choices, budget):
    best = None
    for combo in itertools.product(*[list(c.options.items()) for c in choices]):
        s = sum(o[1][0] for o in combo)
        b = sum(o[1][1] for o in combo)
        t = sum(o[1][2] for o in combo)
        if budget.kind == "size" and b > budget.value * sum(c.options["fp32"][1] for c in choices) + 1e-9:
            continue
        key = s if budget.kind == "size" else b / 100.0 + t / 10.0
        if budget.kind == "kl" and s > budget.value:
            continue
        if best is None or key < best[0] - 1e-12:
            best = (key, {c.layer: o[0] for c, o in zip(choices, combo, strict=True)})
    return best


@pytest.mark.parametrize("seed", range(5))
def test_milp_allocation_is_exact(seed):
    rng = np.random.default_rng(seed)
    choices = []
    for i in range(6):
        nbytes = float(rng.integers(10, 40))
        choices.append(Choice(f"l{i}", {
            "fp32": (0.0, nbytes, 2.0), "int8": (float(rng.uniform(0, 0.01)), nbytes / 4, 1.0),
            "int4_weight": (float(rng.uniform(0, 0.05)), nbytes / 8, 1.5),
        }))
    for budget in (Budget("size", 0.3), Budget("kl", 0.05)):
        got = allocate(choices, budget)
        want = _brute(choices, budget)
        got_s = sum(c.options[got.precisions[c.layer]][0] for c in choices)
        want_s = sum(c.options[want[1][c.layer]][0] for c in choices)
        if budget.kind == "size":
            assert got_s == pytest.approx(want_s, abs=1e-9)
            assert got.bytes <= 0.3 * got.fp32_bytes + 1e-9
        else:
            assert got.sensitivity <= 0.05 + 1e-12
            got_cost = got.bytes / got.fp32_bytes + got.latency_ms / got.fp32_latency_ms
            want_cost = sum(c.options[want[1][c.layer]][1] for c in choices) / got.fp32_bytes + \
                sum(c.options[want[1][c.layer]][2] for c in choices) / got.fp32_latency_ms
            assert got_cost == pytest.approx(want_cost, abs=1e-6)


def test_unreachable_budget_names_the_closest_value_and_binding_layers():
    choices = [Choice("big", {"fp32": (0.0, 100.0, 1.0), "int8": (0.01, 25.0, 1.0)}),
               Choice("small", {"fp32": (0.0, 10.0, 1.0)})]
    with pytest.raises(InputError, match=r"smallest reachable is 0\.3182 of FP32.*big"):
        allocate(choices, Budget("size", 0.1))
    with pytest.raises(InputError, match="least reachable summed sensitivity"):
        allocate([Choice("x", {"int8": (0.5, 1.0, 1.0)})], Budget("kl", 0.01))


def test_budget_fractions():
    assert parse_budget("size=1/6") == Budget("size", 1 / 6)
    assert parse_budget("latency=0.5") == Budget("latency", 0.5)


@pytest.mark.parametrize("text", ["size", "size=abc", "speed=0.5", "kl=-1", "size=0", "size=1/0", "size=1/"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(InputError, match="--budget"):
        parse_budget(text)


def test_pinned_layers_keep_their_precision_and_the_rest_is_re_solved():
    choices = [
        Choice("a", {"fp32": (0.0, 100.0, 1.0), "int8": (0.5, 25.0, 0.5)}),
        Choice("b", {"fp32": (0.0, 100.0, 1.0), "int8": (0.1, 25.0, 0.5)}),
        Choice("c", {"fp32": (0.0, 100.0, 1.0), "int8": (0.2, 25.0, 0.5)}),
    ]
    free = allocate(choices, Budget("size", 0.5))  # 150 bytes: one layer stays fp32, the most sensitive
    assert free.precisions == {"a": "fp32", "b": "int8", "c": "int8"}
    pinned = allocate(choices, Budget("size", 0.5), pinned={"b": "fp32"})
    assert pinned.precisions == {"a": "int8", "b": "fp32", "c": "int8"} and pinned.bytes <= 150


def test_weights_in_constant_nodes_are_layer_weights(digits):
    """paddle2onnx-style weights (Constant nodes, not initializers) are found as the same layers, same bytes."""
    from dscompile.compiler.runtime import ort_session

    model = onnx.load(digits.onnx)
    as_nodes = onnx.ModelProto()
    as_nodes.CopyFrom(model)
    big = [t for t in as_nodes.graph.initializer if len(t.dims) >= 1]  # weights and biases, as paddle2onnx has them
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in big]
    kept = [t for t in as_nodes.graph.initializer if len(t.dims) < 1]
    del as_nodes.graph.initializer[:]
    as_nodes.graph.initializer.extend(kept)
    nodes = consts + list(as_nodes.graph.node)
    del as_nodes.graph.node[:]
    as_nodes.graph.node.extend(nodes)
    want = [(lay.op, lay.weights, lay.params) for lay in find_layers(_graph(model))]
    got = [(lay.op, lay.weights, lay.params) for lay in find_layers(_graph(as_nodes))]
    assert got == want and any(w for _, w, _ in want)
    g = _graph(as_nodes).model.graph  # integer lowering reads biases from initializers (PP-OCRv4's CTC head Gemm)
    inits = {t.name for t in g.initializer}
    biases = [n.input[2] for n in g.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert biases and all(b in inits for b in biases)
    x = {model.graph.input[0].name: digits.test_x[:1]}
    np.testing.assert_array_equal(ort_session(_graph(as_nodes).model).run(None, x)[0], ort_session(model).run(None, x)[0])


def test_repair_reallocation_keeps_layers_on_the_accelerator():
    """The repair loop re-solves a size-budgeted plan from its recorded costs: an option the plan
    recorded as leaving the NPU (``off_device``) ranks below every staying one there too, as in DMPQ."""
    from dscompile.compiler.plan import LayerPlan, QuantPlan
    from dscompile.compiler.repair_budget import Cap, Fixed, promote_within

    def cost(nbytes, off=""):
        return {"bytes": nbytes, "latency_ms": 0.0, **({"off_device": off} if off else {})}

    a = LayerPlan("a", ("a",), "Conv", "fp16", sensitivity={"fp32": 0.0, "fp16": 0.001, "int8": 0.2, "int8_dynamic": 0.01},
                  cost={"fp32": cost(400), "fp16": cost(200), "int8": cost(100), "int8_dynamic": cost(100, "hybrid kernel: CPU")})
    b = LayerPlan("b", ("b",), "Conv", "fp16", sensitivity={"fp32": 0.0, "fp16": 0.001},
                  cost={"fp32": cost(400), "fp16": cost(200)})
    plan = QuantPlan("snapdragon", "x", (a, b), budget={"size": 0.625}, predicted={"bytes": 400, "fp32_bytes": 800})
    cap = Cap(Budget("size", 0.625), Fixed(0.0, 0.0), 500.0)
    precisions, accepted, _ = promote_within(plan, [("b", "fp32")], 1, cap, {})
    assert accepted == [("b", "fp32")]
    assert precisions == {"a": "int8", "b": "fp32"}  # not int8_dynamic, 20x less sensitive but off the NPU
