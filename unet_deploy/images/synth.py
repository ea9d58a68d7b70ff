"""Synthetic Carvana-like data: studio photos of cars with exact binary masks.

Each car is a small 3-D solid: a side profile (body, cabin, wheel arches) extruded across the car's
width, with a narrower glasshouse, plus four wheel cylinders. A view is an orthographic projection at a
given yaw (Carvana's 16 turntable angles) and a slight downward pitch, painted far-to-near with Pillow
at 2x supersampling and downsampled for anti-aliased edges. The mask is the car's silhouette (body,
glass and wheels; never the floor shadow), so it matches the image edge to within half a pixel.
The drawing steps live in :mod:`unet_deploy.images.synth_render`.

Output follows the Carvana layout: ``imgs/<car>_<angle>.jpg`` and ``masks/<car>_<angle>_mask.gif``
where the GIF is a palette image whose pixel values are 0 (background) and 1 (car).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_path
from unet_deploy.images import synth_render as sr
from unet_deploy.images.synth_render import BODY as _BODY
from unet_deploy.images.synth_render import GLASS as _GLASS
from unet_deploy.images.synth_render import WELL as _WELL
from unet_deploy.runtime.resources import check_synth_memory

__all__ = ["CarSpec", "generate_dataset", "generate_test_images", "render_car", "render_view", "sample_car",
           "turntable_views"]

_COLOURS: tuple[tuple[tuple[int, int, int], float], ...] = (
    ((238, 239, 240), 0.20), ((186, 189, 193), 0.14), ((22, 23, 26), 0.16),  # white, silver, black
    ((105, 108, 112), 0.10), ((150, 24, 28), 0.09), ((28, 52, 120), 0.09),  # grey, red, blue
    ((20, 32, 58), 0.06), ((196, 184, 160), 0.05), ((38, 72, 48), 0.04),  # navy, beige, green
    ((92, 60, 40), 0.03), ((210, 120, 30), 0.02), ((60, 130, 170), 0.02),  # brown, orange, teal
)


@dataclass(frozen=True)
class CarSpec:
    """Shape and paint of one car, in units of its length (x: rear -0.5 .. front +0.5, y: up)."""

    profile: np.ndarray  # (N, 2) closed side outline
    materials: np.ndarray  # (N,) material of the edge leaving each vertex
    window: np.ndarray  # (M, 2) side-window outline
    pillar_x: float
    belt: float
    roof: float
    nose_h: float
    tail_h: float
    clearance: float
    wheel_x: tuple[float, float]
    wheel_r: float
    half_width: float
    tumble: float  # half-width factor at the roof relative to the body
    colour: np.ndarray  # (3,) float RGB
    rim: np.ndarray
    glass: np.ndarray


def _chaikin(pts: np.ndarray, mats: np.ndarray, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Round the corners of a closed polygon; a cut corner keeps its material only if both edges share it."""
    for _ in range(rounds):
        nxt = np.roll(pts, -1, axis=0)
        q, r = 0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt
        corner = np.where(mats == np.roll(mats, -1), mats, _BODY)
        pts = np.stack([q, r], axis=1).reshape(-1, 2)
        mats = np.stack([mats, corner], axis=1).reshape(-1)
    return pts, mats


