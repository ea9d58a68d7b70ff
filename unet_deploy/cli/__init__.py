"""``unet-deploy`` command line: each command is a thin call into the library modules.

Errors in the user's input (:class:`unet_deploy.errors.UserError`) print one line and exit non-zero;
only bugs show a traceback. Ctrl-C and SIGTERM stop a command with one line (exit code 130 / 143).
"""

from __future__ import annotations

import logging
import os
import platform
import sys

import typer

from unet_deploy import __version__
from unet_deploy.cli import (  # noqa: F401  (registers commands)
    bench_cmds,
    data_cmds,
    demo_cmds,
    experiment_cmds,
    export_cmds,
    predict_cmds,
    serve_cmds,
    train_cmds,
)
from unet_deploy.cli._app import app
from unet_deploy.cli._options import rewrite_deprecated
from unet_deploy.errors import UserError
from unet_deploy.runtime.cpu_share import IMPORTED, passive_threads_when_busy
from unet_deploy.signals import exit_code, sigterm_as_interrupt

__all__ = ["app", "main"]


def _print_version(value: bool) -> None:
    """``--version``: this package's version and the installed torch / ONNX Runtime versions, read from the
    package metadata (importing torch would take a second)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version  # email, zipfile, csv...: only for --version

    found = []
    for dist in ("torch", "onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            continue
    typer.echo(f"unet-deploy {__version__} ({', '.join(found + [f'Python {platform.python_version()}'])})")
    raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="Print the version of unet-deploy (and of torch and ONNX "
                                               "Runtime) and exit.")) -> None:
    return None


def _setup_logging() -> None:
    level = os.environ.get("UNET_DEPLOY_LOG", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), format="%(levelname)s: %(message)s")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point."""
    _setup_logging()
    passive_threads_when_busy(IMPORTED)  # before torch loads OpenMP; how busy the CPUs were since the CLI loaded
    sigterm_as_interrupt()  # a scheduler's SIGTERM cleans up as Ctrl-C does (``serve`` installs its own)
    try:
        app(args=rewrite_deprecated(sys.argv[1:] if args is None else args), prog_name="unet-deploy")
    except UserError as e:
        from rich.markup import escape  # a message may hold [brackets]: file names, extras, cuda[:N]

        from unet_deploy.progress import err_console  # rich: loaded only to print an error

        err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a file system problem the commands did not foresee: still one line, no traceback
        from unet_deploy.progress import err_console  # rich: loaded only to print an error

        where = f"{e.filename}: " if e.filename else ""
        from rich.markup import escape  # a file name may hold [brackets]

        err_console.print(f"[bold red]error:[/] {escape(f'{where}{e.strerror or e}')}", markup=True,
                          highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(exit_code())
    except Exception as e:  # out of memory (MemoryError, torch, ONNX Runtime): one line; other bugs: traceback
        from unet_deploy.runtime.resources import out_of_memory_line  # psutil, PIL: only on this error path

        line = out_of_memory_line(e, _command(args))
        if line is None:
            raise
        from rich.markup import escape  # rich: loaded only to print an error

        from unet_deploy.progress import err_console  # rich: loaded only to print an error

        err_console.print(f"[bold red]error:[/] {escape(line)}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(1)


def _command(args: list[str] | None) -> str | None:
    """The subcommand's name in ``args`` (default: the process's arguments), for error hints."""
    return next((a for a in (sys.argv[1:] if args is None else args) if not a.startswith("-")), None)
