"""``unet-deploy predict``: masks for image files with any backend, optional CRF, TTA and Kaggle RLE."""

from __future__ import annotations

import contextlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from unet_deploy.cli import _crf, _options
from unet_deploy.cli._app import app
from unet_deploy.cli._launch import relaunch
from unet_deploy.errors import OptionError, UserError
from unet_deploy.images.crf import require_crf
from unet_deploy.predict.shard import rank_device
from unet_deploy.runtime.cpu_share import process_share, share_cores
from unet_deploy.runtime.registry import backend_for_path
from unet_deploy.signals import exit_code

_NAME_LIST_OPTIONS = ("-o", "--output")
_INPUT_OPTIONS = ("-i", "--input")


class _SeedStyleCommand(TyperCommand):
    """Accept Pytorch-UNet's ``-i a.jpg b.jpg -o a.png b.png`` (argparse ``nargs='+'``) and
    ``a.jpg b.jpg -o a.png b.png``.

    Click options take one value each. Here the names following ``-i`` up to the next option are all
    inputs, and the names following ``-o`` are all outputs when ``-i`` is used or when ``-o`` comes after
    the inputs; an ``-o`` before any input takes one value (``-o FOLDER a.jpg b.jpg``).
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        seed = any(a in _INPUT_OPTIONS for a in args)
        takes_value = {name for p in self.params if getattr(p, "param_type_name", "") == "option"
                       and not getattr(p, "is_flag", False) and not getattr(p, "count", False)
                       for name in p.opts}
        rewritten: list[str] = []
        current: str | None = None
        inputs_seen = False
        rest = iter(args)
        for a in rest:
            if a == "--":
                rewritten += [a, *rest]
                break
            if a.startswith("-") and len(a) > 1:
                lists = a in _INPUT_OPTIONS or (a in _NAME_LIST_OPTIONS and (seed or inputs_seen))
                current = a if lists else None
                if current:
                    continue
                rewritten.append(a)
                value = next(rest, None) if a in takes_value else None  # an option's value is not an input
                if value is not None:
                    rewritten.append(value)
                continue
            if current is not None:
                rewritten += [current, a]
                continue
            inputs_seen = True
            rewritten.append(a)
        return super().parse_args(ctx, rewritten)


def _mask_values(text: str | None) -> list[Any] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"--mask-values {text!r}: give integers separated by commas, e.g. 0,255") from None
    if len(values) < 2:
        raise UserError(f"--mask-values {text!r}: give at least two values (background first)")
    return values


@app.command(cls=_SeedStyleCommand)
def predict(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(None, help="Image files, folders or globs (quote globs).",
                                       show_default=False),
    input_: list[str] = typer.Option(None, "--input", "-i", show_default=False,
                                     help="Input images (Pytorch-UNet style; several may follow one -i)."),
    model: Path | None = typer.Option(None, "--model", "-m", show_default=False,
                                      help="Checkpoint (.pth, also Pytorch-UNet's), TorchScript (.ts), ONNX "
                                           "(.onnx) or OpenVINO IR (.xml). Default: the newest verified export "
                                           "in exported/ (ONNX first) unless checkpoints/best.pth is newer; with "
                                           "--backend, the newest file it runs; else the same under demo/. "
                                           "One line says which."),
    output: list[str] = typer.Option(None, "--output", "-o", show_default=False,
                                     help="One output name per input, or one folder. Several names may follow "
                                          "one -o after the inputs (a.jpg b.jpg -o x.png y.png) or with -i; "
                                          "an -o before the inputs takes one value. Default: <stem>_OUT.png "
                                          "beside each input."),
    backend: str | None = typer.Option(None, help="torch, torchscript, ort or openvino (default: from the model "
                                                  "file; openvino also runs an .onnx file)."),
    device: str = typer.Option("auto", help="auto (CUDA when visible, else CPU), cpu, cuda or cuda:N."),
    precision: str | None = typer.Option(None, show_default=False,
                                         help="torch backend (.pth): fp32 (default), fp16 (GPU) or bf16. --backend "
                                              "openvino: auto (default: the fastest precision export verified for "
                                              "this model on this CPU, shown in the start line), fp32, bf16 or "
                                              "fp16. A .ts / .onnx model on ONNX Runtime runs at the precision it "
                                              "was exported with."),
    threads: int | None = typer.Option(None, help="ONNX Runtime / OpenVINO threads, 1 or more (default: the "
                                                  "physical cores)."),
    channels_last: bool = typer.Option(False, "--channels-last",
                                       help="torch backend: channels_last (NHWC) memory, faster convolutions."),
    compile_mode: str | None = typer.Option(None, "--compile",
                                            help="torch backend: torch.compile mode (default, reduce-overhead "
                                                 "= CUDA graphs, max-autotune)."),
    viz: bool = typer.Option(False, "--viz", "-v",
                             help="Write <stem>_OVERLAY.png (mask tinted in a contrasting colour and "
                                  "outlined in white and black over the image) beside each mask; also show "
                                  "it where a display exists."),
    no_save: bool = typer.Option(False, "--no-save", "-n", help="Do not write mask files."),
    mask_threshold: float | None = typer.Option(None, "--mask-threshold", "-t",
                                                help="Foreground probability threshold for binary models (one "
                                                     "or two classes; with --crf the probabilities are "
                                                     "re-weighted so it maps to 0.5). Models with more "
                                                     "classes take the most likely class. Default: the "
                                                     "model's, 0.5."),
    scale: float | None = typer.Option(None, "--scale", "-s",
                                       help="Input downscaling factor (default: the model's, 0.5 for "
                                            "Pytorch-UNet)."),
    mask_values: str | None = typer.Option(None, help="Pixel value per class, 0-255 (8-bit PNG), exactly one "
                                                      "per class, e.g. 0,255 (default: the model's; 0/255 "
                                                      "for binary)."),
    classes: int | None = typer.Option(None, "--classes", "-c",
                                       help="Pytorch-UNet compatibility: checked against the model."),
    bilinear: bool | None = typer.Option(None, "--bilinear/--transposed",
                                         help="Pytorch-UNet compatibility: checked against the model.",
                                         show_default=False),
    batch_size: int = typer.Option(1, "--batch-size", "-b",
                                   help="Images per network call (consecutive images of one size)."),
    crf: bool = typer.Option(False, "--crf/--no-crf",
                             help="Refine masks with a dense CRF (pydensecrf2): the model's parameters from `train "
                                  "--crf auto` (left off, with one line, when they did not help on validation), "
                                  "else the defaults scaled to each image."),
    crf_workers: int | None = typer.Option(None, help="CRF worker processes, 1 or more (default: CPU "
                                                      "count)."),
    crf_gauss_sxy: float | None = _crf.GAUSS_SXY,
    crf_gauss_compat: float | None = _crf.GAUSS_COMPAT,
    crf_bilat_sxy: float | None = _crf.BILAT_SXY,
    crf_bilat_srgb: float | None = _crf.BILAT_SRGB,
    crf_bilat_compat: float | None = _crf.BILAT_COMPAT,
    crf_iterations: int | None = _crf.ITERATIONS,
    crf_clip: float | None = _crf.CLIP,
    tta: bool = typer.Option(False, "--tta", help="Average the probabilities of each image and its mirror."),
    tile: int | None = _options.TILE,
    tile_overlap: int | None = _options.TILE_OVERLAP,
    rle: Path | None = typer.Option(None, "--rle",
                                    help="Also write a Kaggle Carvana submission (img,rle_mask)."),
    skip_existing: bool = typer.Option(False, "--skip-existing", "--resume",
                                       help="Resume an interrupted run: skip inputs whose mask PNG exists, is "
                                            "valid and was made with the same model and options, and with "
                                            "--rle reuse the submission rows it journaled."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors (no progress bar, no "
                                                            "'wrote ...' lines, no summary on success)."),
    nproc: int = typer.Option(1, "--nproc", help="Predict in N local processes (one per GPU, or CPU shares): "
                              "re-runs this command under torch.distributed.run --nproc-per-node N."),
    verbose: bool = _options.VERBOSE,
    ray_address: str | None = typer.Option(None, "--ray-address", show_default=False,
                                           help="Predict on a Ray cluster: auto (the cluster this machine "
                                                "belongs to) or HOST:PORT of its head node. Ray Data reads the "
                                                "files, actors predict, this process writes the outputs. Inputs "
                                                "and model must be at the same path on every node. Needs "
                                                'pip install "unet-deploy[ray]".'),
    ray_concurrency: int | None = typer.Option(None, "--ray-concurrency", show_default=False,
                                               help="With --ray-address: the number of actors (default: one "
                                                    "per GPU of the cluster, else one per CPU, or per --threads "
                                                    "CPUs)."),
) -> None:
    """Predict masks for images with a checkpoint, TorchScript or ONNX model.

    Scale, threshold, classes and mask values come from the model unless given. Bad files are reported on
    one line each and skipped; the exit code is 1 when any file failed. At the end it prints where the
    masks and overlays went. Ctrl-C stops with one line and exit code 130; the masks written so far are
    kept and --resume continues.

    Under torchrun (or with --nproc) the inputs are split over the processes; rank 0 merges --rle.

    Examples: `unet-deploy predict data/test/ --backend ort --rle submission.csv --no-save`;
    `unet-deploy predict -m MODEL.pth a.jpg b.jpg -o a_mask.png b_mask.png` (or -i a.jpg b.jpg -o ...);
    `unet-deploy predict data/test/ --rle submission.csv --no-save --nproc 4 --resume`;
    `unet-deploy predict big.jpg --backend ort --tile 640` (tiled: memory of a 640 px tile, not the image);
    `unet-deploy predict /shared/test/ -m /shared/best.onnx --rle submission.csv --no-save --ray-address auto`
    (on a Ray cluster; --resume continues a stopped run)
    """
    specs = list(input_ or []) + list(inputs or [])
    if not specs:
        raise UserError("predict: no input images; pass files, folders or globs (e.g. data/test/*.jpg)")
    _check_ray_flags(ray_address, ray_concurrency, nproc)
    if nproc != 1:
        from unet_deploy.predict import default_model
        from unet_deploy.runtime.loader import check_model_file

        check_model_file(model if model is not None else default_model(backend, say=False))  # one error line, not N
        relaunch(ctx, nproc)
    from unet_deploy.images.overlay import display_available
    from unet_deploy.predict import PredictOptions, default_model

    if crf_workers is not None and crf_workers < 1:
        raise UserError(f"--crf-workers {crf_workers}: use 1 or more (or leave it out for one per core)")
    crf_params = _crf.crf_params(crf_gauss_sxy, crf_gauss_compat, crf_bilat_sxy, crf_bilat_srgb, crf_bilat_compat,
                                 crf_iterations, crf_clip)
    options = PredictOptions(
        scale=scale, threshold=mask_threshold, mask_values=_mask_values(mask_values), batch_size=batch_size,
        save=not no_save, viz=viz, show=viz and display_available(), rle=rle, crf=crf, crf_params=crf_params,
        crf_workers=crf_workers or _cores_per_process(), tta=tta, skip_existing=skip_existing, progress=not quiet,
        tile=tile, tile_overlap=tile_overlap)
    if crf:
        require_crf()
    _options.say_threads(verbose, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), options.crf_workers if crf else None)
    path = model if model is not None else default_model(backend, say=os.environ.get("RANK", "0") == "0")
    model_args = _ModelArgs(path=path, backend=backend, device=device, precision=precision, threads=threads,
                            channels_last=channels_last, compile=compile_mode, classes=classes, bilinear=bilinear)
    if ray_address is not None:
        _predict_on_ray(specs, output, model_args, options, ray_address, ray_concurrency, quiet=quiet)
        return
    _predict_in_group(specs, output, model_args, options, quiet=quiet)


def _predict_in_group(specs: list[str], output: list[str] | None, model_args: _ModelArgs, options: Any, *,
                      quiet: bool) -> None:
    """Predict in this process, or as one rank of torchrun's group; Ctrl-C / SIGTERM end with one line."""
    from unet_deploy.predict.shard import Group, SharedError, process_group

    # one process (no torchrun): no process group, so the ONNX Runtime path never imports torch
    alone = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    with contextlib.nullcontext(Group()) if alone else process_group() as group:
        try:
            _predict(group, specs, output, model_args, options, quiet=quiet)
        except SharedError as e:
            if group.main:
                raise
            raise typer.Exit(e.exit_code) from None  # rank 0 prints it
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
            if group.main:
                typer.echo(_interrupted_line(e), err=True)
            raise typer.Exit(exit_code()) from None


