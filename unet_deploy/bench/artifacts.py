"""The model files a benchmark loads: the checkpoint (given, or a seeded fresh init), its TorchScript and ONNX
exports, the int8/fp16 ONNX files made from them and the OpenVINO IRs (from this package's ONNX export, its
NNCF int8 form, and from a plain ``torch.onnx.export`` for comparison), kept in a folder named by a hash of
what made them so a cache folder is reused across runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from unet_deploy.bench.inputs import synthetic_image
from unet_deploy.bench.settings import CARVANA_SIZE, BenchSettings, resolve_settings
from unet_deploy.bench.variants import parse_variant
from unet_deploy.checkpoint import load_checkpoint, save_checkpoint
from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
from unet_deploy.export.writers import DEFAULT_OPSET, StageInputs, quiet_exporter
from unet_deploy.fileio import sha256_file
from unet_deploy.images.image_io import preprocess
from unet_deploy.runtime.registry import REGISTRY

__all__ = ["MODEL_FILES", "BENCH_CALIBRATION_IMAGES", "ModelFiles", "cache_key", "prepare_models", "work_folder"]



def _file_name(key: str) -> str:
    """``openvino-int8-plain`` -> ``model.int8.plain.xml``: the words after the backend, then its suffix."""
    backend, *words = key.split("-")
    return ".".join(["model", *words]) + REGISTRY[backend].export_suffix


def _file_keys() -> list[str]:
    """Every file a variant can load, in the order they are made (a file after the one it is made from)."""
    fp32 = sorted(REGISTRY, key=lambda name: (REGISTRY[name].built_from is not None, REGISTRY[name].export_rank))
    derived = [f"{name}-{p}" for name in fp32 for p in REGISTRY[name].derived_precisions]
    plain = [f"{name}{p}-plain" for name in fp32 if "plain" in REGISTRY[name].variant_flags for p in ("", "-int8")]
    return [*fp32, *derived, *plain]


#: File name of each model file, by ``Variant.file_key``, in the order they are made.
MODEL_FILES = {key: _file_name(key) for key in _file_keys()}
#: Synthetic Carvana-like images the benchmark calibrates its int8 model on.
BENCH_CALIBRATION_IMAGES = 4


@dataclass
class ModelFiles:
    """One model in every format, plus where it came from."""

    paths: dict[str, Path]  # backend -> model file
    architecture: str
    source: str  # "checkpoint <path>" or "fresh init (seed N)"
    export_s: dict[str, float] = field(default_factory=dict)  # backend -> seconds spent exporting
    model_config: Any = None  # the ModelConfig (architecture) of these files


def cache_key(settings: BenchSettings) -> str:
    """Hash of the weights (or the fresh-init recipe), the export recipe and the torch/onnx versions."""
    # recipe: bump when the export/quantisation recipe changes, so cached files are made again
    what: dict[str, Any] = {"torch": str(torch.__version__), "recipe": 6, "onnx": onnx.__version__,
                            "openvino": _openvino_version(), "nncf": _openvino_version("nncf")}
    if settings.checkpoint is not None:
        what["checkpoint"] = sha256_file(settings.checkpoint)
    else:
        what.update(base=settings.base_channels, bilinear=settings.bilinear, seed=settings.seed)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def work_folder(cache_dir: str | Path | None, key: str) -> Iterator[tuple[Path, Path]]:
    """(model folder, scratch folder): the model folder persists under ``cache_dir`` when one is given."""
    with tempfile.TemporaryDirectory(prefix="unet-bench-") as tmp:
        models = Path(cache_dir) / key if cache_dir else Path(tmp) / "models"
        yield models, Path(tmp)


def prepare_models(settings: BenchSettings, folder: str | Path,
                   log: Callable[[str], None] | None = None) -> ModelFiles:
    """Write (or reuse from ``folder``) the checkpoint, TorchScript and ONNX files the backends load.

    With ``settings.checkpoint`` the checkpoint is used as is; otherwise a U-Net of the seed architecture
    (``base_channels``, ``bilinear``) is initialised with ``torch.manual_seed(seed)`` and saved. Files
    already in ``folder`` from an earlier run with the same inputs are reused (the folder name is a hash
    of the weights/architecture and the torch/onnx versions).
    """
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
        config, paths["torch"], model = _fresh_checkpoint(settings, folder)
        source = f"fresh init (seed {settings.seed})"
        ckpt = load_checkpoint(paths["torch"])
    export_s: dict[str, float] = {}
    keys = _with_sources({parse_variant(v).file_key for v in settings.backends})
    models = _EagerOnce(ckpt, model)
    for key in MODEL_FILES:
        if key in keys and key not in paths:
            _make_file(key, settings, models, paths, folder, export_s, say)
    return ModelFiles(paths, config.model.architecture, source, export_s, config.model)


def _source(key: str) -> str | None:
    """The file ``key`` is made from: its backend's fp32 file for a derived precision, the file a format is
    converted from (the IR: the ONNX file), None when it is made from the checkpoint."""
    backend, *words = key.split("-")
    if "plain" in words:  # the plain recipe starts from the checkpoint, as a user without this package would
        return None
    return backend if words else REGISTRY[backend].built_from


def _with_sources(keys: set[str]) -> set[str]:
    """``keys`` and, recursively, every file they are made from."""
    todo, out = list(keys), set()
    while todo:
        key = todo.pop()
        if key not in out:
            out.add(key)
            todo += [s for s in (_source(key),) if s]
    return out


@dataclass
class _EagerOnce:
    """The checkpoint's eager model, built when a writer first needs it."""

    ckpt: Any
    model: Any = None

    def get(self) -> Any:
        if self.model is None:
            self.model = self.ckpt.build_model("cpu")
        return self.model


