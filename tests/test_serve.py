"""`unet-deploy serve`: a real server process on 127.0.0.1, real HTTP requests, real files."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import ROOT, Reply, Server, multipart, mutated_images, png_pixels, write_test_images

from unet_deploy.api import Predictor
from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.export import export_onnx, export_torchscript
from unet_deploy.images.rle import rle_encode
from unet_deploy.runtime.openvino_backend import openvino_installed

pytest.importorskip("starlette", reason="serve needs starlette (a dependency of unet-deploy)")


@pytest.fixture(scope="module")
def served(tmp_path_factory, fit_on_heldout_cars) -> dict:
    """A base-8 U-Net fitted on 12 synthetic cars, as .pth, .ts, .onnx and OpenVINO IR (.xml, when the openvino
    extra is installed), and test images of many modes."""
    model, cfg, images = fit_on_heldout_cars(12, 30)
    d = tmp_path_factory.mktemp("serve")
    files = {"torch": save_checkpoint(d / "tiny.pth", model, cfg),
             "torchscript": export_torchscript(model, cfg, d / "tiny.ts"),
             "ort": export_onnx(model, cfg, d / "tiny.onnx")}
    if openvino_installed():
        from unet_deploy.export.openvino_writer import convert_onnx_to_ir

        files["openvino"] = convert_onnx_to_ir(files["ort"], cfg, d / "tiny.xml")
    return {"dir": d, "files": files, "images": write_test_images(d / "images", images[12]), "photo": images[13]}


def _start(served: dict, backend: str) -> Server:
    return Server(["-m", str(served["files"][backend]), "--device", "cpu", "--max-batch", "4", "--max-wait-ms", "30",
                   "--queue", "64"], served["dir"])


@pytest.fixture(scope="module")
def ort_server(served):
    srv = _start(served, "ort")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-2000:]


@pytest.fixture(scope="module", params=["ort", "torchscript", "torch", "openvino"])
def server(request, served, ort_server):
    """A server per backend (the ORT one is shared with the tests that need only one)."""
    if request.param not in served["files"]:
        pytest.skip("--backend openvino needs the openvino extra: pip install 'unet-deploy[openvino]'")
    if request.param == "ort":
        yield "ort", ort_server
        return
    srv = _start(served, request.param)
    yield request.param, srv
    assert srv.stop() == 0, srv.log.read_text()[-2000:]


def test_served_masks_are_the_masks_predict_writes(server, served) -> None:
    backend, srv = server
    predictor = Predictor.load(served["files"][backend], device="cpu")
    for path in served["images"]:
        reply = srv.post("/v1/predict", path.read_bytes())
        assert reply.status == 200, (path.name, reply.body[:200])
        assert reply.headers["content-type"] == "image/png" and reply.headers["x-request-id"]
        expected = np.asarray(predictor.mask_image(predictor.predict(path)))
        got = png_pixels(reply.body)
        assert got.shape == expected.shape, path.name
        agreement = (got == expected).mean()
        if backend == "torch":  # eager's batched kernels differ from the single image's by ~1e-8
            assert agreement >= 0.9999, (path.name, agreement)
        else:
            assert agreement == 1.0, (path.name, agreement)
        assert 0 < (got > 0).mean() < 1, f"{path.name}: the fixture model should find car and background"


def test_every_output_format_and_per_request_settings(server, served) -> None:
    backend, srv = server
    photo = served["images"][0]
    body, headers = multipart(photo.read_bytes(), photo.name)
    mask = png_pixels(srv.post("/v1/predict?format=png", body, headers).body)
    rle = srv.post("/v1/predict?format=rle", photo.read_bytes())
    assert rle.status == 200 and rle.body.decode().strip() == rle_encode(mask > 0)
    info = srv.post("/v1/predict?format=json", photo.read_bytes()).json()
    assert (info["width"], info["height"]) == (239, 160) and info["rle"] == rle_encode(mask > 0)
    assert abs(info["class_fractions"][1] - (mask > 0).mean()) < 1e-6
    overlay = png_pixels(srv.post("/v1/predict?format=overlay", photo.read_bytes()).body)
    assert overlay.shape == (160, 239, 3)
    low = png_pixels(srv.post("/v1/predict?threshold=0.05", photo.read_bytes()).body)
    high = png_pixels(srv.post("/v1/predict?threshold=0.95", photo.read_bytes()).body)
    assert (low > 0).sum() > (mask > 0).sum() > (high > 0).sum()
    flipped = png_pixels(srv.post("/v1/predict?tta=1", photo.read_bytes()).body)
    predictor = Predictor.load(served["files"][backend], device="cpu", tta=True)
    expected = np.asarray(predictor.mask_image(predictor.predict(photo)))
    assert (flipped == expected).mean() >= 0.9999
    model = srv.get("/v1/model").json()
    assert model["model_file"] == served["files"][backend].name, "where the model lies is not the client's business"
    assert model["backend"] == backend and model["classes"] == 2 and model["mask_values"] == [0, 255]
    assert model["scale"] == 0.5 and model["threshold"] == 0.5 and model["precision"] == "fp32"


def test_crf_requests_match_predict_with_crf(ort_server, served) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    srv = ort_server
    photo = served["images"][0]
    reply = srv.post("/v1/predict?crf=1", photo.read_bytes())
    assert reply.status == 200, reply.body[:200]
    predictor = Predictor.load(served["files"]["ort"], device="cpu", crf=True, crf_workers=1)
    expected = np.asarray(predictor.mask_image(predictor.predict(photo)))
    np.testing.assert_array_equal(png_pixels(reply.body), expected)


def test_crf_requests_take_predicts_crf_flags(served) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    from unet_deploy.images.crf import CRFParams

    flags = {"--crf-gauss-sxy": "3", "--crf-bilat-sxy": "10", "--crf-bilat-srgb": "5", "--crf-iterations": "2"}
    params = CRFParams(gauss_sxy=3, bilat_sxy=10, bilat_srgb=5, iterations=2)
    srv = Server(["-m", str(served["files"]["ort"]), "--device", "cpu", "--crf",
                  *[x for pair in flags.items() for x in pair]], served["dir"])
    try:
        assert srv.get("/v1/model").json()["crf_params"]["bilat_srgb"] == 5
        photo = served["images"][0]
        got = png_pixels(srv.post("/v1/predict", photo.read_bytes()).body)
    finally:
        assert srv.stop() == 0
    tuned = Predictor.load(served["files"]["ort"], device="cpu", crf=True, crf_workers=1, crf_params=params)
    default = Predictor.load(served["files"]["ort"], device="cpu", crf=True, crf_workers=1)
    np.testing.assert_array_equal(got, np.asarray(tuned.mask_image(tuned.predict(photo))))
    assert (got != np.asarray(default.mask_image(default.predict(photo)))).any(), "the flags must change the mask"


def test_damaged_images_never_get_a_500(ort_server) -> None:
    """A sample of the seeded fuzz of tests/test_serve_fuzz.py, through HTTP (raw bodies and multipart)."""
    statuses = []
    for i, (fmt, data) in enumerate(mutated_images(25, seed=7)):
        body, headers = multipart(data, f"x.{fmt.lower()}") if i % 2 else (data, None)
        reply = ort_server.post("/v1/predict", body, headers)
        statuses.append(reply.status)
        assert reply.status in (200, 400, 413, 415), (fmt, i, reply.status, reply.body[:300])
        if reply.status != 200:
            message = reply.json()["error"]
            assert message and "\n" not in message, message
    assert {400, 200} <= set(statuses) and len(statuses) == 150
    assert ort_server.get("/readyz").status == 200


def test_concurrent_requests_are_batched(ort_server, served) -> None:
    srv = ort_server
    data = served["images"][0].read_bytes()
    batches_before = srv.metric("unet_deploy_batch_size_count")
    with cf.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda _: srv.post("/v1/predict", data), range(32)))
    assert [r.status for r in replies] == [200] * 32
    assert len({r.body for r in replies}) == 1, "the same image must give the same mask in any batch"
    batches = srv.metric("unet_deploy_batch_size_count") - batches_before
    assert batches < 32, f"32 concurrent requests ran as {batches} model calls: no batch larger than 1"
    assert srv.metric("unet_deploy_requests_total") >= 32


def test_bad_requests_get_one_line_json_errors(ort_server, served, tmp_path: Path) -> None:
    srv = ort_server
    photo = served["images"][0].read_bytes()
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels in a few kB
    no_file_body, no_file_headers = multipart(photo, field_name="notes")
    no_file_body = no_file_body.replace(b'filename="image.png"', b"")
    cases = [
        (srv.post("/v1/predict", b"GIF89a not really"), 400),
        (srv.post("/v1/predict", b"hello, not an image"), 415),
        (srv.post("/v1/predict", photo[: len(photo) // 2]), 400),
        (srv.post("/v1/predict", b""), 400),
        (srv.post("/v1/predict", bomb.read_bytes()), 413),
        (_announce_large_upload(srv, 21 * 1024 * 1024), 413),
        (srv.post("/v1/predict?format=bmp", photo), 400),
        (srv.post("/v1/predict?threshold=2", photo), 400),
        (srv.post("/v1/predict?crf=maybe", photo), 400),
        (srv.post("/v1/predict", no_file_body, no_file_headers), 400),
        (srv.post("/v1/predict", np.zeros(10, np.uint8).tobytes()), 415),
        (srv.get("/v1/predict"), 405),
        (srv.get("/nope"), 404),
    ]
    for i, (reply, status) in enumerate(cases):
        assert reply.status == status, (i, reply.status, reply.body[:200])
        message = reply.json()["error"]
        assert message and "\n" not in message, (i, message)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20)).save(tiny)
    assert srv.post("/v1/predict", tiny.read_bytes()).status == 400  # 10x10 after scaling: too small
    assert srv.get("/readyz").status == 200 and srv.post("/v1/predict", photo).status == 200


def _announce_large_upload(srv: Server, size: int) -> Reply:
    """Headers announcing ``size`` bytes, then the answer: the server refuses before the body is sent."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/predict")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        response = conn.getresponse()
        return Reply(response.status, response.read(), {k.lower(): v for k, v in response.getheaders()})
    finally:
        conn.close()