def sample_car(rng: np.random.Generator) -> CarSpec:
    """Draw a random car: body style, proportions, wheel size and paint."""
    kind = ("sedan", "hatch", "suv", "coupe")[int(rng.choice(4, p=[0.4, 0.25, 0.25, 0.1]))]
    suv = kind == "suv"
    c = rng.uniform(0.045, 0.07) + 0.02 * suv
    r = rng.uniform(0.085, 0.105) + 0.012 * suv
    belt = rng.uniform(0.26, 0.31) + 0.06 * suv
    roof = belt + rng.uniform(0.13, 0.17) + (0.02 * suv) - (0.02 * (kind == "coupe"))
    nose_h, tail_h = belt - rng.uniform(0.03, 0.08), belt - rng.uniform(0.0, 0.03)
    xf, xr = 0.5 - rng.uniform(0.16, 0.2), -0.5 + rng.uniform(0.15, 0.2)
    ws = rng.uniform(0.1, 0.2)  # windshield base
    rf = ws - rng.uniform(0.13, 0.2)  # roof front
    if kind == "sedan":
        rr = rng.uniform(-0.22, -0.12)
        rb = rr - rng.uniform(0.1, 0.15)
    elif kind == "coupe":
        rr, rb = rf - rng.uniform(0.12, 0.2), rng.uniform(-0.4, -0.33)
    else:
        rr, rb = rng.uniform(-0.44, -0.38), -0.48
    rr = min(rr, rf - 0.08)

    pts: list[tuple[float, float, int]] = [(0.49, c + 0.015, _BODY)]
    a = r * 1.17
    for xw in (xf, xr):  # wheel arches, walked from their front side to their rear side
        t0 = math.asin(max(-1.0, min(1.0, (c - r) / a)))
        ts = np.linspace(t0, math.pi - t0, 9)
        pts += [(xw + a * math.cos(t), r + a * math.sin(t), _WELL) for t in ts[:-1]]
        pts.append((xw + a * math.cos(ts[-1]), c, _BODY))
    pts += [(-0.49, c + 0.02, _BODY), (-0.5, c + 0.07, _BODY), (-0.502, tail_h, _BODY)]
    if kind in ("sedan", "coupe"):
        pts += [(-0.49, belt + 0.02, _BODY), (rb, belt + 0.035, _GLASS)]
    else:
        pts += [(rb, belt + 0.01, _GLASS)]
    pts += [(rr, roof, _BODY), (rf, roof, _GLASS), (ws, belt + 0.02, _BODY),
            (0.42, nose_h + 0.015, _BODY), (0.5, nose_h - 0.015, _BODY), (0.505, c + 0.07, _BODY)]
    arr = np.array([(x, y) for x, y, _ in pts], dtype=np.float64)
    profile, mats = _chaikin(arr, np.array([m for _, _, m in pts]), 2)

    house = np.array([(rb, belt + 0.03), (rr, roof), (rf, roof), (ws, belt + 0.025)])
    centre = house.mean(axis=0)
    window = centre + (house - centre) * np.array([0.86, 0.72])

    idx = int(rng.choice(len(_COLOURS), p=np.array([w for _, w in _COLOURS]) / sum(w for _, w in _COLOURS)))
    colour = np.clip(np.array(_COLOURS[idx][0], float) + rng.normal(0, 6, 3), 0, 255)
    rim = np.full(3, rng.choice([150.0, 190.0, 60.0, 215.0]))
    glass = np.array([28.0, 32.0, 38.0]) + rng.uniform(0, 25)
    return CarSpec(profile, mats, window, float(window[:, 0].mean() + rng.uniform(-0.03, 0.03)), belt, roof,
                   nose_h, tail_h, c, (xf, xr), r, rng.uniform(0.19, 0.23) + 0.02 * suv,
                   rng.uniform(0.72, 0.85), colour, rim, glass)


