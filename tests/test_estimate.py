"""The roofline on hand-computed layers, the profile and efficiency loaders, and layer extraction."""

from __future__ import annotations

import math
import textwrap
from dataclasses import replace

import onnx
import onnx.parser
import pytest

from dscompile.compiler.capabilities import Layer
from dscompile.errors import InputError
from dscompile.profiles import devices, estimate
from dscompile.profiles.layers import extract_layers, fold_qdq

FIG = 'value = {v}\nunit = "x"\nsource = "test figure"\n'


def write_profile(folder, name="toy", target="ort-cpu", skip=(), extra="", **figs) -> object:
    values = {"peak_int8_tops": 100.0, "peak_fp16_tflops": 50.0, "peak_fp32_tflops": 10.0,
              "mem_bandwidth_gbps": 100.0, "cpu_cores": 4, **figs}
    text = f'[device]\nname = "Toy"\ntarget = "{target}"\nclass = "cpu"\n\n'
    for k, v in values.items():
        if k not in skip:
            text += f"[figures.{k}]\n" + FIG.format(v=v) + "\n"
    path = folder / f"{name}.toml"
    path.write_text(text + extra)
    return path


def toy_eff(**kw) -> estimate.Efficiency:
    base = estimate.Efficiency(
        "cpu", {"int8": 0.5, "fp16": 0.5, "fp32": 0.5}, memory=0.5, layer_overhead_us=0.0, model_overhead_us=0.0,
        weight_only_compute="fp16", rate_scale={}, source="test", file="test.toml",
    )
    return replace(base, **kw)


@pytest.fixture
def toy(tmp_path):
    return devices.parse_profile(write_profile(tmp_path))


def conv(macs: int, params: int, act: int, depthwise: bool = False) -> Layer:
    return Layer("c", "Conv", ("c",), ("x",), ("y",), params=params, macs=macs, activation_elems=act, depthwise=depthwise)


def test_compute_bound_layer(toy):
    # 1e9 MACs = 2e9 ops at 100 TOPS x 0.5 -> 40 us; memory: 1e3 B weights + 1e3 B int8 acts at 50 GB/s -> 0.04 us
    lay = conv(10**9, 1000, 1000)
    assert estimate.layer_seconds(toy, toy_eff(), lay, "int8") == pytest.approx(40e-6)
    # fp32: 10 TFLOPS x 0.5 -> 2e9 / 5e12 = 400 us
    assert estimate.layer_seconds(toy, toy_eff(), lay, "fp32") == pytest.approx(400e-6)


def test_memory_bound_layer_and_batch(toy):
    # 1e6 weights int8 = 1 MB + 1e6 activations x 1 B = 2 MB at 100 GB/s x 0.5 -> 40 us; compute is 2e3/5e13 s
    lay = conv(1000, 10**6, 10**6)
    assert estimate.layer_seconds(toy, toy_eff(), lay, "int8") == pytest.approx(40e-6)
    # batch 4: weights read once, activations four times -> 5 MB -> 100 us
    assert estimate.layer_seconds(toy, toy_eff(), lay, "int8", batch=4) == pytest.approx(100e-6)
    # fp32 weights (4 MB) and activations (4 MB) -> 8 MB -> 160 us
    assert estimate.layer_seconds(toy, toy_eff(), lay, "fp32") == pytest.approx(160e-6)


def test_overheads_dram_fraction_depthwise_and_weight_only(toy):
    eff = toy_eff(layer_overhead_us=3.0, activation_dram=0.25, depthwise_rate=0.1)
    lay = conv(1000, 10**6, 4 * 10**6)  # 1 MB weights + 0.25 x 4 MB activations = 2 MB -> 40 us, + 3 us
    assert estimate.layer_seconds(toy, eff, lay, "int8") == pytest.approx(43e-6)
    dw = conv(10**9, 9, 100, depthwise=True)  # compute at 10% of the int8 rate: 2e9 / (100e12 x 0.5 x 0.1) = 400 us
    assert estimate.layer_seconds(toy, eff, dw, "int8") == pytest.approx(403e-6)
    # int4 weight-only computes at fp16 (weight_only_compute) with 4-bit weights: 2e9 / 25e12 = 80 us
    assert estimate.layer_seconds(toy, eff, conv(10**9, 8, 0), "int4_weight") == pytest.approx(83e-6)


