"""Memory: what this process may still allocate, what a run will need, and one-line refusals.

* :func:`available_memory` -- the smallest of the system's available memory (``psutil``), the cgroup's
  room (v2 ``memory.max - memory.current``, v1 ``memory.limit_in_bytes - memory.usage_in_bytes``, over
  the process's cgroup and its parents, reclaimable page cache counted as free) and ``RLIMIT_AS``
  (``ulimit -v``) minus the address space already mapped.
* :func:`estimate_inference_bytes` / :func:`estimate_training_bytes` -- calibrated peak-memory estimates
  for a U-Net configuration (formula in their docstrings).
* :func:`check_fits` and the per-command checks raise :class:`~unet_deploy.errors.UserError` with the
  estimate, the memory available and the flag to change, before anything big is allocated.
* :func:`out_of_memory_line` turns an out-of-memory failure (``MemoryError``, torch's CPU/CUDA OOM,
  ONNX Runtime's ``bad_alloc`` / "Failed to allocate memory") into one line naming what to change.

Importing this module never imports torch or onnxruntime (the ONNX Runtime predict path is torch-free).
"""

from __future__ import annotations

import math
import resource
from pathlib import Path
from typing import Any

import psutil

from unet_deploy.errors import UserError
from unet_deploy.images.image_io import open_image, scaled_size
from unet_deploy.runtime.registry import REFERENCE_BACKEND, REGISTRY

__all__ = ["available_memory", "cgroup_memory_left", "estimate_inference_bytes", "estimate_training_bytes",
           "check_fits", "check_predict_memory", "auto_tile_side", "check_train_memory", "check_synth_memory",
           "out_of_memory_kind", "out_of_memory_line", "raise_if_out_of_memory", "format_bytes",
           "SYNTH_BYTES_PER_PIXEL"]

_MIB = 1 << 20
_NO_LIMIT = 1 << 60  # cgroup v1 writes "unlimited" as 0x7FFFFFFFFFFFF000

#: Peak bytes per network-input pixel and per base channel of one forward pass (fp32), by runtime and by
#: up-sampling (transposed, bilinear): each registry entry's ``activation_bytes``. Measured as peak-RSS growth
#: over the loaded, warmed-up model. OpenVINO's from the benchmark's peak RSS of the seed width at 959x640
#: (1,072 MiB with the 124 MB model, benchmarks/results-openvino-959x640.json); its bilinear value is assumed
#: equal.
ACTIVATION_BYTES: dict[str, tuple[float, float]] = {n: s.activation_bytes for n, s in REGISTRY.items()}
#: Fixed working memory of a forward pass (oneDNN scratch, allocator caches): each entry's ``overhead_mib``.
RUNTIME_OVERHEAD: dict[str, int] = {n: s.overhead_mib * _MIB for n, s in REGISTRY.items()}
#: Activation size relative to fp32.
PRECISION_FACTOR: dict[str, float] = {"fp32": 1.0, "bf16": 0.5, "fp16": 0.5, "int8": 0.4}
#: One training step (forward activations kept for backward, their gradients, the loss): bytes per
#: input pixel per base channel, transposed or bilinear alike.
TRAIN_ACTIVATION_BYTES = 96
#: Bytes per parameter a training step adds: the gradient and two optimizer moments (fp32).
TRAIN_PARAM_BYTES = 12
#: ``synth``: peak bytes per image pixel while one image is rendered and saved (an upper bound).
SYNTH_BYTES_PER_PIXEL = 80


def format_bytes(n: float) -> str:
    """``1536 MiB`` -> "1.5 GiB"; below 1 GiB in MiB."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{max(n, 0) / _MIB:.0f} MiB"


# ------------------------------------------------------------------------------------ available memory
def _read_int(path: Path) -> int | None:
    """An integer cgroup file; None when missing or unreadable; "max" (no limit) -> None."""
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _NO_LIMIT else value


def _inactive_file(folder: Path, key: str) -> int:
    """Reclaimable page cache of a cgroup (``memory.stat``): counted as free, as the kernel would."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _room(folder: Path, mount: Path, limit_file: str, usage_file: str, stat_key: str) -> int | None:
    """Smallest ``limit - usage`` over ``folder`` and its parents up to ``mount``; None when none is set."""
    best: int | None = None
    while True:
        limit = _read_int(folder / limit_file)
        if limit is not None:
            usage = (_read_int(folder / usage_file) or 0) - _inactive_file(folder, stat_key)
            room = max(0, limit - max(0, usage))
            best = room if best is None else min(best, room)
        if folder == mount or mount not in folder.parents:
            return best
        folder = folder.parent


