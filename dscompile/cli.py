"""The command line: parsing only; every command calls dscompile.api.

``dscompile --target X MODEL`` is ``dscompile compile --target X MODEL``.
Exit codes: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

import errno
import sys
import traceback

import click

from dscompile import __version__
from dscompile.commands import batch as batch_cmd
from dscompile.commands import build as build_cmd
from dscompile.commands import calibrate as calibrate_cmd
from dscompile.commands import compile as compile_cmd
from dscompile.commands import demo as demo_cmd
from dscompile.commands import devices as devices_cmd
from dscompile.commands import inspect as inspect_cmd
from dscompile.commands import plan as plan_cmd
from dscompile.commands import profile as profile_cmd
from dscompile.errors import DscompileError

DEFAULT_COMMAND = "compile"
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class DefaultGroup(click.Group):
    """A group that runs ``compile`` when the first argument is not a command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dscompile")
def cli() -> None:
    """Compile PyTorch / ONNX models into verified artifacts for edge devices.

    \b
    Example:
      dscompile --target ort-cpu model.pt --input-shape x:1x3x224x224 -o model_cpu.onnx
      dscompile inspect model.onnx
      dscompile demo
    """


# One line per command.
cli.add_command(compile_cmd.command)
cli.add_command(inspect_cmd.command)
cli.add_command(calibrate_cmd.command)
cli.add_command(devices_cmd.command)
cli.add_command(plan_cmd.command)
cli.add_command(build_cmd.command)
cli.add_command(demo_cmd.command)
cli.add_command(profile_cmd.command)
cli.add_command(batch_cmd.command)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rc = cli.main(args=args, prog_name="dscompile", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("dscompile: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("dscompile: interrupted; nothing was written", err=True)
        sys.exit(130)
    except DscompileError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"dscompile: error: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except OSError as exc:
        if debug:
            traceback.print_exc()
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            click.echo(f"dscompile: internal error: OSError: {_one_line(str(exc))} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)
        # a full disk or read-only location met deep inside a stage is the user's environment, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"dscompile: error: {where}{exc.strerror.lower()} (nothing was written)", err=True)
        sys.exit(1)
    except Exception as exc:  # an internal bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(
            f"dscompile: internal error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())
