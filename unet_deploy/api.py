"""The Python API: what the ``unet-deploy`` commands do, from a script.

::

    from unet_deploy.api import Predictor, export

    done = export("checkpoints/best.pth", "onnx")          # verified exported/best.onnx
    predictor = Predictor.load("exported/best.onnx")        # any .pth / .ts / .onnx, any device
    mask = predictor.predict("car.jpg")                     # (H, W) uint8 class indices, the image's size
    predictor.mask_image(mask).save("car_mask.png")         # the model's mask values (0/255 for binary)
    summary = predictor.predict_files(["data/test/"], outputs=["masks/"])   # what `predict` writes
    big = Predictor.load("exported/best.onnx", tile=640)    # tiles of <= 640 px: memory of a tile, not the image

A :class:`Predictor` runs the same stages as ``unet-deploy predict`` (preprocessing, batching, the model,
post-processing with optional flip TTA and dense CRF), so a mask from :meth:`Predictor.predict` has the
pixels ``predict`` writes for the same file and options. Errors are :class:`~unet_deploy.errors.UserError`
with a one-line message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from unet_deploy.config import DeployConfig
from unet_deploy.errors import UserError
from unet_deploy.images.image_io import image_to_array, load_image
from unet_deploy.predict import PredictOptions, PredictSummary, default_model, predict_arrays, predict_files
from unet_deploy.predict.shard import Group
from unet_deploy.predict.write import mask_values_image, output_values
from unet_deploy.runtime.backend_options import BackendOptions
from unet_deploy.runtime.base import Backend, Description
from unet_deploy.runtime.loader import load_backend

if TYPE_CHECKING:  # the export pipeline loads torch: only export() imports it, so ONNX Runtime use never does
    from unet_deploy.export.exporter import ExportResult, Log

__all__ = ["Predictor", "export", "ImageLike"]

#: What :meth:`Predictor.predict` takes: a file path, a PIL image, or a uint8 array (H, W) or (H, W, 1|3|4).
ImageLike = str | Path | Image.Image | np.ndarray


class Predictor:
    """A loaded model (any backend) plus prediction options (``PredictOptions``: scale, threshold, mask
    values, batch size, crf, tta, ...; ``None`` fields take the model's embedded config)."""

    def __init__(self, runner: Backend, options: PredictOptions | None = None):
        self.runner = runner
        self.options = options or PredictOptions()

    @classmethod
    def load(cls, model: str | Path | None = None, *, backend: str | None = None, device: str = "auto",
             backend_options: BackendOptions | None = None, **predict_options: Any) -> Predictor:
        """Load ``model`` (.pth, .ts or .onnx; default: as ``predict`` finds it) on ``device`` ("auto":
        CUDA when visible). ``backend_options``: :class:`~unet_deploy.runtime.TorchOptions`,
        :class:`~unet_deploy.runtime.OrtOptions`, ...; ``predict_options``: :class:`PredictOptions` fields
        (e.g. ``tile=640, tile_overlap=80`` for tiled inference; an image whose whole cannot fit in memory
        is tiled automatically unless ``auto_tile=False``)."""
        path = Path(model) if model is not None else default_model(backend)
        options = PredictOptions(**predict_options)
        return cls(load_backend(path, backend, device, backend_options), options)

    @property
    def config(self) -> DeployConfig:
        """The model's architecture and inference settings (scale, threshold, mask values)."""
        return self.runner.config

    def describe(self) -> Description:
        """backend, precision, provider, device and path (``str()``: one line)."""
        return self.runner.describe()

    def _array(self, image: ImageLike) -> np.ndarray:
        channels = self.config.model.n_channels
        if isinstance(image, (str, Path)):
            return load_image(image, channels)
        if isinstance(image, Image.Image):
            return image_to_array(image, channels)
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise UserError(f"predict: give a uint8 image array (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA, "
                            f"not {array.dtype} {array.shape}")
        # through PIL, so an array is converted exactly as the same pixels read from a file would be
        return image_to_array(Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array),
                              channels)

    def predict_many(self, images: Iterable[ImageLike]) -> Iterator[np.ndarray]:
        """One mask per image, in order; consecutive images of one size run as batches of
        ``options.batch_size``. A bad image raises :class:`UserError` when its turn comes."""
        arrays = [self._array(image) for image in images]
        for result in predict_arrays(self.runner, arrays, self.options):
            if result.error is not None or result.mask is None:
                raise UserError(result.error or f"predict: no mask for image {result.job.index}")
            yield result.mask

    def predict(self, image: ImageLike) -> np.ndarray:
        """The class-index mask (H, W) uint8 of one image, at the image's size (after EXIF rotation)."""
        return next(self.predict_many([image]))

    def mask_image(self, mask: np.ndarray) -> Image.Image:
        """A class-index mask as the PNG ``predict`` writes (each class as its mask value)."""
        return mask_values_image(mask, output_values(self.runner, self.options))

    def predict_files(self, inputs: Sequence[str | Path], outputs: Sequence[str | Path] | None = None,
                      group: Group | None = None) -> PredictSummary:
        """What ``unet-deploy predict INPUTS -o OUTPUTS`` does: files, folders or globs -> mask files,
        overlays and the RLE submission as the options say; failures are counted in the summary."""
        return predict_files(self.runner, inputs, self.options, outputs=outputs, group=group)


def export(checkpoint: str | Path | None = None, formats: str | Sequence[str] = "all", *, log: Log | None = None,
           **options: Any) -> ExportResult:
    """Export ``checkpoint`` (default: checkpoints/best.pth) to ``formats`` ("onnx", "torchscript", "all" or
    a list) and verify each file against eager PyTorch; only files that pass are written.

    ``options`` are :class:`~unet_deploy.export.exporter.ExportOptions` fields (``output``, ``name``, ``opset``,
    ``verify``, ``images``, ``quick_verify``, ``int8``, ``calibration``, ``calibration_count``, ``fp16``).
    ``log`` receives progress lines and parity tables (default: silent). ``result.passed`` is False when any
    file failed its check; ``result.written`` lists (format, path) of the files written."""
    from unet_deploy.export.exporter import ExportOptions, parse_formats, run_export

    words = parse_formats(formats) if isinstance(formats, str) else [f for w in formats for f in parse_formats(w)]
    for key in ("output", "calibration"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    options["images"] = tuple(Path(p) for p in options.get("images") or ())
    opts = ExportOptions(formats=tuple(dict.fromkeys(words)), **options)
    return run_export(Path(checkpoint) if checkpoint is not None else None, opts, log or (lambda _line: None))
