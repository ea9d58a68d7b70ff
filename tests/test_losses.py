"""Edge weight maps peak on mask edges; boundary bands and accuracy; the warm-up + cosine schedule."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from unet_deploy.errors import UserError
from unet_deploy.images.dice import dice_score
from unet_deploy.train import segmentation_loss
from unet_deploy.train.losses import (
    EdgeWeight,
    boundary_accuracy,
    boundary_band,
    boundary_pixels,
    distance_to_boundary,
    edge_weight_map,
    warmup_cosine,
)
from unet_deploy.train.quality import QualityOptions


def _square(h: int = 40, w: int = 50) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.int64)
    m[10:30, 15:40] = 1
    return m


def test_weight_map_peaks_on_edges_and_decays_inside_and_outside():
    mask = _square()
    w = edge_weight_map(mask, width_px=2.0, weight=6.0)
    assert w.dtype == np.float32 and w.shape == mask.shape
    edge = boundary_pixels(mask)
    np.testing.assert_allclose(w[edge], 6.0)
    assert w.max() == pytest.approx(6.0)
    assert np.all(w[~edge] < 6.0)
    # along a row through the square: maximal at the two edges (columns 14|15 and 39|40), 1 far away
    row = w[20]
    assert row[14] == row[15] == pytest.approx(6.0)
    assert row[0] == pytest.approx(1.0, abs=1e-3) and row[27] == pytest.approx(1.0, abs=1e-3)
    inside = row[15:28]
    assert np.all(np.diff(inside) <= 1e-6)  # falls off with the distance to the edge
    # one sigma from the edge pixel: 1 + (W - 1) * exp(-1/2)
    assert row[17] == pytest.approx(1 + 5 * math.exp(-0.5), rel=1e-4)


def test_weight_map_off_and_without_edges():
    mask = _square()
    np.testing.assert_array_equal(edge_weight_map(mask, 3, 1.0), np.ones(mask.shape, np.float32))
    np.testing.assert_array_equal(edge_weight_map(np.ones((8, 9), np.int64), 3, 5.0), np.ones((8, 9)))
    with pytest.raises(ValueError):
        edge_weight_map(mask, 0, 5.0)
    with pytest.raises(ValueError):
        edge_weight_map(mask, 3, 0.5)


def test_distance_matches_scipy_exact_edt():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:60, :80]
    mask = ((((xx - 40) / 25) ** 2 + ((yy - 30) / 15) ** 2) < 1).astype(np.int64)
    mask[rng.random(mask.shape) < 0.01] = 2
    ours = distance_to_boundary(mask)
    ref = ndimage.distance_transform_edt(~boundary_pixels(mask))
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_boundary_band_width_and_accuracy():
    mask = np.zeros((20, 20), dtype=np.int64)
    mask[:, 10:] = 1  # one vertical edge between columns 9 and 10
    for width, cols in ((1, [9, 10]), (2, [8, 9, 10, 11]), (3, [7, 8, 9, 10, 11, 12])):
        band = boundary_band(mask, width)
        assert sorted(np.nonzero(band[5])[0].tolist()) == cols
        assert (band == band[5]).all()
    assert boundary_accuracy(mask, mask, 3) == 1.0
    shifted = np.zeros_like(mask)
    shifted[:, 11:] = 1  # the edge one pixel off: column 10 wrong in a 6-column band
    assert boundary_accuracy(shifted, mask, 3) == pytest.approx(5 / 6)
    assert dice_score(shifted > 0, mask > 0) > 0.94  # dice hardly sees it
    assert math.isnan(boundary_accuracy(mask, np.zeros_like(mask), 3))
    with pytest.raises(ValueError):
        boundary_accuracy(mask, mask[:5], 3)


def test_edge_weighted_loss_charges_edge_mistakes_more():
    mask = _square()
    target = torch.from_numpy(mask)[None]
    logits = torch.stack([(1 - target) * 4.0 - 2.0, target * 4.0 - 2.0], dim=1).float()
    edge = torch.from_numpy(boundary_pixels(mask))[None]
    wrong_at_edges = logits.clone()
    wrong_at_edges[:, :, edge[0]] = -wrong_at_edges[:, :, edge[0]]
    weights = torch.from_numpy(edge_weight_map(mask, 2.0, 5.0))[None]
    plain = segmentation_loss(wrong_at_edges, target, 2) - segmentation_loss(logits, target, 2)
    weighted = (segmentation_loss(wrong_at_edges, target, 2, weights)
                - segmentation_loss(logits, target, 2, weights))
    assert weighted > 1.5 * plain > 0


def test_edge_weight_hook_caches_per_mask_and_pickles_without_cache():
    hook = EdgeWeight(2.0, 5.0, cache_bytes=1 << 20)
    mask = _square()
    a = hook(mask)["weight"]
    b = hook(mask.copy())["weight"]
    assert a.dtype == torch.float32 and a.shape == mask.shape
    assert torch.equal(a, b) and (hook.hits, hook.misses) == (1, 1)
    a[0, 0] = 99.0  # callers get their own copy: the cached map is not modified
    assert hook(mask)["weight"][0, 0] == pytest.approx(1.0, abs=1e-3)
    other = mask.copy()
    other[0, 0] = 1
    hook(other)
    assert hook.misses == 2
    clone = pickle.loads(pickle.dumps(hook))
    assert clone.hits == hook.hits and len(clone._cache) == 0
    nocache = EdgeWeight(2.0, 5.0)
    nocache(mask)
    nocache(mask)
    assert nocache.misses == nocache.hits == 0 and len(nocache._cache) == 0


def test_quality_hooks_cache_only_without_geometric_augmentation():
    from unet_deploy.images.augment import preset

    plain = QualityOptions(edge_weight=4.0).hooks(seed=0)
    assert plain["loss_weight_key"] == "weight" and plain["extras"].cache_bytes > 0
    assert "transform" not in plain and "scheduler" not in plain
    colour = QualityOptions(preset("none", brightness=0.2), edge_weight=4.0).hooks(seed=0)
    assert colour["extras"].cache_bytes > 0
    moving = QualityOptions(preset("light"), edge_weight=4.0).hooks(seed=0)
    assert moving["extras"].cache_bytes == 0 and "transform" in moving
    assert QualityOptions().hooks(seed=0) == {}
    with pytest.raises(UserError, match="--edge-weight"):
        QualityOptions(edge_weight=0.5).validate()
    with pytest.raises(UserError, match="--warmup-steps"):
        QualityOptions(warmup_steps=10).validate()
    with pytest.raises(UserError, match="--schedule"):
        QualityOptions(schedule="step").validate()


def _lrs(total: int, warmup: int, min_ratio: float = 0.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_cosine(opt, total, warmup, min_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine():
    lrs = _lrs(100, 10)
    assert lrs[0] == pytest.approx(0.1 / 11)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # warm-up rises
    assert lrs[10] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only decays
    assert lrs[55] == pytest.approx(0.05, rel=1e-6)  # half-way through the decay
    assert lrs[-1] < 0.001
    floor = _lrs(50, 0, min_ratio=0.1)
    assert floor[0] == pytest.approx(0.1) and min(floor) >= 0.01 - 1e-9


def test_cosine_hook_uses_max_steps_and_refuses_plateau_state():
    hooks = QualityOptions(schedule="cosine", warmup_steps=2).hooks(seed=0, max_steps=20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = hooks["scheduler"](opt, 1000)  # train() passes epochs * steps; max_steps is shorter
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-3
    state = sched.state_dict()
    torch.save(state, __import__("io").BytesIO())  # plain data only (checkpoints load weights_only)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "max").state_dict()
    with pytest.raises(UserError, match="--schedule"):
        sched.load_state_dict(plateau)