def test_request_ids_and_the_page(ort_server) -> None:
    srv = ort_server
    assert srv.get("/healthz", {"X-Request-ID": "client-id-42"}).headers["x-request-id"] == "client-id-42"
    assert float(srv.get("/healthz").headers["x-response-ms"]) >= 0  # the time spent in the server
    assert len(srv.get("/healthz", {"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]) == 16
    page = srv.get("/").body.decode()
    assert "<input type=\"file\"" in page and "/v1/predict" in page
    assert "http://" not in page and "https://" not in page, "the page must not load anything from outside"
    assert 'client-id-42' in srv.log.read_text(), "the access log names each request"


def test_overload_gets_503_at_once_and_the_server_recovers(served) -> None:
    big = served["dir"] / "big.jpg"
    Image.open(served["photo"]).resize((959, 640)).save(big, quality=90)
    srv = Server(["-m", str(served["files"]["ort"]), "--device", "cpu", "--queue", "2", "--max-batch", "1",
                  "--threads", "1"], served["dir"])
    try:
        data = big.read_bytes()
        with cf.ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(lambda _: srv.post("/v1/predict", data, timeout=120), range(50)))
        statuses = sorted({r.status for r in replies})
        assert statuses == [200, 503], statuses
        busy = next(r for r in replies if r.status == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"].startswith("busy:")
        assert srv.get("/readyz").status == 200 and srv.post("/v1/predict", data).status == 200
    finally:
        assert srv.stop() == 0


def test_token_auth_and_timeouts(served) -> None:
    photo = served["images"][0].read_bytes()
    srv = Server(["-m", str(served["files"]["ort"]), "--device", "cpu", "--timeout-s", "0.001"], served["dir"],
                 env={"UNET_DEPLOY_TOKEN": "s3cret"})
    try:
        assert srv.post("/v1/predict", photo).status == 401
        wrong = srv.post("/v1/predict", photo, {"Authorization": "Bearer guess"})
        assert wrong.status == 401 and "token" in wrong.json()["error"]
        assert srv.get("/v1/model").status == 401 and srv.get("/metrics").status == 401
        assert srv.get("/healthz").status == 200 and srv.get("/readyz").status == 200 and srv.get("/").status == 200
        late = srv.post("/v1/predict", photo, {"Authorization": "Bearer s3cret"})
        assert late.status == 504 and "--timeout-s" in late.json()["error"]
        assert srv.get("/v1/model", {"Authorization": "Bearer s3cret"}).status == 200
    finally:
        assert srv.stop() == 0


def test_sigterm_finishes_admitted_requests_then_exits_0(served) -> None:
    big = served["dir"] / "big2.jpg"
    Image.open(served["photo"]).resize((959, 640)).save(big, quality=90)
    srv = Server(["-m", str(served["files"]["ort"]), "--device", "cpu", "--max-batch", "1", "--threads", "1"],
                 served["dir"])
    data = big.read_bytes()
    with cf.ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(srv.post, "/v1/predict", data, None, 120) for _ in range(6)]
        deadline = time.monotonic() + 30
        while srv.metric("unet_deploy_in_flight") < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.proc.send_signal(15)
        time.sleep(0.2)
        late = srv.post("/v1/predict", data)
        replies = [p.result() for p in pending]
    assert [r.status for r in replies] == [200] * 6, "SIGTERM must not drop an admitted request"
    assert late.status == 503 and "shutting down" in late.json()["error"]
    assert srv.proc.wait(60) == 0


def test_a_client_that_leaves_has_its_queued_work_dropped(served) -> None:
    big = served["dir"] / "big3.jpg"
    Image.open(served["photo"]).resize((959, 640)).save(big, quality=90)
    srv = Server(["-m", str(served["files"]["ort"]), "--device", "cpu", "--max-batch", "1", "--threads", "1"],
                 served["dir"])
    try:
        data = big.read_bytes()
        calls_before = srv.metric("unet_deploy_batch_size_count")
        with cf.ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(srv.post, "/v1/predict", data, None, 120) for _ in range(3)]
            while srv.metric("unet_deploy_in_flight") < 3:
                time.sleep(0.02)
            leaver = socket.create_connection(("127.0.0.1", srv.port))
            leaver.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                           + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            deadline = time.monotonic() + 30  # one input on the model, two waiting, and the leaver's waiting
            while srv.metric("unet_deploy_queue_depth") < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert srv.metric("unet_deploy_queue_depth") == 3
            leaver.close()  # gone while its input waits behind the others
            assert [f.result().status for f in busy] == [200] * 3
        time.sleep(0.5)
        assert srv.metric("unet_deploy_batch_size_count") - calls_before == 3, "the dropped input still ran"
        assert srv.metric("unet_deploy_in_flight") == 0
    finally:
        assert srv.stop() == 0


def test_a_port_in_use_is_one_line_before_the_model_loads(served) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "unet_deploy", "serve", "-m", str(served["files"]["ort"]),
                              "--port", str(port)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2  # a user error, as for any bad flag
    assert run.stderr.strip().splitlines() == [f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address "
                                               "already in use); pick another --port (0: any free port) or stop the "
                                               "server that uses it"]


def test_workers_share_one_port_each_with_its_model(served) -> None:
    srv = Server(["-m", str(served["files"]["ort"]), "--device", "cpu", "--workers", "2"], served["dir"])
    try:
        data = served["images"][0].read_bytes()
        with cf.ThreadPoolExecutor(8) as pool:
            assert {r.status for r in pool.map(lambda _: srv.post("/v1/predict", data), range(16))} == {200}
        text = srv.get("/metrics").body.decode()
        workers = {line.split('worker="')[1].split('"')[0] for line in text.splitlines() if 'worker="' in line}
        assert len(workers) == 1 and workers != {"0"}, "each process reports its own metrics, labelled by pid"
        assert json.loads(srv.get("/v1/model").body)["max_batch"] == 1  # the default for ONNX Runtime on a CPU
    finally:
        srv.proc.send_signal(signal.SIGINT)  # Ctrl-C (or kill -INT) to the supervisor: every worker drains
        assert srv.proc.wait(60) == 0, srv.log.read_text()[-2000:]


def test_default_max_batch_follows_backend_and_device(served) -> None:
    from unet_deploy.serve.options import ServeOptions, max_batch_for
    from unet_deploy.serve.server import load_state

    state = load_state(ServeOptions(model=served["files"]["ort"], device="cpu"))
    try:  # a CPU batch runs no faster per image: one request per model call
        assert state.options.max_batch == state.engine.max_batch == state.model_info["max_batch"] == 1
        assert state.options.capacity == state.options.queue + 1
    finally:
        state.engine.close()
    assert max_batch_for("openvino", "cpu") == 4 and max_batch_for("ort", "cuda:0") == 4
    assert max_batch_for("torch", "cuda") == 4 and max_batch_for("torchscript", "cpu") == 1
    explicit = load_state(ServeOptions(model=served["files"]["ort"], device="cpu", max_batch=3))
    explicit.engine.close()
    assert explicit.engine.max_batch == 3 and explicit.model_info["max_batch"] == 3
