"""What a target can do, as values: its precision menu and its cost model.

DMPQ and the other compiler stages see a target only through these types (the
compiler imports no target module). A target builds a ``TargetCapabilities``
for a device and hands it down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

# Precision names used in plans. Not every target offers every one.
FP32 = "fp32"
FP16 = "fp16"
INT8 = "int8"  # static: int8 weights, int8/uint8 activations from calibration
INT8_DYNAMIC = "int8_dynamic"  # int8 weights, activations quantized at run time
INT16X8 = "int16x8"  # int16 activations, int8 weights (TFLite, Hexagon)
INT8_WEIGHT = "int8_weight"  # weight-only int8 (TFLite dynamic range)
INT4_WEIGHT = "int4_weight"  # weight-only int4, block-wise
PRECISIONS = (FP32, FP16, INT8, INT8_DYNAMIC, INT16X8, INT8_WEIGHT, INT4_WEIGHT)

# Bits a weight element takes at each precision (for size accounting).
WEIGHT_BITS = {FP32: 32, FP16: 16, INT8: 8, INT8_DYNAMIC: 8, INT16X8: 8, INT8_WEIGHT: 8, INT4_WEIGHT: 4}

CostKind = Literal["measured", "estimated"]


@dataclass(frozen=True)
class Layer:
    """A quantisable unit as the runtime fuses it (Conv+BN+ReLU, MatMul+Add, ...).

    ``inputs`` are the activation tensors the layer reads (quantised at its
    entry), ``weights`` the initializers it owns, ``nodes`` every ONNX node in
    the fused group, ``op`` the anchor op type that decides the menu; ``params``,
    ``macs`` and ``activation_elems`` are per sample (batch 1).
    """

    name: str
    op: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...] = ()
    module: str | None = None
    params: int = 0
    macs: int = 0
    # Elements of the activations the layer reads and writes, per sample (inputs
    # that are not weights + outputs); 0 when unknown. The roofline estimate turns
    # it into memory traffic at the layer's activation precision.
    activation_elems: int = 0
    # A depthwise convolution (one input channel per group): runtimes run it on
    # vector units, not the matrix engines, so the estimate costs it differently.
    depthwise: bool = False
    # Tensors inside the fused group that a static lowering quantises too (the input of a
    # fused HardSwish, which ort-cpu runs on integers between the anchor and the layer output).
    internal: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one layer at one precision."""

    bytes: int
    latency_ms: float
    kind: CostKind
    source: str  # "onnxruntime 1.32 profiler on <cpu>" or "roofline from devices/<file>.toml"

    def to_json(self) -> dict[str, object]:
        return {"bytes": self.bytes, "latency_ms": self.latency_ms, "kind": self.kind, "source": self.source}


class CostModel(Protocol):
    """A target's cost of running a layer at a precision on its device."""

    def cost(self, layer: Layer, precision: str) -> Cost: ...


@dataclass(frozen=True)
class PrecisionMenu:
    """Precisions a target runs, per anchor op type; ops not named get ``default``.

    ``forced_only`` precisions are valid in a hand-edited plan but DMPQ does not
    choose them by itself (fp16 on a CPU, which has no speedup).
    """

    by_op: Mapping[str, tuple[str, ...]]
    default: tuple[str, ...] = (FP32,)
    forced_only: tuple[str, ...] = ()

    def for_op(self, op: str, include_forced: bool = False) -> tuple[str, ...]:
        menu = self.by_op.get(op, self.default)
        return menu if include_forced else tuple(p for p in menu if p not in self.forced_only)

    def allows(self, op: str, precision: str) -> bool:
        return precision in self.for_op(op, include_forced=True)


@dataclass(frozen=True)
class ActivationScheme:
    """How a target quantises activations: the calibration method and symmetry it wants."""

    method: str = "entropy"  # entropy | minmax | percentile | mse
    symmetric: bool = True  # False: uint8 with a zero point (min/max range)
    # Ops whose outputs are quantized over their whole observed range, not the method's threshold:
    # a bounded output (Softmax's probabilities) carries its signal in the peak a KL threshold clips.
    full_range_ops: tuple[str, ...] = ()
    # > 0: a Softmax input's range starts this far below the smallest row maximum seen on the
    # samples (the target cuts an additive attention mask there; compiler/ranges.py softmax_floors).
    softmax_span: float = 0.0


