"""Calibration data sources: folders of .npz, stacked arrays, images, generators; order, subsets, batches."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from PIL import Image

from dscompile.calibration.collect import calibrate, quantizable_tensors
from dscompile.calibration.datasets import DataOptions, open_data, split_holdout
from dscompile.calibration.images import make_preprocess
from dscompile.errors import InputError

TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, L, 4] x, int64[N, L] ids) => (float[N, L, 3] y, int64[N, L] ids_out)
<float[4, 3] w = {1.0, -2.0, 0.5, 0.25, 1.0, -1.0, 2.0, 0.0, 1.0, -0.5, 0.5, 1.5}>
{
   h = MatMul(x, w)
   y = Relu(h)
   ids_out = Identity(ids)
}
"""
IMAGE = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 3, 4, 4] img) => (float[1, 3, 1, 1] y)
{
   y = GlobalAveragePool(img)
}
"""
SPECS = [{"name": "x", "shape": ["N", "L", 4], "dtype": "float32"}, {"name": "ids", "shape": ["N", "L"], "dtype": "int64"}]


def two_input_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(TWO_INPUTS)


def write_npz_folder(folder, lengths=(3, 5, 3, 7, 5, 3), batch=1, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(lengths):
        np.savez(folder / f"s{i:03d}.npz", x=rng.standard_normal((batch, n, 4)).astype(np.float32),
                 ids=rng.integers(0, 9, (batch, n)))
    return folder


def test_npz_folder_with_variable_lengths(tmp_path):
    folder = write_npz_folder(tmp_path / "d")
    src = open_data(folder, SPECS, DataOptions(batch_size=8))
    assert src.samples == 6 and src.count == 6 and src.kind == "npz-folder"
    assert src.sha256 == open_data(folder, SPECS).sha256  # stable
    lengths = [f["x"].shape[1] for f in src.feeds()]
    assert lengths == [3, 5, 3, 7, 5, 3]  # sorted file order
    batches = list(src)
    assert sorted((b["x"].shape[0], b["x"].shape[1]) for b in batches) == [(1, 7), (2, 5), (3, 3)]
    assert all(b["ids"].dtype == np.int64 for b in batches)
    table = calibrate(two_input_model(), src, model_sha256="m", data_sha256=src.sha256, progress=False)
    assert set(table.tensors) == {"x", "h"}  # the float input and the MatMul output
    assert table.samples == 6
    x_all = np.concatenate([f["x"].ravel() for f in src.feeds()])
    assert table.range("x").absmax == pytest.approx(np.abs(x_all).max())


def test_quantizable_tensors_skip_integer_inputs():
    names = quantizable_tensors(two_input_model())
    assert "x" in names and "h" in names and "ids" not in names


def test_max_samples_seed_and_holdout(tmp_path):
    folder = write_npz_folder(tmp_path / "d", lengths=tuple(range(2, 22)))
    a = open_data(folder, SPECS, DataOptions(max_samples=8, seed=1))
    b = open_data(folder, SPECS, DataOptions(max_samples=8, seed=1))
    c = open_data(folder, SPECS, DataOptions(max_samples=8, seed=2))
    assert a.indices == b.indices and a.sha256 == b.sha256
    assert a.indices != c.indices and a.sha256 != c.sha256
    assert list(a.indices) == sorted(a.indices) and a.samples == 8
    cal, held = split_holdout(a, 3)
    assert held.samples == 3 and cal.samples == 5
    assert not set(cal.indices) & set(held.indices) and set(cal.indices) | set(held.indices) == set(a.indices)
    assert split_holdout(open_data(folder, SPECS, DataOptions(max_samples=2)), 16)[1].samples == 1  # at most half


def test_stacked_npy_and_npz(tmp_path):
    rows = np.random.default_rng(0).standard_normal((10, 3, 4)).astype(np.float32)
    spec = [{"name": "x", "shape": [1, 3, 4], "dtype": "float32"}]
    np.save(tmp_path / "a.npy", rows)
    np.savez(tmp_path / "b.npz", rows)  # unnamed: arr_0
    np.savez(tmp_path / "c.npz", x=rows)
    for name in ("a.npy", "b.npz", "c.npz"):
        src = open_data(tmp_path / name, spec, DataOptions())
        feeds = list(src)
        assert len(feeds) == 10 and feeds[3]["x"].shape == (1, 3, 4)  # fixed batch 1: one row per run
        np.testing.assert_array_equal(feeds[3]["x"][0], rows[3])
    dyn = [{"name": "x", "shape": ["N", 3, 4], "dtype": "float32"}]
    assert [f["x"].shape[0] for f in open_data(tmp_path / "a.npy", dyn, DataOptions(batch_size=4))] == [4, 4, 2]


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="pickled"):
        open_data(tmp_path / "p.npz", [{"name": "x", "shape": ["N"], "dtype": "float32"}])


def _png(path, colour, size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_with_options(tmp_path):
    _png(tmp_path / "imgs" / "b" / "1.png", (255, 0, 0))
    _png(tmp_path / "imgs" / "a.bmp", (0, 255, 0))
    spec = [{"name": "img", "shape": [1, 3, 4, 4], "dtype": "float32"}]
    pre = make_preprocess(mean="0.5", std="0.5")
    src = open_data(tmp_path / "imgs", spec, DataOptions(preprocess=pre))
    feeds = list(src.feeds())
    assert src.samples == 2 and feeds[0]["img"].shape == (1, 3, 4, 4)
    np.testing.assert_allclose(feeds[0]["img"][0, :, 0, 0], [-1.0, 1.0, -1.0])  # a.bmp: green, NCHW
    np.testing.assert_allclose(feeds[1]["img"][0, :, 2, 2], [1.0, -1.0, -1.0])  # b/1.png: red
    bgr = open_data(tmp_path / "imgs", spec, DataOptions(preprocess=make_preprocess(bgr=True)))
    np.testing.assert_allclose(next(bgr.feeds())["img"][0, :, 0, 0], [0.0, 1.0, 0.0])
    assert bgr.sha256 != src.sha256  # the preprocessing is part of the data
    table = calibrate(onnx.parser.parse_model(IMAGE), src, model_sha256="m", data_sha256=src.sha256, progress=False)
    assert table.range("img").max == pytest.approx(1.0)


def test_image_folder_with_toml_spec(tmp_path):
    _png(tmp_path / "imgs" / "x.jpg", (10, 20, 30), size=(40, 20))
    (tmp_path / "pre.toml").write_text(
        'size = [8, 8]\nresize = 10\nmean = [0.0, 0.0, 0.0]\nstd = [1.0, 1.0, 1.0]\nscale = 1.0\nlayout = "NHWC"\n'
    )
    spec = [{"name": "img", "shape": [1, "H", "W", 3], "dtype": "float32"}]
    src = open_data(tmp_path / "imgs", spec, DataOptions(preprocess_file=tmp_path / "pre.toml"))
    x = next(src.feeds())["img"]
    assert x.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(x[0, 4, 4], [10, 20, 30], atol=3)  # JPEG, raw pixel scale
    over = open_data(tmp_path / "imgs", spec, DataOptions(preprocess_file=tmp_path / "pre.toml",
                                                          preprocess=make_preprocess(size="6x4")))
    assert next(over.feeds())["img"].shape == (1, 6, 4, 3)  # options override the file
    (tmp_path / "bad.toml").write_text("sise = 3\n")
    with pytest.raises(InputError, match="unknown preprocessing keys sise"):
        open_data(tmp_path / "imgs", spec, DataOptions(preprocess_file=tmp_path / "bad.toml"))


GENERATOR = '''
import numpy as np

def feeds(seed=0):
    rng = np.random.default_rng(seed)
    for n in (2, 4, 2, 4, 2):
        yield {"x": rng.standard_normal((1, n, 4)).astype(np.float32), "ids": np.zeros((1, n), np.int64)}

def broken():
    yield {"x": np.zeros((1, 2, 4), np.float32), "ids": np.zeros((1, 2), np.int64)}
    raise RuntimeError("sensor offline")
'''


def test_generator_needs_trust_and_is_deterministic(tmp_path, monkeypatch):
    (tmp_path / "calibgen_ok.py").write_text(GENERATOR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="--trust-code"):
        open_data("calibgen_ok:feeds", SPECS, DataOptions())
    src = open_data("calibgen_ok:feeds", SPECS, DataOptions(trust_code=True, seed=3))
    assert src.samples == 5 and src.kind == "generator"
    assert src.sha256 == open_data("calibgen_ok:feeds", SPECS, DataOptions(trust_code=True, seed=3)).sha256
    assert src.sha256 != open_data("calibgen_ok:feeds", SPECS, DataOptions(trust_code=True, seed=4)).sha256
    assert sorted(f["x"].shape[1] for f in src) == [2, 4]  # one batch per length
    assert open_data("calibgen_ok:feeds", SPECS, DataOptions(trust_code=True, max_samples=2)).samples == 2
    with pytest.raises(InputError, match="RuntimeError: sensor offline"):
        open_data("calibgen_ok:broken", SPECS, DataOptions(trust_code=True))
