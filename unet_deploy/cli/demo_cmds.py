"""``unet-deploy demo``: the whole journey on synthetic data, as the commands a user would type."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import typer

from unet_deploy.cli._app import app
from unet_deploy.names import DEMO_DIR, EXPORT_DIR

DEFAULT_OUT = Path(DEMO_DIR)  #: predict's model discovery falls back to this folder


def demo_steps(out: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(title, argv) for each step; the same commands the README shows.

    Training uses the default recipe: 72 cars at 192x128 (full scale), base width 16, 12 epochs, batch 4
    (``--quick``: 48 cars at half scale, 6 epochs), in :func:`train_processes` processes. Held-out cars come
    from another seed, inside DATA/heldout.
    """
    n_train, n_held, epochs, scale = ("48", "8", "6", "0.5") if quick else ("72", "24", "12", "1.0")
    nproc = train_processes()
    data, held = out / "data", out / "data" / "heldout"
    ck, exp, pred = out / "checkpoints", out / "exported", out / "predictions"
    return [
        ("synthetic Carvana-like data: training cars and held-out cars",
         ["synth", "--out", str(data), "--n", n_train, "--heldout", n_held, "--width", "192", "--height", "128",
          "--seed", "0", "--overwrite"]),
        ("train a small U-Net (base width 16) on the CPU with the default recipe"
         + (f" (other jobs keep the CPUs busy: in {nproc} processes of one thread)" if nproc > 1 else "")
         + "; choose its CRF on validation",
         ["train", "--data", str(data), "-e", epochs, "-b", "4", "-s", scale, "-v", "10", "--base-channels", "16",
          "--bilinear", "--checkpoint-dir", str(ck), "--crf", "auto", "-q",
          *(["--nproc", str(nproc)] if nproc > 1 else [])]),
        ("held-out dice (Carvana's metric) on cars the model never saw, without and with the CRF",
         ["evaluate", "-m", str(ck / "best.pth"), "--data", str(held), "--crf", "-q"]),
        ("export to ONNX and TorchScript, verifying parity against eager PyTorch",
         ["export", "-m", str(ck / "best.pth"), "--format", "all", "-o", str(exp), "--quick-verify"]),
        ("predict with ONNX Runtime (+ dense CRF when it helped), writing masks, overlays and a Kaggle submission",
         ["predict", str(held / "imgs"), "-m", str(exp / "best.onnx"), "-o", str(pred), "--crf", "--viz",
          "--rle", str(out / "submission.csv"), "--quiet"]),
        ("benchmark every backend (quick mode: small width and size)",
         ["benchmark", "--quick", "--json", str(out / "benchmark.json")]),
    ]


def train_processes() -> int:
    """Processes for the demo's training: one process of all usable CPUs' threads on a quiet machine; when other
    jobs keep the CPUs busy (as the demo started), one process of one thread per usable CPU, 2 or 4 (its
    batch of 4 splits evenly).

    A model this small trains in processes of one thread each (DistributedDataParallel, which meets once per
    step) as fast as in one process whose threads meet at every layer on a quiet 2-core machine (18.4 against
    18.5 img/s), and 3x as fast beside two other multi-threaded jobs (13.4 against 4.5 img/s), whose threads
    keep waking ours late (``benchmarks/train-threads.json``, ``docs/threads.md``). Quiet, one process keeps
    batch normalisation over the whole batch of 4 (steadier validation dice) and starts no extra processes."""
    from unet_deploy.runtime.cpu_share import processes_would_help, usable_cpus

    if not processes_would_help():
        return 1
    return 4 if usable_cpus() >= 4 else 2


def crf_helps(checkpoint: Path) -> bool:
    """Whether ``train --crf auto`` found that the CRF raises ``checkpoint``'s validation dice."""
    from unet_deploy.runtime.loader import read_embedded_config

    config = read_embedded_config(checkpoint) if checkpoint.is_file() else None
    return bool(config is not None and (config.inference.crf or {}).get("helps"))


def _with_crf_choice(argv: list[str], helps: bool) -> list[str]:
    """A predict step keeps ``--crf`` only when the CRF helped on validation."""
    return argv if helps or argv[0] != "predict" else [a for a in argv if a != "--crf"]


def _sample_image(out: Path) -> Path:
    """Copy the first held-out photo to OUT/car.jpg: one image to try `predict` on."""
    first = sorted((out / "data" / "heldout" / "imgs").glob("*.jpg"))[0]
    target = out / "car.jpg"
    shutil.copyfile(first, target)
    return target


def _next_hint(out: Path, car: Path, crf: bool = False) -> str:
    """The headline command, written so it works when pasted here (with -m unless discovery finds the demo;
    with --crf only when the CRF helped on validation)."""
    uses_discovery = out == DEFAULT_OUT and not any(Path(EXPORT_DIR).glob("*.onnx"))
    model = [] if uses_discovery else ["-m", str(out / "exported" / "best.onnx")]
    return "next: unet-deploy " + shlex.join(["predict", "--backend", "ort", *model, *(["--crf"] if crf else []),
                                              str(car)])


@app.command()
def demo(
    out: Path = typer.Option(DEFAULT_OUT, "--out", "-o",
                             help="Folder for everything the demo writes (with the default, `predict` finds the "
                                  "demo's model without -m)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer, smaller images and fewer epochs."),
) -> None:
    """Run the whole journey on synthetic data: synth -> train (+ CRF chosen on validation) -> evaluate
    (with and without the CRF) -> export + parity -> predict (ONNX Runtime, the CRF when it helped, RLE
    submission) -> benchmark.

    Example: `unet-deploy demo`, then `unet-deploy predict --backend ort demo/car.jpg`
    """
    from unet_deploy.cli import app as cli_app  # cycle: the cli package imports this module

    start = time.perf_counter()
    steps = demo_steps(out, quick)
    helps = False
    for i, (title, argv) in enumerate(steps, 1):
        if argv[0] == "evaluate":  # after training: whether the CRF it chose helped on validation
            helps = crf_helps(out / "checkpoints" / "best.pth")
        argv = _with_crf_choice(argv, helps)
        typer.secho(f"\n[{i}/{len(steps)}] {title}", bold=True)
        typer.echo("$ unet-deploy " + shlex.join(argv))
        step_start = time.perf_counter()
        rc = cli_app(args=argv, prog_name="unet-deploy", standalone_mode=False)
        typer.secho(f"step {i} took {time.perf_counter() - step_start:.1f} s", dim=True)
        if rc not in (None, 0):
            typer.secho(f"demo stopped: step {i} exited with code {rc}", fg="red", err=True)
            raise typer.Exit(rc)
    car = _sample_image(out)
    typer.secho(f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is in {out}/", bold=True)
    typer.echo(_next_hint(out, car, helps))
