"""Snapdragon cost model: the roofline of the device profile, with HTP fallbacks penalised.

A layer the QNN delegate keeps on the HTP costs what ``profiles.estimate.layer_cost``
says for its precision. A layer it cannot keep there (an op outside the QNN
op list, a hybrid dynamic-range kernel, float on an HTP without FP16) runs
in float off the NPU, and splits the delegated graph: it costs its fp32
estimate plus two delegate boundaries (leaving the NPU and coming back), each
priced at the profile class's per-invocation overhead. So DMPQ, minimising
latency, prefers allocations that keep the graph on the NPU.
"""

from __future__ import annotations

from dscompile.compiler.capabilities import FP32, Cost, Layer
from dscompile.profiles.devices import DeviceProfile
from dscompile.profiles.estimate import efficiency_for, layer_cost
from dscompile.targets.tflite_compat import QnnRules, htp_has_fp16, layer_runs_on_htp, load_rules


class SnapdragonCost:
    """Estimated bytes and latency of a layer at a precision on one Snapdragon profile."""

    def __init__(self, profile: DeviceProfile, rules: QnnRules | None = None) -> None:
        self.profile = profile
        self.rules = rules or load_rules()
        self.htp_fp16 = htp_has_fp16(profile)
        self.boundary_ms = efficiency_for(profile).model_overhead_us * 1e-3

    def on_htp(self, layer: Layer, precision: str) -> tuple[bool, str]:
        return layer_runs_on_htp(self.rules, layer.op, precision, self.htp_fp16)

    def cost(self, layer: Layer, precision: str) -> Cost:
        base = layer_cost(self.profile, layer, precision)
        ok, why = self.on_htp(layer, precision)
        if ok:
            return base
        off = layer_cost(self.profile, layer, FP32)
        return Cost(
            base.bytes, off.latency_ms + 2 * self.boundary_ms, "estimated",
            f"{base.source}; off the HTP ({why}): fp32 estimate + 2 delegate boundaries",
        )

    def overhead_ms(self) -> float:
        return efficiency_for(self.profile).model_overhead_us * 1e-3
