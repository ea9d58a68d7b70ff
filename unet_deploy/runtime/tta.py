"""Test-time augmentation: average the class probabilities of an image and of its left-right mirror.

:func:`flip_tta` wraps any :class:`~unet_deploy.runtime.Backend` (eager torch, TorchScript, ONNX Runtime)
in another ``Backend``. It runs the batch and its horizontal flip in one call, flips the second half's
logits back, averages the *probabilities* and returns logits whose softmax (or sigmoid, for one-class
models) are exactly those averages. So every later step -- upsampling, threshold/argmax, dense CRF --
works on TTA output unchanged. Numpy logits (ONNX Runtime on the CPU) are averaged in numpy, without torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from unet_deploy.runtime.base import Backend

if TYPE_CHECKING:
    import torch

__all__ = ["flip_tta", "average_flip_logits"]

_LOG2 = math.log(2.0)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _average_numpy(plain: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    back = flipped[..., ::-1]
    if plain.shape[1] == 1:
        log_p = np.logaddexp(_log_sigmoid(plain), _log_sigmoid(back)) - _LOG2
        log_q = np.logaddexp(_log_sigmoid(-plain), _log_sigmoid(-back)) - _LOG2
        return (log_p - log_q).astype(np.float32)
    return (np.logaddexp(_log_softmax(plain), _log_softmax(back)) - _LOG2).astype(np.float32)


def average_flip_logits(plain: Any, flipped: Any) -> Any:
    """Logits whose probabilities are the mean of ``plain``'s and of the mirrored-back ``flipped``'s.

    Both are (N, C, H, W) torch tensors or both numpy arrays (the result is of the same kind); ``flipped``
    holds the logits of the mirrored inputs (still mirrored). Worked in log space (logsumexp), so
    confident pixels neither underflow nor become infinite.
    """
    if isinstance(plain, np.ndarray):
        return _average_numpy(plain, np.asarray(flipped))
    import torch
    import torch.nn.functional as F

    back = torch.flip(flipped, dims=[-1])
    if plain.shape[1] == 1:  # sigmoid model: logit of the mean of two sigmoids
        log_p = torch.logaddexp(F.logsigmoid(plain), F.logsigmoid(back)) - _LOG2
        log_q = torch.logaddexp(F.logsigmoid(-plain), F.logsigmoid(-back)) - _LOG2
        return log_p - log_q
    return torch.logaddexp(F.log_softmax(plain, dim=1), F.log_softmax(back, dim=1)) - _LOG2


class _FlipRunner:
    def __init__(self, inner: Backend):
        self.inner = inner

    def __call__(self, batch: np.ndarray | torch.Tensor) -> Any:
        both: Any
        if not isinstance(batch, np.ndarray) and hasattr(batch, "detach"):  # a torch tensor
            import torch  # only when torch runs the model: the ONNX Runtime path stays numpy

            both = torch.cat([batch, torch.flip(batch, dims=[-1])])
        else:
            array = np.asarray(batch)
            both = np.ascontiguousarray(np.concatenate([array, array[..., ::-1]]))
        logits = self.inner.run(both)
        logits = logits.astype(np.float32) if isinstance(logits, np.ndarray) else logits.float()
        n = logits.shape[0] // 2
        return average_flip_logits(logits[:n], logits[n:])


def flip_tta(backend: Backend) -> Backend:
    """A Backend that predicts ``batch`` and its horizontal flip (one call of twice the batch) and
    returns the flip-averaged logits; name, config and device are the wrapped backend's."""
    return backend.wrapped(_FlipRunner(backend), "flip TTA")
