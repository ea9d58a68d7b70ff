"""Latency and peak-memory measurement shared by ``unet-deploy benchmark`` and ``benchmarks/``.

One benchmark run:

1. obtains a model -- a checkpoint given with ``-m``, or a freshly initialised model of the seed
   architecture (seeded, so every run measures the same weights) -- and exports it to TorchScript and
   ONNX once, into a temporary (or cache) folder;
2. preprocesses one synthetic Carvana-sized image at every requested scale (the same input for every
   backend);
3. runs every backend x scale case in a FRESH Python process (:func:`run_case_isolated`), so backends do
   not share allocator caches, thread pools or imported libraries: the process records its resident
   memory after imports, loads the backend, warms up while a thread samples memory, then times ``runs``
   calls (CUDA is synchronised around each call);
4. compares every backend's logits to eager PyTorch on the same input (parity), and collects machine
   facts, so the numbers can be pasted into an issue (:func:`render_table`, :func:`render_markdown`) or
   kept as JSON (:func:`write_json`) and a plot (:func:`write_plot`).

Peak memory is the growth over the process's own baseline after imports: the peak resident set (RSS) on
CPU, device memory in use (driver view, also covering ONNX Runtime's arena) on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = [
    "QUICK_ENV", "CARVANA_SIZE", "QUICK_SIZE", "QUICK_BASE_CHANNELS", "DEFAULT_SCALES", "BENCH_BACKENDS",
    "BenchSettings", "ModelFiles", "CaseSpec", "quick_from_env", "resolve_settings", "prepare_models",
    "synthetic_image", "write_jpeg", "end_to_end", "run_case", "run_case_isolated", "parity",
    "latency_stats", "machine_facts", "run_benchmark", "speedups", "render_table", "render_speedups",
    "render_markdown", "render_targets", "reliability", "reliability_notes", "unsteady", "UNSTEADY_SPREAD",
    "Variant", "parse_variant", "expand_variants", "VARIANT_HELP", "targets", "before_after",
    "measure_stages", "STAGES_SCHEMA", "PIPELINE_TARGET",
    "reproduce_command", "write_json", "write_plot",
]

#: Environment variable that switches benchmarks to quick mode (small width, small image).
QUICK_ENV = "UNET_DEPLOY_BENCH_QUICK"
#: (width, height) of a Carvana image; scale 0.5 gives Pytorch-UNet's 959x640 input.
CARVANA_SIZE = (1918, 1280)
#: (width, height) of the quick-mode source image.
QUICK_SIZE = (240, 160)
QUICK_BASE_CHANNELS = 8
SEED_BASE_CHANNELS = 64
DEFAULT_SCALES = (0.5, 1.0)
#: Backends in table order; "torch" (eager) is the parity reference.
BENCH_BACKENDS = ("torch", "torchscript", "ort")
_FILES = {"torch": "model.pth", "torchscript": "model.ts", "ort": "model.onnx", "ort-int8": "model.int8.onnx",
          "ort-fp16": "model.fp16.onnx"}
#: Synthetic Carvana-like images the benchmark calibrates its int8 model on.
BENCH_CALIBRATION_IMAGES = 4


# ---------------------------------------------------------------------------------------------------
# Variants: a backend plus its fast-path options, named like "torch-bf16-cl" or "ort-int8"

_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_FLAGS = ("cl", "compile", "cgraph", "default", "iob")
VARIANT_HELP = ("BACKEND[-PRECISION][-cl][-compile|-cgraph][-default][-iob]: torch, torchscript or ort; "
                "precision fp32 (default), bf16/fp16 (torch), fp16/int8 (ort files); cl = channels_last; "
                "compile = torch.compile, cgraph = torch.compile reduce-overhead (CUDA graphs); default = "
                "ONNX Runtime's default session options (untuned); iob = ORT IO binding")


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: a backend and its fast-path options."""

    backend: str
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    ort_profile: str = "tuned"
    io_binding: bool | None = None

    @property
    def name(self) -> str:
        """Canonical name: backend, then precision (unless fp32), then flags in a fixed order."""
        parts = [self.backend]
        if self.precision != "fp32":
            parts.append(self.precision)
        if self.channels_last:
            parts.append("cl")
        if self.compile:
            parts.append("cgraph" if self.compile == "reduce-overhead" else "compile")
        if self.ort_profile == "default":
            parts.append("default")
        if self.io_binding:
            parts.append("iob")
        return "-".join(parts)

    @property
    def file_key(self) -> str:
        """Which model file it loads (keys of ``ModelFiles.paths``)."""
        return f"ort-{self.precision}" if self.backend == "ort" and self.precision != "fp32" else self.backend

    @property
    def label(self) -> str:
        """Table label, e.g. "torch (eager) bf16 cl", "onnxruntime int8"."""
        base = _NAMES.get(self.backend, self.backend)
        extra = [w for w in self.name.split("-")[1:]]
        return " ".join([base, *extra]) if extra else base


def parse_variant(word: str, device: str | None = None) -> Variant:
    """``torch-bf16-cl`` -> Variant; bad words and combinations raise a one-line :class:`UserError`."""
    parts = [p for p in word.strip().lower().replace("_", "-").split("-") if p]
    if not parts or parts[0] not in BENCH_BACKENDS:
        raise UserError(f"--backends {word}: unknown backend; use {VARIANT_HELP}")
    backend, rest = parts[0], parts[1:]
    precision, flags = "fp32", set()
    for p in rest:
        if p in _PRECISIONS:
            precision = p
        elif p in _FLAGS:
            flags.add(p)
        else:
            raise UserError(f"--backends {word}: unknown option {p!r}; use {VARIANT_HELP}")
    if backend == "torchscript" and (precision != "fp32" or flags):
        raise UserError(f"--backends {word}: torchscript runs the fp32 export as is; drop {'-'.join(rest)}")
    if backend == "torch":
        if precision == "int8" or flags & {"default", "iob"}:
            raise UserError(f"--backends {word}: int8, default and iob are ONNX Runtime options (ort-...)")
        if precision == "fp16" and device is not None and not device.startswith("cuda"):
            raise UserError(f"--backends {word}: torch fp16 needs CUDA; use torch-bf16 on CPU")
    if backend == "ort":
        if precision == "bf16" or flags & {"cl", "compile", "cgraph"}:
            raise UserError(f"--backends {word}: ort takes fp32, fp16 or int8 and -default/-iob only")
    compile_mode = "reduce-overhead" if "cgraph" in flags else ("default" if "compile" in flags else None)
    return Variant(backend, precision, "cl" in flags, compile_mode, "default" if "default" in flags else "tuned",
                   True if "iob" in flags else None)


def expand_variants(words: Sequence[str], precisions: Sequence[str] = (), channels_last: bool = False,
                    compile: str | None = None, device: str | None = None) -> list[str]:
    """Variant names for ``--backends`` words combined with ``--precision``/``--channels-last``/``--compile``.

    Each precision is applied to every backend that supports it (torchscript only fp32; torch fp16 only
    on CUDA, int8 only for ort); ``channels_last`` and ``compile`` apply to the eager torch variants.
    """
    out: list[str] = []
    for word in words:
        v = parse_variant(word, device)
        options = [v.precision] if not precisions else list(precisions)
        for p in options:
            if p not in _PRECISIONS:
                raise UserError(f"--precision {p}: use {', '.join(_PRECISIONS)}")
            if v.backend == "torchscript" and p != "fp32":
                continue
            if v.backend == "torch" and (p == "int8" or (p == "fp16" and not str(device).startswith("cuda"))):
                continue
            if v.backend == "ort" and p == "bf16":
                continue
            c = replace(v, precision=p)
            if c.backend == "torch":
                c = replace(c, channels_last=c.channels_last or channels_last, compile=c.compile or compile)
            out.append(c.name)
    return list(dict.fromkeys(out))
_MIB = 1024 * 1024
SCHEMA = "unet-deploy.benchmark/1"


