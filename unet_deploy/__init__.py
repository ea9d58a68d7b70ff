"""unet-deploy: train, export, verify, predict with and benchmark Pytorch-UNet segmentation models.

The Python API is :mod:`unet_deploy.api`: ``Predictor.load(path).predict(image) -> mask`` and
``export(checkpoint, formats)`` (``from unet_deploy.api import Predictor, export``). ``import unet_deploy``
itself stays light: the API loads torch and the runtimes when it is imported.
"""

import importlib
from collections.abc import Callable
from typing import Any

from unet_deploy.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__", "lazy_exports"]


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` (PEP 562) for a package whose names load on first use.

    Args:
        package: the package's ``__name__``.
        homes: exported name -> the module that defines it: a submodule name relative to ``package``, or an
            absolute ``unet_deploy.…`` module name.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package's ``__init__``: importing the package then costs
        nothing, and ``from package import name`` imports only the submodule that defines ``name`` (so torch
        or a runtime is loaded only by the commands that use it).
    """
    namespace = importlib.import_module(package).__dict__

    def getattr_(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = home if home.startswith("unet_deploy.") else f"{package}.{home}"
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return getattr_, dir_
