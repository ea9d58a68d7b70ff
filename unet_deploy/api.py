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
subclasses with a one-line message, so a script can tell them apart: :class:`~unet_deploy.errors.InputError`
(an image or file it gave), :class:`~unet_deploy.errors.OptionError` (a value such as a backend name),
:class:`~unet_deploy.errors.ModelFileError`, :class:`~unet_deploy.errors.ParityError` (an export failed its
check: ``export(...).raise_for_failures()``) and :class:`~unet_deploy.errors.MissingDependencyError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from unet_deploy.config import DeployConfig
from unet_deploy.errors import InputError
from unet_deploy.images.image_io import image_to_array, load_image
from unet_deploy.images.postprocess import mask_values_image
from unet_deploy.predict import PredictOptions, PredictSummary, default_model, predict_arrays, predict_files
from unet_deploy.predict.shard import Group
from unet_deploy.predict.write import output_values
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
        """Load a model file for prediction.

        Args:
            model: a checkpoint (.pth), TorchScript (.ts), ONNX (.onnx) or OpenVINO IR (.xml) file; default:
                the one ``unet-deploy predict`` finds without ``-m``.
            backend: a registry name (``torch``, ``torchscript``, ``ort``, ``openvino``); default: the one the
                file's suffix names.
            device: ``auto`` (CUDA when visible), ``cpu`` or ``cuda[:N]``.
            backend_options: the backend's options (:class:`~unet_deploy.runtime.TorchOptions`,
                :class:`~unet_deploy.runtime.OrtOptions`, ...); default: its defaults.
            **predict_options: :class:`PredictOptions` fields, e.g. ``tile=640, tile_overlap=80`` for tiled
                inference (an image whose whole cannot fit in memory is tiled automatically unless
                ``auto_tile=False``).

        Returns:
            The predictor.

        Raises:
            ModelFileError: the file is missing, unreadable or not one the backend runs.
            OptionError: an unknown backend or an option the backend does not take.
        """
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
            raise InputError(f"predict: give a uint8 image array (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA, "
                            f"not {array.dtype} {array.shape}")
        # through PIL, so an array is converted exactly as the same pixels read from a file would be
        return image_to_array(Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array),
                              channels)

    def predict_many(self, images: Iterable[ImageLike]) -> Iterator[np.ndarray]:
        """Predict a sequence of images.

        Args:
            images: file paths, PIL images or uint8 arrays; consecutive images of one size run as batches of
                ``options.batch_size``.

        Yields:
            One (H, W) uint8 class-index mask per image, in order, at the image's size.

        Raises:
            InputError: an image that cannot be decoded or used, when its turn comes.
        """
        arrays = [self._array(image) for image in images]
        for result in predict_arrays(self.runner, arrays, self.options):
            if result.error is not None or result.mask is None:
                raise InputError(result.error or f"predict: no mask for image {result.job.index}")
            yield result.mask

    def predict(self, image: ImageLike) -> np.ndarray:
        """Predict one image.

        Args:
            image: a file path, a PIL image or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).

        Returns:
            The (H, W) uint8 class-index mask at the image's size (after EXIF rotation).

        Raises:
            InputError: the image cannot be decoded or used.
        """
        return next(self.predict_many([image]))

    def mask_image(self, mask: np.ndarray) -> Image.Image:
        """The image ``predict`` writes for a mask.

        Args:
            mask: a class-index mask from :meth:`predict`.

        Returns:
            A PIL image with each class as its mask value (0/255 for a binary model unless ``mask_values``).
        """
        return mask_values_image(mask, output_values(self.runner, self.options))

    def predict_files(self, inputs: Sequence[str | Path], outputs: Sequence[str | Path] | None = None,
                      group: Group | None = None) -> PredictSummary:
        """What ``unet-deploy predict INPUTS -o OUTPUTS`` does.

        Args:
            inputs: files, folders (their images) or globs.
            outputs: mask files or one folder (default: beside each input, ``*_OUT.png``).
            group: the torchrun process group when sharded (default: one process).

        Returns:
            The summary: files written, skipped and failed (failures are counted, not raised), the RLE file.
        """
        return predict_files(self.runner, inputs, self.options, outputs=outputs, group=group)


def export(checkpoint: str | Path | None = None, formats: str | Sequence[str] = "all", *, log: Log | None = None,
           **options: Any) -> ExportResult:
    """Export a checkpoint and verify each file against eager PyTorch; only files that pass are written.

    Args:
        checkpoint: this project's or Pytorch-UNet's ``.pth`` (default: ``checkpoints/best.pth``).
        formats: ``"onnx"``, ``"torchscript"``, ``"openvino"``, several joined by commas, ``"all"``, or a list.
        log: receives progress lines and parity tables (default: silent).
        **options: :class:`~unet_deploy.export.exporter.ExportOptions` fields (``output``, ``name``, ``opset``,
            ``verify``, ``images``, ``quick_verify``, ``int8``, ``calibration``, ``calibration_count``,
            ``fp16``).

    Returns:
        The :class:`~unet_deploy.export.exporter.ExportResult`: ``written`` lists (format, path) of the files
        written; ``passed`` is False when a file failed its check, and ``raise_for_failures()`` raises
        :class:`~unet_deploy.errors.ParityError` then.

    Raises:
        OptionError: an unknown format or an invalid option, before anything is written.
        MissingDependencyError: a format whose runtime is not installed (OpenVINO is an extra).
    """
    from unet_deploy.export.exporter import ExportOptions, parse_formats, run_export

    words = parse_formats(formats) if isinstance(formats, str) else [f for w in formats for f in parse_formats(w)]
    for key in ("output", "calibration"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    options["images"] = tuple(Path(p) for p in options.get("images") or ())
    opts = ExportOptions(formats=tuple(dict.fromkeys(words)), **options)
    return run_export(Path(checkpoint) if checkpoint is not None else None, opts, log or (lambda _line: None))