def quick_from_env() -> bool:
    """True when ``UNET_DEPLOY_BENCH_QUICK`` is set to 1/true/yes/on."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class BenchSettings:
    """What to benchmark. ``None`` fields get mode- and device-dependent defaults in
    :func:`resolve_settings` (quick mode: width 8 on a 240x160 image, warmup 1, runs 5; CPU: warmup 1,
    runs 3 at full width; CUDA: warmup 10, runs 50)."""

    checkpoint: Path | None = None
    backends: tuple[str, ...] = BENCH_BACKENDS
    scales: tuple[float, ...] = DEFAULT_SCALES
    device: str = "auto"
    runs: int | None = None
    warmup: int | None = None
    base_channels: int | None = None
    bilinear: bool = False
    quick: bool = False
    threads: int | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of the source image
    seed: int = 0
    timeout_s: float = 3600.0  # per case (fresh process)
    stages: int = 0  # > 0: also time prediction's stages and the pipeline on this many images
    stages_crf: bool = False  # ... with dense CRF
    roofline: bool = False  # also measure ORT's peak conv throughput and report each backend against it


def _default_counts(device: str, quick: bool) -> tuple[int, int]:
    """(warmup, runs): a full-width U-Net takes seconds per Carvana image on a small CPU."""
    if device.startswith("cuda"):
        return 10, 50
    if quick:
        return 1, 5
    return 1, 3


def resolve_settings(settings: BenchSettings) -> BenchSettings:
    """Validate ``settings`` and fill in the defaults; bad values raise a one-line :class:`UserError`."""
    from .backends import resolve_device

    quick = settings.quick or quick_from_env()
    words = [b.strip().lower() for b in settings.backends if b.strip()]
    if not words:
        raise UserError("--backends: name at least one of " + ", ".join(BENCH_BACKENDS))
    device_word = str(settings.device or "auto").lower()
    if device_word == "auto":
        device_word = resolve_device("auto")
    variants = [parse_variant(b, device_word) for b in words]
    # table order: by backend (torch, torchscript, ort), then as given
    order = {b: i for i, b in enumerate(BENCH_BACKENDS)}
    names = sorted(dict.fromkeys(v.name for v in variants), key=lambda n: order[n.split("-")[0]])
    backends = tuple(names)
    scales = tuple(dict.fromkeys(float(s) for s in settings.scales))
    if not scales:
        raise UserError("--scales: give at least one scale, e.g. --scales 0.5 1.0")
    for s in scales:
        if not np.isfinite(s) or not 0 < s <= 4:
            raise UserError(f"--scales {s:g}: a scale must be in (0, 4], e.g. 0.5 for 959x640")
    device = resolve_device(settings.device)
    default_warmup, default_runs = _default_counts(device, quick)
    runs = settings.runs if settings.runs is not None else default_runs
    warmup_runs = settings.warmup if settings.warmup is not None else default_warmup
    if runs < 1:
        raise UserError(f"--runs {runs}: time at least 1 run")
    if warmup_runs < 0:
        raise UserError(f"--warmup {warmup_runs}: use 0 or more warm-up runs")
    if settings.threads is not None and settings.threads < 1:
        raise UserError(f"--threads {settings.threads}: use 1 or more threads")
    base = settings.base_channels or (QUICK_BASE_CHANNELS if quick else SEED_BASE_CHANNELS)
    if base < 1:
        raise UserError(f"--base-channels {base}: use a positive width (64 = Pytorch-UNet)")
    size = settings.image_size or (QUICK_SIZE if quick else CARVANA_SIZE)
    if settings.checkpoint is not None:
        ckpt = Path(settings.checkpoint)
        if ckpt.suffix.lower() in (".onnx", ".ts", ".torchscript", ".jit"):
            raise UserError(f"-m {ckpt}: pass the .pth checkpoint; the benchmark exports TorchScript and "
                            "ONNX from it itself")
    for s in scales:
        w, h = int(size[0] * s), int(size[1] * s)
        if w < 16 or h < 16:
            raise UserError(f"--scales {s:g}: a {size[0]}x{size[1]} image becomes {w}x{h}; a U-Net needs "
                            "at least 16x16 input")
    return replace(settings, quick=quick, backends=backends, scales=scales, device=device, runs=runs,
                   warmup=warmup_runs, base_channels=base, image_size=(int(size[0]), int(size[1])))


# ---------------------------------------------------------------------------------------------------
# Model and exports


@dataclass
class ModelFiles:
    """One model in every format, plus where it came from."""

    paths: dict[str, Path]  # backend -> model file
    architecture: str
    source: str  # "checkpoint <path>" or "fresh init (seed N)"
    export_s: dict[str, float] = field(default_factory=dict)  # backend -> seconds spent exporting
    model_config: Any = None  # the ModelConfig (architecture) of these files


def _cache_key(settings: BenchSettings) -> str:
    import torch

    from .fileio import sha256_file

    # recipe: bump when the export/quantisation recipe changes, so cached files are made again
    what: dict[str, Any] = {"torch": str(torch.__version__), "recipe": 4}
    with contextlib.suppress(ImportError):
        import onnx

        what["onnx"] = onnx.__version__
    if settings.checkpoint is not None:
        what["checkpoint"] = sha256_file(settings.checkpoint)
    else:
        what.update(base=settings.base_channels, bilinear=settings.bilinear, seed=settings.seed)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def prepare_models(settings: BenchSettings, folder: str | Path,
                   log: Callable[[str], None] | None = None) -> ModelFiles:
    """Write (or reuse from ``folder``) the checkpoint, TorchScript and ONNX files the backends load.

    With ``settings.checkpoint`` the checkpoint is used as is; otherwise a U-Net of the seed architecture
    (``base_channels``, ``bilinear``) is initialised with ``torch.manual_seed(seed)`` and saved. Files
    already in ``folder`` from an earlier run with the same inputs are reused (the folder name is a hash
    of the weights/architecture and the torch/onnx versions).
    """
    import torch

    from .checkpoint import load_checkpoint, save_checkpoint
    from .config import DeployConfig, InferenceConfig, ModelConfig
    from .export import export_onnx, export_torchscript

    settings = resolve_settings(settings)
    say = log or (lambda _msg: None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if settings.checkpoint is not None:
        ckpt = load_checkpoint(settings.checkpoint)
        config = ckpt.config
        paths["torch"] = Path(settings.checkpoint)
        source = f"checkpoint {settings.checkpoint}"
        model = None
    else:
        mc = ModelConfig(bilinear=settings.bilinear, base_channels=int(settings.base_channels or 64))
        config = DeployConfig(model=mc, inference=InferenceConfig(scale=settings.scales[0]),
                              source={"format": "fresh-init", "seed": settings.seed})
        source = f"fresh init (seed {settings.seed})"
        paths["torch"] = folder / _FILES["torch"]
        model = None
        if not paths["torch"].exists():
            torch.manual_seed(settings.seed)
            model = mc.build().eval()
            save_checkpoint(paths["torch"], model, config, {"note": "benchmark: untrained seeded init"})
        ckpt = load_checkpoint(paths["torch"])
    export_s: dict[str, float] = {}
    keys = {parse_variant(v).file_key for v in settings.backends}
    if keys & {"ort-int8", "ort-fp16"}:
        keys.add("ort")
    for backend, writer in (("torchscript", export_torchscript), ("ort", export_onnx)):
        if backend not in keys:
            continue
        target = folder / _FILES[backend]
        paths[backend] = target
        if target.exists():
            continue
        if model is None:
            model = ckpt.build_model("cpu")
        say(f"exporting {backend} -> {target}")
        t0 = time.perf_counter()
        writer(model, ckpt.config, target)
        export_s[backend] = time.perf_counter() - t0
    for key in ("ort-int8", "ort-fp16"):
        if key in keys:
            _derived_onnx(key, settings, ckpt.config, paths, folder, export_s, say)
    return ModelFiles(paths, config.model.architecture, source, export_s, config.model)


def _derived_onnx(key: str, settings: BenchSettings, config: Any, paths: dict[str, Path], folder: Path,
                  export_s: dict[str, float], say: Callable[[str], None]) -> None:
    """Write (or reuse) the int8 or fp16 model made from the fp32 ONNX file; add it to ``paths``."""
    from .data import preprocess
    from .export import convert_onnx_fp16, quantize_onnx_int8

    target = folder / _FILES[key]
    paths[key] = target
    if target.exists():
        return
    t0 = time.perf_counter()
    if key == "ort-int8":
        width, height = settings.image_size or CARVANA_SIZE
        scale = config.inference.scale
        say(f"quantising int8 -> {target} (calibrating on {BENCH_CALIBRATION_IMAGES} synthetic images "
            f"at scale {scale:g})")
        batches = (preprocess(synthetic_image(width, height, settings.seed + 1000 + i), scale)[None]
                   for i in range(BENCH_CALIBRATION_IMAGES))
        quantize_onnx_int8(paths["ort"], config, target, batches)
    else:
        say(f"converting fp16 -> {target}")
        convert_onnx_fp16(paths["ort"], config, target)
    export_s[key] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# Inputs and the end-to-end pipeline


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic Carvana-like uint8 (H, W, 3) image: a car on a studio background.

    Uses :func:`unet_deploy.synth.render_car` when that module is installed, else a simple car shape.
    """
    rng = np.random.default_rng(seed)
    try:
        from .synth import render_car
    except ImportError:
        render_car = None
    if render_car is not None:
        return np.ascontiguousarray(render_car(rng, width, height)[0], dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[...] = 200 + 30 * (yy / max(height - 1, 1))[..., None]  # light grey studio gradient
    body = ((xx - 0.5 * width) / (0.38 * width)) ** 2 + ((yy - 0.6 * height) / (0.2 * height)) ** 2 <= 1
    cabin = ((xx - 0.47 * width) / (0.2 * width)) ** 2 + ((yy - 0.42 * height) / (0.14 * height)) ** 2 <= 1
    img[body | cabin] = rng.uniform(20, 200, 3).astype(np.float32)
    for cx in (0.3, 0.7):  # wheels
        wheel = ((xx - cx * width) ** 2 + (yy - 0.77 * height) ** 2) <= (0.07 * width) ** 2
        img[wheel] = 25
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg(image: np.ndarray, path: str | Path, quality: int = 90) -> Path:
    """Save a uint8 RGB image as JPEG (atomically) -- the end-to-end benchmarks decode it."""
    from PIL import Image

    from .fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=quality)
    return path


