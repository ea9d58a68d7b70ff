"""Logits -> masks: the one post-processing shared by predict, evaluate, parity and benchmarks."""

from __future__ import annotations

import numpy as np
import torch

from unet_deploy.postprocess import colorize, logits_to_mask, probabilities


def test_binary_threshold_means_the_same_for_sigmoid_and_softmax_models() -> None:
    p = torch.tensor([0.1, 0.4, 0.6, 0.95]).reshape(1, 1, 1, 4)
    sigmoid_logits = torch.logit(p)
    softmax_logits = torch.cat([torch.zeros_like(p), torch.logit(p)], dim=1)  # softmax class 1 = p
    for t, expected in [(0.5, [0, 0, 1, 1]), (0.3, [0, 1, 1, 1]), (0.9, [0, 0, 0, 1])]:
        assert logits_to_mask(sigmoid_logits, None, t)[0, 0].tolist() == expected
        assert logits_to_mask(softmax_logits, None, t)[0, 0].tolist() == expected


def test_more_classes_take_the_argmax_and_ignore_the_threshold() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 1.0]]).reshape(1, 3, 1, 2)
    assert logits_to_mask(logits, None, 0.99)[0].tolist() == [[0, 1]]


def test_upsampling_to_the_original_size_and_probabilities() -> None:
    logits = torch.randn(1, 2, 8, 12)
    mask = logits_to_mask(logits, (31, 47))
    assert mask.shape == (1, 31, 47) and mask.dtype == np.uint8
    probs = probabilities(logits[0], (31, 47))
    assert probs.shape == (2, 31, 47) and np.allclose(probs.sum(0), 1, atol=1e-6)
    one = probabilities(logits[:, :1][0], None)
    assert one.shape == (2, 8, 12) and np.allclose(one.sum(0), 1)


def test_colorize_maps_classes_to_written_values() -> None:
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    assert colorize(mask, [0, 128, 255]).tolist() == [[0, 128], [255, 128]]
    assert colorize(mask, [[0, 0, 0], [255, 0, 0], [0, 0, 255]])[1, 0].tolist() == [0, 0, 255]
