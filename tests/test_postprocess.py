"""Logits -> masks: the one post-processing shared by predict, evaluate, parity and benchmarks."""

from __future__ import annotations

import numpy as np
import torch

from unet_deploy.images.postprocess import colorize, logits_to_mask, probabilities


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


def _peak_bytes(fn, *args):
    """The most bytes numpy and Python held at once while ``fn(*args)`` ran (tracemalloc), and its result."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn(*args)
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


def _reference_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """overlay_image's formula on the whole image at once (what the blockwise version must equal)."""
    from unet_deploy.images.overlay import MIN_TINT_DISTANCE, PALETTE, _edges

    out = image.astype(np.float32)
    classes = np.clip(mask.astype(np.int64), 0, None)
    tints = PALETTE[np.arange(int(classes.max()) + 1) % len(PALETTE)]
    for c in range(1, len(tints)):
        under = out[classes == c]
        if len(under):
            mean = under.mean(axis=0)
            if np.linalg.norm(tints[c] - mean) < MIN_TINT_DISTANCE:
                tints[c] = PALETTE[1 + int(np.linalg.norm(PALETTE[1:] - mean, axis=1).argmax())]
    fg = classes > 0
    out = np.where(fg[..., None], (1 - alpha) * out + alpha * tints[classes], out)
    edge = _edges(classes)
    out[edge & fg] = 255.0
    out[edge & ~fg] = 0.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def test_large_masks_and_overlays_cost_their_own_bytes_not_float_copies() -> None:
    """A mask or overlay at the size of a large image is worked a block of rows at a time: the same pixels as
    the whole-image formula, with a peak of about the result's own size (a server admits images by their
    pixels: its memory per pixel must not depend on the image's size)."""
    from unet_deploy.images.overlay import overlay_image
    from unet_deploy.images.postprocess import resize_bilinear

    rng = np.random.default_rng(4)
    logits = rng.normal(size=(1, 2, 600, 900)).astype(np.float32)
    size = (1800, 2700)  # 4.9 M pixels: a full-size float32 copy alone would be 19 MB
    peak, mask = _peak_bytes(logits_to_mask, logits, size, 0.4)
    expected = resize_bilinear(logits[:, 1:2] - logits[:, :1], size)[:, 0] > np.log(0.4 / 0.6)
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))
    assert peak < 2.5 * mask.size, f"mask: peak {peak / mask.size:.1f} bytes per pixel"
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    blobs = (resize_bilinear(rng.normal(size=(1, 1, 30, 45)), size)[0, 0] > 0.3).astype(np.uint8)
    three = blobs + (np.arange(size[1])[None] > size[1] // 2).astype(np.uint8)  # classes 0, 1, 2
    for m in (blobs, three):
        peak, overlay = _peak_bytes(overlay_image, image, m)
        np.testing.assert_array_equal(overlay, _reference_overlay(image, m))
        assert peak < 4 * m.size, f"overlay: peak {peak / m.size:.1f} bytes per pixel"
