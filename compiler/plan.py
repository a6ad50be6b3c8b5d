"""QuantPlan: the per-layer precision decision, as editable JSON (``dscompile-plan/1``).

Precedence rule: the plan file is the truth. ``dscompile build --plan`` lowers
exactly what it says; a hand edit the target cannot run is rejected with the
reason, never silently changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import INT8, INT16X8, PRECISIONS, Layer, TargetCapabilities
from dscompile.compiler.ranges import activation_range, range_from_json, range_json
from dscompile.errors import InputError
from dscompile.fileio import write_json

PLAN_FORMAT = "dscompile-plan/1"
# weights entries that hold whatever precision a layer moves to (ort-cpu's measured int8 code width)
PRECISION_FREE_WEIGHT_KEYS = ("int8_bits", "measured_error")


@dataclass(frozen=True)
class LayerPlan:
    name: str
    nodes: tuple[str, ...]
    op: str
    precision: str
    module: str | None = None
    weights: dict[str, Any] = field(default_factory=dict)  # {"scheme", "bits", "axis"|"block_size"}
    activations: dict[str, Any] = field(default_factory=dict)  # {"method", "amax"} or {"method", "min", "max"}
    sensitivity: dict[str, float] = field(default_factory=dict)  # precision -> output divergence
    cost: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> Cost.to_json()
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # stage notes (e.g. distillation results)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["nodes"] = list(self.nodes)
        if not d["extra"]:
            del d["extra"]
        return d


@dataclass(frozen=True)
class QuantPlan:
    target: str
    model_sha256: str
    layers: tuple[LayerPlan, ...]
    budget: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    rounds: tuple[dict[str, Any], ...] = ()
    device: str = ""
    sensitivity_metric: str = ""  # kl | nmse | kl+nmse (see compiler/sensitivity.py)

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise InputError(f"plan: no layer named {name!r}")

    def precision_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lp in self.layers:
            counts[lp.precision] = counts.get(lp.precision, 0) + 1
        return dict(sorted(counts.items()))

    def with_precision(self, name: str, precision: str, reason: str) -> QuantPlan:
        """The layer moved to ``precision``; its weight scheme, written for the old precision, is dropped
        (readers follow the precision where it is missing), measurements that hold for any precision stay."""
        def moved(lp: LayerPlan) -> LayerPlan:
            if lp.precision == precision:
                return replace(lp, reason=reason)
            return replace(lp, precision=precision, reason=reason,
                            weights={k: v for k, v in lp.weights.items() if k in PRECISION_FREE_WEIGHT_KEYS})

        return replace(self, layers=tuple(moved(lp) if lp.name == name else lp for lp in self.layers))

    def with_weights(self, updates: dict[str, dict[str, Any]], note: str = "") -> QuantPlan:
        """Each named layer's ``weights`` merged with its update (``note`` appended to its reason)."""
        def merged(lp: LayerPlan) -> LayerPlan:
            if lp.name not in updates:
                return lp
            return replace(lp, weights={**lp.weights, **updates[lp.name]},
                           reason=f"{lp.reason}; {note}" if note and lp.reason else note or lp.reason)

        return replace(self, layers=tuple(merged(lp) for lp in self.layers))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "target": self.target,
            "device": self.device,
            "model_sha256": self.model_sha256,
            "budget": self.budget,
            "sensitivity_metric": self.sensitivity_metric,
            "layers": [lp.to_json() for lp in self.layers],
            "predicted": self.predicted,
            "rounds": list(self.rounds),
        }

    def save(self, path: str | Path, force: bool = False) -> Path:
        return write_json(path, self.to_json(), force)

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str = "plan") -> QuantPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise InputError(f"{origin}: not a dscompile plan (expected \"format\": \"{PLAN_FORMAT}\")")
        try:
            layers = tuple(
                LayerPlan(
                    name=lp["name"], nodes=tuple(lp["nodes"]), op=lp["op"], precision=lp["precision"],
                    module=lp.get("module"), weights=lp.get("weights", {}), activations=lp.get("activations", {}),
                    sensitivity=lp.get("sensitivity", {}), cost=lp.get("cost", {}), reason=lp.get("reason", ""),
                    extra=lp.get("extra", {}),
                )
                for lp in data["layers"]
            )
            return cls(
                target=data["target"], model_sha256=data["model_sha256"], layers=layers,
                budget=data.get("budget", {}), predicted=data.get("predicted", {}),
                rounds=tuple(data.get("rounds", ())), device=data.get("device", ""),
                sensitivity_metric=data.get("sensitivity_metric", ""),
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"{origin}: malformed plan (missing or wrong field {exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such plan file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json(data, str(path))


def validate_plan(plan: QuantPlan, model_sha256: str, node_names: set[str], caps: TargetCapabilities, force: bool = False) -> None:
    """Reject a plan made for another model or target, or asking what the target cannot run."""
    if plan.model_sha256 != model_sha256 and not force:
        raise InputError(
            f"plan was made for another model (sha256 {plan.model_sha256[:12]}…, this one {model_sha256[:12]}…); "
            "re-plan, or --force to apply it anyway"
        )
    if plan.target != caps.target:
        raise InputError(f"plan is for target {plan.target!r}, not {caps.target!r}")
    for lp in plan.layers:
        if lp.precision not in PRECISIONS:
            raise InputError(f"plan layer {lp.name!r}: unknown precision {lp.precision!r} (known: {', '.join(PRECISIONS)})")
        if not caps.menu.allows(lp.op, lp.precision):
            allowed = ", ".join(caps.menu.for_op(lp.op, include_forced=True))
            raise InputError(f"plan layer {lp.name!r}: target {caps.target} cannot run {lp.op} at {lp.precision} (it can: {allowed})")
        missing = [n for n in lp.nodes if n not in node_names]
        if missing:
            raise InputError(f"plan layer {lp.name!r}: node {missing[0]!r} does not exist in the model")


STATIC_PRECISIONS = (INT8, INT16X8)  # precisions whose activations need calibrated ranges


def validate_layers(plan: QuantPlan, layers: list[Layer], caps: TargetCapabilities) -> None:
    """Every plan layer must be a layer of this model with the same op, at a precision it can run."""
    by_name = {lay.name: lay for lay in layers}
    for lp in plan.layers:
        lay = by_name.get(lp.name)
        if lay is None:
            raise InputError(f"plan layer {lp.name!r} does not exist in the model (it has {len(layers)} layers, e.g. "
                             f"{', '.join(list(by_name)[:3])})")
        if lay.op != lp.op:
            raise InputError(f"plan layer {lp.name!r}: op {lp.op!r} in the plan, {lay.op!r} in the model")
        why = caps.why_not(lay, lp.precision)
        if why:
            raise InputError(f"plan layer {lp.name!r}: {why}")
        bits = int8_weight_bits(lp)
        if type(bits) is not int or not 2 <= bits <= 8:
            raise InputError(f"plan layer {lp.name!r}: weights int8_bits {bits!r} is not an integer from 2 to 8")


def int8_weight_bits(lp: LayerPlan) -> Any:
    """``weights.int8_bits``: the width of the layer's weight codes whenever it runs an int8 precision
    (8 unless the plan says fewer, e.g. 7 where the CPU's integer kernels saturate). It is kept apart
    from ``bits`` (the width of the current scheme) so it holds whatever precision repair moves to."""
    return lp.weights.get("int8_bits", 8)


def needed_tensors(lay: Layer, graph_outputs: set[str]) -> list[str]:
    """Activation tensors a statically quantised layer needs ranges for: inputs, its output and
    the tensors inside it that its lowering quantises too."""
    return list(lay.inputs) + [o for o in lay.outputs[:1] if o not in graph_outputs] + list(lay.internal)


def plan_ranges(plan: QuantPlan, layers: list[Layer], table: CalibrationTable | None,
                graph_outputs: set[str] = frozenset(), constants: set[str] = frozenset()) -> dict[str, tuple[float, float]]:
    """[lo, hi] per tensor of every static layer: the plan's own ranges first (hand edits win), then the table."""
    from dscompile.compiler.capabilities import ActivationScheme

    by_name = {lay.name: lay for lay in layers}
    out: dict[str, tuple[float, float]] = {}
    for lp in plan.layers:
        if lp.precision not in STATIC_PRECISIONS or lp.name not in by_name:
            continue
        given = lp.activations.get("ranges", {}) if isinstance(lp.activations, dict) else {}
        scheme = ActivationScheme(lp.activations.get("method", "minmax"), bool(lp.activations.get("symmetric", False)))
        for t in needed_tensors(by_name[lp.name], set(graph_outputs)):
            if t in out or t in constants:
                continue
            if t in given:
                try:
                    out[t] = range_from_json(given[t])
                except (KeyError, TypeError, ValueError):
                    raise InputError(f"plan layer {lp.name!r}: range of {t!r} needs min/max or amax numbers") from None
            elif table is not None and t in table.tensors:
                out[t] = activation_range(table.tensors[t], scheme)
            else:
                raise InputError(
                    f"plan layer {lp.name!r} is {lp.precision} but neither the plan nor the calibration table "
                    f"has a range for tensor {t!r}" + ("" if table is not None else " (pass --calib)")
                )
    return out


def with_table_ranges(plan: QuantPlan, layers: list[Layer], table: CalibrationTable | None,
                      graph_outputs: set[str] = frozenset(), constants: set[str] = frozenset()) -> QuantPlan:
    """``plan`` with each static layer's missing ranges written in, as plan_ranges resolves them for the
    lowering (the plan's own first, then the table): a stage that reads ranges from the plan alone
    (distillation) then quantises activations exactly as the build will."""
    if table is None:
        return plan
    resolved = plan_ranges(plan, layers, table, graph_outputs, constants)
    by_name = {lay.name: lay for lay in layers}
    out = []
    for lp in plan.layers:
        acts = lp.activations if isinstance(lp.activations, dict) else {}
        given = acts.get("ranges", {})
        want = [] if lp.precision not in STATIC_PRECISIONS or lp.name not in by_name else [
            t for t in needed_tensors(by_name[lp.name], set(graph_outputs)) if t in resolved and t not in given]
        if want:
            method, sym = acts.get("method", "minmax"), bool(acts.get("symmetric", False))
            filled = {t: range_json(*resolved[t], method, sym) for t in want}
            lp = replace(lp, activations={**acts, "method": method, "symmetric": sym, "ranges": {**given, **filled}})
        out.append(lp)
    return replace(plan, layers=tuple(out))
