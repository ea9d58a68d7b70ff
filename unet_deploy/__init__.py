"""unet-deploy: train, export, verify, predict with and benchmark Pytorch-UNet segmentation models."""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
