"""Synthetic Carvana-like data: studio photos of cars with exact binary masks.

Each car is a small 3-D solid: a side profile (body, cabin, wheel arches) extruded across the car's
width, with a narrower glasshouse, plus four wheel cylinders. A view is an orthographic projection at a
given yaw (Carvana's 16 turntable angles) and a slight downward pitch, painted far-to-near with Pillow
at 2x supersampling and downsampled for anti-aliased edges. The mask is the car's silhouette (body,
glass and wheels; never the floor shadow), so it matches the image edge to within half a pixel.

Output follows the Carvana layout: ``imgs/<car>_<angle>.jpg`` and ``masks/<car>_<angle>_mask.gif``
where the GIF is a palette image whose pixel values are 0 (background) and 1 (car).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import UserError
from .fileio import atomic_path
from .resources import check_synth_memory

__all__ = ["CarSpec", "generate_dataset", "generate_test_images", "render_car", "sample_car"]

_SS = 2  # supersampling factor
_BODY, _GLASS, _WELL = 0, 1, 2
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


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return rx @ ry


def _lift(spec: CarSpec, pts: np.ndarray, side: float) -> np.ndarray:
    """Place 2-D profile points on one flank (side=+-1); the glasshouse leans inward."""
    t = np.clip((pts[:, 1] - spec.belt) / (spec.roof - spec.belt), 0.0, 1.0)
    z = side * spec.half_width * (1.0 - (1.0 - spec.tumble) * t)
    return np.column_stack([pts, z])


def _hull(p: np.ndarray) -> np.ndarray:
    """Convex hull (monotone chain) of 2-D points."""
    pts = sorted(map(tuple, p.tolist()))

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Studio backdrop: a wall fading into a floor at a soft horizon, vignetted, slightly tinted."""
    wall = rng.uniform(205, 248)
    floor = wall + rng.uniform(-35, 4)
    ys = np.arange(height, dtype=np.float32) / height
    horizon, soft = rng.uniform(0.45, 0.68), rng.uniform(0.02, 0.15)
    blend = np.clip((ys - horizon) / soft + 0.5, 0.0, 1.0)
    wall_y = wall - rng.uniform(0, 25) * (1.0 - np.clip(ys / horizon, 0, 1))
    floor_y = floor + rng.uniform(-5, 12) * np.clip((ys - horizon) / (1 - horizon), 0, 1)
    vy = wall_y * (1 - blend) + floor_y * blend
    xs = (np.arange(width, dtype=np.float32) - width / 2) / (width / 2)
    vx = 1.0 - rng.uniform(0.0, 0.15) * xs * xs
    tint = (1.0 + rng.uniform(-0.02, 0.02, 3)).astype(np.float32)
    return (vy[:, None] * vx[None, :])[:, :, None] * tint


