"""The efficiency fit: it recovers latencies generated from known factors, and rejects bad published data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dscompile.compiler.capabilities import Layer
from dscompile.errors import InputError
from dscompile.profiles import estimate, fit


def net(depth: int, macs: int, params: int, act: int, dw_every: int = 0) -> tuple[Layer, ...]:
    return tuple(
        Layer(f"l{i}", "Conv", (f"l{i}",), (), (), params=params, macs=macs, activation_elems=act,
              depthwise=bool(dw_every) and i % dw_every == 0)
        for i in range(depth)
    )


NETS = {  # compute-bound, memory-bound, many small layers, depthwise-heavy
    "big": net(20, 2 * 10**8, 10**5, 10**5),
    "wide": net(10, 10**6, 4 * 10**6, 10**6),
    "deep": net(150, 10**5, 10**3, 10**4),
    "dw": net(40, 10**7, 10**4, 10**6, dw_every=2),
}


def test_fit_recovers_latencies_from_known_factors():
    device = "raspberry-pi-5"  # class "cpu"
    prior = estimate.load_efficiency()["cpu"]
    truth = replace(prior, compute={**prior.compute, "int8": 0.2, "fp16": 0.35}, memory=0.6, activation_dram=0.4,
                    layer_overhead_us=12.0, model_overhead_us=80.0, depthwise_rate=0.05)
    points = []
    for name, layers in NETS.items():
        for prec in ("int8", "fp16"):
            p = fit.Published(name, device, prec, 1, 1.0, "fit", "synthetic", "generated", "test.toml")
            points.append(replace(p, latency_ms=fit.estimate_ms(p, layers, truth)))
    fitted = fit.fit_class("cpu", points, lambda m, _c, _u: NETS[m], prior_weight=0.0)
    for p in points:
        assert fit.estimate_ms(p, NETS[p.model], fitted) == pytest.approx(p.latency_ms, rel=0.05), p.model


def test_device_fit_recovers_its_compute_and_overhead_scales():
    device = "raspberry-pi-5"  # class "cpu": the class factors stay as they are, the device gets two scales
    base = estimate.load_efficiency()["cpu"]
    truth = estimate.scaled(base, estimate.DeviceScale(device, 0.6, 2.5, "truth"))
    points = []
    for name, layers in NETS.items():
        p = fit.Published(name, device, "int8", 1, 1.0, "fit_device", "synthetic", "generated", "test.toml")
        points.append(replace(p, latency_ms=fit.estimate_ms(p, layers, truth)))
    sc = fit.fit_device(device, points, lambda m, _c, _u: NETS[m], prior_weight=0.0)
    assert sc.compute == pytest.approx(0.6, rel=0.02) and sc.overhead == pytest.approx(2.5, rel=0.02)
    assert sc.source.startswith("fitted on 4 published latencies of this device")


def test_device_scales_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "eff.toml"
    bad.write_text('[devices.raspberry-pi-5]\nsource = "s"\ncompute = "more"\noverhead = 1\n')
    with pytest.raises(InputError, match=r"devices.raspberry-pi-5.compute is missing or not a positive number"):
        estimate.load_device_scales(bad)
    bad.write_text('[devices.raspberry-pi-5]\ncompute = 1\noverhead = 1\n')
    with pytest.raises(InputError, match=r"devices.raspberry-pi-5 has no source"):
        estimate.load_device_scales(bad)


def test_fit_needs_fit_points():
    p = fit.Published("big", "raspberry-pi-5", "int8", 1, 1.0, "holdout", "", "x", "t.toml")
    with pytest.raises(InputError, match="no published measurement marked"):
        fit.fit_class("cpu", [p], lambda *a: NETS["big"])


@pytest.mark.parametrize("body, match", [
    ('model = "m"\ndevice = "d"\nprecision = "int8"\nrole = "fit"\nlatency_ms = "fast"\nsource = "s"', "latency_ms is missing or not a positive number"),
    ('model = "m"\ndevice = "d"\nprecision = "int8"\nrole = "fit"\nlatency_ms = 1.0', "has no source"),
    ('model = "m"\ndevice = "d"\nprecision = "int8"\nrole = "guess"\nlatency_ms = 1.0\nsource = "s"', "role must be one of"),
])
def test_bad_published_entries_name_file_and_entry(tmp_path, body, match):
    (tmp_path / "x.toml").write_text("[[measurement]]\n" + body + "\n")
    with pytest.raises(InputError, match=match) as err:
        fit.load_published(tmp_path)
    assert "x.toml: measurement #1" in str(err.value)


def test_shipped_published_figures_all_have_sources_and_known_devices():
    from dscompile.profiles.devices import get_device

    points = fit.load_published()
    assert len(points) >= 50
    for p in points:
        get_device(p.device)
        assert p.source and p.latency_ms > 0
    assert {fit.class_of(p) for p in points if p.role == "fit"} == {"jetson-orin", "snapdragon"}
