"""`unet-deploy serve` under hostile and heavy traffic: slow and endless uploads, oversized headers, images
whose header promises millions of pixels, foreign formats, requests past their deadline, shutdown with
stalled uploads, a dead batching task and dead --workers processes. Real servers on 127.0.0.1, raw sockets
for the clients that misbehave, bounded waits everywhere."""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil
import pytest
from PIL import Image
from serve_helpers import ROOT, Server, multipart, oip_image_request, request

pytest.importorskip("starlette", reason="serve needs starlette (a dependency of unet-deploy)")

READ_TIMEOUT_S = 1.5  #: the limited server's --read-timeout-s
SLACK_S = 0.8  #: how late after a deadline its answer may come on this shared 2-core machine


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A base-8 U-Net with random weights (answers do not matter here) as ONNX at scale 0.5, a photo-like
    image, and a `gs` stub on PATH that records whether Ghostscript ever ran."""
    import torch

    from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
    from unet_deploy.export import export_onnx

    d = tmp_path_factory.mktemp("limits")
    torch.manual_seed(0)
    cfg = DeployConfig(model=ModelConfig(base_channels=8, bilinear=True), inference=InferenceConfig(scale=0.5))
    model = export_onnx(cfg.model.build().eval(), cfg, d / "tiny.onnx")
    rng = np.random.default_rng(0)
    photo = d / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (160, 240, 3), dtype=np.uint8)).save(photo, quality=90)
    big = d / "big.png"  # 2800x2800: about 7,600 tiles at --tile 32, a few seconds
    Image.fromarray(np.tile(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8), (28, 28, 1))).save(big)
    bin_dir = d / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{d / 'gs-called'}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    return {"dir": d, "model": model, "photo": photo.read_bytes(), "big": big.read_bytes(),
            "gs_log": d / "gs-called", "env": {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}}


@pytest.fixture(scope="module")
def limited(files):
    """A server with small limits: 2 queued requests, 6 uploads at once, 1.5 s to send a request, 2 M pixels
    per image and 3 M pixels in work."""
    srv = Server(["-m", str(files["model"]), "--device", "cpu", "--threads", "1", "--max-batch", "1", "--queue", "2",
                  "--max-uploads", "6", "--read-timeout-s", str(READ_TIMEOUT_S), "--max-pixels", "2000000",
                  "--pixel-budget", "3000000", "--timeout-s", "20"], files["dir"], env=files["env"])
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


def _open(srv: Server, head: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    if head:
        sock.sendall(head)
    return sock


def _stalled_upload(srv: Server, body: bytes = b"") -> socket.socket:
    """A POST whose headers announce 23,084 bytes and whose body then stops (after ``body``)."""
    return _open(srv, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 23084\r\n\r\n" + body)


def _answer_and_close(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (within ``within`` s), and when it closed."""
    sock.settimeout(within)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic()
        data += chunk


