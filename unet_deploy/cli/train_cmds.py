"""``unet-deploy train`` and ``unet-deploy evaluate``."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import typer

from unet_deploy.cli import _options
from unet_deploy.cli._app import app
from unet_deploy.cli._launch import relaunch
from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_write_text
from unet_deploy.signals import exit_code
from unet_deploy.train.quality import recipe_help, resolve_recipe

QUALITY = "Training quality (augmentation, edge-weighted loss, LR schedule)"


def _q(default, help_text: str):
    return typer.Option(default, help=help_text, rich_help_panel=QUALITY)


DEVICE_HELP = "auto (CUDA when visible, else CPU), cpu, cuda or cuda:N."


@app.command()
def train(
    ctx: typer.Context,
    epochs: int = typer.Option(5, "--epochs", "-e", help="Number of epochs."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Global batch size (split over processes)."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", "-l",
                                               help=f"Learning rate [{recipe_help('learning_rate')}]."),
    load: Path | None = typer.Option(None, "--load", "-f",
                                     help="Resume from a unet-deploy checkpoint (model + optimizer), or "
                                          "fine-tune from a Pytorch-UNet MODEL.pth (weights only)."),
    scale: float = typer.Option(0.5, "--scale", "-s", help="Downscaling factor of the images."),
    validation: float = typer.Option(10.0, "--validation", "-v",
                                     help="Percent of the data used as validation (0-100)."),
    data: Path = typer.Option(Path("data"), "--data", help="Data folder with imgs/ and masks/."),
    imgs: Path | None = typer.Option(None, "--imgs", help="Images folder (default DATA/imgs)."),
    masks: Path | None = typer.Option(None, "--masks", help="Masks folder (default DATA/masks)."),
    mask_suffix: str = typer.Option("_mask", help="Mask file name = <image stem><suffix>.<ext>."),
    classes: int = typer.Option(2, "--classes", "-c", help="Number of classes (1 = sigmoid output)."),
    bilinear: bool = typer.Option(False, "--bilinear/--transposed",
                                  help="Bilinear up-sampling or transposed convolutions (Pytorch-UNet's default)."),
    base_channels: int = typer.Option(64, help="Width of the first layer; 64 = Pytorch-UNet, 16/32 = fast CPU models."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision (fp16 on CUDA, bf16 on CPU)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    seed: int = typer.Option(0, help="Random seed (split, init, shuffling): same seed, same run."),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    checkpoint_dir: Path = typer.Option(Path("checkpoints"), help="Where last.pth and best.pth are written."),
    recipe: str | None = typer.Option(None, "--recipe", metavar="default|pytorch-unet",
                                      help="Defaults for the optimiser, learning rate, schedule and augmentation: "
                                           "default (AdamW 1e-3, cosine after a short warm-up, augmentation "
                                           "'light'; learns well in few epochs) or pytorch-unet (Pytorch-UNet's "
                                           "exact train.py defaults). A flag given explicitly overrides its "
                                           "recipe value. [default: default]"),
    optimizer: str | None = typer.Option(None, help=f"rmsprop (Pytorch-UNet's), adamw or adam "
                                                    f"[{recipe_help('optimizer')}]."),
    weight_decay: float | None = typer.Option(None, help=f"Weight decay [{recipe_help('weight_decay')}]."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="SyncBatchNorm across processes (torchrun)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last memory format (GPU)."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps."),
    crf: str = typer.Option("off", "--crf", metavar="auto|off",
                            help="auto: after training, choose dense-CRF parameters on the validation images (a "
                                 "search of at most a minute) and store them in best.pth, so `predict --crf` uses "
                                 "them; a CRF that does not raise validation dice is stored as off. Needs "
                                 "pydensecrf2."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    nproc: int = typer.Option(1, "--nproc", help="Train in N local processes (DistributedDataParallel): "
                              "re-runs this command under torch.distributed.run --nproc-per-node N."),
    augment: str | None = _q(None, "Augmentation preset: none (Pytorch-UNet's training), light, default, strong "
                                   f"[{recipe_help('augment')}]. The flags below override single settings of "
                                   "the preset. Needs albumentations."),
    hflip: float | None = _q(None, "Probability of a left-right flip."),
    vflip: float | None = _q(None, "Probability of an up-down flip (0 in every preset)."),
    aug_scale: float | None = _q(None, "Random zoom in [1-X, 1+X]."),
    aug_shift: float | None = _q(None, "Random shift up to X of the width/height."),
    rotate: float | None = _q(None, "Random rotation up to DEG degrees either way."),
    brightness: float | None = _q(None, "Brightness factor in [1-X, 1+X]."),
    contrast: float | None = _q(None, "Contrast factor in [1-X, 1+X]."),
    saturation: float | None = _q(None, "Saturation factor in [1-X, 1+X]."),
    hue: float | None = _q(None, "Hue shift in [-X, X] (fraction of the colour circle)."),
    edge_weight: float | None = _q(None, "Loss weight of pixels on mask edges relative to the interior (1 = off; "
                                         f"e.g. 5) [{recipe_help('edge_weight')}]."),
    edge_width: float | None = _q(None, "Reach of the edge weight in pixels at the training scale (Gaussian "
                                        f"sigma) [{recipe_help('edge_width')}]."),
    schedule: str | None = _q(None, "LR schedule: plateau (Pytorch-UNet's, on validation dice, per epoch) or "
                                    f"cosine (per step, after --warmup-steps) [{recipe_help('schedule')}]."),
    warmup_steps: int | None = _q(None, "Linear warm-up steps before the cosine decay "
                                        f"[{recipe_help('warmup_steps')}]."),
    verbose: bool = _options.VERBOSE,
) -> None:
    """Train a U-Net on Carvana-style data (DATA/imgs/<id>.jpg + DATA/masks/<id>_mask.gif).

    Writes CHECKPOINT_DIR/last.pth every epoch and best.pth when validation dice improves; Ctrl-C saves
    last.pth and exits. Under torchrun it trains with DistributedDataParallel.

    The optimiser, learning rate, LR schedule and augmentation come from --recipe (default: `default`);
    `--recipe pytorch-unet` trains exactly like Pytorch-UNet's train.py. Each of those flags given
    explicitly overrides the recipe's value. Checkpoints store the settings used: `-f last.pth` resumes
    with them, and flags given explicitly together with -f override the stored ones.

    Example: `unet-deploy train --data data -e 12 -b 4 -s 1.0 --base-channels 16 --bilinear`
    Several GPUs: `unet-deploy train --nproc 4 -b 16 ...`
    (same as `torchrun --nproc-per-node 4 -m unet_deploy train -b 16 ...`)

    Quality options: `--augment strong --edge-weight 5 --schedule cosine --warmup-steps 100`;
    `unet-deploy experiment` measures what each one buys.
    """
    from unet_deploy.train import TrainConfig, dist_env
    from unet_deploy.train import train as run_train

    if crf not in ("auto", "off"):
        raise UserError(f"--crf {crf}: use auto (choose CRF parameters on the validation images) or off")
    if crf == "auto":
        from unet_deploy.images.crf import require_crf

        require_crf()  # the install hint before training, not after
    if nproc != 1:
        _relaunch(ctx, nproc)

    overrides = {"hflip": hflip, "vflip": vflip, "scale": aug_scale, "shift": aug_shift, "rotate": rotate,
                 "brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
    given = {"recipe": recipe, "optimizer": optimizer, "learning_rate": learning_rate,
             "weight_decay": weight_decay, "schedule": schedule, "warmup_steps": warmup_steps,
             "augment": augment, "edge_weight": edge_weight, "edge_width": edge_width}
    record = resolve_recipe({**given, "augment_overrides": overrides})
    _options.say_threads(verbose, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    _suggest_processes(device, batch_size)
    explicit = _explicit(ctx, {"classes": "n_classes", "bilinear": "bilinear", "base_channels": "base_channels",
                                "batch_size": "batch_size"})
    explicit += tuple(k for k, v in {**given, **overrides}.items() if v is not None)
    cfg = TrainConfig(data=data, images_dir=imgs, masks_dir=masks, mask_suffix=mask_suffix, epochs=epochs,
                      batch_size=batch_size, learning_rate=record["learning_rate"], load=load, scale=scale,
                      validation=validation, n_classes=classes, bilinear=bilinear, base_channels=base_channels,
                      amp=amp, device=device, seed=seed, workers=workers, checkpoint_dir=checkpoint_dir,
                      optimizer=record["optimizer"], weight_decay=record["weight_decay"], sync_bn=sync_bn,
                      channels_last=channels_last, progress=not quiet, max_steps=max_steps,
                      explicit=explicit, recipe=record)
    result = run_train(cfg)
    if result.interrupted:  # Ctrl-C or SIGTERM: interrupted.pth was written
        raise typer.Exit(exit_code())
    if not dist_env().main:
        return
    score = f"best validation dice {result.best_dice:.4f}" if result.best_dice >= 0 else "no validation split (-v 0)"
    typer.echo(f"{score}; {result.images_per_second:.1f} img/s; checkpoints: {result.best_path}, {result.last_path}")
    helps = _auto_crf(result, device) if crf == "auto" else False
    typer.echo(_next_hint(result.best_path, data, helps))


def _suggest_processes(device: str, batch_size: int) -> None:
    """One line when one CPU process trains while other jobs keep the CPUs busy: `--nproc 2` (one thread per
    process) trains about 3x faster there (docs/threads.md)."""
    from unet_deploy.distributed import dist_env
    from unet_deploy.runtime.cpu_share import processes_would_help, wait_choice
    from unet_deploy.runtime.devices import resolve_device

    if not processes_would_help() or dist_env().enabled or batch_size % 2:
        return
    choice = wait_choice()
    if resolve_device(device) == "cpu":
        typer.echo(f"note: other processes left {choice.free:.1f} of {choice.usable} CPUs free: training in "
                   "processes of one thread (add --nproc 2) is faster on a busy machine; see docs/threads.md",
                   err=True)


def _auto_crf(result: Any, device: str) -> bool:
    """``--crf auto``: choose and store the CRF of best.pth on the validation images; one line. Whether it helps."""
    from unet_deploy.runtime.cpu_share import process_share
    from unet_deploy.train.crf_tune import auto_crf

    if not result.val_pairs:
        typer.echo("--crf auto: no validation images (-v 0); the CRF keeps its default parameters")
        return False
    choice = auto_crf(result.best_path, result.val_pairs, workers=process_share(1), device=device)
    typer.echo(f"{choice.line()}; stored in {result.best_path}"
               + ("" if choice.helps else ": `predict --crf` leaves it off"))
    return choice.helps


def _next_hint(best: Path, data: Path, crf: bool = False) -> str:
    """Evaluate on DATA/heldout when synth wrote one (never on the training images; with and without the CRF
    when ``crf`` helped on validation), else export."""
    held = data / "heldout"
    if (held / "imgs").is_dir():
        return "next: unet-deploy " + shlex.join(["evaluate", "-m", str(best), "--data", str(held),
                                                  *(["--crf"] if crf else [])])
    return "next: unet-deploy " + shlex.join(["export", "-m", str(best), "--format", "onnx"])


def _relaunch(ctx: typer.Context, nproc: int) -> None:
    """Check the data once here, then re-run this command without --nproc under torch.distributed.run."""
    from unet_deploy.images.image_io import find_pairs

    opts = ctx.params  # catch the common mistakes here, in one line, before starting N processes
    if nproc >= 1 and opts["batch_size"] % nproc:
        raise UserError(f"-b/--batch-size {opts['batch_size']}: the global batch must be a multiple of "
                        f"--nproc {nproc}")
    data = Path(opts["data"])  # ctx.params holds the raw values (str), not the converted Path
    find_pairs(opts["imgs"] or data / "imgs", opts["masks"] or data / "masks", opts["mask_suffix"])
    relaunch(ctx, nproc)


@app.command()
def evaluate(
    model: Path = typer.Option(Path("checkpoints/best.pth"), "--model", "-m",
                               help="Checkpoint (.pth, also Pytorch-UNet's), TorchScript (.ts) or ONNX (.onnx)."),
    data: Path = typer.Option(Path("data"), "--data", help="Data folder with imgs/ and masks/."),
    imgs: Path | None = typer.Option(None, "--imgs", help="Images folder (default DATA/imgs)."),
    masks: Path | None = typer.Option(None, "--masks", help="Masks folder (default DATA/masks)."),
    mask_suffix: str = typer.Option("_mask", help="Mask file name = <image stem><suffix>.<ext>."),
    scale: float | None = typer.Option(None, "--scale", "-s", help="Override the model's input scale."),
    threshold: float | None = typer.Option(None, "--mask-threshold", "-t", help="Override the threshold."),
    backend: str | None = typer.Option(None, help="torch, torchscript, ort or openvino (default: from the file)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    mask_values: str | None = typer.Option(None, "--mask-values",
                                           help="Mask pixel value per class, e.g. 0,255 (default: the model's; "
                                                "binary models also read predict's 0/255 masks)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write per-image dice as JSON."),
    tile: int | None = _options.TILE,
    tile_overlap: int | None = _options.TILE_OVERLAP,
    crf: bool = typer.Option(False, "--crf/--no-crf",
                             help="Also score the masks of `predict --crf` (the model's CRF from `train --crf "
                                  "auto`, else the defaults): dice with and without the CRF."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verbose: bool = _options.VERBOSE,
) -> None:
    """Mean per-image dice (Carvana's metric) of a model on DATA, at the original resolution.

    Example: `unet-deploy evaluate -m checkpoints/best.pth --data data` (add `--tile 640` for tiled masks,
    `--crf` for the dice with the dense CRF too)
    """
    from unet_deploy.runtime.tiling import check_tiling

    check_tiling(tile, tile_overlap)
    _options.say_threads(verbose)
    from unet_deploy.images.image_io import find_pairs
    from unet_deploy.progress import file_progress
    from unet_deploy.runtime.loader import load_backend
    from unet_deploy.train import ensure_writable_dir, evaluate_model

    values = _parse_values(mask_values) if mask_values else None
    if json_out is not None:
        ensure_writable_dir(json_out.parent if str(json_out.parent) else Path("."), "--json")
        if json_out.is_dir():
            raise UserError(f"--json {json_out}: is a folder; give a file name")
    if crf:
        from unet_deploy.images.crf import require_crf

        require_crf()
    be = load_backend(model, backend, device)
    pairs = find_pairs(imgs or data / "imgs", masks or data / "masks", mask_suffix)
    with file_progress(not quiet) as bar:
        task = bar.add_task("evaluate", total=len(pairs))
        result = evaluate_model(be, pairs, scale, values, threshold,
                                progress=lambda i: bar.update(task, completed=i), tile=tile,
                                tile_overlap=tile_overlap, crf=crf, crf_workers=_crf_workers(len(pairs)))
    typer.echo(f"dice {result['dice']:.6f} over {result['n']} images ({be.describe()})")
    if crf:
        typer.echo(_crf_line(result))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2))
        typer.echo(f"wrote {json_out}")
    typer.echo(_evaluate_hint(model, imgs or data / "imgs", crf and result.get("crf") is not None
                              and result["dice_crf"] > result["dice"]))


def _crf_workers(n_images: int) -> int:
    """CRF processes for ``n_images``: this process's cores, one when there are few images (a pool costs a
    second or two to start)."""
    from unet_deploy.runtime.cpu_share import process_share

    return 1 if n_images < 8 else process_share(1)


def _crf_line(result: dict[str, Any]) -> str:
    """Dice with the CRF against without, or why the CRF stays off for this model."""
    if result.get("crf") is None:
        return f"dice with --crf {result['dice_crf']:.6f}: {result['crf_note']}"
    change = result["dice_crf"] - result["dice"]
    return (f"dice with --crf {result['dice_crf']:.6f} over {result['n']} images ({change:+.6f} against without "
            "it)")


def _evaluate_hint(model: Path, images: Path, crf: bool) -> str:
    """After evaluating a checkpoint: export it; an export: predict the same images into predictions/ (with
    --crf when it raised dice here)."""
    from unet_deploy.runtime.registry import backend_for_path, spec

    if spec(backend_for_path(model)).export_format is None:
        return "next: unet-deploy " + shlex.join(["export", "-m", str(model), "--format", "onnx"])
    return "next: unet-deploy " + shlex.join(["predict", "-m", str(model), str(images), "-o", "predictions",
                                              *(["--crf"] if crf else [])])


def _parse_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"--mask-values {text}: give integers separated by commas, e.g. 0,255") from None
    if len(values) < 2 or len(set(values)) != len(values):
        raise UserError(f"--mask-values {text}: give at least two distinct values, one per class")
    return values


def _explicit(ctx: typer.Context, names: dict[str, str]) -> tuple[str, ...]:
    """TrainConfig fields whose flags were given on the command line (not left at their defaults)."""
    # compared by name: typer may ship its own copy of click, with its own ParameterSource enum
    return tuple(field for param, field in names.items()
                 if getattr(ctx.get_parameter_source(param), "name", "") == "COMMANDLINE")