def cgroup_memory_left(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup"
                       ) -> int | None:
    """Bytes this process's cgroup (v2 or v1) may still use, or None when no memory limit applies.

    ``proc_cgroup`` lists the process's cgroups (``0::/path`` for v2, ``N:memory:/path`` for v1); the
    hierarchies are mounted at ``root`` (v2 at ``root`` or ``root/unified``, v1 at ``root/memory``).
    A path that does not exist under the mount (a container's namespaced view) is read at the mount.
    """
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    found: list[int] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if controllers == "":
            spots = [(m, "memory.max", "memory.current", "inactive_file") for m in (root, root / "unified")]
        elif "memory" in controllers.split(","):
            spots = [(root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]
        else:
            continue
        for mount, limit_file, usage_file, stat_key in spots:
            folder = mount / rel if (mount / rel).is_dir() else mount
            room = _room(folder, mount, limit_file, usage_file, stat_key)
            if room is not None:
                found.append(room)
    return min(found) if found else None


def _address_space_left() -> int | None:
    """``RLIMIT_AS`` (soft) minus the address space this process has mapped; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - psutil.Process().memory_info().vms)


def available_memory() -> tuple[int, str]:
    """``(bytes, what limits it)``: the least of available system memory, the cgroup's room and
    ``RLIMIT_AS`` minus the mapped address space."""
    options = [(int(psutil.virtual_memory().available), "available system memory")]
    cgroup = cgroup_memory_left()
    if cgroup is not None:
        options.append((cgroup, "cgroup memory limit"))
    address = _address_space_left()
    if address is not None:
        options.append((address, "RLIMIT_AS, ulimit -v"))
    return min(options)


# ----------------------------------------------------------------------------------------- estimates
def _model_fields(model: Any) -> tuple[int, int, int, bool]:
    return (int(getattr(model, "base_channels", 64)), int(getattr(model, "n_classes", 2)),
            int(getattr(model, "n_channels", 3)), bool(getattr(model, "bilinear", False)))


def estimate_inference_bytes(model: Any, height: int, width: int, batch: int = 1, runtime: str = "torch",
                             precision: str = "fp32", source_pixels: int = 0) -> int:
    """Peak memory of predicting ``batch`` images of network input ``height`` x ``width`` on the CPU,
    beyond the loaded model (``model``: a :class:`~unet_deploy.config.ModelConfig`)::

        bytes = overhead[runtime]
              + batch * H * W * (a[runtime, up] * precision_factor * base_channels + 4 * (in_ch + classes))
              + source_pixels * (in_ch + 1 + 4 * classes)

    ``a`` (bytes per pixel per base channel; transposed / bilinear): torch 32 / 32, TorchScript 18 / 18,
    ONNX Runtime 14 / 12, OpenVINO 24 / 24; ``overhead``: 64 MiB for torch, TorchScript and OpenVINO, 0 for
    ONNX Runtime;
    ``precision_factor``: fp32 1, bf16/fp16 0.5, int8 0.4. The second line's last term is the float32
    input and logits; the third is the image at its own size, its mask and the logits resized to it.

    The coefficients are fitted to the peak-RSS growth of one forward pass over the loaded, warmed-up
    model (fp32, base 16 and 64, batch 1 and 2). ONNX Runtime's peak is steady from one process to the
    next; eager torch's moves with glibc's mmap threshold, so its estimate is looser on small inputs.
    ``tests/test_resources.py`` re-measures the peak and states the band each runtime must stay within.
    TorchScript's and int8's coefficients come from the benchmark's peak RSS (``benchmarks/RESULTS.md``).
    """
    base, classes, in_ch, bilinear = _model_fields(model)
    entry = REGISTRY.get(runtime, REGISTRY[REFERENCE_BACKEND])  # a backend registered at run time: its own
    per_channel = entry.activation_bytes[1 if bilinear else 0] * PRECISION_FACTOR.get(precision, 1.0)
    per_pixel = per_channel * base + 4 * (in_ch + classes)
    total = entry.overhead_mib * _MIB + batch * height * width * per_pixel
    return int(total + source_pixels * (in_ch + 1 + 4 * classes))


def estimate_training_bytes(model: Any, height: int, width: int, batch: int, n_params: int = 0) -> int:
    """Peak memory of one training step on the CPU beyond the built model::

        bytes = 64 MiB + batch * H * W * (96 * base_channels + 4 * (in_ch + classes) + 8)
              + 12 * n_params

    96 bytes per pixel per base channel is three times eager inference's 32: the forward activations are
    kept for the backward pass, which adds their gradients. ``12 * n_params``: gradients and the two
    optimizer moments. Fitted to the peak-RSS growth of a training step of base-16 models (RMSprop, fp32).
    """
    base, classes, in_ch, _ = _model_fields(model)
    per_pixel = TRAIN_ACTIVATION_BYTES * base + 4 * (in_ch + classes) + 8  # + int64 target
    return int(RUNTIME_OVERHEAD[REFERENCE_BACKEND] + batch * height * width * per_pixel + TRAIN_PARAM_BYTES * n_params)


# --------------------------------------------------------------------------------------------- checks
def check_fits(needed: int, what: str, fix: str) -> None:
    """Raise a one-line UserError when ``needed`` bytes exceed :func:`available_memory`."""
    have, source = available_memory()
    if needed > have:
        raise UserError(f"{what} needs about {format_bytes(needed)} (estimate) but only {format_bytes(have)} "
                        f"is available to this process ({source}); {fix}")


def _on_gpu(device: str) -> bool:
    return not str(device).startswith("cpu")  # GPU memory is the device's own: its OOM is mapped instead


def _fitting_scale(scale: float, needed: int, have: int, fixed: int) -> float:
    """The scale (rounded down to 0.05) whose estimate fits in ``have``: activations grow with scale^2."""
    ratio = max(0.0, have - fixed) / max(1, needed - fixed)
    return math.floor(scale * math.sqrt(ratio) * 20) / 20


def _predict_needed(backend: Any, width: int, height: int, scale: float, batch: int, tta: bool,
                    tile: int | None) -> tuple[int, int, int, int]:
    """(bytes needed, network-input width, height, images per call) of predicting one image size; with
    ``tile`` the network runs on tiles of at most ``tile`` px per side (``batch`` of them per call) and the
    stitched (C, h, w) float32 logits and the scaled uint8 image are held at the input's size."""
    w, h = scaled_size(width, height, scale)
    runtime, precision = getattr(backend, "name", "torch"), getattr(backend, "precision", "fp32")
    model = backend.config.model
    images = batch * (2 if tta else 1)
    if tile is None:
        return estimate_inference_bytes(model, h, w, images, runtime, precision, width * height), w, h, images
    _, classes, in_ch, _ = _model_fields(model)
    net = estimate_inference_bytes(model, min(tile, h), min(tile, w), images, runtime, precision, width * height)
    return net + h * w * (4 * max(classes, 1) + in_ch), w, h, images


def auto_tile_side(backend: Any, width: int, height: int, scale: float, batch: int = 1, tta: bool = False
                   ) -> tuple[int, str] | None:
    """None when predicting the whole ``width`` x ``height`` image at ``scale`` fits in
    :func:`available_memory` (or runs on a GPU); else ``(side, why)``: the largest tile side (a multiple of
    64 px, model-input pixels) whose tiled estimate fits, 0 when not even 64 px tiles fit, and why the whole
    image does not ("needs about 1.2 GiB (estimate) but 800 MiB is available (cgroup memory limit)")."""
    if _on_gpu(getattr(backend, "device", "cpu")):
        return None
    needed, w, h, _ = _predict_needed(backend, width, height, scale, batch, tta, None)
    have, source = available_memory()
    if needed <= have:
        return None
    why = f"needs about {format_bytes(needed)} (estimate) but {format_bytes(have)} is available ({source})"
    for side in range((max(w, h) - 1) // 64 * 64, 63, -64):
        if _predict_needed(backend, width, height, scale, batch, tta, side)[0] <= have:
            return side, why
    return 0, why


def check_predict_memory(backend: Any, width: int, height: int, scale: float, batch: int = 1,
                         tta: bool = False, label: str = "", tile: int | None = None,
                         tiles_fit: bool = True) -> None:
    """Refuse (UserError) a CPU prediction of ``batch`` images of ``width`` x ``height`` at ``scale``
    (twice as many with flip ``tta``; with ``tile``: ``batch`` tiles of at most ``tile`` px per side of one
    image) whose :func:`estimate_inference_bytes` exceeds the memory available; GPU runs are not checked
    (their out-of-memory error is mapped to one line instead). ``tiles_fit=False``: automatic tiling found
    no tile that fits, so the fix does not suggest ``--tile``."""
    if _on_gpu(getattr(backend, "device", "cpu")):
        return
    needed, w, h, images = _predict_needed(backend, width, height, scale, batch, tta, tile)
    have, source = available_memory()
    if needed <= have:
        return
    runtime, precision = getattr(backend, "name", "torch"), getattr(backend, "precision", "fp32")
    model = backend.config.model
    if tile is not None:
        what = f"{images} tile(s) of at most {tile} px per side of a {w}x{h} px input"
        fix = f"lower --tile (e.g. {max(64, tile // 2)})" + (" or -b/--batch-size" if batch > 1 else "")
    else:
        fit = _fitting_scale(scale, needed, have, REGISTRY[runtime].overhead_mib * _MIB if runtime in REGISTRY else 0)
        smaller = f"-s/--scale (e.g. {fit:g})" if fit > 0 else "-s/--scale"
        what = f"{images} image(s) of {w}x{h} px"
        fix = (f"lower -b/--batch-size (to 1) or {smaller}" if batch > 1 else
               f"lower {smaller} or drop --tta" if tta else
               f"lower {smaller}, use --tile (e.g. --tile 512), use a smaller model, or free memory" if tiles_fit
               else f"lower {smaller}, use a smaller model, or free memory (not even 64 px tiles fit)")
    raise UserError(f"{label + ': ' if label else ''}predicting {what} "
                    f"({width}x{height} at scale {scale:g}) with {getattr(model, 'architecture', 'the model')} "
                    f"on {runtime} {precision} needs about {format_bytes(needed)} (estimate) but only "
                    f"{format_bytes(have)} is available to this process ({source}); {fix}")


def check_train_memory(model: Any, image: str | Path, scale: float, batch: int, n_params: int = 0,
                       device: str = "cpu") -> None:
    """Refuse a CPU training run whose one-step estimate (``image``'s size at ``scale``, this process's
    ``batch``) exceeds the memory available; the size is read from the image's header."""
    if _on_gpu(device):
        return
    with open_image(image) as img:
        full_width, full_height = img.size
    width, height = scaled_size(full_width, full_height, scale)
    needed = estimate_training_bytes(model, height, width, batch, n_params)
    check_fits(needed, f"training on batches of {batch} image(s) of {width}x{height} px (scale {scale:g})",
               "lower -b/--batch-size or -s/--scale, use a smaller --base-channels, or free memory")


def check_synth_memory(width: int, height: int) -> None:
    """Refuse a ``synth`` image size whose rendering buffers exceed the memory available."""
    needed = width * height * SYNTH_BYTES_PER_PIXEL
    have, source = available_memory()
    if needed <= have:
        return
    k = math.sqrt(have / needed)
    raise UserError(f"--width {width} --height {height}: rendering one image needs about {format_bytes(needed)} "
                    f"(estimate, {SYNTH_BYTES_PER_PIXEL} bytes per pixel) but only {format_bytes(have)} is "
                    f"available to this process ({source}); use a smaller --width/--height (at most about "
                    f"{int(width * k)}x{int(height * k)})")


# ------------------------------------------------------------------------------- out-of-memory errors
_OOM_TEXT = ("bad_alloc", "bad allocation", "failed to allocate memory", "can't allocate memory",
             "cannot allocate memory", "out of memory")


def out_of_memory_kind(exc: BaseException) -> str | None:
    """What ran out of memory (e.g. "ONNX Runtime could not allocate memory (...)") or None when ``exc``
    is not an out-of-memory failure. Recognises torch's OOM classes by name (torch is not imported)."""
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    classes = {f"{k.__module__}.{k.__qualname__}" for k in type(exc).__mro__}
    text = " ".join(str(exc).split())
    if classes & {"torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"}:
        return f"the GPU ran out of memory (torch: {text[:100]})"
    module = type(exc).__module__
    if not (isinstance(exc, RuntimeError) or module.startswith("onnxruntime")):
        return None
    low = text.lower()
    hit = next((low.find(t) for t in _OOM_TEXT if t in low), -1)
    if hit < 0:
        return None
    who = "ONNX Runtime" if module.startswith("onnxruntime") or "onnxruntime" in low else "torch"
    where = "the GPU" if "cuda" in low else "memory"
    return f"{who} ran out of {where} ({text[hit:hit + 100]})"


def raise_if_out_of_memory(exc: BaseException, what: str) -> None:
    """Raise one UserError line (exit 1) for the whole run when ``exc`` is an out-of-memory failure of
    ``what`` (e.g. "the model on 2 image(s) of 959x640 px"); return otherwise."""
    line = out_of_memory_line(exc)
    if line is not None:
        raise UserError(f"{what}: {line}", exit_code=1) from None


def out_of_memory_line(exc: BaseException, command: str | None = None) -> str | None:
    """One line for an out-of-memory failure: what ran out and which flags to change; None otherwise."""
    kind = out_of_memory_kind(exc)
    if kind is None:
        return None
    if command == "synth":
        fix = "use a smaller --width/--height"
    elif command in ("train", "experiment"):
        fix = "lower -b/--batch-size or -s/--scale, or use a smaller --base-channels"
    else:
        fix = "lower -s/--scale or -b/--batch-size, or use a smaller model"
    return f"{kind}; {fix}, or free memory"