def _response(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """One whole HTTP response (headers and its Content-Length of body), and when its last byte came."""
    sock.settimeout(within)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data, time.monotonic()


def _length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    return len(head) + 4 + (int(match.group(1)) if match else 0)


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def _timed_get(srv: Server, path: str) -> tuple[int, float]:
    start = time.monotonic()
    return request(srv.url + path, timeout=10).status, time.monotonic() - start


def test_slow_uploads_never_hold_queue_slots_and_end_in_408(limited, files) -> None:
    srv = limited
    start = time.monotonic()
    stalled = [_stalled_upload(srv) for _ in range(2)] + [_stalled_upload(srv, b"\x89PN")]  # 3 of 6 uploads
    with cf.ThreadPoolExecutor(3) as pool:  # 3 admitted at most: had the uploads taken them, these were 503
        replies = list(pool.map(lambda _: srv.post("/v1/predict", files["photo"]), range(3)))
    assert [r.status for r in replies] == [200] * 3, [r.body[:200] for r in replies if r.status != 200]
    stalled += [_stalled_upload(srv) for _ in range(3)]
    time.sleep(0.2)
    refused = srv.post("/v1/predict", files["photo"])  # a 7th upload while 6 are being received
    assert refused.status == 503 and "--max-uploads 6" in refused.json()["error"], refused.body[:200]
    assert refused.headers["retry-after"] == "1"
    assert all(_timed_get(srv, "/healthz") == (200, pytest.approx(0, abs=0.5)) for _ in range(3))
    for sock in stalled:
        data, closed = _answer_and_close(sock, READ_TIMEOUT_S + 5)
        assert _status(data) == 408 and b"--read-timeout-s" in data, data[-300:]
        assert closed - start < READ_TIMEOUT_S + 0.2 + 2 * SLACK_S, closed - start
        sock.close()
    assert srv.post("/v1/predict", files["photo"]).status == 200


def test_request_headers_are_bounded_in_size_and_time(limited) -> None:
    srv = limited
    start = time.monotonic()
    partial = _open(srv, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # the headers never end
    silent = _open(srv)  # connects and sends nothing
    keep_alive = _open(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # one request, then idle
    huge = _open(srv)
    huge.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200_000)
    data, closed = _answer_and_close(huge, 10)
    assert _status(data) == 431 and closed - start < 2, data[:200]
    assert _timed_get(srv, "/healthz") == (200, pytest.approx(0, abs=0.5))
    for sock, status in ((partial, 408), (silent, 408), (keep_alive, 200)):
        data, closed = _answer_and_close(sock, READ_TIMEOUT_S + 5)
        assert _status(data) == status, data[:200]
        assert READ_TIMEOUT_S - 0.2 < closed - start < READ_TIMEOUT_S + SLACK_S, (status, closed - start)
        sock.close()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS


def _peak_rss_mib(pid: int) -> float:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def test_pixels_are_admitted_from_the_header_within_the_memory_bound(limited) -> None:
    srv = limited
    bound = srv.get("/v1/model").json()["memory_bound_mib"]
    _reset_peak_rss(srv.proc.pid)
    huge = srv.post("/v1/predict", _png(7000, 7000))  # a few kB that would decode to 147 MB
    assert huge.status == 413 and "49,000,000 pixels, more than 2,000,000 (--max-pixels)" in huge.json()["error"]
    assert float(huge.headers["x-response-ms"]) < 500
    assert _peak_rss_mib(srv.proc.pid) < psutil.Process(srv.proc.pid).memory_info().rss / 2**20 + 20
    thin = srv.post("/v1/predict", _png(100_000, 1)).json()["error"]
    assert thin.startswith("image too small: 100000x1 px is 50000x0 at the model's scale 0.5") and "--scale" not in thin
    body = _png(1400, 1400)  # 1.96 M pixels each, 3 M in work at once: one at a time
    with cf.ThreadPoolExecutor(3) as pool:  # 3: what the queue admits, so only the budget turns one away
        replies = list(pool.map(lambda _: srv.post("/v1/predict?format=overlay", body), range(3)))
    statuses = sorted(r.status for r in replies)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    busy = next(r for r in replies if r.status == 503).json()["error"]
    assert "(--pixel-budget)" in busy and "this one has 1,960,000" in busy
    assert _peak_rss_mib(srv.proc.pid) <= bound, (_peak_rss_mib(srv.proc.pid), bound)
    assert srv.metric("unet_deploy_in_flight") == 0


def test_oip_infer_takes_the_same_admission_and_limits(limited) -> None:
    """POST /v2/models/unet/infer: --max-pixels from the header, the pixel budget for all of a request's images,
    the same budget shared with /v1, and the upload deadline."""
    srv = limited
    huge = srv.post("/v2/models/unet/infer", *oip_image_request([_png(7000, 7000)]))
    assert huge.status == 400 and "more than 2,000,000 (--max-pixels)" in huge.json()["error"], huge.body[:300]
    assert float(huge.headers["x-response-ms"]) < 500
    body = _png(1400, 1400)  # 1.96 M pixels each, 3 M in work at once
    two = srv.post("/v2/models/unet/infer", *oip_image_request([body, body]))
    assert two.status == 400 and "send fewer per request" in two.json()["error"], two.body[:300]
    one = oip_image_request([body], parameters={"binary_data_output": True})  # a JSON mask would count twice
    with cf.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: srv.post("/v2/models/unet/infer", *one), range(3)))
    statuses = sorted(r.status for r in replies)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    assert "(--pixel-budget)" in next(r for r in replies if r.status == 503).json()["error"]
    start = time.monotonic()
    stalled = _open(srv, b"POST /v2/models/unet/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")
    data, closed = _answer_and_close(stalled, READ_TIMEOUT_S + 5)
    assert _status(data) == 408 and closed - start < READ_TIMEOUT_S + 2 * SLACK_S, data[-300:]
    stalled.close()
    assert srv.metric("unet_deploy_in_flight") == 0