def _fresh_checkpoint(settings: BenchSettings, folder: Path) -> tuple[DeployConfig, Path, Any]:
    """The seed architecture initialised with ``torch.manual_seed(seed)``, saved once into ``folder``:
    (config, checkpoint path, the model when it was made now, else None)."""
    mc = ModelConfig(bilinear=settings.bilinear, base_channels=int(settings.base_channels or 64))
    config = DeployConfig(model=mc, inference=InferenceConfig(scale=settings.scales[0]),
                          source={"format": "fresh-init", "seed": settings.seed})
    path = folder / MODEL_FILES["torch"]
    model = None
    if not path.exists():
        torch.manual_seed(settings.seed)
        model = mc.build().eval()
        save_checkpoint(path, model, config, {"note": "benchmark: untrained seeded init"})
    return config, path, model


def _openvino_version(package: str = "openvino") -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _calibration(settings: BenchSettings, config: Any) -> Iterator[Any]:
    width, height = settings.image_size or CARVANA_SIZE
    return (preprocess(synthetic_image(width, height, settings.seed + 1000 + i), config.inference.scale)[None]
            for i in range(BENCH_CALIBRATION_IMAGES))


def _plain_onnx_ir(ckpt: Any, target: Path, calibration: Iterator[Any] | None = None) -> None:
    """OpenVINO's IR of a plain ``torch.onnx.export`` of the network as built (no export rewrites, dynamic
    batch/height/width, torch's default exporter): what a user without this package would run. With
    ``calibration``, the plain int8 recipe: ``nncf.quantize`` with its defaults on those batches."""
    from unet_deploy.export.openvino_writer import convert_onnx_to_ir, quantize_ir_plain

    model = ckpt.build_model("cpu").eval()
    onnx_path = target.with_suffix(".onnx")
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(model, (torch.rand(2, 3, 64, 96),), str(onnx_path), dynamo=True, input_names=["input"],
                          output_names=["logits"], dynamic_shapes=(dims,))
    if calibration is None:
        convert_onnx_to_ir(onnx_path, ckpt.config, target)
    else:
        quantize_ir_plain(onnx_path, ckpt.config, target, calibration)
    onnx_path.unlink()


def _make_file(key: str, settings: BenchSettings, models: _EagerOnce, paths: dict[str, Path], folder: Path,
               export_s: dict[str, float], say: Callable[[str], None]) -> None:
    """Write (or reuse) one file with its registry entry's writer or deriver (the plain recipe: its own path);
    add it to ``paths``."""
    target = folder / MODEL_FILES[key]
    paths[key] = target
    if target.exists():
        return
    t0 = time.perf_counter()
    config, entry = models.ckpt.config, REGISTRY[key.split("-")[0]]
    source, words = _source(key), key.split("-")[1:]
    calibrating = f" (calibrating on {BENCH_CALIBRATION_IMAGES} synthetic images at scale {config.inference.scale:g})"
    say(f"{'exporting' if not words and source is None else 'making'} {key} -> {target}"
        + (calibrating if "int8" in words else ""))
    if "plain" in words:
        _plain_onnx_ir(models.ckpt, target, _calibration(settings, config) if "int8" in words else None)
    elif words:
        entry.deriver(words[0])(paths[entry.name], config, target, _calibration(settings, config))
    else:
        converted = paths[source] if source is not None else target  # made from the checkpoint: not read
        entry.stage()(StageInputs(models.get(), config, target, DEFAULT_OPSET, lambda: converted))
    export_s[key] = time.perf_counter() - t0
