"""The OpenVINO backend: an OpenVINO IR (``NAME.xml`` + ``NAME.bin``, as ``unet-deploy export --format
openvino`` writes it) or an ``.onnx`` file, compiled by OpenVINO and run as a :class:`~.backends.Runner`.

* Precision: ``OpenVinoOptions.precision`` is OpenVINO's inference-precision hint (fp32, bf16, fp16), or
  "auto" (the default): the fastest precision whose parity ``export`` verified for this model on this kind
  of CPU (:mod:`.runtime_precision`), else fp32; the provider line says which and why. The hint is always
  set: OpenVINO would pick bf16 by itself on a CPU with bf16. A device without the asked precision (bf16 on
  a CPU without AVX-512 BF16 / AMX) runs what it has: the backend reports the precision really compiled,
  and says so in one warning line.
* Performance hints: "auto" compiles for latency (all threads on one request) and, on the first batch of
  several images, a second time for throughput (parallel streams, one image each): single images stay
  fast and folders keep every core busy. "latency" / "throughput" force one.
* A compiled-model cache in ``.openvino-cache/`` beside the model: a second start skips compilation. The
  model is compiled from the read model, not from its path, so OpenVINO keys the cache on the weights too
  (a path-keyed cache reuses a stale blob when an export's ``.bin`` changes under the same ``.xml``).
* Metadata: the same keys as the ONNX export, in the IR's ``rt_info`` under ``unet_deploy``;
  :func:`read_ir_metadata` reads them from the ``.xml`` without OpenVINO.

OpenVINO is imported only here and only when used (``pip install "unet-deploy[openvino]"``).
"""

from __future__ import annotations

import functools
import logging
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.config import CONFIG_KEY, DeployConfig
from unet_deploy.errors import UserError, first_line
from unet_deploy.runtime.backend_options import OpenVinoOptions
from unet_deploy.runtime.cpu_features import bf16_hidden
from unet_deploy.runtime.cpu_share import usable_cpus
from unet_deploy.runtime.precision import AUTO, DEFAULT, VERDICTS_KEY, Choice, choose_precision, read_verdicts

__all__ = ["load_openvino", "read_ir_metadata", "read_ir_config", "import_openvino", "openvino_installed",
           "openvino_device",
           "openvino_cpu_has",
           "RT_INFO_SECTION", "CACHE_FOLDER", "INSTALL_HINT"]

log = logging.getLogger(__name__)

#: rt_info section of the IR that holds this package's metadata (the ONNX export's keys).
RT_INFO_SECTION = "unet_deploy"
#: Compiled-model cache folder, created beside the model file.
CACHE_FOLDER = ".openvino-cache"
INSTALL_HINT = 'pip install "unet-deploy[openvino]" (or pip install openvino)'
#: OpenVINO element type name -> this package's precision name
_PRECISION_OF_TYPE = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "f16": "fp16", "float16": "fp16"}
_HINT_OF_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


@functools.lru_cache(maxsize=1)
def openvino_core() -> Any:
    """The process's one ``openvino.Core`` (each Core starts its own plugin and thread pools)."""
    return import_openvino().Core()


def openvino_installed() -> bool:
    """Whether ``import openvino`` would work (without importing it)."""
    from unet_deploy.runtime.registry import spec

    return spec("openvino").installed()


def import_openvino() -> Any:
    """The ``openvino`` module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UserError(f"--backend openvino needs OpenVINO: {INSTALL_HINT}") from None
    return openvino


def openvino_cpu_has(precision: str) -> bool:
    """Whether OpenVINO's CPU plugin has native kernels for ``precision`` here (fp32 always; bf16 with
    AVX-512 BF16 or AMX; fp16 with AVX-512 FP16 or AMX-FP16; int8 with AVX2/VNNI)."""
    if precision == "fp32":
        return True
    if precision in ("bf16", "fp16") and bf16_hidden():  # UNET_DEPLOY_CPU_HIDE=bf16: as if the CPU had none
        return False
    core = openvino_core()
    capabilities = {str(c).upper() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}
    return {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}.get(precision, precision.upper()) in capabilities


def read_ir_metadata(path: str | Path) -> dict[str, str]:
    """The ``unet_deploy`` rt_info entries of an IR ``.xml`` (key -> value), read with ElementTree (no
    OpenVINO, no weights); {} when it has none. A file that is not XML is a one-line :class:`UserError`."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise UserError(f"{path}: not a readable OpenVINO IR ({first_line(e)}); re-export it") from None
    section = root.find(f"rt_info/{RT_INFO_SECTION}")
    if section is None:
        return {}
    return {child.tag: child.get("value", "") for child in section}


