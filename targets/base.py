"""The Target contract, the Artifact value, and the registry of targets.

A target declares what it supports (precision menu, cost model, devices) and
how to lower a plan and run the result; the pipeline owns the plumbing
(staging, verification, reports, atomic output). Target modules are imported
lazily, so a target whose runtime is missing never breaks the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import TargetCapabilities
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.plan import QuantPlan
from dscompile.errors import InputError
from dscompile.fileio import sha256_file

# name -> "module:attribute". Adding a target is one line here and one module.
BUILTIN: dict[str, str] = {
    "ort-cpu": "dscompile.targets.ort_cpu:TARGET",
    "jetson-orin": "dscompile.targets.tensorrt:TARGET",
    "snapdragon": "dscompile.targets.tflite:TARGET",
}

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the artifact's staging/output root
    sha256: str
    bytes: int
    role: str  # model | plan | calibration-cache | script | engine | other

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "role": self.role}


@dataclass(frozen=True)
class Artifact:
    """What a target wrote: files under ``root``; ``primary`` is the runnable model."""

    target: str
    device: str
    root: Path
    primary: str
    files: tuple[ArtifactFile, ...]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_path(self) -> Path:
        return self.root / self.primary

    def relocated(self, root: Path, primary: str | None = None) -> Artifact:
        return Artifact(self.target, self.device, root, primary or self.primary, self.files, self.notes)


def describe_files(root: Path, roles: dict[str, str]) -> tuple[ArtifactFile, ...]:
    """ArtifactFile entries (hash, size) for the named files under ``root``."""
    return tuple(
        ArtifactFile(rel, sha256_file(root / rel), (root / rel).stat().st_size, role) for rel, role in roles.items()
    )


@dataclass(frozen=True)
class BuildOptions:
    """Build settings from the command line; a target reads the ones it understands."""

    seed: int = 0
    threads: int | None = None
    device: str = ""
    remote: str | None = None  # user@host[:port] (SSH) or adb:SERIAL
    shapes: dict[str, Any] | None = None  # dynamic-shape profile: {"min"|"opt"|"max": {input: dims}}
    dla: int | None = None  # DLA core on Jetson
    build_engine: bool | None = None  # None: build where the runtime exists
    benchmark_binary: Path | None = None  # TFLite benchmark_model for ADB timing
    samples: tuple[dict[str, np.ndarray], ...] = ()  # calibration feeds (never held-out ones): ort-cpu fits GPTQ int4
    # to them, snapdragon ranges the TFLite tensors the table cannot
    refit_weights: bool = True  # False: the weights were distilled onto their grid, re-rounding would undo it
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """Runs a built artifact on this machine."""

    def run(self, feed: Feed) -> list[np.ndarray]: ...

    def where(self) -> str: ...


@runtime_checkable
class Target(Protocol):
    """A deployment target. Optional: ``refine_plan(graph, plan, table, feeds, threads) -> QuantPlan``,
    a measurement the target makes on a fresh DMPQ plan before the repair loop (ort-cpu: int8 weight
    bits where this CPU's kernels saturate)."""

    name: str
    description: str
    output_kind: Literal["file", "dir"]
    suffix: str  # default artifact suffix for file outputs (".onnx", ".tflite")

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, how to install what is missing)."""
        ...

    def default_device(self) -> str: ...

    def capabilities(self, graph: ModelGraph, device: str) -> TargetCapabilities: ...

    def lower(
        self, graph: ModelGraph, plan: QuantPlan | None, table: CalibrationTable | None,
        stage: Path, options: BuildOptions,
    ) -> Artifact:
        """Write the artifact's files into the empty folder ``stage``."""
        ...

    def runner(self, artifact: Artifact, threads: int | None = None) -> Runner | None:
        """A runner for the artifact on this machine, or None where its runtime is absent."""
        ...


def target_names() -> Sequence[str]:
    return tuple(BUILTIN)


def get_target(name: str) -> Target:
    if name not in BUILTIN:
        raise InputError(f"unknown target {name!r} (known: {', '.join(BUILTIN)})")
    module, _, attr = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)
