"""``unet-deploy`` command line: each command is a thin call into the library modules.

Errors in the user's input (:class:`unet_deploy.errors.UserError`) print one line and exit non-zero;
only bugs show a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import UserError
from . import (  # noqa: F401  (registers commands)
    bench_cmds,
    data_cmds,
    demo_cmds,
    experiment_cmds,
    export_cmds,
    predict_cmds,
    train_cmds,
)
from ._app import app

__all__ = ["app", "main"]


def _setup_logging() -> None:
    level = os.environ.get("UNET_DEPLOY_LOG", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), format="%(levelname)s: %(message)s")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point."""
    _setup_logging()
    try:
        app(args=args, prog_name="unet-deploy")
    except UserError as e:
        from ..progress import err_console

        err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a file system problem the commands did not foresee: still one line, no traceback
        from ..progress import err_console

        where = f"{e.filename}: " if e.filename else ""
        err_console.print(f"[bold red]error:[/] {where}{e.strerror or e}", markup=True, highlight=False,
                          soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