def test_only_the_listed_formats_are_decoded_and_ghostscript_never_runs(limited, files) -> None:
    srv = limited
    picture = Image.new("RGB", (64, 48), (200, 30, 30))
    for fmt in ("EPS", "PPM", "PCX", "ICO", "TGA", "SGI"):
        buffer = io.BytesIO()
        picture.save(buffer, fmt)
        for body, headers in ((buffer.getvalue(), None), multipart(buffer.getvalue(), "car.jpg")):
            reply = srv.post("/v1/predict", body, headers)
            assert reply.status == 415, (fmt, reply.status, reply.body[:200])
            assert reply.json()["error"] == "not an image this server reads: send JPEG, PNG, GIF, TIFF, BMP or WebP"
    assert not files["gs_log"].exists(), files["gs_log"].read_text()


def test_a_second_file_in_a_multipart_body_is_named(limited, files) -> None:
    one, headers = multipart(files["photo"], "a.jpg")
    boundary = headers["Content-Type"].split("boundary=")[1].encode()
    two = one.replace(b"--" + boundary + b"--", one.split(b"\r\n--" + boundary + b"--")[0] + b"\r\n--" + boundary
                      + b"--", 1)
    reply = limited.post("/v1/predict", two, headers)
    assert reply.status == 400 and reply.json()["error"].startswith("multipart body with more than one file"), \
        reply.body[:300]


