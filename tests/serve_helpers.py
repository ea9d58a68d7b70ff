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


def write_test_images(folder: Path, source: Path) -> list[Path]:
    """One car photo in many modes and odd sizes: RGB JPEG, RGBA PNG, grey PNG, palette GIF, 16-bit PNG,
    and a sideways JPEG with an EXIF rotation."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(source).convert("RGB")
    out = []

    def save(img: Image.Image, name: str, **kw: object) -> None:
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
