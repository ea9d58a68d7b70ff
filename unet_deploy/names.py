"""The names and limits every command shares: backends, precisions, model file suffixes, the scale range and
the default paths. Light on purpose (no torch, no numpy): the CLI and the ONNX Runtime path import it."""

from __future__ import annotations

from pathlib import Path

from unet_deploy.errors import UserError

__all__ = ["BACKENDS", "PRECISIONS", "TORCH_PRECISIONS", "OPENVINO_PRECISIONS", "MODEL_SUFFIXES", "EXPORT_SUFFIXES",
           "backend_for_path", "is_checkpoint_file", "is_export_file", "SCALE_MAX", "scale_in_range",
           "check_scale", "CHECKPOINT_DIR", "DEFAULT_CHECKPOINT", "EXPORT_DIR", "DEMO_DIR", "MAX_DIR_IMAGES"]

#: Runtimes a model runs on, in table order; "torch" (eager) is the parity reference.
BACKENDS = ("torch", "torchscript", "ort", "openvino")
#: Every precision a model may run at (eager torch: fp32/fp16/bf16; ONNX files: fp32/fp16/int8).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: Precisions the eager torch backend converts a checkpoint to.
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
#: OpenVINO's inference-precision hints (the precision its kernels compute in; an int8 IR stays int8).
OPENVINO_PRECISIONS = ("fp32", "bf16", "fp16")
#: Model file suffix -> the backend that runs it.
MODEL_SUFFIXES = {
    ".pth": "torch", ".pt": "torch", ".ckpt": "torch",
    ".ts": "torchscript", ".torchscript": "torchscript", ".jit": "torchscript",
    ".onnx": "ort",
    ".xml": "openvino",  # OpenVINO IR: NAME.xml names the graph, NAME.bin beside it holds the weights
}
#: The suffix `unet-deploy export` writes for each exported backend.
EXPORT_SUFFIXES = {"torchscript": ".ts", "ort": ".onnx", "openvino": ".xml"}

#: Input scale factors are in (0, SCALE_MAX].
SCALE_MAX = 4.0

CHECKPOINT_DIR = "checkpoints"
#: What train writes last and best, and what export/predict/evaluate read when -m is omitted.
DEFAULT_CHECKPOINT = Path(CHECKPOINT_DIR) / "best.pth"
#: Where export writes and where predict looks for the newest .onnx / .ts.
EXPORT_DIR = "exported"
#: A folder given to export/verify --images adds its first this many images (by name) to the parity inputs.
MAX_DIR_IMAGES = 4
#: Where `unet-deploy demo` writes; its model is the fallback when none is here.
DEMO_DIR = "demo"


def backend_for_path(path: str | Path) -> str:
    """The backend that runs a model file, from its suffix (.pth/.pt -> torch, .ts -> torchscript,
    .onnx -> ort, .xml -> openvino); an unknown suffix is a one-line :class:`UserError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise UserError(f"{path}: cannot tell the backend from suffix {suffix!r}; use .pth (torch), "
                        ".ts (torchscript), .onnx (ort) or .xml (openvino), or pass --backend")
    return MODEL_SUFFIXES[suffix]


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether the suffix names a PyTorch checkpoint (.pth, .pt, .ckpt)."""
    return MODEL_SUFFIXES.get(Path(path).suffix.lower()) == "torch"


def is_export_file(path: str | Path) -> bool:
    """Whether the suffix names an exported model (TorchScript, ONNX or OpenVINO IR)."""
    return MODEL_SUFFIXES.get(Path(path).suffix.lower()) in EXPORT_SUFFIXES


def scale_in_range(value: float) -> bool:
    """Whether ``value`` is a usable input scale, in (0, SCALE_MAX] (NaN is not)."""
    return 0 < value <= SCALE_MAX


def check_scale(value: float, flag: str) -> float:
    """``value`` when it is in (0, 4]; otherwise a one-line :class:`UserError` naming ``flag``."""
    if not scale_in_range(value):
        raise UserError(f"{flag} {value:g}: a scale must be in (0, {SCALE_MAX:g}], e.g. 0.5")
    return value
