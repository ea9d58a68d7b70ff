"""Drawing one view of a synthetic car (:mod:`unet_deploy.images.synth`), step by step.

The car's 3-D solid is projected orthographically by a :class:`Camera`; the steps are: the extruded
profile's faces (:func:`faces`), the wheels, the flank and end details, the car's placement in the
frame, the studio backdrop, the floor shadow, painting at 2x supersampling on a :class:`Canvas`
(solid parts far to near, then clipped details) and compositing onto the backdrop with sensor noise.
Every step draws from the random generator in a fixed order, so a seed always gives the same image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from unet_deploy.images.synth import CarSpec

__all__ = ["BODY", "GLASS", "WELL", "Camera", "Canvas", "Placement", "background", "camera", "composite",
           "end_details", "faces", "flank_details", "hull", "lift", "paint_details", "paint_solid", "place",
           "rotation", "shadow", "wheels"]

SS = 2  # supersampling factor
BODY, GLASS, WELL = 0, 1, 2  # material of a profile edge: body paint, glass, wheel well


def rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return rx @ ry


def lift(spec: CarSpec, pts: np.ndarray, side: float) -> np.ndarray:
    """Place 2-D profile points on one flank (side=+-1); the glasshouse leans inward."""
    t = np.clip((pts[:, 1] - spec.belt) / (spec.roof - spec.belt), 0.0, 1.0)
    z = side * spec.half_width * (1.0 - (1.0 - spec.tumble) * t)
    return np.column_stack([pts, z])


def hull(p: np.ndarray) -> np.ndarray:
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


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
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


@dataclass(frozen=True)
class Camera:
    """An orthographic view: rotation, unit light direction and the flank (+-1) facing the camera."""

    rot: np.ndarray
    light: np.ndarray
    side: float

    @property
    def cap_normal(self) -> np.ndarray:
        return np.array([0.0, 0.0, self.side])

    def proj(self, p3: np.ndarray) -> np.ndarray:
        return p3 @ self.rot.T

    def shade(self, base: np.ndarray, normal: np.ndarray, amb: float = 0.55, diff: float = 0.55) -> tuple:
        n = self.rot @ normal
        b = amb + diff * max(0.0, float(n @ self.light) / (np.linalg.norm(n) + 1e-9))
        return tuple(int(v) for v in np.clip(base * b, 0, 255))


def camera(rng: np.random.Generator, yaw: float) -> Camera:
    """A view at ``yaw`` with a random slight downward pitch, lit from the front left or right."""
    rot = rotation(yaw, math.radians(rng.uniform(6, 16)))
    light = np.array([rng.choice([-0.45, 0.45]), 0.65, 0.6])
    light /= np.linalg.norm(light)
    return Camera(rot, light, 1.0 if rot[2, 2] >= 0 else -1.0)


def faces(spec: CarSpec, cam: Camera) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[tuple]]:
    """The extruded profile: near and far flanks, back-facing polygons, and (depth, quad, colour) faces."""
    near, far = cam.proj(lift(spec, spec.profile, cam.side)), cam.proj(lift(spec, spec.profile, -cam.side))
    orient = 1.0 if np.sum(spec.profile[:, 0] * np.roll(spec.profile[:, 1], -1)
                           - np.roll(spec.profile[:, 0], -1) * spec.profile[:, 1]) > 0 else -1.0
    back: list[np.ndarray] = [far]
    items: list[tuple[float, np.ndarray, tuple]] = []  # (depth, polygon, colour)
    count = len(spec.profile)
    for i in range(count):
        j = (i + 1) % count
        quad = np.stack([near[i], near[j], far[j], far[i]])
        d = spec.profile[j] - spec.profile[i]
        normal = orient * np.array([d[1], -d[0], 0.0])
        if (cam.rot @ normal)[2] <= 0:
            back.append(quad)
            continue
        mat = spec.materials[i]
        if mat == GLASS:
            col = cam.shade(spec.glass, normal, 0.8, 0.9)
        elif mat == WELL:
            col = (18, 18, 20)
        else:
            col = cam.shade(spec.colour, normal)
        items.append((float(quad[:, 2].mean()), quad, col))
    return near, far, back, items


def wheels(spec: CarSpec, cam: Camera) -> list[tuple[float, np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """Four wheels as (depth, tyre outline, rim disc, hub disc); discs only on the side facing the camera."""
    ts = np.linspace(0, 2 * math.pi, 28, endpoint=False)
    circle = np.column_stack([np.cos(ts), np.sin(ts)])
    out: list[tuple[float, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
    for xw in spec.wheel_x:
        for s in (-1.0, 1.0):
            zo = s * spec.half_width * 0.96
            zi = zo - s * spec.half_width * 0.45
            ring = np.array([xw, spec.wheel_r]) + spec.wheel_r * circle
            tyre = np.vstack([cam.proj(np.column_stack([ring, np.full(len(ring), z)])) for z in (zo, zi)])
            rim = hub = None
            if cam.rot[2, 2] * s > 0.05:
                for k, frac in ((0, 0.62), (1, 0.22)):
                    disc = np.array([xw, spec.wheel_r]) + frac * spec.wheel_r * circle
                    poly = cam.proj(np.column_stack([disc, np.full(len(disc), zo)]))
                    rim, hub = (poly, hub) if k == 0 else (rim, poly)
            centre = cam.proj(np.array([[xw, spec.wheel_r, zo]]))[0]
            out.append((float(centre[2]), hull(tyre[:, :2]), rim, hub))
    return out


def flank_details(spec: CarSpec, cam: Camera) -> list[tuple[np.ndarray, tuple]]:
    """Window, pillar, sill, crease and lamps on the near flank (painted clipped to the flank)."""
    side, cap_normal = cam.side, cam.cap_normal
    overlays: list[tuple[np.ndarray, tuple]] = []
    win = cam.proj(lift(spec, spec.window, side))
    overlays.append((win, cam.shade(spec.glass, cap_normal, 0.8, 0.9)))
    p = spec.pillar_x
    overlays.append((cam.proj(lift(spec, np.array([(p - 0.013, spec.belt), (p - 0.01, spec.roof),
                                                    (p + 0.01, spec.roof), (p + 0.013, spec.belt)]), side)),
                     cam.shade(spec.colour * 0.85, cap_normal)))
    c, b = spec.clearance, spec.belt
    a = spec.wheel_r * 1.17
    sill = np.array([(spec.wheel_x[1] + a, c + 0.002), (spec.wheel_x[0] - a, c + 0.002),
                     (spec.wheel_x[0] - a, c + 0.035), (spec.wheel_x[1] + a, c + 0.035)])
    overlays.append((cam.proj(lift(spec, sill, side)), cam.shade(spec.colour * 0.7, cap_normal)))
    crease = np.array([(-0.46, b - 0.05), (0.45, b - 0.05), (0.45, b - 0.035), (-0.46, b - 0.035)])
    overlays.append((cam.proj(lift(spec, crease, side)), cam.shade(np.minimum(spec.colour * 1.2 + 15, 255),
                                                                   cap_normal)))
    for cx, col in ((0.47, (235, 235, 225)), (-0.47, (170, 20, 20))):
        y0 = spec.nose_h if cx > 0 else spec.tail_h
        lamp = np.array([(cx - 0.03, y0 - 0.045), (cx + 0.025, y0 - 0.045), (cx + 0.025, y0 - 0.02),
                         (cx - 0.03, y0 - 0.015)])
        overlays.append((cam.proj(lift(spec, lamp, side)), col))
    return overlays


def end_details(spec: CarSpec, cam: Camera) -> list[tuple[np.ndarray, tuple]]:
    """Lamps (and the grille) on the nose and tail faces the camera sees (painted clipped to the car)."""
    overlays: list[tuple[np.ndarray, tuple]] = []
    for sign, y0, col in ((1.0, spec.nose_h, (235, 235, 225)), (-1.0, spec.tail_h, (170, 20, 20))):
        if cam.rot[2, 0] * sign <= 0.1:
            continue  # that end faces away from the camera
        x = 0.504 * sign
        for zs in (-1.0, 1.0):
            z0, z1 = zs * spec.half_width * 0.5, zs * spec.half_width * 0.9
            overlays.append((cam.proj(np.array([(x, y0 - 0.05, z0), (x, y0 - 0.05, z1),
                                                (x, y0 - 0.018, z1), (x, y0 - 0.018, z0)])), col))
        if sign > 0:
            hw, c = spec.half_width * 0.4, spec.clearance
            overlays.append((cam.proj(np.array([(x, c + 0.05, -hw), (x, c + 0.05, hw),
                                                (x, y0 - 0.06, hw), (x, y0 - 0.06, -hw)])), (30, 30, 32)))
    return overlays


@dataclass(frozen=True)
class Placement:
    """Where the projected car lands in the image: projection (u, v) to pixel (x, y)."""

    umin: float
    vmax: float
    scale: float
    x0: float
    y0: float
    cw: float
    ch: float

    def screen(self, poly: np.ndarray) -> np.ndarray:
        return np.column_stack([self.x0 + (poly[:, 0] - self.umin) * self.scale,
                                self.y0 + (self.vmax - poly[:, 1]) * self.scale])

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The car's pixel bounding box (x0, y0, x1, y1) with a 2-pixel margin, inside the image."""
        bx0, by0 = max(0, int(self.x0) - 2), max(0, int(self.y0) - 2)
        return (bx0, by0, min(width, int(math.ceil(self.x0 + self.cw)) + 2),
                min(height, int(math.ceil(self.y0 + self.ch)) + 2))


