"""unet-deploy: train, export, verify, predict with and benchmark Pytorch-UNet segmentation models.

The Python API is :mod:`unet_deploy.api`: ``Predictor.load(path).predict(image) -> mask`` and
``export(checkpoint, formats)`` (``from unet_deploy.api import Predictor, export``). ``import unet_deploy``
itself stays light: the API loads torch and the runtimes when it is imported.
"""

from unet_deploy.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__"]