@dataclass(frozen=True)
class Numerics:
    """What a precision does to a layer's numbers, so DMPQ can emulate it on any machine.

    weight: "none" | "int8_channel" (symmetric per output channel) | "int4_block"
            (block-wise along the reduction axis) | "fp16"
    activation: "none" | "static" (calibrated range, per ``ActivationScheme``)
            | "dynamic" (per-tensor range of each run, uint8) | "fp16"
    """

    weight: str = "none"
    activation: str = "none"
    block_size: int = 0
    weight_symmetric: bool = True  # int4 blocks: symmetric, or with a zero point per block
    quantize_output: bool = False  # static: the layer's output is requantised too
    rounding: str = "nearest"  # int4 MatMul weights: "nearest", or "gptq" fitted to calibration inputs (compiler/gptq.py)
    weight_bits: int = 8  # int8_channel codes: 7 where the runtime's int8 kernels need reduce_range (targets/ort_cpu_isa.py)
    # Gather tables (embeddings) under an int weight scheme: "block" (row blocks, as onnxruntime's
    # GatherBlockQuantized) or "tensor" (one scale for the whole table at the activation width:
    # int8 with a zero point for "static", symmetric int16 for "static16", as TFLite's GATHER)
    gather_table: str = "block"


DEFAULT_NUMERICS: dict[str, Numerics] = {
    FP32: Numerics(),
    FP16: Numerics("fp16", "fp16"),
    INT8: Numerics("int8_channel", "static", quantize_output=True),
    INT8_DYNAMIC: Numerics("int8_channel", "dynamic"),
    INT16X8: Numerics("int8_channel", "static16"),
    INT8_WEIGHT: Numerics("int8_channel", "none"),
    INT4_WEIGHT: Numerics("int4_block", "none", block_size=32),
}

# A target's veto for one layer at one precision: None, or why it cannot run it.
LayerCheck = Callable[[Layer, str], "str | None"]


@dataclass(frozen=True)
class TargetCapabilities:
    """Everything DMPQ needs to know about one target on one device."""

    target: str
    device: str
    menu: PrecisionMenu
    cost_model: CostModel
    activations: ActivationScheme = field(default_factory=ActivationScheme)
    numerics: Mapping[str, Numerics] = field(default_factory=lambda: dict(DEFAULT_NUMERICS))
    check: LayerCheck | None = None
    reasons: Mapping[str, str] = field(default_factory=dict)  # op -> why it stays fp32 (GRU, If, ...)
    # Precisions that run but gain nothing on this layer (the runtime's own advice): DMPQ does not
    # choose them, a hand-edited plan may (unlike ``check``, which refuses).
    advice: LayerCheck | None = None
    # The precision the target's conventional placement (no DMPQ) gives a layer, e.g. TensorRT's INT8
    # where it has INT8 kernels and FP16 elsewhere. With one, the default budget never plans a larger
    # summed sensitivity than that placement has: DMPQ may only beat it (compiler/dmpq.py).
    reference: Callable[[Layer], str] | None = None

    def layer_menu(self, layer: Layer, include_forced: bool = False) -> tuple[str, ...]:
        """Precisions this layer can take: the op's menu minus what the target vetoes or advises against."""
        menu = self.menu.for_op(layer.op, include_forced)
        return tuple(p for p in menu if p == FP32 or self.why_not_chosen(layer, p) is None)

    def why_not_chosen(self, layer: Layer, precision: str) -> str | None:
        """Why DMPQ leaves ``precision`` out of this layer's menu (a veto or the target's advice), else None."""
        for rule in (self.check, self.advice):
            why = rule(layer, precision) if rule is not None else None
            if why:
                return why
        return None

    def why_not(self, layer: Layer, precision: str) -> str | None:
        """None if ``layer`` can run at ``precision``, else the reason."""
        if not self.menu.allows(layer.op, precision):
            allowed = ", ".join(self.menu.for_op(layer.op, include_forced=True))
            return f"target {self.target} cannot run {layer.op} at {precision} (it can: {allowed})"
        if precision != FP32 and self.check is not None:
            return self.check(layer, precision)
        return None
