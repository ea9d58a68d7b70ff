"""ONNX Runtime session settings: execution providers, the tuned session options, and glibc's return of
large freed blocks to the system. No torch here: the ONNX Runtime path never imports it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from unet_deploy.errors import UserError

__all__ = ["ORT_PROFILES", "physical_cores", "ort_providers", "ort_session_options", "release_large_frees",
           "MMAP_THRESHOLD_BYTES"]

#: ONNX Runtime session settings: "tuned" (this package's, see :func:`ort_session_options`) or "default"
#: (ONNX Runtime's own defaults, kept to measure the tuning against).
ORT_PROFILES = ("tuned", "default")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's vector units), within its CPU
    affinity and cgroup quota (:func:`unet_deploy.runtime.cpu_share.usable_cpus`)."""
    from unet_deploy.runtime.cpu_share import usable_cpus

    return usable_cpus()


def ort_providers(device: str) -> list[Any]:
    """CPU, or CUDA with CPU as fallback for the few ops CUDA lacks. CUDA options: HEURISTIC cuDNN
    algorithm choice (no slow exhaustive search on each new input shape) and cuDNN's default workspace
    instead of the largest one (``cudnn_conv_use_max_workspace`` 0: bounded memory)."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        cuda = {"device_id": index, "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "0",
                "do_copy_in_default_stream": "1"}
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session_options(threads: int | None = None, profile: str = "tuned") -> Any:
    """ONNX Runtime session options.

    ``tuned`` (the default): all graph optimisations (on x86 this includes the NCHWc convolution layout),
    ``intra_op_num_threads`` = ``threads`` or the physical cores this process may use (hyper-threads only
    contend for the same vector units; affinity and the cgroup quota count), threads that sleep rather than
    spin when idle, sequential execution, and no memory arena: the arena keeps every
    block it ever grew to, which raises peak memory on large inputs for little speed (the benchmark's
    ``ort-default`` variant measures the difference). The ``ort`` backend also calls :func:`release_large_frees` before
    it builds a tuned session (sessions made elsewhere from these options do not get that).
    ``default``: ONNX Runtime's own defaults, only ``threads`` applied.
    """
    import onnxruntime as ort

    if profile not in ORT_PROFILES:
        raise UserError(f"ORT profile {profile!r}: use {' or '.join(ORT_PROFILES)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: every ORT error also comes back as an exception (one line in the CLI)
    if profile == "default":
        if threads:
            opts.intra_op_num_threads = threads
        return opts
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: a U-Net call is long (tens of ms and more), so spinning wins
    # nothing, while spinning threads take CPU from the decoders, CRF workers and other jobs beside them.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_cpu_mem_arena = False
    return opts


#: Allocations at least this large get their own memory mapping from glibc, returned to the system when
#: freed (see :func:`release_large_frees`).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)
_malloc_tuned = False


def release_large_frees() -> bool:
    """Make glibc hand freed blocks of 1 MiB and more straight back to the system (once per process).

    glibc raises its mmap threshold each time a large mapped block is freed, up to 32 MiB, after which
    blocks below that size come from the heap and stay resident once freed. ONNX Runtime without its
    arena allocates and frees every activation on each run, so the heap would keep dead copies of weights
    and tensors; with a fixed threshold they go back to the system, at the same speed. A no-op where the
    C library is not glibc. Returns whether the setting is in force.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _malloc_tuned
