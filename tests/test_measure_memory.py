"""Peak memory of a measured cell belongs to the measuring child, not to the process that spawned it."""
from __future__ import annotations

import numpy as np

from dscompile.profiles.measure import in_child, peak_rss_mb


def _child_peak() -> dict[str, float]:
    return {"mb": peak_rss_mb()}


def test_spawned_child_does_not_report_the_parents_peak():
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this process
    ballast += 1
    parent = peak_rss_mb()
    child = in_child(_child_peak)["mb"]
    assert parent > 400, parent
    # ru_maxrss survives exec, so the old reading gave the child at least the parent's 400 MiB
    assert child < parent - 300, (child, parent)
