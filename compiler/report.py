"""The compile report (``dscompile-report/1``): what was built, what it cost, how it was checked."""

from __future__ import annotations

from typing import Any

from dscompile.compiler.graph import ModelGraph, parameter_stats
from dscompile.compiler.plan import QuantPlan
from dscompile.compiler.verify import Fidelity

REPORT_FORMAT = "dscompile-report/1"


def build_report(
    *,
    target: str,
    device: str,
    graph: ModelGraph,
    artifacts: list[dict[str, Any]],
    artifact_bytes: int,
    plan: QuantPlan | None,
    fidelity: Fidelity | None,
    latency: dict[str, Any] | None,
    export_check: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    _, fp32_bytes = parameter_stats(graph.model)
    fp32_bytes = max(fp32_bytes, graph.model.ByteSize())
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "target": target,
        "device": device,
        "source": graph.source.to_json(),
        "model_sha256": graph.sha256,
        "inputs": [s.to_json() for s in graph.inputs],
        "artifacts": artifacts,
        "size": {
            "fp32_bytes": fp32_bytes,
            "artifact_bytes": artifact_bytes,
            "ratio": round(artifact_bytes / fp32_bytes, 4) if fp32_bytes else None,
        },
        "precision": plan.precision_counts() if plan else {"fp32": "all"},
        "fidelity": fidelity.to_json() if fidelity else {"measured_with": None, "why": "no runtime for this artifact here"},
        "latency": latency or {"kind": None, "why": "no runtime for this artifact here"},
    }
    if export_check:
        report["export_check"] = export_check
    if plan:
        report["plan"] = {"layers": len(plan.layers), "budget": plan.budget, "predicted": plan.predicted}
        report["rounds"] = list(plan.rounds)
    if extra:
        report.update(extra)
    return report