def _interrupted_line(e: KeyboardInterrupt) -> str:
    from unet_deploy.predict import PredictInterrupted

    if not isinstance(e, PredictInterrupted):
        return "interrupted; rerun the same command (with --resume to keep the masks already written)"
    return (f"interrupted: {e.done} of {e.total} files done; masks written so far are kept; rerun the same "
            "command with --resume to continue")


def _where_lines(paths: list[Path], noun: str, limit: int = 3) -> list[str]:
    """``wrote a_OUT.png`` per file for a few files; ``wrote N masks to DIR/`` per folder for more."""
    if len(paths) <= limit:
        return [f"wrote {p}" for p in paths]
    folders: dict[Path, int] = {}
    for p in paths:
        folders[p.parent] = folders.get(p.parent, 0) + 1
    lines = [f"wrote {n} {noun} to {str(d).rstrip('/')}/" for d, n in list(folders.items())[:limit]]
    if len(folders) > limit:
        rest = sum(list(folders.values())[limit:])
        lines.append(f"wrote {rest} more {noun} in {len(folders) - limit} more folders (beside their inputs)")
    return lines


def _cores_per_process() -> int:
    """This process's share of the cores it may use: processes on one machine share them."""
    return process_share(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass(frozen=True, kw_only=True)
class _ModelArgs:
    """predict's model flags: the file, its backend and load options, and the seed's compatibility checks."""

    path: Path
    backend: str | None
    device: str
    precision: str | None
    threads: int | None
    channels_last: bool
    compile: str | None
    classes: int | None
    bilinear: bool | None

    def load(self, group: Any) -> Any:
        """The Predictor's runner for this process (its GPU, or its share of the cores, under torchrun)."""
        from unet_deploy.api import Predictor
        from unet_deploy.runtime.backend_options import options_for

        device, threads = self.device, self.threads
        if group.world > 1:
            device = rank_device(device, group.local_rank, group.world)
        backend = self.backend or backend_for_path(self.path)
        if group.world > 1:  # this process's share of the cores (the registry says how a backend takes it)
            threads = share_cores(backend, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), threads)
        options = options_for(backend, precision=self.precision, threads=threads,
                              channels_last=self.channels_last, compile=self.compile)
        predictor = Predictor.load(self.path, backend=backend, device=device, backend_options=options)
        self.check_compatibility(predictor.config.model)
        return predictor

    def check_compatibility(self, mc: Any) -> None:
        """Pytorch-UNet's --classes / --bilinear, checked against what the model file says."""
        if self.classes is not None and max(self.classes, 1) != mc.n_classes:
            noun = "class" if mc.n_classes == 1 else "classes"
            raise UserError(f"--classes {self.classes}: {self.path} predicts {mc.n_classes} {noun}; drop --classes "
                            "(it is read from the model)")
        if self.bilinear is not None and self.bilinear != mc.bilinear:
            raise UserError(f"--{'bilinear' if self.bilinear else 'transposed'}: {self.path} uses "
                            f"{'bilinear' if mc.bilinear else 'transposed'} up-sampling; drop the flag (it is "
                            "read from the model)")


