"""The memory bound of a server process, printed at start and shown by ``GET /v1/model``:

    RSS <= ready + model call + images + uploads + connections

* **ready**: the RSS once the model is loaded and has answered its warm-up image;
* **model call**: the estimate (:func:`unet_deploy.runtime.resources.estimate_inference_bytes`) of the largest network
  call: ``--max-batch`` inputs of at most :data:`~unet_deploy.serve.engine.WHOLE_MAX_PIXELS` network pixels
  (larger images run as tiles of that size, or ``--tile``), doubled for flip TTA;
* **images**: ``--pixel-budget`` decoded pixels, each costing at most :func:`bytes_per_pixel` at any step
  (admitted from the header before decoding and counted until the last step on it has returned);
* **uploads**: ``--max-uploads`` bodies, each in memory up to :data:`~unet_deploy.serve.upload.SPOOL_BYTES`;
* **connections**: :data:`~unet_deploy.serve.protocol.MAX_CONNECTIONS`, each with up to
  :data:`~unet_deploy.serve.protocol.MAX_HEADER_BYTES` of headers and uvicorn's 64 KiB of body buffer.

Dense CRF runs in its own processes (``--crf-workers``): their memory is theirs, not in this bound.
``tests/test_serve_limits.py`` and ``benchmarks/serve_load.py --hostile`` measure the peak RSS against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unet_deploy.runtime.resources import estimate_inference_bytes, format_bytes
from unet_deploy.serve.protocol import MAX_CONNECTIONS, MAX_HEADER_BYTES
from unet_deploy.serve.upload import SPOOL_BYTES

__all__ = ["MemoryBound", "bytes_per_pixel", "memory_bound", "DECODE_BYTES", "ENCODE_BYTES"]

#: bytes per pixel while an image is decoded, beyond the decoded array: Pillow's 4-byte RGBX buffer and the
#: copies of a mode conversion (the worst: RGBA and palette images composited on white, about 5 copies)
DECODE_BYTES = 20
#: bytes per pixel while an answer is encoded, beyond the image: the mask, an overlay and Pillow's copy of it,
#: the PNG being written
ENCODE_BYTES = 11
_BODY_BUFFER = 64 * 1024  #: uvicorn's per-connection body buffer before it pauses reading


def bytes_per_pixel(scale: float, classes: int, channels: int) -> float:
    """The most bytes one decoded pixel of an admitted image costs at any step: the decoded image (kept to the
    end) plus the heaviest step: decoding, the network side at ``scale`` (its float32 input and logits, or
    its tiles' stitched logits) with the mask, or encoding."""
    network = scale * scale * (4 * channels + 4 * max(classes, 2)) + 1
    return channels + max(DECODE_BYTES, ENCODE_BYTES, network)


@dataclass(frozen=True)
class MemoryBound:
    """The terms of the bound, in bytes."""

    ready: int
    model: int
    images: int
    uploads: int
    connections: int
    per_pixel: float

    @property
    def total(self) -> int:
        return self.ready + self.model + self.images + self.uploads + self.connections

    def line(self, pixel_budget: int) -> str:
        return (f"memory bound {format_bytes(self.total)}: ready {format_bytes(self.ready)} + model call "
                f"{format_bytes(self.model)} + images {format_bytes(self.images)} (--pixel-budget "
                f"{pixel_budget:,} x {self.per_pixel:g} B) + uploads {format_bytes(self.uploads)} + connections "
                f"{format_bytes(self.connections)}")


def memory_bound(backend: Any, options: Any, ready: int, largest_call: int) -> MemoryBound:
    """The bound of a server with this ``backend`` and ``options`` (:class:`ServeOptions`, max batch set),
    whose RSS was ``ready`` bytes after its warm-up; ``largest_call``: network pixels of the largest input."""
    model = backend.config.model
    side = int(largest_call ** 0.5)
    images = 2 * int(options.max_batch or 1)  # flip TTA runs each input and its mirror in one call
    call = estimate_inference_bytes(model, side, side, images, getattr(backend, "name", "torch"),
                                    getattr(backend, "precision", "fp32"))
    per_pixel = bytes_per_pixel(backend.config.inference.scale, model.n_classes, model.n_channels)
    return MemoryBound(ready=ready, model=call, images=int(options.pixel_budget * per_pixel),
                       uploads=options.max_uploads * SPOOL_BYTES,
                       connections=MAX_CONNECTIONS * (MAX_HEADER_BYTES + _BODY_BUFFER), per_pixel=per_pixel)
