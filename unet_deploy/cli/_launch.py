"""``--nproc N``: re-run the current command in N local processes under ``torch.distributed.run``."""

from __future__ import annotations

import typer

from unet_deploy.errors import UserError

__all__ = ["command_args", "relaunch"]


def command_args(ctx: typer.Context, drop: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The command line that reproduces ``ctx``'s command as parsed (options, flags, then ``--`` arguments).

    Every option is written out explicitly (also defaults), so each worker runs exactly this command;
    options named in ``drop`` (``--nproc``) and unset ones (``None``) are left out.
    """
    args = [ctx.info_name or ""]
    positional: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.name in drop or value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name != "option":
            positional += [str(v) for v in values]
            continue
        if getattr(param, "is_flag", False):  # options only (typer may vendor its own click)
            flag = param.opts[0] if value else next(iter(param.secondary_opts), None)
            args += [flag] if flag else []
        else:
            for v in values:
                args += [param.opts[0], str(v)]
    return args + (["--", *positional] if positional else [])


def relaunch(ctx: typer.Context, nproc: int) -> None:
    """Re-run this command without ``--nproc`` in ``nproc`` local processes; exit with torchrun's exit code.

    Check the command's own arguments before calling this, so a mistake is one line, not one per process.
    """
    from unet_deploy.distributed import dist_env, launch_torchrun  # imports torch

    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be >= 1")
    if dist_env().enabled:
        raise UserError("--nproc: already running under torchrun (WORLD_SIZE is set); drop --nproc")
    raise typer.Exit(launch_torchrun(nproc, command_args(ctx)))
