"""``dscompile devices``: the targets and the device profiles."""

from __future__ import annotations

import click

from dscompile import console
from dscompile.cli_common import common_options, emit_json
from dscompile.targets.base import get_target, target_names


@click.command("devices")
@common_options
def command(as_json: bool) -> None:
    """List targets (and whether their runtime is installed here) and device profiles.

    \b
    Example:
      dscompile devices --json
    """
    from dscompile.profiles.devices import load_all

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
