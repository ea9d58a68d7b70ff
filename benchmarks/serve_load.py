"""Load figures for `unet-deploy serve`, against offline `predict` in the same run.

    python benchmarks/serve_load.py --out benchmarks/results-serve.json   # writes the JSON, prints a table

What it does (all on this machine, the server on 127.0.0.1), on one server started once:
1. a base-N U-Net (bilinear; random weights: speed does not depend on them) exported to ONNX, and synthetic
   959x640 JPEGs (Carvana at scale 0.5, run at the model's scale 1.0);
2. memory: the server's RSS after the first tenth of --memory-requests and after all of them;
3. single images, paired: one offline prediction (the Predictor `predict` uses: decode + model + PNG) and then
   the same image served, image by image, so both medians come from the same minutes of a shared machine;
4. a bounded async load generator (httpx) at concurrency 1 and 4, then offline `predict` on the folder, then
   concurrency 16: throughput, latency percentiles, answers by status;
5. overload, on a server with --queue 2 --max-batch 1: a burst of 64 clients at once (only 200 and 503 may
   come back), then a full queue held by 4 clients while one client sends --probes requests one at a time
   (how fast a 503 comes back, seen by the client).
`--table results-serve.json` prints the markdown tables of RESULTS-serve.md from a JSON.

    python benchmarks/serve_load.py --hostile --out benchmarks/results-serve-hostile.json

runs the hostile run instead (`serve_hostile.py`: the server at its defaults while slow and oversized uploads
attack it and 4 normal clients measure; issue 22's targets); `--table` prints its tables too.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
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
from unet_deploy.images.synth import generate_test_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_hostile import hostile_run, render_hostile  # noqa: E402


def _model(folder: Path, width: int) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = DeployConfig(model=ModelConfig(base_channels=width, bilinear=True), inference=InferenceConfig(scale=1.0))
    return export_onnx(cfg.model.build().eval(), cfg, folder / f"unet{width}.onnx")


def _offline_folder(predictor: Predictor, images: list[Path]) -> dict:
    """Throughput of ``predict`` on the folder (what the c=16 run is compared with)."""
    start = time.perf_counter()
    summary = predictor.predict_files([str(p) for p in images], outputs=[str(images[0].parent.parent / "masks")])
    seconds = time.perf_counter() - start
    assert summary.exit_code == 0
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}


def _paired_singles(predictor: Predictor, url: str, images: list[Path]) -> dict:
    """Image by image, one offline prediction (decode + model + PNG encode) and then the same image served (one
    request at a time): paired samples, so both medians see the same moments of a shared machine."""
    offline, served = [], []
    with httpx.Client(timeout=300) as http:
        for path in images:
            start = time.perf_counter()
            predictor.mask_image(predictor.predict(path)).save(io.BytesIO(), format="PNG")
            offline.append(time.perf_counter() - start)
            body = path.read_bytes()
            start = time.perf_counter()
            answer = http.post(url + "/v1/predict", content=body)
            served.append(time.perf_counter() - start)
            assert answer.status_code == 200, answer.text
    return {"pairs": len(images), "single_image_ms_p50": 1000 * float(np.median(offline)),
            "served_ms_p50": 1000 * float(np.median(served))}


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
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": total, "seconds": seconds,
            "images_per_s": statuses.get("200", 0) / seconds,  # answered images only
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "statuses": statuses}


def _load_runs(model: Path, images: list[Path], per_client: int, total: int,
               max_batch: int) -> tuple[dict, list[dict], dict | None]:
    """On one fresh server: memory over the first ``total`` requests (RSS after a tenth and after all; skipped
    when ``total`` is 0), paired single images, concurrency 1 and 4, the offline folder, concurrency 16. The
    offline folder runs with ``--batch-size`` = the server's ``--max-batch``: the same batches on both sides."""
    predictor = Predictor.load(model, device="cpu", batch_size=max_batch)
    predictor.predict(images[0])  # warm-up
    bodies = [p.read_bytes() for p in images]
    # --timeout-s 600: at the seed width 16 queued CPU images legitimately take minutes (the default 30 s
    # would answer 504 and measure the timeout, not the server)
    server = _Server(model, "--max-batch", str(max_batch), "--max-wait-ms", "5", "--queue", "64",
                     "--timeout-s", "600")
    memory: dict | None = None
    try:
        if total:
            memory = _memory_run(server, bodies, total)
        paired = _paired_singles(predictor, server.url, images[:16])
        runs = [asyncio.run(_drive(server.url, bodies, c, max(per_client * c, len(bodies)))) for c in (1, 4)]
        offline = {**_offline_folder(predictor, images), **paired}
        runs.append(asyncio.run(_drive(server.url, bodies, 16, max(per_client * 16, len(bodies)))))
    finally:
        exit_code = server.stop()
    if memory is not None:
        memory["exit_code"] = exit_code
    return offline, runs, memory