def render_view(rng: np.random.Generator, spec: CarSpec, yaw: float, width: int, height: int,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Render one view of ``spec`` into a fresh studio scene."""
    cam = sr.camera(rng, yaw)
    near, far, back, items = sr.faces(spec, cam)
    wheels = sr.wheels(spec, cam)
    flank, ends = sr.flank_details(spec, cam), sr.end_details(spec, cam)
    place = sr.place(rng, near, far, wheels, width, height)
    image = sr.background(rng, width, height)
    sr.shadow(rng, image, spec, cam, place, wheels, width, height)
    canvas = sr.Canvas(place, place.box(width, height))
    cap = sr.paint_solid(canvas, spec, cam, near, back, items, wheels)
    sr.paint_details(canvas, cap, flank, ends)
    return sr.composite(rng, image, canvas, width, height)


def render_car(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Render a random car in a random pose.

    Returns ``(image, mask)``: an RGB ``uint8`` array of shape (height, width, 3) and a ``uint8`` mask of
    shape (height, width) with 1 on the car (body, glass, wheels) and 0 elsewhere, shadow included.
    The result depends only on ``rng``'s state.
    """
    spec = sample_car(rng)
    return render_view(rng, spec, rng.uniform(0, 2 * math.pi), width, height)


def _check_args(n: int, width: int, height: int, angles: int, jpeg_quality: int) -> None:
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if width < 16 or height < 16:
        raise UserError(f"--width and --height must be at least 16 pixels (got {width}x{height})")
    if not 1 <= angles <= 99:
        raise UserError(f"--angles must be between 1 and 99 (got {angles})")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be between 1 and 100 (got {jpeg_quality})")
    check_synth_memory(width, height)  # refuse, before allocating, an image whose buffers cannot fit


def _prepare(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder; choose another --out")
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"{folder} already contains files; pass --overwrite to replace them "
                        f"or choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder}: {exc.strerror or exc}") from exc


def turntable_views(rng: np.random.Generator, n: int, angles: int):
    """Yield ``(id, spec, yaw)`` for n images grouped into cars of ``angles`` turntable views."""
    seen: set[str] = set()
    for i in range(n):
        k = i % angles
        if k == 0:
            car_id = rng.bytes(6).hex()
            while car_id in seen:
                car_id = rng.bytes(6).hex()
            seen.add(car_id)
            spec = sample_car(rng)
        yaw = -math.pi / 2 + 2 * math.pi * k / angles + math.radians(rng.uniform(-3, 3))
        yield f"{car_id}_{k + 1:02d}", spec, yaw


def _save_jpeg(image: np.ndarray, path: Path, quality: int) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=quality)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    gif = Image.fromarray(mask)
    gif.putpalette([0, 0, 0, 255, 255, 255])  # turns the 'L' image into 'P': 0 black, 1 white
    with atomic_path(path) as tmp:
        gif.save(tmp, format="GIF")


def generate_dataset(out_dir: str | os.PathLike[str], n: int = 16, width: int = 1918, height: int = 1280,
                     seed: int = 0, angles: int = 16, jpeg_quality: int = 90,
                     overwrite: bool = False) -> list[str]:
    """Write ``n`` image/mask pairs in Carvana's layout and return their ids in order.

    Files: ``out_dir/imgs/<id>.jpg`` and ``out_dir/masks/<id>_mask.gif`` with ids ``<12 hex>_<NN>``:
    consecutive images are the ``angles`` turntable views of one car. The same ``seed`` gives the same
    files, and a larger ``n`` extends a smaller run without changing its images. Raises ``UserError``
    for bad arguments or when ``imgs/`` or ``masks/`` already hold files and ``overwrite`` is false.
    """
    _check_args(n, width, height, angles, jpeg_quality)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    imgs, masks = out / "imgs", out / "masks"
    for folder in (imgs, masks):
        _prepare(folder, overwrite)
    rng = np.random.default_rng(seed)
    ids = []
    for image_id, spec, yaw in turntable_views(rng, n, angles):
        image, mask = render_view(rng, spec, yaw, width, height)
        _save_jpeg(image, imgs / f"{image_id}.jpg", jpeg_quality)
        _save_mask(mask, masks / f"{image_id}_mask.gif")
        ids.append(image_id)
    return ids


def generate_test_images(out_dir: str | os.PathLike[str], n: int = 16, width: int = 1918, height: int = 1280,
                         seed: int = 0, angles: int = 16, jpeg_quality: int = 90,
                         overwrite: bool = False) -> list[str]:
    """Write ``n`` unlabeled images ``out_dir/<id>.jpg`` (a Kaggle-style test folder).

    Uses a random stream separate from :func:`generate_dataset`, so the same seed gives other cars.
    """
    _check_args(n, width, height, angles, jpeg_quality)
    out = Path(out_dir)
    _prepare(out, overwrite)
    rng = np.random.default_rng([seed, 1])
    ids = []
    for image_id, spec, yaw in turntable_views(rng, n, angles):
        image, _ = render_view(rng, spec, yaw, width, height)
        _save_jpeg(image, out / f"{image_id}.jpg", jpeg_quality)
        ids.append(image_id)
    return ids
