"""``unet-deploy serve``: an HTTP server for a model, with the prediction path of ``predict``."""

from __future__ import annotations

from pathlib import Path

import typer

from unet_deploy.cli import _crf, _options
from unet_deploy.cli._app import app
from unet_deploy.errors import UserError

_SERVER_PACKAGES = {"starlette", "uvicorn", "prometheus_client", "multipart", "python_multipart", "anyio"}
_INSTALL = "pip install starlette uvicorn prometheus-client python-multipart (dependencies of unet-deploy)"


def _crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401  - optional: only CRF requests need it
    except ImportError:
        return False
    return True


@app.command()
def serve(
    model: Path | None = typer.Option(None, "--model", "-m", show_default=False,
                                      help="Checkpoint (.pth), TorchScript (.ts) or ONNX (.onnx). Default: as "
                                           "`predict`, the newest verified export (also the demo's) unless "
                                           "checkpoints/best.pth is newer; one line says which."),
    backend: str | None = typer.Option(None, help="torch, torchscript, ort or openvino (default: from the model "
                                                  "file)."),
    device: str = typer.Option("auto", help="auto (CUDA when visible, else CPU), cpu, cuda or cuda:N."),
    precision: str | None = typer.Option(None, show_default=False,
                                         help="torch backend: fp32 (default), fp16 (GPU) or bf16; openvino: auto "
                                              "(default: the fastest precision export verified here), fp32, bf16 "
                                              "or fp16."),
    threads: int | None = typer.Option(None, help="ONNX Runtime / OpenVINO threads (default: the physical cores)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port, printed at start)."),
    max_batch: int | None = typer.Option(None, "--max-batch", show_default=False,
                                         help="Most concurrent requests of one input size per model call. "
                                              "Default: 4 on a GPU and for OpenVINO (parallel streams), 1 "
                                              "for other CPU backends (a CPU batch is no faster per image)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a request waits for others to batch "
                                                                  "with."),
    queue: int = typer.Option(32, help="Requests admitted beyond the running batch; more get 503 with "
                                       "Retry-After at once."),
    workers: int = typer.Option(1, help="Server processes behind the port, each with its own model."),
    token: str | None = typer.Option(None, envvar="UNET_DEPLOY_TOKEN", show_default=False,
                                     help="Require 'Authorization: Bearer TOKEN' (also read from "
                                          "UNET_DEPLOY_TOKEN); /healthz and /readyz stay open."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest upload; larger ones get 413."),
    max_uploads: int = typer.Option(128, "--max-uploads", help="Uploads received at once; more get 503 with "
                                                               "Retry-After before their body is read."),
    read_timeout_s: float = typer.Option(15.0, "--read-timeout-s",
                                         help="A request's headers, and then its body, must arrive within this: "
                                              "else 408 and the connection closes."),
    max_pixels: int = typer.Option(16_000_000, "--max-pixels",
                                   help="Largest image in pixels (width x height), read from its header: larger "
                                        "ones get 413 before they are decoded."),
    pixel_budget: int = typer.Option(40_000_000, "--pixel-budget",
                                     help="Decoded pixels of all images in work at once (bounds the memory of "
                                          "requests): an image that does not fit gets 503 before it is "
                                          "decoded."),
    timeout_s: float = typer.Option(30.0, "--timeout-s", help="A request not answered this long after it arrived "
                                                              "(upload included) gets 504 and is dropped."),
    crf: bool = typer.Option(False, "--crf/--no-crf", help="Dense CRF by default (requests may say crf=0/1); the "
                                                            "model's parameters from `train --crf auto`, as predict."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Flip TTA by default (requests may say tta=0/1)."),
    crf_workers: int = typer.Option(1, "--crf-workers", help="Processes for dense CRF."),
    crf_gauss_sxy: float | None = _crf.GAUSS_SXY,
    crf_gauss_compat: float | None = _crf.GAUSS_COMPAT,
    crf_bilat_sxy: float | None = _crf.BILAT_SXY,
    crf_bilat_srgb: float | None = _crf.BILAT_SRGB,
    crf_bilat_compat: float | None = _crf.BILAT_COMPAT,
    crf_iterations: int | None = _crf.ITERATIONS,
    crf_clip: float | None = _crf.CLIP,
    tile: int | None = _options.TILE,
    tile_overlap: int | None = _options.TILE_OVERLAP,
    model_name: str = typer.Option("unet", "--model-name",
                                   help="The model's name in the Open Inference Protocol: /v2/models/NAME."),
    grace_s: float = typer.Option(30.0, "--grace-s", help="On SIGTERM or Ctrl-C: how long the whole shutdown may "
                                                          "take; uploads still arriving are cut at once, "
                                                          "admitted requests may finish."),
    verbose: bool = _options.VERBOSE,
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /v1/model, /healthz, /readyz, /metrics, a web page, and
    the Open Inference Protocol (KServe v2: tritonclient, KServe, Seldon) under /v2.

    Concurrent requests of one input size are batched (--max-batch, --max-wait-ms). Masks have the pixels
    `predict` writes for the same file and options. Bad uploads get 400/413/415, a slow upload 408, a full
    queue or budget 503, a slow answer 504; every error is JSON {"error": "..."}. Memory is bounded by
    --max-uploads, --queue and --pixel-budget (the bound is printed at start). SIGTERM or Ctrl-C: new
    requests get 503, the admitted ones finish within --grace-s, exit 0.

    Examples: `unet-deploy serve` (the newest verified export) or `unet-deploy serve -m exported/best.onnx`, then
    `curl -F file=@car.jpg http://127.0.0.1:8000/v1/predict -o car_mask.png`;
    `curl --data-binary @car.jpg 'http://127.0.0.1:8000/v1/predict?format=json'`;
    `curl http://127.0.0.1:8000/v2/models/unet` (its inputs: image, BYTES [N], or pixels, FP32 [N, C, H, W];
    outputs: mask, UINT8 [N, H, W], and probabilities), then with tritonclient.http:
    `InferInput("image", [1], "BYTES")` holding the file's bytes, `client.infer("unet", [that]).as_numpy("mask")`.
    """
    from unet_deploy.runtime.tiling import check_tiling

    check_tiling(tile, tile_overlap)  # before the model is looked for: the flag's own error first
    try:
        from unet_deploy.serve.options import ServeOptions
        from unet_deploy.serve.server import serve as run_server

        _options.say_threads(verbose, workers, crf_workers)
    except ImportError as e:
        if (e.name or "").split(".")[0] not in _SERVER_PACKAGES:
            raise
        raise UserError(f"serve needs the server packages ({e.name} is missing): {_INSTALL}") from None
    from unet_deploy.predict import default_model

    allow_crf = _crf_available()
    if crf and not allow_crf:
        raise UserError("--crf needs pydensecrf: pip install pydensecrf2 (or drop --crf)")
    options = ServeOptions(
        model=model if model is not None else default_model(backend), backend=backend, device=device,
        backend_options={"precision": precision, "threads": threads}, host=host, port=port,
        max_batch=max_batch, max_wait_ms=max_wait_ms, queue=queue, workers=workers, token=token,
        max_upload_mb=max_upload_mb, max_uploads=max_uploads, read_timeout_s=read_timeout_s, max_pixels=max_pixels,
        pixel_budget=pixel_budget, timeout_s=timeout_s, crf=crf, tta=tta, allow_crf=allow_crf,
        crf_workers=crf_workers, grace_s=grace_s, tile=tile, tile_overlap=tile_overlap, model_name=model_name,
        crf_params=_crf.crf_params(crf_gauss_sxy, crf_gauss_compat, crf_bilat_sxy, crf_bilat_srgb, crf_bilat_compat,
                                   crf_iterations, crf_clip))
    raise typer.Exit(run_server(options))