def _predict(group: Any, specs: list[str], output: list[str] | None, model_args: _ModelArgs, options: Any, *,
             quiet: bool) -> None:
    """The body of ``predict`` in one process (one rank under torchrun)."""
    from unet_deploy.predict import crf_setting

    predictor = model_args.load(group)
    predictor.options = options
    crf, note = crf_setting(predictor.runner, options)
    if note and group.main:
        typer.echo(note, err=True)  # the CRF stays off for this model: said even with --quiet
    summary = predictor.predict_files(specs, outputs=output, group=group)
    if group.main and not quiet:
        for line in _where_lines(summary.masks, "masks") + _where_lines(summary.overlays, "overlays"):
            typer.echo(line)
    if group.main and (not quiet or summary.failed):
        typer.echo(f"{summary.line()} [{predictor.describe()}]", err=bool(summary.failed))
    if summary.failed:
        raise typer.Exit(summary.exit_code)
    if group.main and not quiet and (summary.masks or options.rle):
        typer.echo(_next_hint(model_args.path, crf is not None and options.crf_params is None))


def _next_hint(model: Path, crf: bool) -> str:
    """After predicting with a checkpoint: export it (a faster predict); with an export: serve it (with the
    model's CRF when this run used it)."""
    from unet_deploy.runtime.registry import is_checkpoint_file

    if is_checkpoint_file(model):
        return "next: unet-deploy " + shlex.join(["export", "-m", str(model), "--format", "onnx"])
    return "next: unet-deploy " + shlex.join(["serve", "-m", str(model), *(["--crf"] if crf else [])])


