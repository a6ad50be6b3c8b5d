"""``dscompile devices``: the targets and the device profiles."""

from __future__ import annotations

import click

from dscompile import console
from dscompile.cli_common import common_options, emit_json
from dscompile.targets.base import get_target, target_names


@click.command("devices")
@click.argument("device", required=False)
@click.option("--sources", "show_sources", is_flag=True, help="Show every figure with its source.")
@common_options
def command(device: str | None, show_sources: bool, as_json: bool) -> None:
    """List targets (and whether their runtime is installed here) and device profiles;
    with DEVICE or --sources, every figure of the profiles with where it comes from.

    \b
    Examples:
      dscompile devices
      dscompile devices jetson-agx-orin-64gb
      dscompile devices --sources --json
    """
    from dscompile.profiles.devices import get_device, load_all

    if device is not None:
        prof = get_device(device)
        if as_json:
            emit_json(prof.summary())
        else:
            _show_figures([prof.summary()])
        return

    targets = []
    for name in target_names():
        t = get_target(name)
        ok, why = t.available()
        targets.append({"name": name, "description": t.description, "available": ok, "install": why or None,
                        "default_device": t.default_device()})
    devices = [d.summary() for d in load_all()]
    if as_json:
        emit_json({"targets": targets, "devices": devices})
        return
    from rich.table import Table

    tt = Table(title="targets")
    for col in ("target", "description", "runtime here", "default device"):
        tt.add_column(col)
    for t in targets:
        tt.add_row(t["name"], t["description"], "yes" if t["available"] else f"no: {t['install']}", t["default_device"])
    console.out.print(tt)
    dt = Table(title="device profiles")
    for col in ("device", "name", "target", "file"):
        dt.add_column(col)
    for d in devices:
        dt.add_row(d["id"], d["name"], d["target"], d["file"])
    console.out.print(dt)
    if show_sources:
        _show_figures(devices)


def _show_figures(devices: list[dict]) -> None:
    from rich.table import Table

    for d in devices:
        table = Table(title=f"{d['id']}: {d['name']} ({d['file']})", show_lines=False)
        for col in ("figure", "value", "unit", "source"):
            table.add_column(col, overflow="fold")
        for key, fig in d["figures"].items():
            table.add_row(key, f"{fig['value']:g}", fig["unit"], fig["source"])
        for key, value in d.get("software", {}).items():
            table.add_row(f"software.{key}", value, "", "")
        console.out.print(table)