def _memory_run(server: _Server, bodies: list[bytes], total: int) -> dict:
    first = asyncio.run(_drive(server.url, bodies, 8, total // 10))
    after_first = server.rss_mib()
    rest = asyncio.run(_drive(server.url, bodies, 8, total - total // 10))
    after_all = server.rss_mib()
    return {"requests": total, "rss_mib_after_first_tenth": after_first, "rss_mib_after_all": after_all,
            "ratio": after_all / after_first,
            "statuses": {k: first["statuses"].get(k, 0) + rest["statuses"].get(k, 0)
                         for k in {*first["statuses"], *rest["statuses"]}}}


def _overload(model: Path, body: bytes, probes: int) -> dict:
    """A server with --queue 2 --max-batch 1: a burst of 64 clients at once (only 200s and 503s may come back),
    then a full queue held by 4 clients while one client probes it ``probes`` times, one request at a time."""
    server = _Server(model, "--max-batch", "1", "--queue", "2")
    try:
        burst = asyncio.run(_drive_all(server.url, body, 64))
        with _QueueHolder(server.url, body, clients=4):
            probed = _probe(server.port, body, probes)
        healthy_after = httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    finally:
        server.stop()
    busy = [ms for status, ms, _ in probed if status == 503]
    in_server = [server_ms for status, _, server_ms in probed if status == 503]
    return {"burst": {"clients": 64, "ok": sum(1 for s, _, _ in burst if s == 200),
                      "busy_503": sum(1 for s, _, _ in burst if s == 503),
                      "other": sum(1 for s, _, _ in burst if s not in (200, 503)),
                      "busy_client_p50_ms": _percentile([ms for s, ms, _ in burst if s == 503], 50),
                      "busy_client_p99_ms": _percentile([ms for s, ms, _ in burst if s == 503], 99)},
            "probe": {"requests": probes, "busy_503": len(busy),
                      "admitted_200": sum(1 for s, _, _ in probed if s == 200),
                      "other": sum(1 for s, _, _ in probed if s not in (200, 503)),
                      "busy_p50_ms": _percentile(busy, 50), "busy_p90_ms": _percentile(busy, 90),
                      "busy_p99_ms": _percentile(busy, 99), "busy_max_ms": max(busy) if busy else None,
                      "busy_in_server_p99_ms": _percentile(in_server, 99)},
            "healthy_after": healthy_after}


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class _QueueHolder:
    """``clients`` threads that keep the server's queue full: each sends its next request as soon as the last
    is answered (after 50 ms when it was turned away), so the admitted count stays at the server's capacity."""

    def __init__(self, url: str, body: bytes, clients: int):
        self.url, self.body, self.stop = url, body, threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=300) as http:
            while not self.stop.is_set():
                if http.post(self.url + "/v1/predict", content=self.body).status_code == 503:
                    self.stop.wait(0.05)

    def __enter__(self) -> _QueueHolder:
        for thread in self.threads:
            thread.start()
        time.sleep(2.0)  # every holder has sent its first request
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(600)


def _probe(port: int, body: bytes, count: int) -> list[tuple[int, float, float]]:
    """``count`` sequential POSTs, each on a new connection (the standard library's client: no pool, little
    client-side work), 20 ms apart: (status, ms from connect to the last byte of the answer, server's ms)."""
    results = []
    for _ in range(count):
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        connection.request("POST", "/v1/predict", body=body, headers={"Content-Type": "image/jpeg"})
        answer = connection.getresponse()
        answer.read()
        elapsed = (time.perf_counter() - start) * 1000
        results.append((answer.status, elapsed, float(answer.getheader("x-response-ms") or "nan")))
        connection.close()
        time.sleep(0.02)
    return results


async def _drive_all(url: str, body: bytes, clients: int) -> list[tuple[int, float, float]]:
    """``clients`` requests sent at once: (status, ms seen by the client, ms in the server's handler)."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        async def one() -> tuple[int, float, float]:
            t = time.perf_counter()
            r = await http.post(url + "/v1/predict", content=body)
            return r.status_code, (time.perf_counter() - t) * 1000, float(r.headers.get("x-response-ms", "nan"))
        return list(await asyncio.gather(*(one() for _ in range(clients))))


def _targets(result: dict) -> dict:
    """Issue 14's targets, each as measured / limit / met."""
    offline, runs, probe = result["offline"], result["serve"], result["overload"]["probe"]
    c1_limit = 1.1 * offline["single_image_ms_p50"] + 20  # the paired offline time of the same images
    errors = sum(n for r in runs for status, n in r["statuses"].items() if status != "200")
    targets = {
        "c16_throughput_vs_offline": {"measured": result["ratios"]["c16_vs_offline_throughput"], "limit": 0.9},
        "c1_p50_ms": {"measured": offline["served_ms_p50"], "limit": c1_limit},
        "full_queue_503_p99_ms": {"measured": probe["busy_p99_ms"], "limit": 50.0},
        "errors_other_than_503": {"measured": errors + probe["other"] + result["overload"]["burst"]["other"],
                                  "limit": 0}}
    if result["memory"]:
        targets["rss_after_all_vs_first_tenth"] = {"measured": result["memory"]["ratio"], "limit": 1.05}
    for name, target in targets.items():
        higher_is_better = name == "c16_throughput_vs_offline"
        value = target["measured"]
        target["met"] = value is not None and (value >= target["limit"] if higher_is_better
                                               else value <= target["limit"])
    return targets


TARGET_LABELS = {
    "c16_throughput_vs_offline": "throughput at concurrency 16 ≥ 0.9× offline `predict` (ratio)",
    "c1_p50_ms": "p50 at concurrency 1 ≤ 1.1× one offline image + 20 ms (ms)",
    "full_queue_503_p99_ms": "a full queue answers 503 in ≤ 50 ms p99 (ms, client side)",
    "errors_other_than_503": "no answers other than 200 and 503 (count)",
    "rss_after_all_vs_first_tenth": "RSS after all requests ≤ 1.05× after the first tenth (ratio)",
}


def render_tables(result: dict) -> str:
    """The markdown tables of RESULTS-serve.md, from one JSON of this script."""
    offline, probe, burst = result["offline"], result["overload"]["probe"], result["overload"]["burst"]
    rows = ["| | images/s | p50 ms | p90 ms | p99 ms | answers |", "|---|---|---|---|---|---|",
            f"| offline `predict` (folder of {offline['images']}) | {offline['images_per_s']:.2f} | | | | |",
            f"| offline, one image (decode + model + PNG) | | {offline['single_image_ms_p50']:,.0f} | | | |",
            f"| served, one image, paired with the line above | | {offline['served_ms_p50']:,.0f} | | | "
            f"{offline['pairs']} × 200 |"]
    for run in result["serve"]:
        answers = ", ".join(f"{n} × {status}" for status, n in sorted(run["statuses"].items()))
        rows.append(f"| serve, concurrency {run['concurrency']} | {run['images_per_s']:.2f} | {run['p50_ms']:,.0f} "
                    f"| {run['p90_ms']:,.0f} | {run['p99_ms']:,.0f} | {answers} |")
    rows += ["", "| full queue (`--queue 2 --max-batch 1`) | requests | 200 | 503 | other "
                 "| 503 p50 / p90 / p99 / max ms |",
             "|---|---|---|---|---|---|",
             f"| one client probing, one request at a time | {probe['requests']} | {probe['admitted_200']} "
             f"| {probe['busy_503']} | {probe['other']} | {probe['busy_p50_ms']:.1f} / {probe['busy_p90_ms']:.1f} / "
             f"{probe['busy_p99_ms']:.1f} / {probe['busy_max_ms']:.1f} |",
             f"| a burst of {burst['clients']} clients at once | {burst['clients']} | {burst['ok']} "
             f"| {burst['busy_503']} | {burst['other']} "
             f"| {burst['busy_client_p50_ms']:.0f} / – / {burst['busy_client_p99_ms']:.0f} / – |",
             "", "| target (issue 14) | measured | limit | |", "|---|---|---|---|"]
    for name, target in result["targets"].items():
        digits = "d" if isinstance(target["limit"], int) else ".3f" if target["limit"] < 10 else ",.1f"
        rows.append(f"| {TARGET_LABELS[name]} | {target['measured']:{digits}} | {target['limit']:{digits}} "
                    f"| {'met' if target['met'] else '**not met**'} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-serve.json")
    parser.add_argument("--width", type=int, default=16, help="U-Net base width (16 routine, 64 the seed's)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--per-client", type=int, default=6, help="requests per client at each concurrency")
    parser.add_argument("--memory-requests", type=int, default=1000,
                        help="requests of the memory phase (0 skips it: the seed-width record run)")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="the server's --max-batch (1: its default for ONNX Runtime on a CPU) and the "
                             "offline folder's --batch-size")
    parser.add_argument("--probes", type=int, default=200, help="requests sent one by one to a full queue")
    parser.add_argument("--table", type=Path, help="print the markdown tables of this JSON and exit")
    parser.add_argument("--hostile", action="store_true", help="the hostile run (serve_hostile.py) instead")
    parser.add_argument("--seconds", type=float, default=60.0, help="hostile run: how long the attack lasts")
    parser.add_argument("--slow", type=int, default=32,
                        help="hostile run: clients sending a body at 1 byte/s, and as many sending headers only")
    parser.add_argument("--big", type=int, default=16, help="hostile run: clients uploading a 7000x7000 PNG")
    parser.add_argument("--normal-requests", type=int, default=15,
                        help="hostile run: requests per normal client (4 of them) before the attack")
    parser.add_argument("--heavy", type=int, default=36,
                        help="hostile run: clients at once asking for a 1000x1000 RGBA overlay with TTA (memory)")
    args = parser.parse_args()
    if args.table:
        result = json.loads(args.table.read_text())
        print(render_hostile(result) if "attack" in result else render_tables(result), end="")
        return
    if args.hostile:
        _hostile_main(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = _model(folder, args.width)
        generate_test_images(folder / "imgs", n=args.images, width=959, height=640, seed=11)
        images = sorted((folder / "imgs").glob("*.jpg"))
        load_before = os.getloadavg()
        offline, runs, memory = _load_runs(model, images, args.per_client, args.memory_requests, args.max_batch)
        overload = _overload(model, images[0].read_bytes(), args.probes)
    result = {"command": f"python benchmarks/serve_load.py --width {args.width} --images {args.images} "
                         f"--per-client {args.per_client} --memory-requests {args.memory_requests} "
                         f"--max-batch {args.max_batch} --probes {args.probes}",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "load_before": load_before,
                          "load_after": os.getloadavg()},
              "model": {"width": args.width, "input": "959x640 JPEG", "backend": "ort"},
              "offline": offline, "serve": runs, "overload": overload, "memory": memory}
    c16 = runs[-1]
    result["ratios"] = {"c16_vs_offline_throughput": c16["images_per_s"] / offline["images_per_s"],
                        "served_single_minus_offline_ms": offline["served_ms_p50"] - offline["single_image_ms_p50"],
                        "served_single_vs_offline": offline["served_ms_p50"] / offline["single_image_ms_p50"]}
    result["targets"] = _targets(result)
    staged = args.out.with_name(args.out.name + ".partial")
    staged.write_text(json.dumps(result, indent=2) + "\n")
    staged.replace(args.out)
    print(json.dumps({k: result[k] for k in ("offline", "ratios", "overload", "memory", "targets")}, indent=2))
    for r in runs:
        print(f"c={r['concurrency']:>2}: {r['images_per_s']:.2f} img/s, p50 {r['p50_ms']:.0f} ms, "
              f"p99 {r['p99_ms']:.0f} ms, statuses {r['statuses']}")


def _hostile_main(args: argparse.Namespace) -> None:
    out = args.out if args.out != ROOT / "benchmarks" / "results-serve.json" else \
        ROOT / "benchmarks" / "results-serve-hostile.json"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = _model(folder, args.width)
        generate_test_images(folder / "imgs", n=args.images, width=959, height=640, seed=11)
        images = sorted((folder / "imgs").glob("*.jpg"))
        load_before = os.getloadavg()
        result = hostile_run(_Server, model, images, args)
    command = (f"python benchmarks/serve_load.py --hostile --width {args.width} --images {args.images} "
               f"--seconds {args.seconds:g} --slow {args.slow} --big {args.big} "
               f"--normal-requests {args.normal_requests} --heavy {args.heavy}")
    result = {"command": command,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "load_before": load_before,
                          "load_after": os.getloadavg()},
              "model": {"width": args.width, "input": "959x640 JPEG", "backend": "ort"}, **result}
    staged = out.with_name(out.name + ".partial")
    staged.write_text(json.dumps(result, indent=2) + "\n")
    staged.replace(out)
    print(render_hostile(result), end="")


if __name__ == "__main__":
    main()