def _render(rng: np.random.Generator, spec: CarSpec, yaw: float, width: int, height: int,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Render one view of ``spec`` into a fresh studio scene."""
    rot = _rotation(yaw, math.radians(rng.uniform(6, 16)))
    light = np.array([rng.choice([-0.45, 0.45]), 0.65, 0.6])
    light /= np.linalg.norm(light)
    side = 1.0 if rot[2, 2] >= 0 else -1.0  # flank facing the camera

    def proj(p3: np.ndarray) -> np.ndarray:
        return p3 @ rot.T

    def shade(base: np.ndarray, normal: np.ndarray, amb: float = 0.55, diff: float = 0.55) -> tuple:
        n = rot @ normal
        b = amb + diff * max(0.0, float(n @ light) / (np.linalg.norm(n) + 1e-9))
        return tuple(int(v) for v in np.clip(base * b, 0, 255))

    near, far = proj(_lift(spec, spec.profile, side)), proj(_lift(spec, spec.profile, -side))
    orient = 1.0 if np.sum(spec.profile[:, 0] * np.roll(spec.profile[:, 1], -1)
                           - np.roll(spec.profile[:, 0], -1) * spec.profile[:, 1]) > 0 else -1.0
    dark = tuple(int(v) for v in spec.colour * 0.4)
    back: list[np.ndarray] = [far]
    items: list[tuple[float, np.ndarray, tuple]] = []  # (depth, polygon, colour)
    count = len(spec.profile)
    for i in range(count):
        j = (i + 1) % count
        quad = np.stack([near[i], near[j], far[j], far[i]])
        d = spec.profile[j] - spec.profile[i]
        normal = orient * np.array([d[1], -d[0], 0.0])
        if (rot @ normal)[2] <= 0:
            back.append(quad)
            continue
        mat = spec.materials[i]
        if mat == _GLASS:
            col = shade(spec.glass, normal, 0.8, 0.9)
        elif mat == _WELL:
            col = (18, 18, 20)
        else:
            col = shade(spec.colour, normal)
        items.append((float(quad[:, 2].mean()), quad, col))

    ts = np.linspace(0, 2 * math.pi, 28, endpoint=False)
    circle = np.column_stack([np.cos(ts), np.sin(ts)])
    wheels: list[tuple[float, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
    for xw in spec.wheel_x:
        for s in (-1.0, 1.0):
            zo = s * spec.half_width * 0.96
            zi = zo - s * spec.half_width * 0.45
            ring = np.array([xw, spec.wheel_r]) + spec.wheel_r * circle
            tyre = np.vstack([proj(np.column_stack([ring, np.full(len(ring), z)])) for z in (zo, zi)])
            rim = hub = None
            if rot[2, 2] * s > 0.05:
                for k, frac in ((0, 0.62), (1, 0.22)):
                    disc = np.array([xw, spec.wheel_r]) + frac * spec.wheel_r * circle
                    poly = proj(np.column_stack([disc, np.full(len(disc), zo)]))
                    rim, hub = (poly, hub) if k == 0 else (rim, poly)
            centre = proj(np.array([[xw, spec.wheel_r, zo]]))[0]
            wheels.append((float(centre[2]), _hull(tyre[:, :2]), rim, hub))

    overlays: list[tuple[np.ndarray, tuple]] = []
    cap_normal = np.array([0.0, 0.0, side])
    win = proj(_lift(spec, spec.window, side))
    overlays.append((win, shade(spec.glass, cap_normal, 0.8, 0.9)))
    p = spec.pillar_x
    overlays.append((proj(_lift(spec, np.array([(p - 0.013, spec.belt), (p - 0.01, spec.roof),
                                                 (p + 0.01, spec.roof), (p + 0.013, spec.belt)]), side)),
                     shade(spec.colour * 0.85, cap_normal)))
    c, b = spec.clearance, spec.belt
    a = spec.wheel_r * 1.17
    sill = np.array([(spec.wheel_x[1] + a, c + 0.002), (spec.wheel_x[0] - a, c + 0.002),
                     (spec.wheel_x[0] - a, c + 0.035), (spec.wheel_x[1] + a, c + 0.035)])
    overlays.append((proj(_lift(spec, sill, side)), shade(spec.colour * 0.7, cap_normal)))
    crease = np.array([(-0.46, b - 0.05), (0.45, b - 0.05), (0.45, b - 0.035), (-0.46, b - 0.035)])
    overlays.append((proj(_lift(spec, crease, side)), shade(np.minimum(spec.colour * 1.2 + 15, 255),
                                                            cap_normal)))
    lamp_y = spec.nose_h
    for cx, col in ((0.47, (235, 235, 225)), (-0.47, (170, 20, 20))):
        y0 = lamp_y if cx > 0 else spec.tail_h
        lamp = np.array([(cx - 0.03, y0 - 0.045), (cx + 0.025, y0 - 0.045), (cx + 0.025, y0 - 0.02),
                         (cx - 0.03, y0 - 0.015)])
        overlays.append((proj(_lift(spec, lamp, side)), col))
    n_cap = len(overlays)
    for sign, y0, col in ((1.0, spec.nose_h, (235, 235, 225)), (-1.0, spec.tail_h, (170, 20, 20))):
        if rot[2, 0] * sign <= 0.1:
            continue  # that end faces away from the camera
        x = 0.504 * sign
        for zs in (-1.0, 1.0):
            z0, z1 = zs * spec.half_width * 0.5, zs * spec.half_width * 0.9
            overlays.append((proj(np.array([(x, y0 - 0.05, z0), (x, y0 - 0.05, z1),
                                            (x, y0 - 0.018, z1), (x, y0 - 0.018, z0)])), col))
        if sign > 0:
            hw = spec.half_width * 0.4
            overlays.append((proj(np.array([(x, c + 0.05, -hw), (x, c + 0.05, hw),
                                            (x, y0 - 0.06, hw), (x, y0 - 0.06, -hw)])), (30, 30, 32)))

    # Scale and place the car: 40-80% of the width, within the frame vertically.
    allpts = np.vstack([near[:, :2], far[:, :2]] + [w[1] for w in wheels])
    umin, vmin = allpts.min(axis=0)
    umax, vmax = allpts.max(axis=0)
    scale = float(min(rng.uniform(0.4, 0.8) * width / (umax - umin),
                      rng.uniform(0.6, 0.85) * height / (vmax - vmin)))
    cw, ch = (umax - umin) * scale, (vmax - vmin) * scale
    x0 = (width - cw) / 2 + rng.uniform(-0.5, 0.5) * (width - cw) * 0.5
    bottom = min(height * rng.uniform(0.8, 0.93), height * 0.97)
    y0 = max(bottom - ch, height * 0.03)

    def screen(poly: np.ndarray) -> np.ndarray:
        return np.column_stack([x0 + (poly[:, 0] - umin) * scale, y0 + (vmax - poly[:, 1]) * scale])

    image = _background(rng, width, height)

    # Soft floor shadow from the car's footprint, drawn small and blurred.
    sf = 4
    foot = np.array([(x, 0.0, z) for x in (-0.55, 0.55) for z in (-1.15, 1.15)]) * [1, 1, spec.half_width]
    sh = Image.new("L", (max(1, width // sf), max(1, height // sf)))
    sdraw = ImageDraw.Draw(sh)
    sdraw.polygon([tuple(q) for q in (screen(_hull(proj(foot)[:, :2])) / sf).tolist()], fill=200)
    sh = sh.filter(ImageFilter.GaussianBlur(max(0.5, 0.03 * scale / sf)))
    sdraw = ImageDraw.Draw(sh)
    for w in wheels:
        low = screen(w[1])
        bx, by = low[:, 0], low[:, 1].max()
        sdraw.ellipse([bx.min() / sf, (by - 0.02 * scale) / sf, bx.max() / sf, (by + 0.015 * scale) / sf],
                      fill=255)
    sh = sh.filter(ImageFilter.GaussianBlur(max(0.5, 0.006 * scale / sf))).resize((width, height),
                                                                                  Image.BILINEAR)
    image *= 1.0 - rng.uniform(0.25, 0.5) * (np.asarray(sh, dtype=np.float32)[:, :, None] / 255.0)

    # Paint the car at _SS x resolution inside its bounding box.
    bx0, by0 = max(0, int(x0) - 2), max(0, int(y0) - 2)
    bx1, by1 = min(width, int(math.ceil(x0 + cw)) + 2), min(height, int(math.ceil(y0 + ch)) + 2)
    size = ((bx1 - bx0) * _SS, (by1 - by0) * _SS)
    rgb, sil = Image.new("RGB", size), Image.new("L", size)
    dr, ds = ImageDraw.Draw(rgb), ImageDraw.Draw(sil)

    def poly_xy(poly: np.ndarray) -> list[tuple[float, float]]:
        pts = (screen(poly) - [bx0, by0]) * _SS
        return [tuple(q) for q in pts.tolist()]

    for poly in back:
        xy = poly_xy(poly)
        dr.polygon(xy, fill=dark)
        ds.polygon(xy, fill=255)
    tyre_col = (20, 20, 22)
    rim_col = shade(spec.rim, cap_normal, 0.7, 0.4)
    scene = [(d, "face", poly, col) for d, poly, col in items] + [(w[0], "wheel", w, None) for w in wheels]
    for _, what, obj, col in sorted(scene, key=lambda t: t[0]):
        if what == "face":
            xy = poly_xy(obj)
            dr.polygon(xy, fill=col)
            ds.polygon(xy, fill=255)
        else:
            xy = poly_xy(obj[1])
            dr.polygon(xy, fill=tyre_col)
            ds.polygon(xy, fill=255)
            if obj[2] is not None:
                dr.polygon(poly_xy(obj[2]), fill=rim_col)
                dr.polygon(poly_xy(obj[3]), fill=tuple(int(v * 0.6) for v in rim_col))
    cap = poly_xy(near)
    dr.polygon(cap, fill=shade(spec.colour, cap_normal))
    ds.polygon(cap, fill=255)
    # Details are clipped: flank details to the flank, lamps and grille to the silhouette.
    cap_mask = Image.new("L", size)
    ImageDraw.Draw(cap_mask).polygon(cap, fill=255)
    for group, clip in ((overlays[:n_cap], cap_mask), (overlays[n_cap:], sil)):
        if group:
            layer = rgb.copy()
            dl = ImageDraw.Draw(layer)
            for poly, col in group:
                dl.polygon(poly_xy(poly), fill=col)
            rgb = Image.composite(layer, rgb, clip)

    rgb, sil = rgb.reduce(_SS), sil.reduce(_SS)
    alpha = np.asarray(sil, dtype=np.float32)[:, :, None] / 255.0
    car = np.asarray(rgb, dtype=np.float32)
    grad = np.linspace(1.12, 0.82, car.shape[0], dtype=np.float32)[:, None, None]
    region = image[by0:by1, bx0:bx1]
    image[by0:by1, bx0:bx1] = region * (1.0 - alpha) + car * grad

    image += rng.standard_normal((height, width), dtype=np.float32)[:, :, None] * rng.uniform(1.0, 3.0)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[by0:by1, bx0:bx1] = np.asarray(sil) >= 128
    return np.clip(image, 0, 255).astype(np.uint8), mask


def render_car(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Render a random car in a random pose.

    Returns ``(image, mask)``: an RGB ``uint8`` array of shape (height, width, 3) and a ``uint8`` mask of
    shape (height, width) with 1 on the car (body, glass, wheels) and 0 elsewhere, shadow included.
    The result depends only on ``rng``'s state.
    """
    spec = sample_car(rng)
    return _render(rng, spec, rng.uniform(0, 2 * math.pi), width, height)


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


def _views(rng: np.random.Generator, n: int, angles: int):  # type: ignore[no-untyped-def]
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
    for image_id, spec, yaw in _views(rng, n, angles):
        image, mask = _render(rng, spec, yaw, width, height)
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
    for image_id, spec, yaw in _views(rng, n, angles):
        image, _ = _render(rng, spec, yaw, width, height)
        _save_jpeg(image, out / f"{image_id}.jpg", jpeg_quality)
        ids.append(image_id)
    return ids