def _check_ray_flags(address: str | None, concurrency: int | None, nproc: int) -> None:
    """--ray-address: Ray installed (else one line saying how), and not mixed with torchrun."""
    if address is None:
        if concurrency is not None:
            raise OptionError("--ray-concurrency: only with --ray-address (a Ray cluster); drop it")
        return
    if concurrency is not None and concurrency < 1:
        raise OptionError(f"--ray-concurrency {concurrency}: use 1 or more (or leave it out: one actor per GPU, "
                          "else per CPU of the cluster)")
    if nproc != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OptionError("--ray-address: Ray runs the workers; drop --nproc (and do not start it under torchrun)")
    from unet_deploy.predict.ray_batch import import_ray

    import_ray()


def _predict_on_ray(specs: list[str], output: list[str] | None, model_args: _ModelArgs, options: Any,
                    address: str, concurrency: int | None, *, quiet: bool) -> None:
    """The body of ``predict --ray-address``: the model is loaded here too (its fingerprint decides what
    --resume reuses), then the cluster reads and predicts the files and this process writes the outputs."""
    from unet_deploy.predict.ray_batch import ModelSpec, predict_on_ray
    from unet_deploy.predict.shard import Group

    predictor = model_args.load(Group())
    spec = ModelSpec(path=str(Path(model_args.path).absolute()), backend=model_args.backend
                     or backend_for_path(model_args.path), precision=model_args.precision,
                     threads=model_args.threads, channels_last=model_args.channels_last, compile=model_args.compile)
    try:
        summary, where = predict_on_ray(predictor.runner, spec, specs, output, options, address=address,
                                        device=model_args.device, concurrency=concurrency)
    except KeyboardInterrupt as e:
        typer.echo(_interrupted_line(e), err=True)
        raise typer.Exit(exit_code()) from None
    if not quiet:
        for line in _where_lines(summary.masks, "masks") + _where_lines(summary.overlays, "overlays"):
            typer.echo(line)
    if not quiet or summary.failed:
        typer.echo(f"{summary.line()} [{predictor.describe()}; {where}]", err=bool(summary.failed))
    if summary.failed:
        raise typer.Exit(summary.exit_code)
