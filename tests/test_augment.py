"""Augmentation: image and mask stay aligned, masks keep their labels, runs are reproducible per seed."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from unet_deploy.errors import UserError
from unet_deploy.images.augment import PRESETS, AugmentConfig, AugmentTransform, build_transform, preset
from unet_deploy.train.losses import boundary_band

GEOMETRY = AugmentConfig(hflip=0.5, scale=0.25, shift=0.1, rotate=20.0, geometric_p=1.0)


def _shapes_mask(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), dtype=np.int64)
    mask[((xx - 24) / 14) ** 2 + ((yy - 26) / 10) ** 2 < 1] = 1
    mask[8:20, 40:58] = 2
    return mask


def _encoded(mask: np.ndarray) -> np.ndarray:
    """An image whose pixels spell the mask: class c -> grey level 100 * c in every channel."""
    return np.repeat((mask * 100).astype(np.uint8)[..., None], 3, axis=2)


def test_geometric_augmentation_keeps_image_and_mask_aligned():
    mask = _shapes_mask()
    image = _encoded(mask)
    t = AugmentTransform(GEOMETRY, seed=3)
    moved = 0
    for _ in range(12):
        img, m = t(image, mask)
        assert img.shape == image.shape and img.dtype == np.uint8
        assert m.shape == mask.shape and m.dtype == mask.dtype
        assert set(np.unique(m)) <= {0, 1, 2}  # nearest interpolation: no blended labels
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
        decoded = np.rint(img[..., 0] / 100.0).astype(np.int64)
        wrong = decoded != m
        # Bilinear image interpolation blends only pixels on an edge; everywhere else the warped image
        # still spells the warped mask.
        assert not (wrong & ~boundary_band(m, 2)).any()
        moved += int((m != mask).any())
    assert moved >= 10  # the transform really moved things


def test_flip_override_mirrors_both():
    mask = _shapes_mask()
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    t = build_transform(preset("none", hflip=1.0), seed=0)
    img, m = t(image, mask)
    np.testing.assert_array_equal(img, image[:, ::-1])
    np.testing.assert_array_equal(m, mask[:, ::-1])


def test_colour_jitter_changes_pixels_not_the_mask():
    mask = _shapes_mask()
    image = (np.random.default_rng(1).random((48, 64, 3)) * 200 + 20).astype(np.uint8)
    cfg = AugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, color_p=1.0)
    assert cfg.photometric and not cfg.geometric
    t = AugmentTransform(cfg, seed=0)
    for _ in range(3):
        img, m = t(image, mask)
        np.testing.assert_array_equal(m, mask)
        assert np.abs(img.astype(int) - image.astype(int)).mean() > 1.0


def _draws(t: AugmentTransform, n: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    mask = _shapes_mask()
    image = (np.random.default_rng(2).random((48, 64, 3)) * 255).astype(np.uint8)
    return [t(image, mask) for _ in range(n)]


def test_same_seed_same_augmentations_other_seed_different():
    a, b, c = (_draws(AugmentTransform(PRESETS["default"], seed=s)) for s in (7, 7, 8))
    for (ia, ma), (ib, mb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    assert any(not np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(a, c, strict=True))
    # global RNG state does not leak in
    np.random.seed(123)
    torch.manual_seed(123)
    d = _draws(AugmentTransform(PRESETS["default"], seed=7))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, d, strict=True))


def test_pickled_transform_restarts_its_stream():
    t = AugmentTransform(PRESETS["light"], seed=5)
    first = _draws(t, 3)
    clone = pickle.loads(pickle.dumps(t))
    again = _draws(clone, 3)
    for (ia, ma), (ib, mb) in zip(first, again, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)


class _Repeat(torch.utils.data.Dataset):
    """The same pair at every index, augmented: what differs between items is only the random draw."""

    def __init__(self, transform: AugmentTransform, n: int = 8):
        self.transform, self.n = transform, n
        self.mask = _shapes_mask()
        self.image = _encoded(self.mask)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        _, m = self.transform(self.image, self.mask)
        return torch.from_numpy(m)


def _loader_masks(seed: int) -> list[torch.Tensor]:
    ds = _Repeat(AugmentTransform(GEOMETRY, seed=seed))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, shuffle=False,
                                         multiprocessing_context="fork")
    return [b[0] for b in loader]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_dataloader_workers_are_reproducible_and_do_not_repeat_each_other():
    a = _loader_masks(11)
    b = _loader_masks(11)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # items 0,2,4,... come from worker 0 and 1,3,5,... from worker 1: with one shared stream they
    # would be pairwise identical
    assert any(not torch.equal(a[i], a[i + 1]) for i in range(0, len(a), 2))


def test_segmentation_dataset_applies_the_transform(tmp_path):
    from unet_deploy.images.image_io import Pair
    from unet_deploy.train import SegmentationDataset

    mask = (_shapes_mask() > 0).astype(np.uint8)
    Image.fromarray(_encoded(mask * 2)).save(tmp_path / "a.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "a_mask.png")
    pairs = [Pair("a", tmp_path / "a.png", tmp_path / "a_mask.png")]
    plain = SegmentationDataset(pairs, 1.0, [0, 1])[0]
    flipped = SegmentationDataset(pairs, 1.0, [0, 1], transform=build_transform(preset("none", hflip=1.0)))[0]
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))


def test_presets_and_validation():
    assert build_transform("none") is None
    assert not PRESETS["none"].active
    assert all(PRESETS[p].vflip == 0 for p in PRESETS)  # cars are not upside down
    assert preset("none", rotate=15).geometric  # an explicit amount switches its part on
    with pytest.raises(UserError, match="--augment"):
        preset("wild")
    with pytest.raises(UserError, match="--hflip"):
        preset("default", hflip=1.5)
    with pytest.raises(UserError, match="--rotate"):
        preset("default", rotate=-3)
