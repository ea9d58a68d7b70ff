"""``unet-deploy benchmark``: latency and peak memory per backend and scale, as a table to paste."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from unet_deploy.cli import _options
from unet_deploy.cli._app import app
from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_write_text
from unet_deploy.names import DEFAULT_CHECKPOINT, PRECISIONS
from unet_deploy.runtime.registry import BACKENDS

if TYPE_CHECKING:
    from unet_deploy.bench import BenchSettings


def _split(values: list[str] | None) -> list[str]:
    """Accept ``--scales 0.5 1.0``, ``--scales 0.5 --scales 1.0`` and ``--scales 0.5,1.0`` alike."""
    out: list[str] = []
    for v in values or []:
        out += [p for p in v.replace(",", " ").split() if p]
    return out


def _is_variant(word: str) -> bool:
    """Whether ``word`` names a benchmark variant (its first part is a backend)."""
    return word.lower().replace("_", "-").split("-")[0] in BACKENDS


def _sort_extras(extras: list[str], backends: list[str], scales: list[str], precisions: list[str]) -> None:
    """Words after ``--backends``/``--scales``/``--precision`` that click leaves over: numbers are scales,
    fp32/fp16/bf16/int8 precisions, names backends."""
    for word in extras:
        for part in _split([word]):
            if _is_variant(part):
                backends.append(part)
                continue
            if part.lower() in PRECISIONS:
                precisions.append(part.lower())
                continue
            try:
                float(part)
            except ValueError:
                if part.startswith("-"):
                    raise UserError(f"{part}: unknown option; see `unet-deploy benchmark --help`") from None
                raise UserError(f"{part}: not a backend ({', '.join(BACKENDS)}), precision ("
                                f"{', '.join(PRECISIONS)}) nor a scale (a number like 0.5); check --backends, "
                                "--precision and --scales") from None
            scales.append(part)


def _floats(words: list[str]) -> list[float]:
    out = []
    for w in words:
        try:
            out.append(float(w))
        except ValueError:
            raise UserError(f"--scales {w}: not a number; give scales like --scales 0.5 1.0") from None
    return out


@app.command(context_settings={"allow_extra_args": True, "allow_interspersed_args": True})
def benchmark(
    ctx: typer.Context,
    model: Path | None = typer.Option(None, "--model", "-m",
                                      help="Checkpoint (.pth, also Pytorch-UNet's) to benchmark. Default: "
                                           "checkpoints/best.pth when it is here (not with --quick or "
                                           "--base-channels), else a freshly initialised model of the seed "
                                           "architecture."),
    backends: list[str] | None = typer.Option(None, "--backends",
                                              help="Backends: torch (eager), torchscript, ort, openvino, or "
                                                   "variants like torch-bf16-cl, ort-int8, ort-default (untuned), "
                                                   "openvino-bf16, openvino-int8, openvino-plain (OpenVINO on a "
                                                   "plain torch.onnx export), openvino-int8-plain (the plain "
                                                   "recipe: nncf.quantize defaults, OpenVINO's default hints), "
                                                   "torch-fp16-cl-compile (CUDA). "
                                                   "Several may follow one flag. Default: torch torchscript ort "
                                                   "and openvino when installed."),
    precision: list[str] | None = typer.Option(None, "--precision", "-p",
                                               help="Precisions for every backend that has them: fp32, bf16 "
                                                    "(torch, openvino), fp16 (torch on CUDA, ort, openvino), "
                                                    "int8 (ort, openvino). Several may follow one flag."),
    channels_last: bool = typer.Option(False, "--channels-last",
                                       help="Eager torch variants use channels_last (NHWC) memory."),
    compile_: bool = typer.Option(False, "--compile", help="Eager torch variants use torch.compile."),
    compile_mode: str = typer.Option("default", "--compile-mode",
                                     help="torch.compile mode with --compile: default, reduce-overhead "
                                          "(CUDA graphs) or max-autotune."),
    stages: int = typer.Option(0, "--stages",
                               help="Also time prediction stage by stage (decode, preprocess, model, "
                                    "post-process, write) and the overlapped pipeline on N synthetic JPEGs, "
                                    "with the fastest variant."),
    stages_crf: bool = typer.Option(False, "--stages-crf", help="Include dense CRF in the --stages run."),
    roofline: bool = typer.Option(False, "--roofline",
                                  help="Also report this CPU's theoretical peak per precision (per-cycle table "
                                       "x timed clock x cores) and the best rate every installed runtime "
                                       "reaches on one compute-bound layer, each backend's share of both, the "
                                       "floor latencies and the speed-up ceilings they allow (CPU)."),
    tile: int | None = typer.Option(None, "--tile", show_default=False,
                                    help="Measure tiled prediction instead: per backend, whole-image vs tiles of "
                                         "at most N px latency at the image size, mask agreement, and the peak "
                                         "memory of a double-size image in tiles vs a half-size one whole (scale "
                                         "1.0 unless --scales gives one). Results under \"tiled\" in --json."),
    tile_overlap: int | None = typer.Option(None, "--tile-overlap", show_default=False,
                                            help="Least overlap of neighbouring tiles with --tile (default: an "
                                                 "eighth of --tile)."),
    from_json: Path | None = typer.Option(None, "--from-json",
                                          help="Run nothing: render the table/--markdown from a --json file of "
                                               "an earlier run (with --merge: several runs in one RESULTS.md)."),
    merge: list[Path] | None = typer.Option(None, "--merge",
                                            help="Earlier JSON results (another benchmark run, "
                                                 "benchmarks/int8_eval.py) to include in --markdown."),
    scales: list[str] | None = typer.Option(None, "--scales", "-s",
                                            help="Input scales of a 1918x1280 Carvana image (0.5 = 959x640). "
                                                 "Several may follow one flag. Default: 0.5 1.0."),
    device: str = typer.Option("auto", help="auto (CUDA when visible, else CPU), cpu, cuda or cuda:N."),
    runs: int | None = typer.Option(None, "--runs",
                                    help="Timed runs per case. Default: 3 on CPU (full width), 5 in quick "
                                         "mode, 50 on CUDA."),
    warmup: int | None = typer.Option(None, "--warmup",
                                      help="Untimed warm-up calls per case, exactly N (0: the first call is "
                                           "timed). Default: 1 on CPU and in quick mode, 10 on CUDA."),
    quick: bool = typer.Option(False, "--quick",
                               help="Small width (8) on a small 240x160 image: checks the setup in seconds. "
                                    "Also on with UNET_DEPLOY_BENCH_QUICK=1."),
    base_channels: int | None = typer.Option(None, "--base-channels",
                                             help="Width of the fresh model (64 = Pytorch-UNet; 8 in quick "
                                                  "mode). Ignored with -m."),
    bilinear: bool = typer.Option(False, "--bilinear/--transposed",
                                  help="Up-sampling of the fresh model (Pytorch-UNet's: transposed)."),
    threads: int | None = typer.Option(None, "--threads",
                                       help="CPU threads for torch and ONNX Runtime (default: their own)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every number and the machine facts."),
    plot: Path | None = typer.Option(None, "--plot", help="Draw latency and memory side by side (PNG)."),
    markdown: Path | None = typer.Option(None, "--markdown",
                                         help="Write RESULTS.md: table, ratios, machine, reproduce command."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir",
                                          help="Keep the exported models here and reuse them next time "
                                               "(default: a temporary folder)."),
    show_targets: bool = typer.Option(False, "--targets",
                                      help="Also print this project's own speed/memory targets (met / NOT met) "
                                           "and put them in --markdown: for the project's record in "
                                           "benchmarks/RESULTS.md, not needed to compare backends."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the table."),
    verbose: bool = _options.VERBOSE,
) -> None:
    """Time every backend at every scale and print one table to paste into an issue.

    Columns: backend | precision | scale | input | parity vs eager | p50 ms | p90 ms | img/s (p50) |
    peak MiB | file MB; img/s is 1000 / p50 ms, and the speed-ups under the table are ratios of p50s
    against eager torch. Each case runs in a fresh process, so peak memory is that backend's own (CPU:
    peak RSS growth after imports; CUDA: device memory). Exports are made once per run.

    A "?" marks numbers not to trust, with a footnote saying why: the machine was busy (1-minute load
    average above its cores at the start or end) or a case's timings were unsteady (p90 more than 1.25x
    p50). Rerun on a quiet machine, or with more --runs.

    The last line recommends the fastest variant whose parity passed here, for your model (-m, or the
    checkpoints/best.pth found here) or else the seed width at scale 0.5, with the commands that deploy
    it, which it runs once before printing them. A --quick run of a fresh width-8 model recommends nothing.

    Examples:
      `unet-deploy benchmark --quick`;
      `unet-deploy benchmark -m checkpoints/best.pth --backends torch ort --scales 0.5 --runs 5`;
      `unet-deploy benchmark --device cpu --json bench.json --plot bench.png --markdown RESULTS.md`;
      `unet-deploy benchmark --backends ort --tile 640 --json tiled.json` (tiled vs whole images)
    """
    from rich.console import Console

    from unet_deploy.bench import BenchSettings

    backend_words, scale_words, precision_words = _option_words(ctx, backends, scales, precision, compile_,
                                                                compile_mode, stages)
    merged = [_read_json(path, "--merge", "give a JSON written by --json or int8_eval.py") for path in merge or []]
    words = _variants(backend_words, precision_words, channels_last, compile_, compile_mode, device)
    _check_paths(json_out, plot, markdown, model)
    _check_tiled(tile, stages, roofline, plot, markdown)
    err = Console(stderr=True)
    _options.say_threads(verbose)
    if from_json is None:
        model = _model_to_measure(model, quick, base_channels, tile, err)
    settings = BenchSettings(
        checkpoint=model, backends=tuple(words), stages=stages, stages_crf=stages_crf, roofline=roofline,
        scales=tuple(_floats(scale_words)) or ((1.0,) if tile is not None else (0.5, 1.0)), device=device,
        runs=runs, warmup=warmup, base_channels=base_channels, bilinear=bilinear, quick=quick, threads=threads,
        tile=tile, tile_overlap=tile_overlap, check_recommendation=tile is None,
    )
    log = None if quiet else (lambda msg: err.print(f"[dim]{msg}[/]", highlight=False))
    if from_json is not None:
        report = _read_report(from_json)
    else:
        report = _run(settings, cache_dir, log, show_targets, json_out, plot, markdown, merge)
    _show(report, show_targets)
    _write(report, json_out, plot, markdown, merged, show_targets)


def _model_to_measure(model: Path | None, quick: bool, base_channels: int | None, tile: int | None,
                      err: Any) -> Path | None:
    """``-m``, else this folder's ``checkpoints/best.pth`` (the model the recommendation is for), unless the
    run is a quick setup check, a tiled run or asks for a fresh width."""
    from unet_deploy.bench import quick_from_env

    if model is not None or quick or quick_from_env() or base_channels is not None or tile is not None:
        return model
    if DEFAULT_CHECKPOINT.is_file():
        err.print(f"benchmarking {DEFAULT_CHECKPOINT} (found here; --base-channels 64 measures a fresh seed-width "
                  "model instead)", highlight=False)
        return DEFAULT_CHECKPOINT
    return None


def _option_words(ctx: typer.Context, backends: list[str] | None, scales: list[str] | None,
                  precision: list[str] | None, compile_: bool, compile_mode: str, stages: int
                  ) -> tuple[list[str], list[str], list[str]]:
    """Backend, scale and precision words from the flags and the words click left over, checked."""
    from unet_deploy.bench import VARIANT_HELP
    from unet_deploy.runtime.backend_options import COMPILE_MODES

    backend_words, scale_words, precision_words = _split(backends), _split(scales), _split(precision)
    _sort_extras(list(ctx.args), backend_words, scale_words, precision_words)
    for b in backend_words:
        if not _is_variant(b):
            raise UserError(f"--backends {b}: unknown backend; use {VARIANT_HELP}")
    if compile_ and compile_mode not in COMPILE_MODES:
        raise UserError(f"--compile-mode {compile_mode}: use {', '.join(COMPILE_MODES)}")
    if stages < 0:
        raise UserError(f"--stages {stages}: use 0 (off) or a number of images")
    return backend_words, scale_words, precision_words


def _variants(backend_words: list[str], precision_words: list[str], channels_last: bool, compile_: bool,
              compile_mode: str, device: str) -> list[str]:
    """The variants to run: the backends, expanded by --precision, --channels-last and --compile."""
    from unet_deploy.bench import default_backends, expand_variants

    words = backend_words or list(default_backends())
    if precision_words or channels_last or compile_:
        from unet_deploy.runtime.devices import resolve_device

        words = expand_variants(words, precision_words, channels_last, compile_mode if compile_ else None,
                                resolve_device(device))
    return words


def _check_paths(json_out: Path | None, plot: Path | None, markdown: Path | None, model: Path | None) -> None:
    """Output files must not be folders, --plot must be a PNG, -m must exist."""
    for out in (json_out, plot, markdown):
        if out is not None and out.is_dir():
            raise UserError(f"{out}: is a folder; give a file name")
    if plot is not None and plot.suffix.lower() != ".png":
        raise UserError(f"--plot {plot}: the plot is a PNG; use a .png file name")
    if model is not None and not model.exists():
        raise UserError(f"-m {model}: checkpoint not found; omit -m to benchmark a fresh seed-architecture "
                        "model")


def _check_tiled(tile: int | None, stages: int, roofline: bool, plot: Path | None, markdown: Path | None) -> None:
    """``--tile`` measures tiled prediction only: the table's extras do not apply to it."""
    if tile is None:
        return
    for flag, given in (("--stages", stages > 0), ("--roofline", roofline), ("--plot", plot is not None),
                        ("--markdown", markdown is not None)):
        if given:
            raise UserError(f"{flag}: not with --tile (the tiled run prints its own section and writes it to "
                            "--json); run them separately")


