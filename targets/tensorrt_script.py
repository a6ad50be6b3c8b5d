"""The trtexec command line for an artifact, and ``build_engine.sh`` that runs it on the board.

Engines are built where TensorRT lives (the Jetson itself, or a host with the same TensorRT and
GPU); the script is what the folder carries for that step. Flags follow trtexec's own help
(NVIDIA/TensorRT samples/common/sampleOptions.cpp): --stronglyTyped on TensorRT 10 (on 8.x, which
has no strong typing, --int8 --fp16 let the builder honour the graph's Q/DQ), --saveEngine,
--timingCacheFile (reused between builds), --memPoolSize=workspace:<MiB>, and for DLA
--useDLACore with --allowGPUFallback; dynamic inputs get --minShapes/--optShapes/--maxShapes.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from dscompile.targets.tensorrt_shapes import Profile, trtexec_shape_args

MODEL_FILE = "model.qdq.onnx"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
LOG_FILE = "trtexec.log"
SCRIPT_FILE = "build_engine.sh"
DEFAULT_WORKSPACE_MIB = 1024


@dataclass(frozen=True)
class TrtexecJob:
    onnx: str = MODEL_FILE
    engine: str = ENGINE_FILE
    timing_cache: str = TIMING_CACHE_FILE
    strongly_typed: bool = True
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    dla_core: int | None = None
    shapes: Profile | None = None

    def args(self) -> list[str]:
        args = [f"--onnx={self.onnx}"]
        args += ["--stronglyTyped"] if self.strongly_typed else ["--int8", "--fp16"]
        args += [
            f"--saveEngine={self.engine}", f"--timingCacheFile={self.timing_cache}",
            f"--memPoolSize=workspace:{self.workspace_mib}",
        ]
        if self.dla_core is not None:
            args += [f"--useDLACore={self.dla_core}", "--allowGPUFallback"]
        return args + trtexec_shape_args(self.shapes)

    def command(self, trtexec: str = "trtexec") -> str:
        return " ".join([trtexec, *(shlex.quote(a) for a in self.args())])


_SCRIPT = """#!/usr/bin/env bash
# Build the TensorRT engine for {target} on the board (or a host with the same TensorRT and GPU).
# Written by dscompile for {release}. Engines do not move between TensorRT versions or GPUs:
# run this where the engine will be used. The timing cache makes a rebuild fast.
#   copy this folder to the board, then:  bash build_engine.sh
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
  echo "build_engine.sh: trtexec not found (JetPack installs it as /usr/src/tensorrt/bin/trtexec; set TRTEXEC=...)" >&2
  exit 127
fi
"$TRTEXEC" {args} 2>&1 | tee {log}
"""


def build_script(job: TrtexecJob, release_label: str, target: str = "jetson-orin") -> str:
    args = " \\\n    ".join(shlex.quote(a) for a in job.args())
    return _SCRIPT.format(target=target, release=release_label, args=args, log=LOG_FILE)


def how_to_run(folder: str, remote_hint: str = "user@jetson") -> str:
    """The one message the report and the CLI give when no engine was built here."""
    return (
        f"engine not built here (no TensorRT on this machine): copy {folder} to the Jetson and run "
        f"`bash build_engine.sh` there, or rebuild with --remote {remote_hint} to build and time it over SSH"
    )