def test_cpu_profile_without_fp16_runs_fp16_at_the_fp32_rate(tmp_path):
    prof = devices.parse_profile(write_profile(tmp_path, skip=("peak_fp16_tflops", "cpu_cores")))
    lay = conv(10**9, 1000, 1000)
    assert estimate.layer_seconds(prof, toy_eff(), lay, "fp16") == pytest.approx(400e-6)


def test_model_estimate_sums_layers_and_reports_fps(toy):
    eff = toy_eff(model_overhead_us=100.0)
    layers = [replace(conv(10**9, 1000, 1000), name="a"), replace(conv(10**9, 1000, 1000), name="b")]
    ms, fps = estimate.model_estimate(toy, layers, {"a": "int8", "b": "fp32"}, efficiency=eff)
    assert ms == pytest.approx(0.1 + 0.04 + 0.4)
    assert fps == pytest.approx(1000 / ms)
    ms8, fps8 = estimate.model_estimate(toy, layers, {}, batch=8, default="int8", efficiency=eff)
    assert ms8 == pytest.approx(0.1 + 2 * 8 * 0.04)
    assert fps8 == pytest.approx(8000 / ms8)
    with pytest.raises(InputError, match="batch"):
        estimate.model_estimate(toy, layers, {}, batch=0, efficiency=eff)


def test_layer_cost_api_on_a_real_profile():
    prof = devices.get_device("jetson-agx-orin-64gb")
    cost = estimate.layer_cost(prof, conv(10**8, 10**5, 10**5), "int8")
    assert cost.kind == "estimated" and cost.latency_ms > 0
    assert cost.bytes == 10**5  # int8 weights
    assert "devices/jetson-agx-orin-64gb.toml" in cost.source
    assert estimate.layer_cost(prof, conv(10**8, 10**5, 10**5), "fp16").bytes == 2 * 10**5


def test_every_shipped_profile_loads_with_its_target_keys():
    profs = devices.load_all()
    by_target = {p.target for p in profs}
    assert {"jetson-orin", "snapdragon", "ort-cpu"} <= by_target
    ids = {p.id for p in profs}
    assert {"jetson-agx-orin-64gb", "jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "jetson-orin-nx-8gb",
            "jetson-orin-nano-8gb", "jetson-orin-nano-4gb", "snapdragon-8-gen2", "snapdragon-8-gen3",
            "snapdragon-8-elite"} <= ids
    for p in profs:
        for key in (*devices.REQUIRED, "peak_fp16_tflops", *devices.TARGET_REQUIRED.get(p.target, ())):
            assert p.figure(key).source.strip(), (p.id, key)
    orin = devices.get_device("jetson-agx-orin-64gb")
    assert orin.value("gpu_int8_tops_sparse") == 2 * orin.value("gpu_int8_tops_dense")
    assert orin.software["tensorrt"]


@pytest.mark.parametrize("case, match", [
    ({"skip": ("mem_bandwidth_gbps",)}, "'mem_bandwidth_gbps' is missing"),
    ({"target": "snapdragon", "skip": ("peak_fp16_tflops",)}, "'peak_fp16_tflops' is missing"),
    ({"peak_int8_tops": '"fast"'}, "'peak_int8_tops' is not a number"),
    ({"target": "jetson-orin"}, "'gpu_int8_tops_dense' is missing"),
])
def test_bad_profiles_name_file_and_key(tmp_path, case, match):
    path = write_profile(tmp_path, **case)
    with pytest.raises(InputError, match=match) as err:
        devices.parse_profile(path)
    assert str(path) in str(err.value)


def test_figure_without_source_is_an_error(tmp_path):
    path = write_profile(tmp_path, extra='[figures.extra]\nvalue = 1\nsource = " "\n')
    with pytest.raises(InputError, match=r"toy.toml: figure 'extra' has no source"):
        devices.parse_profile(path)


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown device 'nope' .*jetson-agx-orin-64gb.*snapdragon-8-gen2"):
        devices.get_device("nope")


