"""Load figures for `unet-deploy serve`, against offline `predict` in the same run.

    python benchmarks/serve_load.py --out benchmarks/results-serve.json   # writes the JSON, prints a table

What it does (all on this machine, the server on 127.0.0.1):
1. a base-16 U-Net (bilinear; random weights: speed does not depend on them) exported to ONNX, and N synthetic
   959x640 JPEGs (Carvana at scale 0.5 after the model's own scale of 1.0);
2. offline: the same Predictor `predict` uses, on the folder (throughput) and image by image (decode + model +
   PNG encode per image);
3. the server (`unet-deploy serve`, --max-batch 4) driven by a bounded async load generator (httpx) at
   concurrency 1, 4 and 16: throughput and latency percentiles, errors by status;
4. overload: a server with --queue 2 flooded by 64 clients: how fast 503 comes back;
5. memory: the server's RSS after the first 100 requests and after 1,000.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unet_deploy.api import Predictor  # noqa: E402
from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig  # noqa: E402
from unet_deploy.export import export_onnx  # noqa: E402
from unet_deploy.synth import generate_test_images  # noqa: E402


def _model(folder: Path, width: int) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = DeployConfig(model=ModelConfig(base_channels=width, bilinear=True), inference=InferenceConfig(scale=1.0))
    return export_onnx(cfg.model.build().eval(), cfg, folder / f"unet{width}.onnx")


def _offline(model: Path, images: list[Path]) -> dict:
    predictor = Predictor.load(model, device="cpu")
    predictor.predict(images[0])  # warm-up
    t0 = time.perf_counter()
    summary = predictor.predict_files([str(p) for p in images], outputs=[str(images[0].parent.parent / "masks")])
    folder_s = time.perf_counter() - t0
    singles = []
    for path in images[:16]:
        t = time.perf_counter()
        predictor.mask_image(predictor.predict(path)).save(io.BytesIO(), format="PNG")
        singles.append(time.perf_counter() - t)
    assert summary.exit_code == 0
    return {"images": len(images), "seconds": folder_s, "images_per_s": len(images) / folder_s,
            "single_image_ms_p50": 1000 * float(np.median(singles))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    def __init__(self, model: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "unet_deploy", "serve", "-m", str(model), "--device",
                                      "cpu", "--port", str(self.port), *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("serve did not become ready")

    def rss_mib(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


async def _drive(url: str, bodies: list[bytes], concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` clients, each sending its next request when answered."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            t = time.perf_counter()
            r = await http.post(url + "/v1/predict", content=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": total, "seconds": seconds, "images_per_s": total / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "statuses": statuses}


def _load_runs(model: Path, bodies: list[bytes], per_client: int, total: int) -> tuple[list[dict], dict]:
    """Memory over the first ``total`` requests of a fresh server (RSS after a tenth and after all), then the
    concurrency runs on it."""
    server = _Server(model, "--max-batch", "4", "--max-wait-ms", "5", "--queue", "64")
    memory: dict = {}
    try:
        first = asyncio.run(_drive(server.url, bodies, 8, total // 10))
        memory["rss_mib_after_first_tenth"] = server.rss_mib()
        rest = asyncio.run(_drive(server.url, bodies, 8, total - total // 10))
        memory["rss_mib_after_all"] = server.rss_mib()
        memory["requests"] = total
        memory["ratio"] = memory["rss_mib_after_all"] / memory["rss_mib_after_first_tenth"]
        memory["statuses"] = {k: first["statuses"].get(k, 0) + rest["statuses"].get(k, 0)
                              for k in {*first["statuses"], *rest["statuses"]}}
        runs = [asyncio.run(_drive(server.url, bodies, c, max(per_client * c, 24))) for c in (1, 4, 16)]
    finally:
        memory["exit_code"] = server.stop()
    return runs, memory


def _overload(model: Path, body: bytes) -> dict:
    server = _Server(model, "--max-batch", "1", "--queue", "2")
    try:
        flood = asyncio.run(_drive_all(server.url, body, 64))
    finally:
        server.stop()
    busy = [ms for status, ms, _ in flood if status == 503]
    in_server = [server_ms for status, _, server_ms in flood if status == 503]
    return {"clients": 64, "ok": sum(1 for s, _, _ in flood if s == 200), "busy_503": len(busy),
            "other": sum(1 for s, _, _ in flood if s not in (200, 503)),
            "busy_p50_ms": float(np.percentile(busy, 50)) if busy else None,
            "busy_p99_ms": float(np.percentile(busy, 99)) if busy else None,
            "busy_in_server_p99_ms": float(np.percentile(in_server, 99)) if in_server else None}


async def _drive_all(url: str, body: bytes, clients: int) -> list[tuple[int, float, float]]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        async def one() -> tuple[int, float, float]:
            t = time.perf_counter()
            r = await http.post(url + "/v1/predict", content=body)
            return r.status_code, (time.perf_counter() - t) * 1000, float(r.headers.get("x-response-ms", "nan"))
        return list(await asyncio.gather(*(one() for _ in range(clients))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-serve.json")
    parser.add_argument("--width", type=int, default=16, help="U-Net base width (16 routine, 64 the seed's)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--per-client", type=int, default=6, help="requests per client at each concurrency")
    parser.add_argument("--memory-requests", type=int, default=1000, help="requests of the memory phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = _model(folder, args.width)
        generate_test_images(folder / "imgs", n=args.images, width=959, height=640, seed=11)
        images = sorted((folder / "imgs").glob("*.jpg"))
        bodies = [p.read_bytes() for p in images]
        load_before = os.getloadavg()
        offline = _offline(model, images)
        runs, memory = _load_runs(model, bodies, args.per_client, args.memory_requests)
        overload = _overload(model, bodies[0])
    result = {"command": f"python benchmarks/serve_load.py --width {args.width} --images {args.images} "
                         f"--per-client {args.per_client} --memory-requests {args.memory_requests}",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "load_before": load_before,
                          "load_after": os.getloadavg()},
              "model": {"width": args.width, "input": "959x640 JPEG", "backend": "ort"},
              "offline": offline, "serve": runs, "overload": overload, "memory": memory}
    c1, c16 = runs[0], runs[-1]
    result["ratios"] = {"c16_vs_offline_throughput": c16["images_per_s"] / offline["images_per_s"],
                        "c1_p50_minus_single_ms": c1["p50_ms"] - offline["single_image_ms_p50"],
                        "c1_p50_vs_single": c1["p50_ms"] / offline["single_image_ms_p50"]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("offline", "ratios", "overload", "memory")}, indent=2))
    for r in runs:
        print(f"c={r['concurrency']:>2}: {r['images_per_s']:.2f} img/s, p50 {r['p50_ms']:.0f} ms, "
              f"p99 {r['p99_ms']:.0f} ms, statuses {r['statuses']}")


if __name__ == "__main__":
    main()