def _run(settings: BenchSettings, cache_dir: Path | None, log: Callable[[str], None] | None, show_targets: bool,
         json_out: Path | None, plot: Path | None, markdown: Path | None, merge: list[Path] | None) -> dict:
    """Run the benchmark; the report records the command that reproduces it."""
    from unet_deploy.bench import reproduce_command, resolve_settings, run_benchmark

    _say_estimate(resolve_settings(settings))
    if settings.tile is not None:
        from unet_deploy.bench.tiled import run_tiled_benchmark

        report = run_tiled_benchmark(resolve_settings(settings), cache_dir=cache_dir, log=log)
    else:
        report = run_benchmark(settings, cache_dir=cache_dir, log=log)
    outputs = [*(["--targets"] if show_targets else []),
               *(["--json", str(json_out)] if json_out else []), *(["--plot", str(plot)] if plot else []),
               *(["--markdown", str(markdown)] if markdown else []),
               *[w for p in merge or [] for w in ("--merge", str(p))]]
    report["command"] = reproduce_command(resolve_settings(settings), outputs)
    return report


def _say_estimate(settings: Any) -> None:
    """Issue 25: one line before a benchmark whose largest case is big (memory or time per image)."""
    from unet_deploy.config import ModelConfig
    from unet_deploy.runtime.estimates import benchmark_estimate_line
    from unet_deploy.runtime.loader import read_embedded_config

    config = read_embedded_config(settings.checkpoint) if settings.checkpoint else None
    model = config.model if config else ModelConfig(base_channels=settings.base_channels, bilinear=settings.bilinear)
    line = benchmark_estimate_line(model, settings.image_size, settings.scales, settings.device)
    if line is not None:
        typer.echo(line, err=True)