def test_efficiency_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "eff.toml"
    bad.write_text('[classes.cpu]\nsource = "x"\nmemory = "high"\nlayer_overhead_us = 1\nmodel_overhead_us = 1\n')
    with pytest.raises(InputError, match=r"classes.cpu.memory is missing or not a number"):
        estimate.load_efficiency(bad)
    bad.write_text('[classes.cpu]\nmemory = 1\nlayer_overhead_us = 1\nmodel_overhead_us = 1\n')
    with pytest.raises(InputError, match=r"classes.cpu has no source"):
        estimate.load_efficiency(bad)


TOY_NET = textwrap.dedent("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) <float[4, 3, 3, 3] w1, float[4] b1, float[4] s, float[4] m,
        float[4] v, float[4, 1, 3, 3] wd, float[4, 4, 1, 1] w2>
    {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        n1 = BatchNormalization (c1, s, b1, m, v)
        r1 = Relu (n1)
        d1 = Conv <pads = [1, 1, 1, 1], group = 4> (r1, wd)
        c2 = Conv (d1, w2)
        y = Add (c2, r1)
    }
""")


def toy_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(TOY_NET)
    for name, dims in (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("s", (4,)), ("m", (4,)), ("v", (4,)),
                       ("wd", (4, 1, 3, 3)), ("w2", (4, 4, 1, 1))):
        model.graph.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, dims, [0.5] * math.prod(dims)))
    return model


def test_layers_fuse_bn_relu_and_residual_add():
    layers = extract_layers(toy_model())
    assert [lay.op for lay in layers] == ["Conv", "Conv", "Conv"]
    first, dw, last = layers
    assert first.nodes == ("Conv_0", "BatchNormalization_1", "Relu_2")
    assert first.macs == 4 * 8 * 8 * 3 * 3 * 3 and first.params == 4 * 27 + 4
    assert first.activation_elems == 3 * 64 + 4 * 64  # reads x, writes r1
    assert dw.depthwise and dw.macs == 4 * 64 * 9 and not first.depthwise
    assert last.nodes == ("Conv_4", "Add_5")  # the residual add fuses into the conv before it
    assert last.activation_elems == 4 * 64 + 4 * 64 + 4 * 64  # d1 and r1 in, y out


def test_unfused_ops_become_layers():
    layers = extract_layers(toy_model(), unfused={"Relu"})
    assert [lay.op for lay in layers] == ["Conv", "Relu", "Conv", "Conv"]
    assert layers[1].macs == 0 and layers[1].activation_elems == 2 * 4 * 64


def test_qdq_model_folds_to_its_float_layers_with_precisions():
    from onnx import helper

    model = toy_model()
    g = model.graph
    # quantize the first conv's weight and input: DQ(w1_q) and Q->DQ on x
    g.initializer.append(helper.make_tensor("w1_q", onnx.TensorProto.INT8, (4, 3, 3, 3), [1] * 108))
    g.initializer.append(helper.make_tensor("sc", onnx.TensorProto.FLOAT, (), [0.1]))
    g.initializer.append(helper.make_tensor("zp", onnx.TensorProto.INT8, (), [0]))
    qdq = [helper.make_node("DequantizeLinear", ["w1_q", "sc", "zp"], ["w1_dq"]),
           helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["x_q"]),
           helper.make_node("DequantizeLinear", ["x_q", "sc", "zp"], ["x_dq"])]
    g.node[0].input[0], g.node[0].input[1] = "x_dq", "w1_dq"
    nodes = qdq + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    folded, precisions = fold_qdq(model)
    assert all(n.op_type not in ("QuantizeLinear", "DequantizeLinear") for n in folded.graph.node)
    assert list(precisions.values()) == ["int8"]
    assert extract_layers(folded)[0].macs == extract_layers(toy_model())[0].macs


def test_recurrent_layers_count_their_macs():
    from onnx import helper

    steps, batch, inp, hidden = 5, 2, 6, 4
    w = helper.make_tensor("W", onnx.TensorProto.FLOAT, (1, 3 * hidden, inp), [0.1] * (3 * hidden * inp))
    r = helper.make_tensor("R", onnx.TensorProto.FLOAT, (1, 3 * hidden, hidden), [0.1] * (3 * hidden * hidden))
    node = helper.make_node("GRU", ["x", "W", "R"], ["y"], hidden_size=hidden)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, (steps, batch, inp))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w, r])
    (layer,) = extract_layers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert layer.op == "GRU" and layer.params == 3 * hidden * (inp + hidden)
    assert layer.macs == steps * batch * 3 * hidden * (inp + hidden)