def end_to_end(backend: Any, image_path: str | Path, scale: float, threshold: float = 0.5,
               crf: bool = False) -> np.ndarray:
    """decode -> preprocess -> model -> post-process (-> dense CRF): the mask at the original size."""
    from .data import load_image, preprocess
    from .postprocess import logits_to_mask, probabilities

    image = load_image(image_path)
    batch = preprocess(image, scale)[None]
    logits = backend(batch)
    size = image.shape[:2]
    if not crf:
        return logits_to_mask(logits, size, threshold)[0]
    from .crf import dense_crf

    return dense_crf(image, probabilities(logits[0], size))


# ---------------------------------------------------------------------------------------------------
# One case, in this process or a fresh one


@dataclass(frozen=True)
class CaseSpec:
    """One backend x input measurement. ``input`` is a .npy float32 NCHW batch (mode "model") or an image
    file (modes "e2e" and "e2e-crf", with ``scale``). ``runs=0`` measures memory only."""

    backend: str
    model_path: str
    device: str
    input: str
    scale: float = 1.0
    mode: str = "model"
    runs: int = 3
    warmup: int = 1
    threads: int | None = None
    logits_out: str | None = None  # save the first output's logits here (.npy), for parity
    variant: str | None = None  # e.g. "torch-bf16-cl": precision and fast-path options of the backend


class _PeakSampler:
    """Samples host RSS (and CUDA memory in use) in a thread; ``peak_*`` are the maxima seen."""

    def __init__(self, cuda_device: str | None, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self._cuda = cuda_device
        self._interval = interval
        self._stop = threading.Event()
        self.peak_rss = self._proc.memory_info().rss
        self.peak_device = self._device_used() if cuda_device else 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _device_used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self._cuda)
        return int(total - free)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self._cuda:
            self.peak_device = max(self.peak_device, self._device_used())

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ``VmHWM``) to its current RSS, so a later
    :func:`peak_rss_bytes` is the exact peak since now, whatever the imports before reached. False where
    the kernel does not offer it (then peaks come from sampling and ``ru_maxrss``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss_bytes() is not None
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The peak RSS (``VmHWM``) since the process started or since :func:`reset_peak_rss`; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _per_s(ms: float, batch: int = 1) -> float:
    return 1000.0 * batch / ms if ms > 0 else float("inf")


def latency_stats(times_s: Sequence[float], batch: int = 1) -> dict[str, Any]:
    """p50/p90/mean/min/max in milliseconds; images per second at the median (``images_per_s`` =
    1000 / p50 x batch, the number the table shows) and at the mean (``images_per_s_mean``)."""
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    mean, p50 = float(ms.mean()), float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "mean_ms": mean,
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "runs": len(ms), "batch": batch,
            "images_per_s": _per_s(p50, batch), "images_per_s_mean": _per_s(mean, batch),
            "times_ms": [float(t) for t in ms]}


def run_case(spec: CaseSpec) -> dict[str, Any]:
    """Measure one case in THIS process: memory growth over the current baseline, then latency.

    Memory numbers are only meaningful in a fresh process (see :func:`run_case_isolated`); the baseline is
    taken here, after the heavy imports. Exactly ``spec.warmup`` untimed calls run before the ``spec.runs``
    timed ones (with no warm-up, the first timed call also supplies the parity logits).
    """
    import psutil
    import torch

    if spec.backend == "ort":
        import onnxruntime  # noqa: F401  - part of the baseline, not of the model's memory
    cuda = spec.device.startswith("cuda")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if cuda:  # the CUDA context is part of the baseline, like the imports
        torch.zeros(1, device=spec.device)
        torch.cuda.synchronize(spec.device)
        torch.cuda.reset_peak_memory_stats(spec.device)
    if spec.mode == "model":
        batch: Any = np.load(spec.input)
    elif spec.mode not in ("e2e", "e2e-crf"):
        raise ValueError(f"unknown benchmark mode {spec.mode!r}")
    base = {"rss": psutil.Process().memory_info().rss, "maxrss": _maxrss_bytes(),
            "exact": not cuda and reset_peak_rss()}  # the import-time peak must not hide the model's

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(spec.device)

    def once() -> Any:
        if spec.mode == "model":
            return backend(batch)
        return end_to_end(backend, spec.input, spec.scale, crf=spec.mode == "e2e-crf")

    with _PeakSampler(spec.device if cuda else None) as sampler:
        base["device"] = sampler.peak_device
        t0 = time.perf_counter()
        backend = _load_variant(spec.model_path, parse_variant(spec.variant or spec.backend), spec.device,
                                spec.threads)
        load_s = time.perf_counter() - t0
        sampler.sample()
        for i in range(spec.warmup):
            out = once()
            sync()
            if i == 0:
                _save_logits(spec, out)
    # Timed runs (memory sampling stopped, so it cannot disturb them); ru_maxrss still sees any peak.
    times: list[float] = []
    for i in range(spec.runs):
        sync()
        t0 = time.perf_counter()
        out = once()
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0 and spec.warmup == 0:
            _save_logits(spec, out)
    sampler.sample()  # memory still held after the runs (e.g. an arena grown by an unwarmed first call)
    result = {"backend": spec.variant or spec.backend, "runtime": spec.backend, "mode": spec.mode,
              "device": spec.device, "scale": spec.scale, "precision": backend.precision,
              "provider": backend.provider, "load_s": load_s, "warmup_calls": spec.warmup,
              **_memory_result(spec, sampler, base)}
    if spec.runs:
        result["latency"] = latency_stats(times, int(batch.shape[0]) if spec.mode == "model" else 1)
    return result


def _load_variant(model_path: str | Path, v: Variant, device: str, threads: int | None) -> Any:
    """Load the model file as variant ``v`` (its runtime, precision and fast-path options)."""
    from .backends import load_backend

    return load_backend(model_path, v.backend, device, precision=v.precision if v.backend == "torch" else "fp32",
                        channels_last=v.channels_last, threads=threads, compile=v.compile,
                        ort_profile=v.ort_profile, io_binding=v.io_binding)


def _save_logits(spec: CaseSpec, out: Any) -> None:
    """The first model call's logits, for parity against eager (model mode only)."""
    if spec.logits_out and spec.mode == "model":
        np.save(spec.logits_out, out.detach().cpu().numpy())


