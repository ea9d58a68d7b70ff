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


def test_binary_masks_equal_thresholding_the_resized_probabilities() -> None:
    """The margin shortcut (resize z1 - z0 or z, compare with logit(t)) gives the mask of the textbook
    route (resize every logit, softmax/sigmoid, threshold); only pixels whose margin sits within float
    rounding of the threshold may differ."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    for classes in (1, 2):
        logits = 3 * torch.randn(2, classes, 61, 97, generator=g)
        up = F.interpolate(logits, size=(122, 195), mode="bilinear", align_corners=False)
        for t in (0.5, 0.2, 0.85):
            if classes == 1:
                prob = torch.sigmoid(up[:, 0])
                margin = up[:, 0]
            else:
                prob = torch.softmax(up, dim=1)[:, 1]
                margin = up[:, 1] - up[:, 0]
            want = (prob > t).numpy()
            got = logits_to_mask(logits, (122, 195), t).astype(bool)
            assert got.shape == want.shape == (2, 122, 195)
            near = (margin - float(np.log(t / (1 - t)))).abs().numpy() < 1e-5
            assert not (got != want)[~near].any()
            assert (got != want).sum() <= near.sum()
