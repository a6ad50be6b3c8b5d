"""Facts about the machine we run on, for labelling measurements."""

from __future__ import annotations

import functools
import os
import platform


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_label() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