def _memory_result(spec: CaseSpec, sampler: _PeakSampler, base: dict[str, Any]) -> dict[str, Any]:
    """Peak memory growth over the process baseline ``base`` (rss, maxrss, exact, device)."""
    peak_rss = sampler.peak_rss
    maxrss = _maxrss_bytes()
    if maxrss > base["maxrss"]:  # a new lifetime peak after the baseline: exact, even between samples
        peak_rss = max(peak_rss, maxrss)
    hwm = peak_rss_bytes() if base["exact"] else None
    if hwm is not None:  # exact: the kernel's high-water mark since the baseline
        peak_rss = max(peak_rss, hwm)
    result: dict[str, Any] = {"host_peak_mib": max(peak_rss - base["rss"], 0) / _MIB,
                              "host_baseline_mib": base["rss"] / _MIB}
    if spec.device.startswith("cuda"):
        import torch

        reserved = torch.cuda.max_memory_reserved(spec.device)
        result["device_peak_mib"] = max(sampler.peak_device - base["device"], reserved, 0) / _MIB
        result["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated(spec.device) / _MIB
        result["peak_mib"] = result["device_peak_mib"]
        result["memory_method"] = "CUDA device memory in use, growth over the process baseline"
    else:
        result["peak_mib"] = result["host_peak_mib"]
        result["memory_method"] = ("peak RSS growth over a fresh process's baseline after imports"
                                   + (" (kernel high-water mark, reset at the baseline)" if hwm is not None
                                      else " (sampled every 5 ms and ru_maxrss)"))
    return result


def run_case_isolated(spec: CaseSpec, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run :func:`run_case` in a fresh ``python -m unet_deploy.bench`` process and return its result."""
    with tempfile.TemporaryDirectory(prefix="unet-bench-case-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "unet_deploy.bench", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"benchmark case {spec.variant or spec.backend} scale {spec.scale:g} ran over "
                            f"{timeout_s:.0f} s; "
                            "use fewer --runs or --quick") from None
        if proc.returncode != 0 or not out_path.exists():
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            raise UserError(f"benchmark case {spec.variant or spec.backend} scale {spec.scale:g} failed in its "
                            "process: "
                            f"{last[:300]}")
        return json.loads(out_path.read_text())


def _worker_main(argv: Sequence[str]) -> int:
    spec = CaseSpec(**json.loads(Path(argv[0]).read_text()))
    result = run_case(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------
# Parity and machine facts


def parity(reference: np.ndarray, other: np.ndarray, threshold: float = 0.5,
           precision: str = "fp32") -> dict[str, Any]:
    """How far ``other`` logits are from the eager ``reference`` on the same input, by the same measures
    and thresholds ``export`` verifies with (:func:`unet_deploy.parity.compare`).

    ``max_rel_err`` = max |a - b| / max |a|; ``pixel_agreement`` = share of mask pixels that agree after
    post-processing; ``passed`` = within the documented thresholds for ``precision``.
    """
    import torch

    from .parity import ParityThresholds, compare

    a = np.asarray(reference, dtype=np.float32)
    b = np.asarray(other, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    result = compare(torch.from_numpy(a), torch.from_numpy(b), ParityThresholds.for_precision(precision),
                     threshold)
    return {"max_abs_err": result["max_abs_err"], "max_rel_err": result["rel_err"],
            "pixel_agreement": result["pixel_agreement"], "dice": result["dice"], "passed": result["passed"]}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, library versions and ONNX Runtime providers of this machine."""
    import psutil
    import torch

    from .config import versions

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    facts: dict[str, Any] = {
        "cpu": _cpu_model(), "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable, "ram_gib": round(psutil.virtual_memory().total / 1024 ** 3, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "versions": versions(), "gpu": None,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cuda": torch.version.cuda, "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
    }
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        facts["ort_providers"] = ort.get_available_providers()
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        props = torch.cuda.get_device_properties(index)
        facts["gpu"] = props.name
        facts["gpu_memory_gib"] = round(props.total_memory / 1024 ** 3, 1)
    return facts


# ---------------------------------------------------------------------------------------------------
# End-to-end prediction: per-stage cost and the overlapped pipeline

STAGES_SCHEMA = "unet-deploy.stages/1"
#: Target: the pipeline's images/s within this factor of its slowest stage's.
PIPELINE_TARGET = 1.3


def measure_stages(model_path: str | Path, variant: str, device: str, images: Sequence[str | Path],
                   out_dir: str | Path, crf: bool = False, threads: int | None = None,
                   crf_workers: int | None = None) -> dict[str, Any]:
    """Time each stage of prediction one image at a time (decode, preprocess, model, post-process, CRF,
    write), then the whole overlapped pipeline (``predict.predict_files``: decoding threads ahead of the
    network, CRF in worker processes) on the same images.

    Stage ms are medians over the images (after one untimed warm-up image). The pipeline is compared with
    its slowest stage: ``slowest_ratio`` = slowest stage's images/s / pipeline images/s (1.0 = perfect
    overlap; the target is <= :data:`PIPELINE_TARGET`).
    """
    import torch

    from .data import load_image, preprocess
    from .postprocess import logits_to_mask, probabilities
    from .predict import PredictOptions, output_values, predict_files, write_mask

    if threads:
        torch.set_num_threads(threads)
    v = parse_variant(variant, device)
    backend = _load_variant(model_path, v, device, threads)
    cfg = backend.config
    scale, threshold = cfg.inference.scale, cfg.inference.threshold
    values = output_values(backend, PredictOptions())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["decode", "preprocess", "model", "postprocess"] + (["crf"] if crf else []) + ["write"]
    times: dict[str, list[float]] = {n: [] for n in names}
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    paths = [Path(p) for p in images]
    for i, path in enumerate([paths[0], *paths]):  # the first image warms up, untimed
        t = [time.perf_counter()]
        image = load_image(path, cfg.model.n_channels)
        t.append(time.perf_counter())
        batch = preprocess(image, scale)[None]
        t.append(time.perf_counter())
        logits = backend(batch)
        sync()
        t.append(time.perf_counter())
        if crf:
            from .crf import dense_crf

            probs = probabilities(logits[0], image.shape[:2])
            t.append(time.perf_counter())
            mask = dense_crf(image, probs)
        else:
            mask = logits_to_mask(logits, image.shape[:2], threshold)[0]
        t.append(time.perf_counter())
        write_mask(out_dir / f"stage-{i}.png", mask, values)
        t.append(time.perf_counter())
        if i:
            for name, a, b in zip(names, t[:-1], t[1:], strict=True):
                times[name].append(b - a)
    stage_ms = {n: float(np.median(ts)) * 1000 for n, ts in times.items()}
    options = PredictOptions(crf=crf, progress=False, **({"crf_workers": crf_workers} if crf_workers else {}))
    t0 = time.perf_counter()
    summary = predict_files(backend, [str(p) for p in paths], options, outputs=[str(out_dir / "pipeline") + "/"])
    pipeline_s = time.perf_counter() - t0
    if summary.failed:
        raise UserError(f"stage benchmark: predict failed on {summary.failed} image(s): {summary.errors[0]}")
    slowest = max(stage_ms, key=lambda n: stage_ms[n])
    pipeline_ips = len(paths) / pipeline_s
    slowest_ips = 1000.0 / stage_ms[slowest]
    return {
        "schema": STAGES_SCHEMA, "variant": v.name, "provider": backend.provider, "device": device,
        "images": len(paths), "crf": crf, "scale": scale, "stage_ms": stage_ms,
        "sequential_ms": float(sum(stage_ms.values())), "slowest_stage": slowest,
        "slowest_stage_images_per_s": slowest_ips, "pipeline_s": pipeline_s, "pipeline_images_per_s": pipeline_ips,
        "slowest_ratio": slowest_ips / pipeline_ips, "target_ratio": PIPELINE_TARGET,
        "loader_threads": options.loader_threads, "crf_workers": options.crf_workers if crf else None,
    }


# ---------------------------------------------------------------------------------------------------
# The whole run


@contextlib.contextmanager
def _work_folder(cache_dir: str | Path | None, key: str) -> Iterator[tuple[Path, Path]]:
    """(model folder, scratch folder): the model folder persists under ``cache_dir`` when one is given."""
    with tempfile.TemporaryDirectory(prefix="unet-bench-") as tmp:
        models = Path(cache_dir) / key if cache_dir else Path(tmp) / "models"
        yield models, Path(tmp)


def run_benchmark(settings: BenchSettings, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every backend x scale case (each in a fresh process) and return the JSON-ready report."""
    settings = resolve_settings(settings)
    say = log or (lambda _msg: None)
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    key = f"{'ckpt' if settings.checkpoint else 'fresh'}-{_cache_key(settings)}"
    with _work_folder(cache_dir, key) as (model_dir, scratch):
        files = prepare_models(settings, model_dir, say)
        cases = _run_cases(settings, files, scratch, None if cache_dir else model_dir, say)
        roof = None  # the probe runs before the in-process stage timing: no threads of that around
        if settings.roofline:
            roof = _run_roofline(settings, cases, files, say)
        stages = _run_stages(settings, cases, files, scratch, say) if settings.stages else None
    s = settings
    report = {
        "schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
        "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
        "settings": {
            "checkpoint": str(s.checkpoint) if s.checkpoint else None, "quick": s.quick,
            "backends": list(s.backends), "scales": list(s.scales), "device": s.device, "runs": s.runs,
            "warmup": s.warmup, "threads": s.threads, "base_channels": s.base_channels if not s.checkpoint else None,
            "bilinear": s.bilinear if not s.checkpoint else None, "seed": s.seed,
            "image_size": list(s.image_size or CARVANA_SIZE),
        },
        "model": {"architecture": files.architecture, "source": files.source},
        "machine": machine_facts(s.device),
        "cases": cases,
    }
    report["load_avg"] = {"start": load_start, "end": report["machine"].get("load_avg_1m")}
    for case in cases:
        case["unsteady"] = unsteady(case)
    report["reliability"] = reliability(report)
    if roof is not None:
        report["roofline"] = roof  # before the targets: they quote its ceilings
    report["speedups"] = speedups(report)
    report["targets"] = targets(report)
    report["before_after"] = before_after(report)
    if stages is not None:
        report["stages"] = stages
    report["command"] = reproduce_command(settings)
    return report


def _run_cases(settings: BenchSettings, files: ModelFiles, scratch: Path, temporary_models: Path | None,
               say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every backend x scale case in its own process, with parity against eager on the same input. Files in
    ``temporary_models`` (gone after the run) are recorded by name, others by path."""
    from .data import preprocess

    width, height = settings.image_size or CARVANA_SIZE
    image = synthetic_image(width, height, settings.seed)
    cases: list[dict[str, Any]] = []
    for scale in settings.scales:
        batch = preprocess(image, scale)[None]
        input_path = scratch / f"input-{scale:g}.npy"
        np.save(input_path, batch)
        h, w = batch.shape[-2:]
        logits: dict[str, Path] = {}
        order = list(settings.backends)
        if "torch" not in order:  # parity needs eager logits: one untimed eager call
            order.insert(0, "reference")
        for name in order:
            variant = parse_variant("torch" if name == "reference" else name)
            backend = variant.file_key
            logits[name] = scratch / f"logits-{name}-{scale:g}.npy"
            spec = CaseSpec(variant.backend, str(files.paths[backend]), settings.device, str(input_path),
                            scale, "model", 0 if name == "reference" else int(settings.runs or 1),
                            int(settings.warmup or 0) if name != "reference" else 1, settings.threads,
                            str(logits[name]), variant.name)
            say(f"{name} scale {scale:g} ({w}x{h}): running in a fresh process")
            result = run_case_isolated(spec, settings.timeout_s)
            if name == "reference":
                continue
            ref = np.load(logits.get("torch", logits.get("reference")))
            par = parity(ref, np.load(logits[name]), precision=result.get("precision", "fp32"))
            path = files.paths[backend]
            cases.append({
                **result, "scale": scale, "input": f"{w}x{h}", "input_width": int(w), "input_height": int(h),
                "parity": {**par, "reference": name == "torch"},
                "file": path.name if path.parent == temporary_models else str(path),
                "file_mb": path.stat().st_size / 1e6, "export_s": files.export_s.get(backend),
            })
    return cases


def _run_roofline(settings: BenchSettings, cases: list[dict[str, Any]], files: ModelFiles,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """The roofline section: work per image, achieved GFLOP/s and (CPU) ONNX Runtime's measured peaks."""
    from .roofline import measure_peaks, roofline_report

    peaks = None
    if settings.device == "cpu":
        say("roofline: timing ONNX Runtime's fp32 and int8 convolutions on one large layer")
        try:
            peaks = measure_peaks(settings.threads)
        except Exception as e:  # noqa: BLE001 - keep the timings already measured; report without peaks
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            say(f"roofline: the peak probe failed ({first[:200]}); reporting GFLOP/s without floors")
    return roofline_report({"cases": cases}, files.model_config, peaks)


def _run_stages(settings: BenchSettings, cases: list[dict[str, Any]], files: ModelFiles, scratch: Path,
                say: Callable[[str], None]) -> dict[str, Any]:
    """Stage timing with the fastest variant whose parity passed at the model's (first) scale."""
    scale = settings.scales[0]
    ok = [c for c in cases if c["scale"] == scale and c["parity"].get("passed", True)]
    best = min(ok, key=lambda c: c["latency"]["p50_ms"]) if ok else None
    variant = best["backend"] if best else settings.backends[0]
    width, height = settings.image_size or CARVANA_SIZE
    images = [write_jpeg(synthetic_image(width, height, settings.seed + 2000 + i), scratch / f"car{i:03d}.jpg")
              for i in range(settings.stages)]
    say(f"stages: {variant} on {len(images)} {width}x{height} JPEGs{' with CRF' if settings.stages_crf else ''}")
    return measure_stages(files.paths[parse_variant(variant).file_key], variant, settings.device, images,
                          scratch / "stages", crf=settings.stages_crf, threads=settings.threads)


def speedups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per scale, each backend against eager torch measured in the same run: speed-up of p50 latency
    (> 1 = faster than eager) and peak memory relative to eager (< 1 = less memory)."""
    out = []
    busy = reliability(report)["busy"]
    for scale in report["settings"]["scales"]:
        rows = {c["backend"]: c for c in report["cases"] if c["scale"] == scale}
        eager = rows.get("torch")
        if eager is None:
            continue
        for name, case in rows.items():
            mem = case["peak_mib"] / eager["peak_mib"] if eager["peak_mib"] > 0 else None
            out.append({"scale": scale, "backend": name, "input": case["input"],
                        "speedup_p50": eager["latency"]["p50_ms"] / case["latency"]["p50_ms"],
                        "memory_ratio": mem, "unreliable": busy or unsteady(eager) or unsteady(case)})
    return out


#: A case whose p90 is more than this times its p50 had unsteady timings (other work got in the way).
UNSTEADY_SPREAD = 1.25


def unsteady(case: dict[str, Any]) -> bool:
    """True when the case's p90/p50 is above :data:`UNSTEADY_SPREAD`."""
    lat = case.get("latency") or {}
    p50, p90 = lat.get("p50_ms"), lat.get("p90_ms")
    return bool(p50 and p90) and p90 / p50 > UNSTEADY_SPREAD


def reliability(report: dict[str, Any]) -> dict[str, Any]:
    """Was the machine quiet enough to trust the ratios? ``busy``: the 1-minute load average at the start
    or end of the run was above the usable cores; ``unsteady``: the cases with p90/p50 above
    :data:`UNSTEADY_SPREAD`; ``reliable``: neither."""
    m = report.get("machine") or {}
    cores = m.get("cores_usable") or m.get("cores_logical") or os.cpu_count() or 1
    load = report.get("load_avg") or {}
    seen = [x for x in (load.get("start"), load.get("end"), m.get("load_avg_1m")) if x is not None]
    peak = max(seen) if seen else None
    busy = peak is not None and peak > cores
    shaky = [{"backend": c["backend"], "scale": c["scale"],
              "spread": c["latency"]["p90_ms"] / c["latency"]["p50_ms"]} for c in report["cases"] if unsteady(c)]
    return {"busy": busy, "load": peak, "cores": cores, "spread_limit": UNSTEADY_SPREAD, "unsteady": shaky,
            "reliable": not busy and not shaky}


def reliability_notes(report: dict[str, Any]) -> list[str]:
    """Footnote lines for the ``?`` marks: why this run's timings and ratios are not to be trusted."""
    r = reliability(report)
    out = []
    if r["busy"]:
        out.append(f"? machine busy (load {r['load']:.1f} on {r['cores']} cores): ratios unreliable, rerun on "
                   "a quiet machine")
    if r["unsteady"]:
        cases = ", ".join(f"{_label(c['backend'])} at {c['scale']:g} ({c['spread']:.2f}x)" for c in r["unsteady"])
        out.append(f"? unsteady timings, p90/p50 above {UNSTEADY_SPREAD:g}: {cases}; their rows and ratios are "
                   "unreliable, rerun with more --runs on a quiet machine")
    return out


def _mark(text: str, doubtful: bool) -> str:
    return f"{text} ?" if doubtful else text


#: Issue targets, checked on full-size runs (a 1918x1280 source image) only.
CPU_TARGETS = {"ort": 2.5, "ort-int8": 6.5}
CPU_MEMORY_TARGET = 0.5  # ORT peak RSS <= this x eager
GPU_LATENCY_TARGET_MS = {959: 1.6, 1918: 6.5}  # best backend, on an H200
GPU_MEMORY_TARGET = 0.3  # best backend's peak <= this x the seed default (eager fp32)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets that this run can judge: ``target``, ``measured`` (text), ``met`` (bool)."""
    s = report["settings"]
    if s.get("quick") or list(s.get("image_size") or []) != list(CARVANA_SIZE):
        return []
    out: list[dict[str, Any]] = []
    cuda = str(s["device"]).startswith("cuda")
    for scale in s["scales"]:
        rows = {c["backend"]: c for c in report["cases"] if c["scale"] == scale}
        eager = rows.get("torch")
        if not rows:
            continue
        size = next(iter(rows.values()))["input"]
        width = next(iter(rows.values()))["input_width"]
        if not cuda and eager is not None:
            ceilings = _ceilings(report, size)
            for name, want in CPU_TARGETS.items():
                if name in rows and width == 959:
                    got = eager["latency"]["p50_ms"] / rows[name]["latency"]["p50_ms"]
                    goal = {"target": f"{_label(name)} >= {want:g}x eager fp32 at {size}",
                            "measured": f"{got:.2f}x", "met": got >= want}
                    ceiling = ceilings.get("int8" if name == "ort-int8" else "fp32")
                    if ceiling is not None:
                        goal["ceiling"] = ceiling
                        goal["reachable"] = ceiling >= want
                    out.append(goal)
            if "ort" in rows and eager["peak_mib"] > 0:
                got = rows["ort"]["peak_mib"] / eager["peak_mib"]
                out.append({"target": f"onnxruntime peak RSS <= {CPU_MEMORY_TARGET:g}x eager at {size}",
                            "measured": f"{got:.2f}x", "met": got <= CPU_MEMORY_TARGET})
        if cuda:
            ok = [c for c in rows.values() if c["parity"].get("passed", True)]
            best = min(ok, key=lambda c: c["latency"]["p50_ms"]) if ok else None
            want = GPU_LATENCY_TARGET_MS.get(width)
            if best is not None and want is not None:
                got = best["latency"]["p50_ms"]
                out.append({"target": f"best backend <= {want:g} ms at {size} (H200)",
                            "measured": f"{got:.2f} ms ({_label(best['backend'])})", "met": got <= want})
            if best is not None and eager is not None and eager["peak_mib"] > 0:
                lowest = min(ok, key=lambda c: c["peak_mib"])
                got = lowest["peak_mib"] / eager["peak_mib"]
                out.append({"target": f"peak memory <= {GPU_MEMORY_TARGET:g}x the seed default at {size}",
                            "measured": f"{got:.2f}x ({_label(lowest['backend'])})", "met": got <= GPU_MEMORY_TARGET})
    return out


def _ceilings(report: dict[str, Any], size: str) -> dict[str, float]:
    """Largest speed-up over eager that ORT's measured peak allows at ``size`` (``--roofline`` runs)."""
    for entry in (report.get("roofline") or {}).get("sizes", []):
        if entry["input"] == size:
            return dict(entry.get("ceiling_speedup") or {})
    return {}


#: (before, after) variant pairs shown in the before/after table when both were measured.
_BEFORE_AFTER = (("ort-default", "ort"), ("torch", "torch-cl"), ("torch", "torch-bf16"), ("torch", "torch-bf16-cl"),
                 ("torch", "torch-compile"), ("torch", "torch-fp16-cl"), ("torch", "torch-fp16-cl-compile"),
                 ("torch", "torch-fp16-cl-cgraph"), ("ort", "ort-int8"), ("ort", "ort-fp16"), ("ort", "ort-iob"),
                 ("ort-fp16", "ort-fp16-iob"))


def before_after(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each fast path against what it replaces, same run, same scale: speed-up and memory ratio."""
    out = []
    busy = reliability(report)["busy"]
    for scale in report["settings"]["scales"]:
        rows = {c["backend"]: c for c in report["cases"] if c["scale"] == scale}
        for before, after in _BEFORE_AFTER:
            if before in rows and after in rows:
                b, a = rows[before], rows[after]
                out.append({"scale": scale, "input": a["input"], "before": before, "after": after,
                            "before_ms": b["latency"]["p50_ms"], "after_ms": a["latency"]["p50_ms"],
                            "speedup": b["latency"]["p50_ms"] / a["latency"]["p50_ms"],
                            "before_mib": b["peak_mib"], "after_mib": a["peak_mib"],
                            "memory_ratio": a["peak_mib"] / b["peak_mib"] if b["peak_mib"] > 0 else None,
                            "unreliable": busy or unsteady(a) or unsteady(b)})
    return out


# ---------------------------------------------------------------------------------------------------
# Rendering and writing

#: Table columns; img/s is 1000 / p50 ms x batch, so it always agrees with the p50 column.
COLUMNS = ("backend", "precision", "scale", "input", "parity vs eager", "p50 ms", "p90 ms", "img/s (p50)",
           "peak MiB", "file MB")
_NAMES = {"torch": "torch (eager)", "torchscript": "torchscript", "ort": "onnxruntime"}


def _label(name: str) -> str:
    """Table label of a variant name ("torch-bf16-cl" -> "torch (eager) bf16 cl")."""
    try:
        return parse_variant(name).label
    except UserError:
        return name


def _parity_text(case: dict[str, Any]) -> str:
    p = case["parity"]
    if p.get("reference"):
        return "reference"
    verdict = "" if "passed" not in p else (" ok" if p["passed"] else " FAIL")
    return f"rel {p['max_rel_err']:.1e}, {100 * p['pixel_agreement']:.2f}% px{verdict}"


def _rows(report: dict[str, Any]) -> list[list[str]]:
    """Table rows; the p50 of a case timed on a busy machine or with unsteady timings is marked "?"."""
    rows = []
    busy = reliability(report)["busy"]
    for c in report["cases"]:
        lat = c["latency"]
        name = _label(c["backend"])
        if c.get("runtime", c["backend"]) == "ort":
            name += f" ({c['provider'].split(',')[0].replace('ExecutionProvider', '')})"
        per_s = _per_s(lat["p50_ms"], lat.get("batch", 1))  # also for JSON written before img/s used p50
        rows.append([name, c["precision"], f"{c['scale']:g}", c["input"], _parity_text(c),
                     _mark(f"{lat['p50_ms']:.1f}", busy or unsteady(c)), f"{lat['p90_ms']:.1f}", f"{per_s:.2f}",
                     f"{c['peak_mib']:.0f}", f"{c['file_mb']:.1f}"])
    return rows


def _title(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores_usable']} cores"
    mode = "QUICK MODE, " if s["quick"] else ""
    return (f"{mode}{report['model']['architecture']} ({report['model']['source']}) on {s['device']} "
            f"[{where}]; warmup {s['warmup']}, runs {s['runs']}")


def render_table(report: dict[str, Any]) -> Any:
    """The results as a rich Table (print it with a rich Console)."""
    from rich.table import Table

    table = Table(title=_title(report), title_justify="left")
    for col in COLUMNS:
        numeric = col.startswith(("p50", "p90", "img/s", "peak", "file")) or col == "scale"
        table.add_column(col, justify="right" if numeric else "left")
    for row in _rows(report):
        table.add_row(*row)
    return table


def render_speedups(report: dict[str, Any]) -> str:
    """One line per scale: each backend's speed-up and memory ratio against eager ("?" = unreliable), then
    the footnotes explaining any "?"."""
    lines = []
    rows = speedups(report)  # recomputed: JSON from before the reliability flags gets them too
    for scale in report["settings"]["scales"]:
        parts = [_mark(f"{_label(r['backend'])} {r['speedup_p50']:.2f}x", r["unreliable"])
                 + (f" ({r['memory_ratio']:.2f}x memory)" if r["memory_ratio"] is not None else "")
                 for r in rows if r["scale"] == scale and r["backend"] != "torch"]
        if parts:
            lines.append(f"scale {scale:g}: speed-up vs eager (p50): " + ", ".join(parts))
    return "\n".join(lines + reliability_notes(report))


def render_targets(report: dict[str, Any]) -> list[str]:
    """The project's own targets (met / NOT met), one line each: for the record (``--targets``), not for
    users judging a backend."""
    out = []
    for goal in report["targets"] if "targets" in report else targets(report):
        ceiling = (f"; ceiling here {goal['ceiling']:.2f}x, {'reachable' if goal['reachable'] else 'out of reach'}"
                   if "ceiling" in goal else "")
        out.append(f"target: {goal['target']}: {goal['measured']} ({'met' if goal['met'] else 'NOT met'}{ceiling})")
    return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)])


def reproduce_command(settings: BenchSettings, extra: Sequence[str] = ()) -> str:
    """The ``unet-deploy benchmark`` command line that repeats this run."""
    s = settings
    args = ["unet-deploy", "benchmark"]
    if s.checkpoint:
        args += ["-m", str(s.checkpoint)]
    if s.quick:
        args.append("--quick")
    if tuple(s.backends) != BENCH_BACKENDS:
        args += ["--backends", *s.backends]
    args += ["--scales", *(f"{x:g}" for x in s.scales), "--device", s.device]
    if s.runs is not None:
        args += ["--runs", str(s.runs)]
    if s.warmup is not None:
        args += ["--warmup", str(s.warmup)]
    if not s.checkpoint and s.base_channels and s.base_channels != (QUICK_BASE_CHANNELS if s.quick
                                                                   else SEED_BASE_CHANNELS):
        args += ["--base-channels", str(s.base_channels)]
    if not s.checkpoint and s.bilinear:
        args.append("--bilinear")
    if s.threads:
        args += ["--threads", str(s.threads)]
    if s.stages:
        args += ["--stages", str(s.stages), *(["--stages-crf"] if s.stages_crf else [])]
    if s.roofline:
        args.append("--roofline")
    return shlex.join([*args, *extra])


FULL_RUN = ("unet-deploy benchmark --device cpu --targets --markdown benchmarks/RESULTS.md "
            "--json benchmarks/results.json --plot benchmarks/results.png")
#: The CPU fast-path record in benchmarks/RESULTS.md: one run per scale (fewer timed runs at full size,
#: where eager takes tens of seconds an image on 2 cores) and the int8 accuracy script, rendered together.
FAST_PATH_RUNS = (
    "V='torch torch-cl torch-bf16-cl torchscript ort-default ort ort-int8'\n"
    "unet-deploy benchmark --device cpu --backends $V --scales 0.5 --warmup 1 --runs 3 --threads 2 --stages 4 "
    "--roofline --json benchmarks/results-959x640.json\n"
    "unet-deploy benchmark --device cpu --backends $V --scales 1.0 --warmup 1 --runs 2 --threads 2 --roofline "
    "--json benchmarks/results-1918x1280.json\n"
    "python benchmarks/int8_eval.py --out /tmp/int8-eval --json benchmarks/int8-eval.json\n"
    "unet-deploy benchmark --from-json benchmarks/results-959x640.json --merge benchmarks/results-1918x1280.json "
    "--merge benchmarks/int8-eval.json --targets --markdown benchmarks/RESULTS.md"
)


def _bench_section(report: dict[str, Any], command: str, title: str, show_targets: bool = False) -> list[str]:
    """One benchmark run: what ran, the table, ratios, before/after, (targets,) the command."""
    s = report["settings"]
    out = [f"## {title}", ""]
    if s["quick"]:
        out += ["> **Quick mode** (small width on a small image): a smoke test of the benchmark itself, "
                "NOT representative of the seed-width model.", ""]
    notes = reliability_notes(report)
    out += [
        f"Generated by `{command}` on {report['started']} in {report['duration_s']:.0f} s. "
        f"Model: `{report['model']['architecture']}` ({report['model']['source']}). Source image "
        f"{s['image_size'][0]}x{s['image_size'][1]}, batch 1, device `{s['device']}`, warmup {s['warmup']}, "
        f"timed runs {s['runs']}, threads per case: {s['threads'] or 'library defaults'}; load average "
        f"(1 min) {_load_text(report)}.", "",
        "### Latency and peak memory (model only)", "",
        _md_table(COLUMNS, _rows(report)), "",
        *([f"> {n}" for n in notes] + [""] if notes else []),
        "### Ratios against eager PyTorch fp32 (same run)", "",
        _md_table(["scale", "input", "backend", "speed-up (p50)", "peak memory vs eager"],
                  [[f"{r['scale']:g}", r["input"], _label(r["backend"]), _mark(f"{r['speedup_p50']:.2f}x",
                                                                              r["unreliable"]),
                    "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"]
                   for r in speedups(report) if r["backend"] != "torch"]), "",
    ]
    pairs = before_after(report)
    if pairs:
        out += ["### Before / after (each fast path against what it replaces, same run)", "",
                _md_table(["scale", "input", "before", "after", "p50 ms before -> after", "speed-up",
                           "peak MiB before -> after"],
                          [[f"{r['scale']:g}", r["input"], _label(r["before"]), _label(r["after"]),
                            f"{r['before_ms']:.1f} -> {r['after_ms']:.1f}", _mark(f"{r['speedup']:.2f}x",
                                                                                 r["unreliable"]),
                            f"{r['before_mib']:.0f} -> {r['after_mib']:.0f}"] for r in pairs]), ""]
    if report.get("roofline"):
        out += _roofline_section(report)
    if show_targets:
        out += _targets_section(report["targets"] if "targets" in report else targets(report))
    if report.get("stages"):
        out += _stages_section(report["stages"], show_targets)
    return out


def _targets_section(goals: list[dict[str, Any]]) -> list[str]:
    """The project's targets table (``--targets``), with the roofline's ceiling column when there is one."""
    if not goals:
        return []
    ceilings = any("ceiling" in g for g in goals)  # --roofline runs: one more column
    header = ["target", "measured", "met"] + (["ceiling on this machine (at ORT's measured peak)"]
                                              if ceilings else [])
    rows = [[g["target"], g["measured"], "met" if g["met"] else "NOT met"]
            + ([f"{g['ceiling']:.2f}x ({'reachable' if g['reachable'] else 'out of reach'})"
                if "ceiling" in g else "-"] if ceilings else []) for g in goals]
    return ["### Targets", "", _md_table(header, rows), ""]


def _roofline_section(report: dict[str, Any]) -> list[str]:
    """Work per image, achieved throughput per backend, and the floors at ORT's measured peaks."""
    roof = report["roofline"]
    peaks = roof.get("peaks")
    out = ["### Compute ceiling (roofline)", ""]
    if peaks:
        out += [f"ONNX Runtime's own convolution kernels on one compute-bound layer ({peaks['layer']}, "
                f"{peaks['gflop']:.1f} GFLOP, best of {peaks['runs']}, {peaks['threads'] or 'physical-core'} threads, "
                f"this run): float32 **{peaks['fp32_gflops']:.0f} GFLOP/s**, int8 QDQ "
                f"**{peaks['int8_gops']:.0f} GOP/s**. No session setting makes the whole network run faster "
                "than its work at these rates."
                + (f" (For {' and '.join(peaks['raised'])} a whole-network run beat the probe layer, which can "
                   "happen when other work disturbs the probe, so that peak is the network's own best rate.)"
                   if peaks.get("raised") else ""), ""]
    rows = []
    for entry in roof["sizes"]:
        for name, c in entry["cases"].items():
            share = "-" if c["share_of_peak"] is None else f"{100 * c['share_of_peak']:.0f}%"
            rows.append([entry["input"], f"{entry['gflop']:.4g}", _label(name),
                         "-" if c["gflops"] is None else f"{c['gflops']:.3g}", share])
    out += [_md_table(["input", "network GFLOP", "backend", "achieved GFLOP/s", "of ORT's peak"], rows), ""]
    for entry in roof["sizes"]:
        if entry.get("floor_ms"):
            f, c = entry["floor_ms"], entry.get("ceiling_speedup") or {}
            line = (f"- {entry['input']}: floor {f['fp32']:.4g} ms at the fp32 peak, {f['int8']:.4g} ms at the "
                    "int8 peak")
            if c:
                line += f"; largest speed-up over eager fp32: {c['fp32']:.2f}x (fp32), {c['int8']:.2f}x (int8)"
            out.append(line)
    return out + [""]


def render_roofline(report: dict[str, Any]) -> list[str]:
    """Plain-text roofline lines for the terminal (empty without ``--roofline``)."""
    roof = report.get("roofline")
    if not roof:
        return []
    out = []
    peaks = roof.get("peaks")
    if peaks:
        out.append(f"roofline: ONNX Runtime peak on {peaks['layer']}: fp32 {peaks['fp32_gflops']:.0f} GFLOP/s, "
                   f"int8 {peaks['int8_gops']:.0f} GOP/s")
    for entry in roof["sizes"]:
        parts = [f"{_label(n)} {c['gflops']:.3g}" for n, c in entry["cases"].items() if c["gflops"]]
        line = f"roofline {entry['input']}: {entry['gflop']:.4g} GFLOP per image; GFLOP/s: " + ", ".join(parts)
        if entry.get("ceiling_speedup"):
            c = entry["ceiling_speedup"]
            line += f"; largest speed-up over eager allowed: fp32 {c['fp32']:.2f}x, int8 {c['int8']:.2f}x"
        out.append(line)
    return out


def _load_text(report: dict[str, Any]) -> str:
    """The machine's 1-minute load average around the run (other work on a shared machine skews timings)."""
    load = report.get("load_avg")
    if load:
        return f"{load['start']} at the start, {load['end']} at the end"
    return f"{report['machine'].get('load_avg_1m')} at the end of the run"


def _stages_section(st: dict[str, Any], show_targets: bool = False) -> list[str]:
    rows = [[name, f"{ms:.1f}", f"{1000 / ms:.2f}" if ms > 0 else "-"] for name, ms in st["stage_ms"].items()]
    met = st["slowest_ratio"] <= st["target_ratio"]
    goal = f" (target <= {st['target_ratio']:g}x: {'met' if met else 'NOT met'})" if show_targets else ""
    return [
        f"### End-to-end prediction stages ({_label(st['variant'])}, {st['images']} images"
        f"{', dense CRF' if st['crf'] else ''})", "",
        _md_table(["stage", "median ms per image", "img/s (one worker)"], rows), "",
        f"Sequential sum {st['sequential_ms']:.1f} ms per image; slowest stage **{st['slowest_stage']}** "
        f"({st['slowest_stage_images_per_s']:.2f} img/s). Overlapped pipeline (`predict`: "
        f"{st['loader_threads']} decoding threads" + (f", {st['crf_workers']} CRF processes" if st["crf"] else "")
        + f"): {st['pipeline_images_per_s']:.2f} img/s, i.e. the slowest stage is "
        f"{st['slowest_ratio']:.2f}x the pipeline's rate{goal}.", "",
    ]


def _int8_section(r: dict[str, Any], show_targets: bool = False) -> list[str]:
    d = r["dice"]
    masks = r["int8_vs_fp32_masks"]
    change = r["dice_change_int8_vs_fp32"]
    goal = f" (target |change| <= 0.002: {'met' if abs(change) <= 0.002 else 'NOT met'})" if show_targets else ""
    return [
        "## int8 accuracy on a held-out set", "",
        f"Generated by `{r['command']}` on {r['started']}. Model `{r['model']}` trained on "
        f"{r['settings']['train_images']} synthetic {r['settings']['width']}x{r['settings']['height']} images"
        + (f" of {-(-r['settings']['train_images'] // r['settings']['angles'])} cars" if r["settings"].get("angles")
           else "") + " "
        f"(validation dice {r['train_val_dice']:.4f}); int8 calibrated on {r['settings']['calibration_count']} of "
        f"its training images; scored on {r['heldout_images']} held-out images (Carvana metric: mean per-image "
        "dice at full resolution).", "",
        _md_table(["model", "held-out dice"], [[k, f"{v:.5f}"] for k, v in d.items()]), "",
        f"- dice change int8 - fp32: **{change:+.5f}**{goal}",
        f"- int8 vs fp32 masks: pixel agreement min {masks['min_pixel_agreement']:.4%}, mean "
        f"{masks['mean_pixel_agreement']:.4%}; mask dice min {masks['min_mask_dice']:.5f}; "
        f"{masks['flipped_pixels']} of {masks['pixels']} pixels flipped (at network resolution)",
        f"- export parity thresholds for int8: {r['thresholds']}", "",
    ]


def render_markdown(report: dict[str, Any], command: str | None = None,
                    merged: Sequence[dict[str, Any]] = (), show_targets: bool = False) -> str:
    """RESULTS.md: this run (table, ratios, before/after, stages) plus the ``merged`` JSON results of earlier
    runs (other benchmark runs, ``benchmarks/int8_eval.py``), the machine, and the commands that regenerate
    every number. ``show_targets`` adds the project's own targets (met / NOT met), for the record."""
    m = report["machine"]
    v = m["versions"]
    command = command or report.get("command", "")
    out = ["# unet-deploy benchmark results", "",
           "Every number below is written by the commands quoted with it; none is typed in.", ""]
    runs = [(report, command)] + [(r, r.get("command", "")) for r in merged if r.get("schema") == SCHEMA]
    runs.sort(key=lambda rc: min((c["input_width"] for c in rc[0]["cases"]), default=0))  # smallest input first
    for i, (r, cmd) in enumerate(runs):
        scales = ", ".join(sorted({c["input"] for c in r["cases"]}, key=lambda x: int(x.split("x")[0])))
        out += _bench_section(r, cmd, f"Run {i + 1}: {r['settings']['device']}, {scales}", show_targets)
    for r in merged:
        if r.get("schema") == STAGES_SCHEMA:
            out += _stages_section(r, show_targets)
        elif r.get("schema") == "unet-deploy.int8-eval/1":
            out += _int8_section(r, show_targets)
    out += [
        "## Machine", "",
        f"- CPU: {m['cpu']} ({m['cores_usable']} usable cores, {m['cores_logical']} logical, "
        f"{m['ram_gib']} GiB RAM); torch default threads {m['torch_threads']}",
        f"- GPU: {m['gpu'] or 'none used'}",
        f"- Python {m['python']}, torch {v.get('torch')}, onnxruntime {v.get('onnxruntime', '-')}, "
        f"onnx {v.get('onnx', '-')}, numpy {v.get('numpy')}; {m['platform']}",
        f"- ONNX Runtime providers available: {', '.join(m.get('ort_providers') or []) or '-'}", "",
        "## How it is measured", "",
        "- Each backend x scale case runs in a fresh Python process, one after another. Latency is the model "
        "call alone (preprocessed float32 batch in, logits out) after exactly `warmup` untimed calls; img/s = "
        "1000 / p50 ms (batch 1); the JSON keeps mean and p50.",
        f"- `?` marks a number not to trust: the 1-minute load average at the start or end of the run was "
        f"above the usable cores (every ratio), or the case's p90 was more than {UNSTEADY_SPREAD:g}x its p50.",
        "- Peak MiB: " + (report["cases"][0]["memory_method"] if report["cases"] else "-")
        + " (includes the weights and the backend's runtime, not the shared imports).",
        "- Parity: the largest logit difference from eager torch on the same input, divided by the "
        "largest eager logit, and the share of mask pixels that agree; ok/FAIL by the export's thresholds for "
        "the precision (int8: mask criteria only). A freshly initialised model has near-tied logits, so "
        "reduced-precision rows may flip many pixels there; trained-model accuracy is in the int8 section.",
        "- Variants: `torch-bf16-cl` = eager with bfloat16 weights and channels_last; `onnxruntime default` = "
        "ONNX Runtime's own session defaults; `onnxruntime` = this package's tuned options; `int8` = static "
        "QDQ quantisation; `fp16` = onnxconverter-common fp16 with fp32 I/O.",
        "- file MB: the checkpoint (.pth) for eager torch, the exported file for the others.", "",
        "## Reproduce", "",
        "The full seed-width (base 64) run on CPU (slow: minutes on 2 cores):", "",
        "```", FULL_RUN, "```", "",
        "This file's fast-path record (each section above quotes its own command; add `--cache-dir DIR` to "
        "both benchmark runs to export once):", "",
        "```", FAST_PATH_RUNS, "```", "",
        "On a GPU machine, `benchmarks/gpu_check.sh OUT_DIR` measures every variant at both scales plus "
        "training throughput in about 8 minutes and writes OUT_DIR/RESULTS.md.", "",
        "Quick mode (width 8, 240x160 source image; seconds): add `--quick` or set "
        f"`{QUICK_ENV}=1`. The pytest-benchmark suites: `pytest benchmarks/` (full) or "
        f"`{QUICK_ENV}=1 pytest benchmarks/` (quick).", "",
    ]
    return "\n".join(out)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON, atomically."""
    from .fileio import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Latency (p50 bars with p90 whiskers) and peak memory per backend and scale, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    scales = report["settings"]["scales"]
    backends = list(dict.fromkeys(c["backend"] for c in report["cases"]))
    x = np.arange(len(scales))
    width = 0.8 / max(len(backends), 1)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for i, b in enumerate(backends):
        by_scale = {c["scale"]: c for c in report["cases"] if c["backend"] == b}
        p50 = [by_scale[s]["latency"]["p50_ms"] if s in by_scale else np.nan for s in scales]
        p90 = [by_scale[s]["latency"]["p90_ms"] if s in by_scale else np.nan for s in scales]
        mem = [by_scale[s]["peak_mib"] if s in by_scale else np.nan for s in scales]
        pos = x + (i - (len(backends) - 1) / 2) * width
        yerr = np.vstack([np.zeros(len(p50)), np.maximum(np.subtract(p90, p50), 0)])
        ax_t.bar(pos, p50, width, yerr=yerr, capsize=3, label=_label(b))
        ax_m.bar(pos, mem, width, label=_label(b))
    labels = []
    for s in scales:
        case = next((c for c in report["cases"] if c["scale"] == s), None)
        labels.append(f"scale {s:g}\n{case['input'] if case else ''}")
    for ax, ylabel, title in ((ax_t, "latency ms (p50, whisker p90)", "Latency per image"),
                              (ax_m, "peak MiB", "Peak memory")):
        ax.set_xticks(x, labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(report), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


if __name__ == "__main__":  # the fresh process of run_case_isolated
    sys.exit(_worker_main(sys.argv[1:]))
