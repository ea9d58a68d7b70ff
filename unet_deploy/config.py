"""The configuration that travels with a model: saved in checkpoints, embedded in every export,
read back by ``predict`` so a user never has to repeat ``--classes`` or ``--scale`` by hand."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy

from unet_deploy import __version__
from unet_deploy.names import SCALE_MAX, scale_in_range

__all__ = [
    "ModelConfig",
    "InferenceConfig",
    "DeployConfig",
    "PREPROCESSING",
    "CONFIG_KEY",
    "versions",
]

#: Key under which the JSON config is stored: TorchScript ``_extra_files`` name and ONNX metadata key.
CONFIG_KEY = "unet_deploy.json"

#: How images are turned into network input -- identical to Pytorch-UNet's ``BasicDataset.preprocess``.
PREPROCESSING: dict[str, Any] = {
    "color": "RGB",
    "resize": "bicubic",
    "mask_resize": "nearest",
    "divide_by": 255.0,
    "mean_std": None,
    "layout": "NCHW",
    "dtype": "float32",
}


def _from_known(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``data``, ignoring keys a newer version may have added."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ModelConfig:
    n_channels: int = 3
    n_classes: int = 2
    bilinear: bool = False
    base_channels: int = 64
    conv_bias: bool = False

    def build(self):
        from unet_deploy.model import UNet  # torch: the ONNX Runtime predict path imports this module

        return UNet(self.n_channels, self.n_classes, self.bilinear, self.base_channels, self.conv_bias)

    @property
    def architecture(self) -> str:
        up = "bilinear" if self.bilinear else "transposed"
        return f"unet-{up}-w{self.base_channels}-c{self.n_channels}-k{self.n_classes}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_known(cls, data)


@dataclass(frozen=True)
class InferenceConfig:
    """How predictions are made: input scale, threshold (one class), the mask values written out and the CRF.

    ``mask_values[i]`` is the pixel value written for class ``i`` (Pytorch-UNet's convention); ``None``
    means "0/255 for one or two classes, the class index otherwise". ``crf``: the dense-CRF choice of
    ``train --crf auto`` (:class:`unet_deploy.images.crf.CRFChoice` as a dict), which ``predict --crf``
    uses; ``None``: the default parameters.
    """

    scale: float = 0.5
    threshold: float = 0.5
    mask_values: list[Any] | None = None
    crf: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not scale_in_range(self.scale):  # a ValueError: callers name the flag or file it came from
            raise ValueError(f"scale must be in (0, {SCALE_MAX:g}], got {self.scale}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def output_values(self, n_classes: int) -> list[Any]:
        """Pixel values written to mask files for each class (binary: 0 and 255)."""
        if self.mask_values and len(self.mask_values) >= max(n_classes, 2):
            values = list(self.mask_values)
            if n_classes <= 2 and values[:2] in ([0, 1], [False, True]):
                return [0, 255]
            return values
        if n_classes <= 2:
            return [0, 255]
        return list(range(n_classes))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferenceConfig:
        return _from_known(cls, data)


def versions() -> dict[str, str]:
    import torch  # not on the ONNX Runtime predict path, which imports this module

    out = {"unet_deploy": __version__, "torch": str(torch.__version__), "numpy": numpy.__version__,
           "python": platform.python_version()}
    try:
        import onnx  # not on the ONNX Runtime predict path

        out["onnx"] = str(onnx.__version__)
    except ImportError:
        pass
    try:
        import onnxruntime  # optional runtime

        out["onnxruntime"] = str(onnxruntime.__version__)
    except ImportError:
        pass
    return out


@dataclass
class DeployConfig:
    """Everything an exported model needs to be used correctly, as one JSON document."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(PREPROCESSING))
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint path / sha256 / format
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "inference": asdict(self.inference),
            "preprocessing": dict(self.preprocessing),
            "source": dict(self.source),
            "versions": dict(self.versions),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeployConfig:
        return cls(
            model=ModelConfig.from_dict(data.get("model", {})),
            inference=InferenceConfig.from_dict(data.get("inference", {})),
            preprocessing=dict(data.get("preprocessing") or PREPROCESSING),
            source=dict(data.get("source") or {}),
            versions=dict(data.get("versions") or {}),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> DeployConfig:
        return cls.from_dict(json.loads(text))
