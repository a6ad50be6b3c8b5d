"""``dscompile batch``: compile, verify and profile every model x target of a manifest."""

from __future__ import annotations

from pathlib import Path

import click

from dscompile import console
from dscompile.cli_common import common_options, emit_json
from dscompile.errors import DscompileError


@click.command("batch")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for the jobs, summary.json and matrix/ (re-running skips what is up to date).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs at once (worker processes, or Ray CPUs).")
@click.option("--executor", default="local", show_default=True, metavar="local|ray[:ADDRESS]",
              help="local worker processes, or a Ray cluster (a local one started on the fly without ADDRESS).")
@click.option("--force", is_flag=True, help="Redo every job, and write into a non-empty folder.")
@common_options
def command(manifest: Path, output: Path, jobs: int, executor: str, force: bool, as_json: bool) -> None:
    """Compile, verify and profile every model x target in MANIFEST; a failing job is recorded
    with its reason and the rest go on; a summary and the FPS matrix come at the end.

    \b
    Examples:
      dscompile batch manifest.toml -o out/
      dscompile batch manifest.toml -o out/ --jobs 4
      dscompile batch manifest.toml -o out/ --executor ray:10.0.0.5:6379
    """
    from dscompile.batch import run_batch

    result = run_batch(manifest, output, jobs, executor, force)
    if as_json:
        emit_json({"jobs": result.results, "matrix": str(result.matrix_dir), "summary": str(result.summary_path)})
    else:
        _show(result)
    if result.failed:
        raise DscompileError(f"{len(result.failed)} of {len(result.results)} jobs failed (see {result.summary_path})")


def _show(result) -> None:
    from rich.table import Table

    table = Table(title="batch")
    for col in ("model", "target", "status", "seconds", "reason"):
        table.add_column(col, overflow="fold")
    for r in result.results:
        table.add_row(r["name"], r["target"], r["status"], f"{r.get('seconds', 0):.1f}", r.get("reason", ""))
    console.out.print(table)
    if result.matrix_dir.is_dir():
        from dscompile.commands.profile import show_matrix
        from dscompile.profiles.matrix import FpsMatrix

        show_matrix(FpsMatrix.load(result.matrix_dir / "matrix.json"))
        console.out.print(f"matrix in {result.matrix_dir}/, summary in {result.summary_path}")