def place(rng: np.random.Generator, near: np.ndarray, far: np.ndarray, wheels: list, width: int,
          height: int) -> Placement:
    """Scale and place the car: 40-80% of the width, within the frame vertically."""
    allpts = np.vstack([near[:, :2], far[:, :2]] + [w[1] for w in wheels])
    umin, vmin = allpts.min(axis=0)
    umax, vmax = allpts.max(axis=0)
    scale = float(min(rng.uniform(0.4, 0.8) * width / (umax - umin),
                      rng.uniform(0.6, 0.85) * height / (vmax - vmin)))
    cw, ch = (umax - umin) * scale, (vmax - vmin) * scale
    x0 = (width - cw) / 2 + rng.uniform(-0.5, 0.5) * (width - cw) * 0.5
    bottom = min(height * rng.uniform(0.8, 0.93), height * 0.97)
    y0 = max(bottom - ch, height * 0.03)
    return Placement(umin, vmax, scale, x0, y0, cw, ch)


def shadow(rng: np.random.Generator, image: np.ndarray, spec: CarSpec, cam: Camera, place: Placement,
           wheels: list, width: int, height: int) -> None:
    """Darken ``image`` in place by a soft floor shadow from the car's footprint, drawn small and blurred."""
    sf, scale, screen = 4, place.scale, place.screen
    foot = np.array([(x, 0.0, z) for x in (-0.55, 0.55) for z in (-1.15, 1.15)]) * [1, 1, spec.half_width]
    sh = Image.new("L", (max(1, width // sf), max(1, height // sf)))
    sdraw = ImageDraw.Draw(sh)
    sdraw.polygon([tuple(q) for q in (screen(hull(cam.proj(foot)[:, :2])) / sf).tolist()], fill=200)
    sh = sh.filter(ImageFilter.GaussianBlur(max(0.5, 0.03 * scale / sf)))
    sdraw = ImageDraw.Draw(sh)
    for w in wheels:
        low = screen(w[1])
        bx, by = low[:, 0], low[:, 1].max()
        sdraw.ellipse([bx.min() / sf, (by - 0.02 * scale) / sf, bx.max() / sf, (by + 0.015 * scale) / sf],
                      fill=255)
    sh = sh.filter(ImageFilter.GaussianBlur(max(0.5, 0.006 * scale / sf))).resize((width, height),
                                                                                  Image.Resampling.BILINEAR)
    image *= 1.0 - rng.uniform(0.25, 0.5) * (np.asarray(sh, dtype=np.float32)[:, :, None] / 255.0)


class Canvas:
    """The car's bounding box at SS x resolution: a colour image and the silhouette."""

    def __init__(self, place: Placement, box: tuple[int, int, int, int]) -> None:
        self.place, self.box = place, box
        self.size = ((box[2] - box[0]) * SS, (box[3] - box[1]) * SS)
        self.rgb, self.sil = Image.new("RGB", self.size), Image.new("L", self.size)
        self.dr, self.ds = ImageDraw.Draw(self.rgb), ImageDraw.Draw(self.sil)

    def xy(self, poly: np.ndarray) -> list[tuple[float, float]]:
        pts = (self.place.screen(poly) - [self.box[0], self.box[1]]) * SS
        return [tuple(q) for q in pts.tolist()]

    def solid(self, poly: np.ndarray, col: tuple) -> list[tuple[float, float]]:
        """Paint ``poly`` in ``col`` and add it to the silhouette; its canvas points."""
        xy = self.xy(poly)
        self.dr.polygon(xy, fill=col)
        self.ds.polygon(xy, fill=255)
        return xy


def paint_solid(canvas: Canvas, spec: CarSpec, cam: Camera, near: np.ndarray, back: list[np.ndarray],
                items: list[tuple], wheels: list) -> list[tuple[float, float]]:
    """Back faces dark, then faces and wheels far to near, then the near flank; the flank's points."""
    dark = tuple(int(v) for v in spec.colour * 0.4)
    for poly in back:
        canvas.solid(poly, dark)
    tyre_col = (20, 20, 22)
    rim_col = cam.shade(spec.rim, cam.cap_normal, 0.7, 0.4)
    scene = [(d, "face", poly, col) for d, poly, col in items] + [(w[0], "wheel", w, None) for w in wheels]
    for _, what, obj, col in sorted(scene, key=lambda t: t[0]):
        if what == "face":
            canvas.solid(obj, col)
        else:
            canvas.solid(obj[1], tyre_col)
            if obj[2] is not None:
                canvas.dr.polygon(canvas.xy(obj[2]), fill=rim_col)
                canvas.dr.polygon(canvas.xy(obj[3]), fill=tuple(int(v * 0.6) for v in rim_col))
    return canvas.solid(near, cam.shade(spec.colour, cam.cap_normal))


def paint_details(canvas: Canvas, cap: list[tuple[float, float]], flank: list, ends: list) -> None:
    """Details are clipped: flank details to the flank, lamps and grille to the silhouette."""
    cap_mask = Image.new("L", canvas.size)
    ImageDraw.Draw(cap_mask).polygon(cap, fill=255)
    for group, clip in ((flank, cap_mask), (ends, canvas.sil)):
        if group:
            layer = canvas.rgb.copy()
            dl = ImageDraw.Draw(layer)
            for poly, col in group:
                dl.polygon(canvas.xy(poly), fill=col)
            canvas.rgb = Image.composite(layer, canvas.rgb, clip)


def composite(rng: np.random.Generator, image: np.ndarray, canvas: Canvas, width: int, height: int,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Downsample the car onto the backdrop, add sensor noise; the uint8 image and the 0/1 mask."""
    bx0, by0, bx1, by1 = canvas.box
    rgb, sil = canvas.rgb.reduce(SS), canvas.sil.reduce(SS)
    alpha = np.asarray(sil, dtype=np.float32)[:, :, None] / 255.0
    car = np.asarray(rgb, dtype=np.float32)
    grad = np.linspace(1.12, 0.82, car.shape[0], dtype=np.float32)[:, None, None]
    region = image[by0:by1, bx0:bx1]
    image[by0:by1, bx0:bx1] = region * (1.0 - alpha) + car * grad
    image += rng.standard_normal((height, width), dtype=np.float32)[:, :, None] * rng.uniform(1.0, 3.0)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[by0:by1, bx0:bx1] = np.asarray(sil) >= 128
    return np.clip(image, 0, 255).astype(np.uint8), mask
