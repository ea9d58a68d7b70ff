"""The Open Inference Protocol (KServe v2 REST; what ``tritonclient``, KServe and Seldon speak) next to ``/v1``:

=====================================  ==========================================================================
``GET /v2/health/live``                200 while the process runs
``GET /v2/health/ready``               200 once the model has answered its warm-up; 400 (and why) otherwise
``GET /v2``                            the server: name, version, extensions (``binary_tensor_data``)
``GET /v2/models/<name>``              the model: inputs ``image`` (BYTES ``[-1]``: encoded image files) and
                                       ``pixels`` (FP32 ``[-1, C, -1, -1]``: preprocessed), outputs ``mask``
                                       (UINT8 ``[-1, -1, -1]``) and ``probabilities`` (FP32 ``[-1, K, -1, -1]``)
``GET /v2/models/<name>/ready``        as ``/v2/health/ready``, 404 for another name
``POST /v2/models/<name>/infer``       masks (and probabilities, when asked) of N images of one size
=====================================  ==========================================================================

(``/versions/1`` may follow the model's name.) An ``infer`` request takes the path of ``POST /v1/predict``
(:func:`~unet_deploy.serve.pipeline.admitted`): the same upload limits, model queue, pixel budget, batching,
deadline, token and metrics (``protocol="oip"``). Its body (:mod:`unet_deploy.serve.oip_codec`) may be
gzip/deflate-compressed (inflated within ``--max-upload-mb``) and carry binary tensors. An ``image`` is
decoded and preprocessed as ``predict`` reads a file, so ``mask`` holds the values ``predict`` writes (0/255
for a binary model); ``pixels`` are taken as the network input (at the network's size, so the mask is at that
size). Request ``parameters`` may set ``threshold``, ``crf`` and ``tta`` as ``/v1/predict``'s query does.
What a request holds beyond an image file's pixels -- its parsed JSON, a ``pixels`` input, JSON outputs and
probabilities -- is counted against ``--pixel-budget`` too, as pixels of the same bytes, before it is made.
Errors are ``{"error": "..."}``: 400 for a request this model cannot take, 404 for another model's name; the
server's limits answer as on ``/v1`` (401, 408, 413, 503, 504).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from unet_deploy import __version__
from unet_deploy.runtime.registry import spec
from unet_deploy.serve.decode import HTTPError, decode_image
from unet_deploy.serve.engine import WHOLE_MAX_PIXELS, RequestSettings
from unet_deploy.serve.limits import Jobs
from unet_deploy.serve.memory import bytes_per_pixel
from unet_deploy.serve.oip_codec import (
    ENCODINGS,
    InferRequest,
    InputTensor,
    bytes_elements,
    encode_response,
    inflate,
    numeric_array,
    read_request,
)
from unet_deploy.serve.pipeline import admitted, probe_upload, refuse_early
from unet_deploy.serve.upload import Upload

if TYPE_CHECKING:
    from unet_deploy.serve.app import Handler, ServerState

__all__ = ["oip_routes", "model_metadata", "VERSION", "EXTENSIONS", "JSON_BYTES_COST", "JSON_MAX_ELEMENTS"]

VERSION = "1"  #: the one version of the served model
EXTENSIONS = ["binary_tensor_data"]
#: memory a JSON header may take once parsed, per byte: measured up to 32 (``[{"":{}}, ...]``); counted against
#: ``--pixel-budget`` before it is parsed
JSON_BYTES_COST = 40
#: the most elements of one output sent as JSON ``data``; larger outputs must be asked in binary
JSON_MAX_ELEMENTS = 1 << 22
#: pixel-budget pixels counted per pixel of a ``pixels`` input (its float32 copy and the batch's)
PIXELS_INPUT_COST = 2
#: bytes per pixel of the outputs beyond what ``--pixel-budget``'s per-pixel cost covers (an encoded mask): a
#: JSON mask (a list of ints and its text), and per class the probabilities (float32 arrays, stacked, and the
#: body: about 4 copies) or the JSON probabilities (a float object, its pointer and its text)
MASK_JSON_BYTES = 16
PROBABILITY_BYTES = 16
PROBABILITY_JSON_BYTES = 60
Endpoint = Callable[..., "Handler"]
T = TypeVar("T")


def _per_pixel(state: ServerState) -> float:
    """The bytes one pixel of ``--pixel-budget`` stands for (:func:`~unet_deploy.serve.memory.bytes_per_pixel`)."""
    model = state.engine.backend.config.model
    return bytes_per_pixel(state.engine.scale, model.n_classes, model.n_channels)


def _classes(state: ServerState) -> int:
    return max(state.engine.backend.config.model.n_classes, 2)


def model_metadata(state: ServerState) -> dict[str, Any]:
    """``GET /v2/models/<name>``: the tensors of the model (``-1``: any size)."""
    be = state.engine.backend
    channels = be.config.model.n_channels
    return {"name": state.options.model_name, "versions": [VERSION], "platform": f"unet-deploy/{spec(be.name).label}",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "FP32", "shape": [-1, channels, -1, -1]}],
            "outputs": [{"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, _classes(state), -1, -1]}],
            "parameters": {"mask_values": _mask_values(state), "scale": state.engine.scale,
                           "threshold": state.engine.threshold}}


def _mask_lut(values: list[Any]) -> np.ndarray | None:
    """The mask values as a uint8 lookup table, or None when ``predict`` writes colours or values past 255
    (the ``mask`` output then holds the class indices)."""
    lut = np.asarray(values)
    if lut.ndim != 1 or lut.min(initial=0) < 0 or lut.max(initial=0) > 255:
        return None
    return lut.astype(np.uint8)


def _mask_values(state: ServerState) -> list[Any]:
    return state.values if _mask_lut(state.values) is not None else list(range(_classes(state)))


def _model(state: ServerState, request: Request) -> None:
    """404 unless the path names this model (and version 1, when it names one)."""
    name = request.path_params["name"]
    version = request.path_params.get("version", VERSION)
    if name != state.options.model_name:
        raise HTTPError(404, f"no model {name!r} here: this server serves {state.options.model_name!r}")
    if version != VERSION:
        raise HTTPError(404, f"model {name!r} has no version {version!r}: its one version is {VERSION!r}")


def _settings(state: ServerState, parameters: dict[str, Any]) -> RequestSettings:
    """The request's ``threshold``, ``crf`` and ``tta`` parameters (as ``/v1/predict``'s query)."""
    threshold = parameters.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise HTTPError(400, f"parameter threshold={threshold!r}: use a number in [0, 1]")
    flags = {}
    for name in ("crf", "tta"):
        value = parameters.get(name)
        if value is not None and not isinstance(value, bool):
            raise HTTPError(400, f"parameter {name}={value!r}: use true or false")
        flags[name] = value
    return state.engine.settings(None if threshold is None else float(threshold), flags["crf"], flags["tta"])


def _outputs(state: ServerState, parsed: InferRequest) -> dict[str, bool]:
    """The outputs to send -> in binary: those asked for, else ``mask``."""
    asked = parsed.outputs if parsed.outputs is not None else {"mask": parsed.binary_output}
    unknown = sorted(set(asked) - {"mask", "probabilities"})
    if unknown:
        raise HTTPError(400, f"no output {unknown[0]!r}: this model gives 'mask' (UINT8 [N, H, W]) and "
                             f"'probabilities' (FP32 [N, {_classes(state)}, H, W])")
    if not asked:
        raise HTTPError(400, "'outputs' is empty: ask for 'mask', 'probabilities' or both")
    return asked


def _the_input(parsed: InferRequest, capacity: int) -> InputTensor:
    """The one input, ``image`` (BYTES [N]) or ``pixels`` (FP32 [N, C, H, W]), with 1 <= N <= ``capacity``."""
    if len(parsed.inputs) != 1 or parsed.inputs[0].name not in ("image", "pixels"):
        names = ", ".join(repr(t.name) for t in parsed.inputs)
        raise HTTPError(400, f"inputs {names}: send one input, 'image' (BYTES [N]: encoded image files) or "
                             "'pixels' (FP32 [N, C, H, W]: preprocessed)")
    tensor = parsed.inputs[0]
    want = ("BYTES", 1) if tensor.name == "image" else ("FP32", 4)
    if (tensor.datatype, len(tensor.shape)) != want:
        layout = "BYTES [N]" if tensor.name == "image" else "FP32 [N, C, H, W]"
        raise HTTPError(400, f"input '{tensor.name}' is {tensor.describe()}: it must be {layout}")
    n = tensor.shape[0]
    if not 1 <= n <= capacity:
        raise HTTPError(400, f"input '{tensor.name}' holds {n} images: send 1 to {capacity} per request (--queue + "
                             "--max-batch)")
    return tensor


def _same_size(sizes: list[tuple[int, int]], either_way: bool = False) -> None:
    """400 unless the (width, height) ``sizes`` are one (``either_way``: or that size turned)."""
    shapes = {(min(w, h), max(w, h)) if either_way else (w, h) for w, h in sizes}
    if len(shapes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes[:8])
        raise HTTPError(400, f"the {len(sizes)} images have different sizes ({listed}): the outputs are [N, H, W] "
                             "tensors, so send images of one size per request (or one image per request)")


def _as_request_error(error: HTTPError) -> HTTPError:
    """An image's own fault (413 too many pixels, 415 not an image) is the protocol's 400."""
    return HTTPError(400, error.message) if error.status in (413, 415) else error


async def _images(state: ServerState, files: list[IO[bytes]], jobs: Jobs, extra: int) -> list[np.ndarray]:
    """The images of an ``image`` input, decoded as ``predict`` reads files: every header read, their pixels
    admitted together (times ``1 + extra``), then decoded one after another."""
    engine, opts = state.engine, state.options
    try:
        headers = []
        for file in files:
            file.seek(0, 2)
            headers.append(await probe_upload(state, file, file.tell(), jobs))
        # either way round: an EXIF rotation may turn one (the decoded sizes are checked again below)
        _same_size([(h.width, h.height) for h in headers], either_way=True)
        pixels = sum(h.pixels for h in headers) * (1 + extra)
        if pixels > opts.pixel_budget:
            raise HTTPError(400, f"the {len(files)} images hold {pixels:,} pixels with their outputs, more than "
                                 f"--pixel-budget {opts.pixel_budget:,}: send fewer per request")
        state.limits.reserve(jobs, pixels)
        channels = engine.backend.config.model.n_channels
        images = [await jobs.run(engine.cpu, decode_image, f, channels, h) for f, h in zip(files, headers, strict=True)]
    except HTTPError as e:
        raise _as_request_error(e) from None
    _same_size([(int(i.shape[1]), int(i.shape[0])) for i in images])
    return images


async def _pixels(state: ServerState, array: np.ndarray, jobs: Jobs, extra: int) -> list[np.ndarray]:
    """The network inputs of a ``pixels`` input, admitted against the pixel budget."""
    n, channels, height, width = array.shape
    want = state.engine.backend.config.model.n_channels
    if channels != want:
        raise HTTPError(400, f"input 'pixels' has {channels} channels: this model takes {want} ([N, {want}, H, W])")
    if height * width > WHOLE_MAX_PIXELS:
        raise HTTPError(400, f"input 'pixels' is {width}x{height}: preprocessed inputs run whole, up to "
                             f"{WHOLE_MAX_PIXELS:,} pixels; send larger images as 'image' (they run as tiles)")
    pixels = n * height * width * (PIXELS_INPUT_COST + extra)
    if pixels > state.options.pixel_budget:
        raise HTTPError(400, f"input 'pixels' holds {pixels:,} pixels with its outputs, more than --pixel-budget "
                             f"{state.options.pixel_budget:,}: send fewer per request")
    state.limits.reserve(jobs, pixels)
    if not np.isfinite(array).all():
        raise HTTPError(400, "input 'pixels' holds NaN or infinite values")
    return [np.ascontiguousarray(x, np.float32) for x in array]


def _check_json_outputs(outputs: dict[str, bool], count: int, classes: int) -> None:
    for name, binary in outputs.items():
        elements = count * (classes if name == "probabilities" else 1)
        if not binary and elements > JSON_MAX_ELEMENTS:
            raise HTTPError(400, f"output '{name}' has {elements:,} values, too many for JSON (at most "
                                 f"{JSON_MAX_ELEMENTS:,}): ask for it with binary_data")


def _output_cost(state: ServerState, outputs: dict[str, bool], classes: int) -> int:
    """Pixel-budget pixels counted per image pixel for the outputs asked (beyond an encoded mask's)."""
    cost = 0 if outputs.get("mask", True) else MASK_JSON_BYTES
    if "probabilities" in outputs:
        cost += classes * (PROBABILITY_BYTES if outputs["probabilities"] else PROBABILITY_JSON_BYTES)
    return math.ceil(cost / _per_pixel(state))


async def _inputs(state: ServerState, body: IO[bytes], tensor: InputTensor, outputs: dict[str, bool],
                  jobs: Jobs) -> tuple[list[np.ndarray], bool]:
    """(the images or network inputs, whether they are network inputs), admitted and read."""
    classes = _classes(state)
    extra = _output_cost(state, outputs, classes)
    if tensor.name == "pixels":
        array = await jobs.run(state.engine.cpu, numeric_array, body, tensor)
        n, _, height, width = array.shape
        _check_json_outputs(outputs, n * height * width, classes)
        return await _pixels(state, array, jobs, extra), True
    files = await jobs.run(state.engine.cpu, bytes_elements, body, tensor)
    images = await _images(state, files, jobs, extra)
    _check_json_outputs(outputs, len(images) * images[0].shape[0] * images[0].shape[1], classes)
    return images, False


async def _body(state: ServerState, request: Request, upload: Upload, jobs: Jobs) -> tuple[IO[bytes], int]:
    """The request body as sent, or inflated (``Content-Encoding``)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return upload.file, upload.size
    if encoding not in ENCODINGS:
        raise HTTPError(400, f"Content-Encoding {encoding[:20]!r}: send gzip, deflate or an uncompressed body")
    file, size = await jobs.run(state.engine.cpu, inflate, upload.file, encoding, state.options.max_upload_bytes)
    jobs.on_over(file.close)
    if not size:
        raise HTTPError(400, "empty body once inflated: send the request in the body")
    return file, size


async def _parse(state: ServerState, request: Request, body: IO[bytes], size: int, jobs: Jobs) -> InferRequest:
    """The request's JSON, its memory admitted before it is parsed."""
    header = request.headers.get("inference-header-content-length")
    length = size if header is None or not header.strip().isdigit() else min(int(header), size)
    cost = math.ceil(length * JSON_BYTES_COST / _per_pixel(state))
    if cost > state.options.pixel_budget:
        raise HTTPError(413, f"a JSON header of {length:,} bytes is too large for this server's --pixel-budget: "
                             "send tensors as binary data (binary_data_size, Inference-Header-Content-Length)")
    state.limits.reserve(jobs, cost)
    return await jobs.run(state.engine.cpu, read_request, body, size, header)


async def _all(work: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result, in order; the first error cancels the rest (their queued inputs are dropped)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _mask_output(masks: list[np.ndarray], values: list[Any]) -> np.ndarray:
    lut = _mask_lut(values)
    stacked = np.stack(masks)
    return lut[stacked] if lut is not None else stacked.astype(np.uint8)


async def _infer(state: ServerState, request: Request, upload: Upload, jobs: Jobs) -> Response:
    """One ``infer`` request after its upload: parse, admit, decode, the model, the answer."""
    engine = state.engine
    body, size = await _body(state, request, upload, jobs)
    parsed = await _parse(state, request, body, size, jobs)
    settings = _settings(state, parsed.parameters)
    outputs = _outputs(state, parsed)
    tensor = _the_input(parsed, state.options.capacity)
    if settings.crf and tensor.name == "pixels":
        raise HTTPError(400, "crf needs the images, not preprocessed pixels: send them as 'image', or set crf false")
    inputs, preprocessed = await _inputs(state, body, tensor, outputs, jobs)
    want_probs = "probabilities" in outputs
    results = await _all([engine.outputs(x, settings, jobs, probabilities=want_probs, preprocessed=preprocessed)
                          for x in inputs])
    arrays = {"mask": ("UINT8", lambda: _mask_output([m for m, _ in results], state.values)),
              "probabilities": ("FP32", lambda: np.stack([p for _, p in results if p is not None]))}
    table = [(name, arrays[name][0], arrays[name][1](), binary) for name, binary in outputs.items()]
    content, header_length = await jobs.run(engine.cpu, encode_response, state.options.model_name, VERSION,
                                            parsed.id, table)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


def oip_routes(state: ServerState, endpoint: Endpoint) -> list[Route]:
    """The ``/v2`` routes, each wrapped by ``endpoint`` (request id, auth, errors, metrics, access log)."""

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        reason = state.unready()
        if reason is not None:
            raise HTTPError(400, f"not ready: {reason}")
        return JSONResponse({"ready": True})

    async def server(request: Request) -> Response:
        return JSONResponse({"name": "unet-deploy", "version": __version__, "extensions": EXTENSIONS})

    async def metadata(request: Request) -> Response:
        _model(state, request)
        return JSONResponse(model_metadata(state))

    async def model_ready(request: Request) -> Response:
        _model(state, request)
        return await ready(request)

    async def infer(request: Request) -> Response:
        arrived = asyncio.get_running_loop().time()
        _model(state, request)
        refuse_early(state)
        return await admitted(state, request, arrived, lambda upload, jobs: _infer(state, request, upload, jobs),
                              multipart=False)

    def route(path: str, name: str, handler: Any, auth: bool = True, methods: tuple[str, ...] = ("GET",)) -> Route:
        return Route(path, endpoint(state, name, handler, auth=auth, protocol="oip"), methods=list(methods))

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [route("/v2/health/live", "health_live", live, auth=False),
            route("/v2/health/ready", "health_ready", ready, auth=False),
            route("/v2", "server_metadata", server),
            *(route(base, "model_metadata", metadata) for base in (model, versioned)),
            *(route(base + "/ready", "model_ready", model_ready, auth=False) for base in (model, versioned)),
            *(route(base + "/infer", "infer", infer, methods=("POST",)) for base in (model, versioned))]
