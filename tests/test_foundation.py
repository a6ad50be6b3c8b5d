"""Foundation: ingest every source format, export + check, ort-cpu FP32 build, report, CLI."""

from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch

from dscompile import api
from dscompile.compiler.ingest import IngestOptions, detect_format, ingest
from dscompile.compiler.module_paths import layer_map
from dscompile.compiler.shapes import parse_input_shape
from dscompile.errors import InputError


@pytest.fixture(scope="module")
def sources(digits, tmp_path_factory):
    """The digits CNN saved every way a user may hand it to us."""
    d = tmp_path_factory.mktemp("sources")
    example = torch.from_numpy(digits.test_x[:1])
    torch.save(digits.module, d / "pickled.pt")
    torch.save(digits.module.state_dict(), d / "state_dict.pt")
    torch.export.save(torch.export.export(digits.module, (example,)), d / "exported.pt2")
    return {"torchscript": digits.torchscript, "onnx": digits.onnx, "pickle": d / "pickled.pt",
            "torch-export": d / "exported.pt2", "state_dict": d / "state_dict.pt"}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "pickle", "torch-export"])
def test_format_is_read_from_content_not_name(sources, fmt, tmp_path):
    disguised = tmp_path / "model.bin"
    disguised.write_bytes(sources[fmt].read_bytes())
    assert detect_format(disguised) == fmt


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "torch-export"])
def test_compile_every_format_gives_a_verified_fp32_build(sources, fmt, tmp_path, digits):
    out = tmp_path / "m.onnx"
    shapes = [] if fmt == "torch-export" else ["x:1x1x8x8"]
    result = api.compile(sources[fmt], target="ort-cpu", output=out, input_shapes=shapes, verify_samples=8)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["format"] == "dscompile-report/1"
    assert report["source"]["format"] == fmt
    assert report["fidelity"]["cosine"] > 0.9999
    assert report["fidelity"]["top1_agreement"] == 1.0
    assert report["latency"]["kind"] == "measured" and "onnxruntime" in report["latency"]["where"]
    assert report["artifacts"][0]["bytes"] == out.stat().st_size
    # The artifact really classifies digits as the torch model does.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = digits.test_x[:64]
    got = [sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1]})[0].argmax() for i in range(len(x))]
    with torch.no_grad():
        ref = digits.module(torch.from_numpy(x)).argmax(1).numpy()
    assert (ref == got).mean() == 1.0


def test_pickled_module_needs_trust(sources, tmp_path):
    opts = IngestOptions(input_shapes=(parse_input_shape("x:1x1x8x8"),))
    with pytest.raises(InputError, match="--trust-pickle"):
        ingest(sources["pickle"], opts)
    trusted = IngestOptions(input_shapes=opts.input_shapes, trust_pickle=True)
    assert ingest(sources["pickle"], trusted).graph.source.format == "pickle"


def test_export_keeps_module_paths(digits):
    from dscompile.compiler.ingest import export_to_onnx

    model, lmap = export_to_onnx(digits.module, (parse_input_shape("x:1x1x8x8"),), "module", digits.torchscript)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(lmap.get(c) in {"0", "3"} for c in convs), lmap
    assert layer_map(model) == lmap


def test_export_check_compares_against_torch(transformer, tmp_path):
    graph = ingest(transformer.torchscript, IngestOptions(input_shapes=(parse_input_shape(transformer.input_shape),)))
    assert graph.graph.inputs[0].dtype == "int64"
    assert graph.export_check["max_rel_err"] < 1e-3


@pytest.mark.parametrize("model_name", ["transformer", "gru"])
def test_sequence_models_compile(request, model_name, tmp_path, cli):
    zm = request.getfixturevalue(model_name)
    out = tmp_path / f"{model_name}.onnx"
    r = cli("--target", "ort-cpu", zm.torchscript, "--input-shape", zm.input_shape, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["fidelity"]["cosine"] > 0.9999
    assert out.exists()


def test_default_subcommand_is_compile(cli, digits, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    ra = cli("--target", "ort-cpu", digits.torchscript, "--input-shape", "x:1x1x8x8", "-o", a, "-q")
    rb = cli("compile", "--target", "ort-cpu", digits.torchscript, "--input-shape", "x:1x1x8x8", "-o", b, "-q")
    assert ra.returncode == rb.returncode == 0, ra.stderr + rb.stderr
    assert onnx.load(str(a)).graph == onnx.load(str(b)).graph


def test_inspect_reports_ops_params_macs(cli, digits):
    r = cli("inspect", digits.onnx, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["ops"]["Conv"] == 2 and info["ops"]["Gemm"] == 2
    n_params = sum(p.numel() for p in digits.module.parameters())
    # BatchNorm folded into the convs: 2 x (2 x channels) BN parameters disappear
    assert info["parameters"] == n_params - 2 * (16 + 32)
    # conv1 16*64*9 + conv2 32*64*16*9 + fc1 512*64 + fc2 64*10
    assert info["macs"] == 16 * 64 * 9 + 32 * 64 * 16 * 9 + 512 * 64 + 64 * 10
    assert info["inputs"][0]["shape"] == [1, 1, 8, 8]
    r = cli("inspect", digits.torchscript, "--input-shape", "x:1x1x8x8")
    assert r.returncode == 0 and "Conv" in r.stdout


def test_devices_lists_targets(cli):
    r = cli("devices", "--json")
    assert r.returncode == 0, r.stderr
    names = [t["name"] for t in json.loads(r.stdout)["targets"]]
    assert "ort-cpu" in names


def test_help_has_examples_and_no_optional_backend_imports():
    import subprocess

    code = (
        "import sys; from dscompile import cli; "
        "bad = [m for m in ('tensorflow', 'tensorrt', 'onnx2tf', 'ai_edge_litert') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from click.testing import CliRunner

    from dscompile.cli import cli

    for name in cli.commands:
        text = CliRunner().invoke(cli, [name, "--help"]).output
        assert "Example" in text, name


def test_demo_runs_end_to_end(cli, tmp_path):
    r = cli("demo", "-o", tmp_path / "demo", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["accuracy"] > 0.95
    assert data["reports"]["ort-cpu"]["fidelity"]["cosine"] > 0.9999
