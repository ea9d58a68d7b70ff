"""Latency and peak-memory measurement shared by ``unet-deploy benchmark`` and ``benchmarks/``.

One benchmark run (:func:`run_benchmark`, :mod:`.runner`):

1. obtains a model -- a checkpoint given with ``-m``, or a freshly initialised model of the seed
   architecture (seeded, so every run measures the same weights) -- and exports it to TorchScript and
   ONNX once, into a temporary (or cache) folder (:mod:`.artifacts`);
2. preprocesses one synthetic Carvana-sized image at every requested scale (the same input for every
   backend; :mod:`.inputs`);
3. runs every backend x scale case in a FRESH Python process (:func:`run_case_isolated`, :mod:`.probe` and
   :mod:`.worker`), so backends do not share allocator caches, thread pools or imported libraries: the
   process records its resident memory after imports, loads the backend, warms up while a thread samples
   memory (:mod:`.memory`), then times ``runs`` calls (CUDA is synchronised around each call);
4. compares every backend's logits to eager PyTorch on the same input (parity, :mod:`.cases`), and collects
   machine facts (:mod:`.machine`), so the numbers can be pasted into an issue (:func:`render_table`,
   :func:`render_markdown`) or kept as JSON (:func:`write_json`) and a plot (:func:`write_plot`).

Variant names (``torch-bf16-cl``, ``ort-int8``) are parsed in :mod:`.variants`; ratios, before/after and
targets are in :mod:`.analysis`; the optional roofline and stage timing in :mod:`.roofline` and
:mod:`.stages`.

Peak memory is the growth over the process's own baseline after imports: the peak resident set (RSS) on
CPU, device memory in use (driver view, also covering ONNX Runtime's arena) on CUDA.
"""

from __future__ import annotations

from unet_deploy.bench.analysis import before_after, speedups, targets
from unet_deploy.bench.artifacts import ModelFiles, prepare_models
from unet_deploy.bench.cases import parity
from unet_deploy.bench.inputs import end_to_end, synthetic_image, write_jpeg
from unet_deploy.bench.machine import UNSTEADY_SPREAD, machine_facts, reliability, reliability_notes, unsteady
from unet_deploy.bench.peak_memory import peak_rss_bytes, reset_peak_rss
from unet_deploy.bench.probe import CaseSpec, latency_stats, run_case, run_case_isolated
from unet_deploy.bench.render.markdown import FULL_RUN, render_markdown
from unet_deploy.bench.render.plot import write_plot
from unet_deploy.bench.render.report_json import write_json
from unet_deploy.bench.render.table import render_roofline, render_speedups, render_table, render_targets
from unet_deploy.bench.runner import run_benchmark
from unet_deploy.bench.settings import (
    CARVANA_SIZE,
    DEFAULT_SCALES,
    QUICK_BASE_CHANNELS,
    QUICK_ENV,
    QUICK_SIZE,
    SCHEMA,
    BenchSettings,
    quick_from_env,
    reproduce_command,
    resolve_settings,
)
from unet_deploy.bench.stages import PIPELINE_TARGET, STAGES_SCHEMA, measure_stages
from unet_deploy.bench.variants import (
    BENCH_BACKENDS,
    VARIANT_HELP,
    Variant,
    default_backends,
    expand_variants,
    parse_variant,
)

__all__ = [
    "QUICK_ENV", "CARVANA_SIZE", "QUICK_SIZE", "QUICK_BASE_CHANNELS", "DEFAULT_SCALES", "BENCH_BACKENDS", "SCHEMA",
    "BenchSettings", "ModelFiles", "CaseSpec", "quick_from_env", "resolve_settings", "prepare_models",
    "synthetic_image", "write_jpeg", "end_to_end", "run_case", "run_case_isolated", "parity",
    "latency_stats", "machine_facts", "run_benchmark", "speedups", "render_table", "render_speedups",
    "render_markdown", "render_targets", "render_roofline", "reliability", "reliability_notes", "unsteady",
    "UNSTEADY_SPREAD", "Variant", "parse_variant", "expand_variants", "default_backends", "VARIANT_HELP",
    "targets", "before_after",
    "measure_stages", "STAGES_SCHEMA", "PIPELINE_TARGET", "FULL_RUN", "peak_rss_bytes", "reset_peak_rss",
    "reproduce_command", "write_json", "write_plot",
]
