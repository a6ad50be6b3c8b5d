"""Fit the roofline's efficiency factors on published latencies and print every estimate beside its figure.

    python benchmarks/fit_estimates.py            # report with the factors in profiles/efficiency.toml
    python benchmarks/fit_estimates.py --write    # refit, write profiles/efficiency.toml, then report

Layer shapes come from the plain nn.Module definitions in tests/reference_nets.py
(random weights: shapes and MACs only).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dscompile.fileio import write_text  # noqa: E402
from dscompile.profiles import estimate, fit  # noqa: E402
from tests.reference_nets import layers_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="refit and overwrite profiles/efficiency.toml")
    args = ap.parse_args()
    points = fit.load_published()
    by_class: dict[str, list[fit.Published]] = defaultdict(list)
    for p in points:
        by_class[fit.class_of(p)].append(p)
    if args.write:
        effs = dict(estimate.load_efficiency())
        notes = {}
        for cls, pts in by_class.items():
            effs[cls] = fit.fit_class(cls, pts, layers_of)
            used = sorted({f"{p.model}/{p.precision}@{p.device}" for p in pts if p.role == "fit"})
            files = sorted({Path(p.file).name for p in pts})
            notes[cls] = f"fitted on {len(used)} published latencies in published/{', '.join(files)} (fit: {'; '.join(used)})"
        write_text(estimate.EFFICIENCY_FILE, fit.efficiency_toml(effs, notes), force=True)
        estimate.load_efficiency.cache_clear()
        estimate.load_device_scales.cache_clear()
        # then each device with its own fit points, on top of its freshly fitted class
        scales = {d: fit.fit_device(d, points, layers_of)
                  for d in dict.fromkeys(p.device for p in points if p.role == "fit_device")}
        write_text(estimate.EFFICIENCY_FILE, fit.efficiency_toml(effs, notes, scales), force=True)
        estimate.load_device_scales.cache_clear()
    rows = fit.error_table(points, layers_of)
    print(f"{'class':12s} {'role':8s} {'model':20s} {'device':22s} {'prec':5s} {'published':>10s} {'estimate':>10s} {'error':>7s}")
    worst: dict[str, float] = defaultdict(float)
    for r, p in zip(rows, points, strict=True):
        cls = fit.class_of(p)
        worst[f"{cls}/{r['role']}"] = max(worst[f"{cls}/{r['role']}"], abs(r["error"]))
        print(f"{cls:12s} {r['role']:8s} {r['model']:20s} {r['device']:22s} {r['precision']:5s} "
              f"{r['published_ms']:10.3f} {r['estimate_ms']:10.3f} {r['error']:+7.1%}")
    for k, v in sorted(worst.items()):
        print(f"worst |error| {k}: {v:.1%}")
    for cls, eff in estimate.load_efficiency().items():
        print(f"{cls}: compute {dict(eff.compute)} memory {eff.memory:.3g} layer {eff.layer_overhead_us:.3g} us model {eff.model_overhead_us:.3g} us")
    for dev, sc in estimate.load_device_scales().items():
        print(f"{dev}: compute x{sc.compute:.3g}, overheads x{sc.overhead:.3g} ({sc.source})")


if __name__ == "__main__":
    main()