def read_ir_config(path: str | Path) -> DeployConfig | None:
    """The config in an IR's (or an ONNX file's) metadata, or None."""
    if Path(path).suffix.lower() != ".xml":
        from unet_deploy.runtime.ort_backend import read_onnx_config

        return read_onnx_config(Path(path))
    meta = read_ir_metadata(path)
    return DeployConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None


def openvino_device(device: str, available: list[str]) -> str:
    """This package's ``--device`` as an OpenVINO device: auto/cpu -> CPU; an OpenVINO name (GPU, NPU,
    AUTO, GPU.1, HETERO:GPU,CPU...) passes through when the device is present; CUDA is refused in one line."""
    word = (device or "auto").strip()
    if word.lower() in ("auto", "cpu"):
        return "CPU"
    if word.lower().startswith("cuda"):
        raise UserError(f"--device {device}: OpenVINO does not run on CUDA; use --backend ort or torch on an "
                        "NVIDIA GPU, or --device cpu")
    name = word.upper()
    if name.split(":")[0] in ("AUTO", "HETERO", "MULTI") or name in available:
        return name
    raise UserError(f"--device {device}: OpenVINO sees {', '.join(available) or 'no device'} here; use "
                    "--device cpu (or AUTO, GPU, NPU where present)")


def _read_model(core: Any, path: Path) -> Any:
    try:
        return core.read_model(str(path))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for any bad file
        what = "its .bin beside it is missing or does not match" if path.suffix == ".xml" else "not a model"
        raise UserError(f"{path}: OpenVINO cannot read this model ({first_line(e)[:160]}; {what}); "
                        "re-export it with `unet-deploy export --format openvino`") from None


def _cache_dir(path: Path) -> str | None:
    folder = path.parent / CACHE_FOLDER
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        log.debug("%s: no compiled-model cache (cannot create %s)", path, folder)
        return None
    return str(folder)


def _compile(core: Any, model: Any, device: str, properties: dict[str, Any], path: Path) -> Any:
    try:
        return core.compile_model(model, device, properties)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: OpenVINO cannot compile this model for {device} ({first_line(e)[:200]})") from None


class _OpenVinoRunner:
    """numpy in, numpy out. Batches of one image run on a latency-compiled model; with ``hint`` "auto" or
    "throughput", a batch of several runs its images in parallel on a throughput-compiled model."""

    def __init__(self, core: Any, model: Any, device: str, properties: dict[str, Any], options: OpenVinoOptions,
                 path: Path):
        self.core, self.model, self.device, self.path = core, model, device, path
        self.properties = properties
        self.hint = options.hint
        first = "THROUGHPUT" if options.hint == "throughput" else "LATENCY"
        self.compiled = {first: _compile(core, model, device, {**properties, "PERFORMANCE_HINT": first}, path)}
        self.request = self.compiled[first].create_infer_request()
        self.requests: list[Any] | None = None

    def _throughput_requests(self) -> list[Any]:
        """The throughput-compiled model's requests (one per stream), made on first use."""
        if self.requests is None:
            compiled = self.compiled.get("THROUGHPUT") or _compile(
                self.core, self.model, self.device, {**self.properties, "PERFORMANCE_HINT": "THROUGHPUT"}, self.path)
            self.compiled["THROUGHPUT"] = compiled
            count = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            self.requests = [compiled.create_infer_request() for _ in range(count)]
        return self.requests

    def _run_parallel(self, x: np.ndarray) -> np.ndarray:
        """Each image on its own request, as many at once as there are streams (plain start/wait: no Python
        callbacks run on OpenVINO's threads)."""
        requests, outputs = self._throughput_requests(), []
        for start in range(0, len(x), len(requests)):
            running = list(zip(requests, range(start, min(start + len(requests), len(x))), strict=False))
            for request, i in running:
                request.start_async({0: x[i:i + 1]})
            for request, _i in running:
                request.wait()
                outputs.append(request.get_output_tensor(0).data.copy())
        return np.concatenate(outputs)

    def __call__(self, batch: Any) -> np.ndarray:
        if not isinstance(batch, np.ndarray) and hasattr(batch, "detach"):  # a torch tensor
            batch = batch.detach().cpu().numpy()
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(x) > 1 and self.hint != "latency":
            out = self._run_parallel(x)
        else:
            self.request.infer({0: x})
            out = self.request.get_output_tensor(0).data.copy()  # the request reuses its buffer next call
        return np.asarray(out, dtype=np.float32)