def _read_json(path: Path, flag: str, hint: str) -> dict:
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; {hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{flag} {path}: not a JSON file") from None


def _read_report(path: Path) -> dict:
    """A ``--json`` result of an earlier run (``--from-json``)."""
    from unet_deploy.bench import SCHEMA

    report = _read_json(path, "--from-json", "give a JSON written by --json")
    if report.get("schema") != SCHEMA:
        raise UserError(f"--from-json {path}: not a benchmark result (schema {report.get('schema')!r})")
    return report


def _show(report: dict, show_targets: bool) -> None:
    """The table, the speed-ups (with any "?" footnotes), roofline, targets (``--targets``) and stages."""
    from rich.console import Console

    from unet_deploy.bench import render_roofline, render_speedups, render_table, render_targets
    from unet_deploy.bench.tiled import render_tiled

    if report.get("tiled") and not report.get("cases"):
        for line in render_tiled(report):
            typer.echo(line)
        return
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(render_table(report))
    typer.echo(render_speedups(report))
    from unet_deploy.bench.recommend import render_recommendation

    advice = render_recommendation(report)
    if advice:
        typer.echo(advice)
    for line in render_roofline(report) + (render_targets(report) if show_targets else []):
        typer.echo(line)
    if report.get("stages"):
        st = report["stages"]
        typer.echo("stages (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in st["stage_ms"].items())
                   + f"; pipeline {st['pipeline_images_per_s']:.2f} img/s, slowest stage {st['slowest_stage']} "
                   f"{st['slowest_ratio']:.2f}x the pipeline rate")


def _write(report: dict, json_out: Path | None, plot: Path | None, markdown: Path | None, merged: list[dict],
           show_targets: bool) -> None:
    from unet_deploy.bench import render_markdown, write_json, write_plot

    if json_out:
        write_json(report, json_out)
        typer.echo(f"wrote {json_out}")
    if plot:
        write_plot(report, plot)
        typer.echo(f"wrote {plot}")
    if markdown:
        atomic_write_text(markdown, render_markdown(report, merged=merged, show_targets=show_targets))
        typer.echo(f"wrote {markdown}")
