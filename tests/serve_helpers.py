"""Shared by the serve tests: a tiny trained model and its exports, odd-sized images of many modes, and a
real `unet-deploy serve` process on 127.0.0.1 with bounded waits."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXIF_ORIENTATION = 0x0112


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict:
        return json.loads(self.body)


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None,
            timeout: float = 60) -> Reply:
    """One HTTP request (urllib: no extra client library); any status comes back as a Reply."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.read(), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read(), {k.lower(): v for k, v in e.headers.items()})


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


class Server:
    """`unet-deploy serve ARGS` in a subprocess on a free port; ``stop()`` sends SIGTERM."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"serve-{self.port}.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "unet_deploy", "serve", "--port", str(self.port),
                                          *args], cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if request(self.url + "/readyz", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve not ready after {seconds} s: {self.log.read_text()[-2000:]}")

    def post(self, path: str, data: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> Reply:
        return request(self.url + path, data, {"Content-Type": "application/octet-stream", **(headers or {})},
                       "POST", timeout)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return request(self.url + path, headers=headers)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("serve did not stop within the grace period") from None

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """The sum of one metric's samples (all labels)."""
        text = self.get("/metrics", headers).body.decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


def multipart(data: bytes, filename: str = "image.png", field_name: str = "file") -> tuple[bytes, dict[str, str]]:
    boundary = "unetdeployboundary7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def oip_image_request(images: list[bytes], **extra: object) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol ``infer`` body: the ``image`` input (BYTES [N]) in binary, and its headers."""
    data = b"".join(len(image).to_bytes(4, "little") + image for image in images)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                     "parameters": {"binary_data_size": len(data)}}], **extra}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


def write_test_images(folder: Path, source: Path) -> list[Path]:
    """One car photo in many modes and odd sizes: RGB JPEG, RGBA PNG, grey PNG, palette GIF, 16-bit PNG,
    and a sideways JPEG with an EXIF rotation."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(source).convert("RGB")
    out = []

    def save(img: Image.Image, name: str, **kw: Any) -> None:
        img.save(folder / name, **kw)
        out.append(folder / name)

    save(rgb.resize((239, 160)), "rgb.jpg", quality=95)
    rgba = rgb.resize((97, 61)).convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    save(rgba, "rgba.png")
    save(rgb.resize((150, 101)).convert("L"), "grey.png")
    save(rgb.resize((121, 83)).convert("P"), "palette.gif")
    wide = (np.asarray(rgb.resize((133, 90)).convert("L"), np.uint16) * 257)
    save(Image.fromarray(wide), "deep16.png")
    sideways = rgb.resize((160, 107)).transpose(Image.Transpose.ROTATE_90)
    exif = sideways.getexif()
    exif[EXIF_ORIENTATION] = 8
    save(sideways, "exif.jpg", exif=exif, quality=95)
    return out


def seed_images() -> dict[str, list[bytes]]:
    """Small images of every format the server reads, in several modes and encodings each: the seeds that
    :func:`mutated_images` damages."""
    rng = np.random.default_rng(3)
    base = np.zeros((32, 48, 3), np.uint8)
    base[..., 0] = np.arange(48, dtype=np.uint8)[None] * 5
    base[..., 1] = np.arange(32, dtype=np.uint8)[:, None] * 7
    base[8:24, 12:36, 2] = rng.integers(0, 255, (16, 24), dtype=np.uint8)
    rgb = Image.fromarray(base)
    variants: dict[str, list[tuple[Image.Image, dict]]] = {
        "JPEG": [(rgb, {"quality": 90}), (rgb.convert("L"), {}), (rgb, {"progressive": True}),
                 (rgb.convert("CMYK"), {}), (rgb, {"exif": _rotated_exif(6)})],
        "PNG": [(rgb, {}), (rgb.convert("RGBA"), {}), (rgb.convert("P"), {}), (rgb.convert("1"), {}),
                (Image.fromarray(base[..., 0].astype(np.uint16) * 257), {}), (rgb, {"interlace": 1})],
        "GIF": [(rgb.convert("P"), {}), (rgb.convert("P"), {"save_all": True, "append_images": [rgb.convert("P")]})],
        "TIFF": [(rgb, {}), (rgb, {"compression": "tiff_lzw"}), (rgb, {"compression": "tiff_adobe_deflate"}),
                 (rgb, {"compression": "packbits"}), (rgb.convert("L"), {"compression": "jpeg"}),
                 (rgb.convert("F"), {})],
        "BMP": [(rgb, {}), (rgb.convert("P"), {}), (rgb.convert("L"), {}), (rgb.convert("RGBA"), {})],
        "WEBP": [(rgb, {"quality": 80}), (rgb, {"lossless": True}), (rgb.convert("RGBA"), {"lossless": True})],
    }
    out: dict[str, list[bytes]] = {}
    for fmt, items in variants.items():
        out[fmt] = []
        for img, kwargs in items:
            buffer = io.BytesIO()
            img.save(buffer, fmt, **kwargs)
            out[fmt].append(buffer.getvalue())
    return out


def _rotated_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded damage: flipped or overwritten bytes (often in the header), a cut, an insertion, a deletion,
    a repeated range, or a header field set to an extreme value."""
    b = bytearray(data)
    kind = int(rng.integers(0, 7))
    n = len(b)
    if kind == 0:  # a few flipped bits anywhere
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(0, n))] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # bytes of the header overwritten with extreme values
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(0, min(n, 96)))] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
    elif kind == 2:  # cut anywhere, headers included
        return bytes(b[: int(rng.integers(0, n))])
    elif kind == 3:  # random bytes inserted
        at = int(rng.integers(0, n))
        b[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 4:  # a range deleted
        at = int(rng.integers(0, n))
        del b[at: at + int(rng.integers(1, 64))]
    elif kind == 5:  # a range repeated
        at = int(rng.integers(0, n))
        b[at:at] = b[at: at + int(rng.integers(1, 128))]
    else:  # a 16- or 32-bit field in the first 128 bytes set to 0 or its maximum
        width = int(rng.choice([2, 4]))
        at = int(rng.integers(0, max(1, min(n, 128) - width)))
        b[at: at + width] = bytes([int(rng.choice([0, 0xFF]))]) * width
    return bytes(b)


def mutated_images(per_format: int, seed: int) -> list[tuple[str, bytes]]:
    """``per_format`` seeded mutations of the seed images of each format: (format, bytes)."""
    rng = np.random.default_rng(seed)
    out = []
    for fmt, seeds in seed_images().items():
        for i in range(per_format):
            out.append((fmt, mutate(seeds[i % len(seeds)], rng)))
    return out