def _metadata(path: Path, model: Any) -> dict[str, str]:
    if path.suffix.lower() == ".xml":
        return read_ir_metadata(path)
    keys = (CONFIG_KEY, "unet_deploy.precision", VERDICTS_KEY)  # an ONNX file: OpenVINO keeps its metadata_props there
    return {k: model.get_rt_info(["framework", k]).astype(str) for k in keys if model.has_rt_info(["framework", k])}


def _compiled_precision(compiled: Any, asked: str) -> str:
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # noqa: BLE001 - a device without the property runs what it was asked
        return asked
    name = value.to_string() if hasattr(value, "to_string") else str(value)
    return _PRECISION_OF_TYPE.get(name.lower(), asked)


def _properties(options: OpenVinoOptions, path: Path) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if options.precision != DEFAULT:
        properties["INFERENCE_PRECISION_HINT"] = _HINT_OF_PRECISION[options.precision]
    elif bf16_hidden():  # OpenVINO's own choice on a CPU the switch says has no bf16
        properties["INFERENCE_PRECISION_HINT"] = "f32"
    # the CPUs this process may use (affinity, cgroup quota): OpenVINO alone would take the host's cores
    properties["INFERENCE_NUM_THREADS"] = options.threads or usable_cpus()
    cache = _cache_dir(path) if options.cache else None
    if cache is not None:
        properties["CACHE_DIR"] = cache
    return properties


def load_openvino(path: Path, device: str, options: OpenVinoOptions) -> Any:
    """A :class:`~.backends.Backend` running ``path`` (.xml IR or .onnx) on OpenVINO ``device``."""
    from unet_deploy.runtime.base import Backend

    ov = import_openvino()
    core = openvino_core()
    target = openvino_device(device, list(core.available_devices))
    model = _read_model(core, path)
    meta = _metadata(path, model)
    config = DeployConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else DeployConfig()
    options, why = _runtime_precision(options, meta, target, path)
    runner = _OpenVinoRunner(core, model, target, _properties(options, path), options, path)
    compiled = next(iter(runner.compiled.values()))
    ran = _compiled_precision(compiled, options.precision)
    if ran != options.precision:
        log.warning("%s: OpenVINO on %s has no %s kernels here; it runs %s", path, target, options.precision, ran)
    exported = meta.get("unet_deploy.precision", "fp32")
    precision = "int8" if exported == "int8" else ran
    try:
        name = core.get_property(target, "FULL_DEVICE_NAME")
    except Exception:  # noqa: BLE001 - AUTO/HETERO have no single name
        name = target
    layers = f"int8, other layers {ran}" if exported == "int8" else ran
    provider = f"OpenVINO {ov.__version__.split('-')[0]} {target} ({name}), {layers}{why}"
    return Backend(name="openvino", path=path, device="cpu" if target == "CPU" else target, config=config,
                   provider=provider, precision=precision, options=options, call=runner)


def _runtime_precision(options: OpenVinoOptions, meta: dict[str, str], target: str,
                       path: Path) -> tuple[OpenVinoOptions, str]:
    """The options with a concrete precision ("auto": the fastest verified here) and, for "auto", why."""
    if options.precision == DEFAULT:
        return options, " (OpenVINO's default precision)"
    if options.precision == AUTO:
        choice = choose_precision(meta, openvino_cpu_has) if target == "CPU" else Choice("fp32", "fp32")
        return replace(options, precision=choice.precision), f" (auto: {choice.why})"
    if target == "CPU" and not openvino_cpu_has(options.precision):
        # the plugin would fall back to fp32 itself; asking it anyway crashed a long test process here
        log.warning("%s: OpenVINO on %s has no %s kernels here; it runs fp32", path, target, options.precision)
        return replace(options, precision="fp32"), ""
    verdict = (read_verdicts(meta).get("precisions") or {}).get(options.precision)
    if verdict is not None and not verdict.get("passed"):
        log.warning("%s: %s failed its parity check at export (masks may differ from fp32); --precision auto "
                    "runs the fastest verified precision", path, options.precision)
    return options, ""