@pytest.fixture
def slow(files):
    """A server on which the 2800x2800 image runs as about 7,600 tiles of 32 px, one tile per model call."""
    srv = Server(["-m", str(files["model"]), "--device", "cpu", "--threads", "1", "--tile", "32", "--timeout-s", "2",
                  "--read-timeout-s", "5", "--grace-s", "2"], files["dir"])
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def _send_slowly(srv: Server, body: bytes, seconds: float) -> socket.socket:
    """Headers now, then ``body`` in 10 parts over ``seconds``."""
    sock = _open(srv, f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    step = -(-len(body) // 10)
    for i in range(0, len(body), step):
        time.sleep(seconds / 10)
        sock.sendall(body[i:i + step])
    return sock


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def test_timeout_counts_from_arrival_and_the_work_is_dropped(slow, files) -> None:
    start = time.monotonic()
    sock = _send_slowly(slow, files["big"], 1.2)  # 1.2 s of the 2 s go to the upload
    data, answered = _response(sock, 10)
    assert _status(data) == 504 and b"of its arrival" in data, data[-300:]
    assert 1.9 < answered - start < 2.0 + 0.5, answered - start  # the issue: within --timeout-s + 0.5 s
    time.sleep(0.5)  # the tile batch running at the deadline ends
    before = _cpu_seconds(slow.proc.pid)
    time.sleep(1.5)
    assert _cpu_seconds(slow.proc.pid) - before < 0.25, "the dropped image's tiles still run"
    assert slow.metric("unet_deploy_in_flight") == 0
    start = time.monotonic()  # the Open Inference Protocol's infer: the same deadline
    body, headers = oip_image_request([files["big"]], parameters={"binary_data_output": True})
    reply = slow.post("/v2/models/unet/infer", body, headers)
    assert reply.status == 504 and "of its arrival" in reply.json()["error"], reply.body[:300]
    assert 1.9 < time.monotonic() - start < 2.0 + 0.5


def test_shutdown_cuts_uploads_and_ends_within_grace_without_traceback(slow, files) -> None:
    stalled = _stalled_upload(slow, b"\x89PNG")
    working = _open(slow, f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(files['big'])}\r\n\r\n"
                    .encode() + files["big"])
    time.sleep(0.5)  # admitted, its tiles running
    start = time.monotonic()
    slow.proc.send_signal(signal.SIGTERM)
    assert slow.proc.wait(10) == 0
    assert time.monotonic() - start < 2.0 + SLACK_S  # --grace-s 2 in all
    cut, _ = _answer_and_close(stalled, 5)
    assert _status(cut) == 503 and b"the upload was cut" in cut, cut[-200:]
    late, _ = _answer_and_close(working, 5)
    assert _status(late) in (503, 504), late[-200:]
    log = slow.log.read_text()
    assert "Traceback" not in log and "Error" not in log.replace('"error"', ""), log[-3000:]


_BROKEN_BATCHER = """
import sys
from unet_deploy.serve.batcher import MicroBatcher

calls = []
original = MicroBatcher._take

def take(self):
    calls.append(1)
    if len(calls) > 1:  # the warm-up batch runs; the first request's batch kills the batching task
        raise RuntimeError("simulated fault in the batching loop")
    return original(self)

MicroBatcher._take = take
from unet_deploy.cli import main
main(sys.argv[1:])
"""


def test_a_dead_batching_task_stops_the_server_with_one_line(files) -> None:
    port_server = Server.__new__(Server)  # a Server started through the fault-injecting launcher
    from serve_helpers import free_port

    port_server.port = free_port()
    port_server.url = f"http://127.0.0.1:{port_server.port}"
    port_server.log = files["dir"] / "broken.log"
    with open(port_server.log, "w") as out:
        port_server.proc = subprocess.Popen(
            [sys.executable, "-c", _BROKEN_BATCHER, "serve", "-m", str(files["model"]), "--device", "cpu",
             "--port", str(port_server.port)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        port_server.wait_ready()
        reply = port_server.post("/v1/predict", files["photo"], timeout=15)
        assert reply.status == 503 and "batching task ended" in reply.json()["error"], reply.body[:200]
        assert port_server.proc.wait(15) == 1
    finally:
        if port_server.proc.poll() is None:
            port_server.proc.kill()
    log = port_server.log.read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == ["error: the batching task ended (RuntimeError: simulated fault in the batching loop); no "
                      "request can be answered, so the server stops (exit code 1)"], log[-2000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_readyz_turns_503_when_the_batching_task_is_gone(files, monkeypatch) -> None:
    from starlette.testclient import TestClient

    from unet_deploy.serve.batcher import MicroBatcher
    from unet_deploy.serve.options import ServeOptions
    from unet_deploy.serve.server import DrainingServer, load_state

    calls: list[int] = []
    original = MicroBatcher._take

    def take(self):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated fault")
        return original(self)

    monkeypatch.setattr(MicroBatcher, "_take", take)
    state = load_state(ServeOptions(model=files["model"], device="cpu"))
    server = DrainingServer(state)
    app = cast(Any, server.config.app)
    with TestClient(app) as client:  # the lifespan: warm-up batch, then the batching task waits
        assert client.get("/readyz").status_code == 200 and server.exit_code == 0
        reply = client.post("/v1/predict", content=files["photo"])
        assert reply.status_code == 503 and "batching task ended (RuntimeError: simulated fault)" in reply.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"].startswith("broken: the batching task ended")
        assert client.post("/v1/predict", content=files["photo"]).status_code == 503
    assert server.exit_code == 1 and server.should_exit


def _workers(srv: Server) -> list[psutil.Process]:
    """The supervisor's live worker processes (not multiprocessing's resource tracker, not one just killed)."""
    found = []
    for child in psutil.Process(srv.proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_workers_are_restarted_and_a_second_signal_stops_them_all(files) -> None:
    srv = Server(["-m", str(files["model"]), "--device", "cpu", "--workers", "2", "--threads", "1", "--tile", "32",
                  "--timeout-s", "60"], files["dir"])
    try:
        first = _workers(srv)
        assert len(first) == 2
        first[0].kill()  # SIGKILL: as the OOM killer would
        deadline, new = time.monotonic() + 60, None
        while time.monotonic() < deadline and new is None:
            now = [w for w in _workers(srv) if w not in first]
            new = now[0] if now else None
            time.sleep(0.1)
        assert new is not None, "the dead worker was not replaced"
        seen: set[str] = set()  # /metrics is labelled by the answering worker's pid: the new one answers too
        while time.monotonic() < deadline and f'worker="{new.pid}"' not in seen:
            seen.update(re.findall(r'worker="\d+"', srv.get("/metrics").body.decode()))
        assert f'worker="{new.pid}"' in seen, seen
        with cf.ThreadPoolExecutor(4) as pool:
            assert {r.status for r in pool.map(lambda _: srv.post("/v1/predict", files["photo"]), range(8))} == {200}
        assert f"worker {first[0].pid} ended with exit code -9 after" in srv.log.read_text()
        working = _open(srv, f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(files['big'])}\r\n\r\n"
                        .encode() + files["big"])
        time.sleep(1.0)  # its tiles are running: a drain would wait for them
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)  # the second signal: everything stops now
        assert srv.proc.wait(10) == 1 and time.monotonic() - start < 3
        working.close()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert not [w for w in first[1:] if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert "Traceback" not in srv.log.read_text(), srv.log.read_text()[-3000:]


def test_the_server_uses_no_private_uvicorn_module() -> None:
    for path in (ROOT / "unet_deploy" / "serve").glob("*.py"):
        assert not re.search(r"uvicorn\._", path.read_text()), path
