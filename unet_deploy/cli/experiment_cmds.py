"""``unet-deploy experiment``: what augmentation, edge weighting, cosine LR and fine-tuning buy."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from unet_deploy.cli._app import app
from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_write_text


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. 0,1,2") from None


def _command_line(ctx: typer.Context) -> str:
    """The command as the user gave it (options they set explicitly, in declaration order)."""
    parts = [ctx.command_path]
    for param in ctx.command.params:
        if param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":  # by name: typer may vendor its own click
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):  # options only (typer may vendor its own click)
            names = param.opts if value else param.secondary_opts
            if names:
                parts.append(max(names, key=len))
            continue
        parts += [max(param.opts, key=len), shlex.quote(str(value))]
    return " ".join(parts)


@app.command()
def experiment(
    ctx: typer.Context,
    work_dir: Path = typer.Option(Path("experiment"), "--work-dir", "-o",
                                  help="Where generated data, checkpoints and results go."),
    data: Path | None = typer.Option(None, help="Training folder (imgs/, masks/); default: synthetic."),
    heldout: Path | None = typer.Option(None, help="Held-out folder scored after training; default: "
                                                   "synthetic from another seed."),
    source: Path | None = typer.Option(None, help="Data to pretrain the fine-tuning start point on; default: "
                                                  "synthetic from a third seed."),
    pretrained: Path | None = typer.Option(None, help="Fine-tune from this MODEL.pth instead of pretraining "
                                                      "one (e.g. Pytorch-UNet's released Carvana model)."),
    variants: str = typer.Option("baseline,augment,edge,cosine,all,longer,finetune",
                                 help="Comma-separated variants to run."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; several give mean ± std."),
    steps: int = typer.Option(240, help="Optimizer steps per variant (same for all; 'longer' gets 2x)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Batch size."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", "-l", help="Learning rate."),
    optimizer: str = typer.Option("adamw", help="adamw, adam or rmsprop (Pytorch-UNet's)."),
    base_channels: int = typer.Option(16, help="Width of the model's first layer."),
    scale: float = typer.Option(0.5, "--scale", "-s", help="Input scale for training and scoring."),
    n_train: int = typer.Option(48, help="Synthetic training images (when --data is not given)."),
    n_heldout: int = typer.Option(16, help="Synthetic held-out images (when --heldout is not given)."),
    width: int = typer.Option(240, help="Synthetic image width."),
    height: int = typer.Option(160, help="Synthetic image height."),
    augment: str = typer.Option("default", help="Augmentation preset of the augment/all variants."),
    edge_weight: float = typer.Option(5.0, help="Edge weight of the edge/all variants."),
    edge_width: float = typer.Option(2.0, help="Edge width (px, training scale) of the edge/all variants."),
    warmup_fraction: float = typer.Option(0.1, help="Warm-up share of the steps in the cosine/all variants."),
    band: int = typer.Option(3, help="Boundary band half-width in pixels for boundary accuracy."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    threads: int | None = typer.Option(None, help="Torch CPU threads (default: torch's choice)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (8 images of 64x48, width 8, 24 steps, "
                                                       "lr 1e-2): checks the pipeline in a few minutes on 2 cores."),
    json_out: Path | None = typer.Option(None, "--json", help="Results JSON (default WORK_DIR/results.json)"),
    markdown_out: Path | None = typer.Option(None, "--markdown",
                                             help="Also write the table and its command here."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Print progress lines."),
) -> None:
    """Train the same small model with each quality option on and off; report held-out dice,
    boundary-band accuracy and training time as a markdown table (and JSON).

    Same seed, same initial weights, same batch order and the same number of steps for every variant;
    the held-out images are never trained on.

    Example: `unet-deploy experiment --seeds 0,1,2 --markdown benchmarks/RESULTS-training.md`
    """
    from unet_deploy.train.experiment import (
        ExperimentConfig,
        markdown_table,
        quick_config,
        run_experiment,
        write_results,
    )

    cfg = ExperimentConfig(work_dir=work_dir, data=data, heldout=heldout, source=source,
                           pretrained=pretrained, n_train=n_train, n_heldout=n_heldout, width=width,
                           height=height, scale=scale, base_channels=base_channels, batch_size=batch_size,
                           steps=steps, learning_rate=learning_rate, optimizer=optimizer,
                           seeds=_int_list(seeds, "--seeds"),
                           variants=[v.strip() for v in variants.split(",") if v.strip()], augment=augment,
                           edge_weight=edge_weight, edge_width=edge_width, warmup_fraction=warmup_fraction,
                           band=band, device=device, workers=workers, threads=threads)
    if quick:
        cfg = quick_config(cfg)
    result = run_experiment(cfg, log=typer.echo if verbose else (lambda _m: None))
    command = _command_line(ctx)
    result["command"] = command
    table = markdown_table(result)
    json_path = json_out or work_dir / "results.json"
    write_results(result, json_path)
    typer.echo(table)
    typer.echo(f"wrote {json_path}")
    if markdown_out:
        env = result["environment"]
        text = (f"Made with `{command}` (torch {env['torch']}, {env['device']}, {env['cpu_threads']} "
                f"threads, {env['platform']}).\n\n{table}\n")
        atomic_write_text(markdown_out, text)
        typer.echo(f"wrote {markdown_out}")
