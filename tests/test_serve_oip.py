"""`unet-deploy serve`'s Open Inference Protocol (KServe v2 REST) spoken by the real client, ``tritonclient[http]``,
against real server processes on 127.0.0.1; and the hostile bodies a client may send."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from serve_helpers import Server, request

from unet_deploy.api import Predictor
from unet_deploy.export import export_onnx
from unet_deploy.images.image_io import load_image, preprocess
from unet_deploy.images.postprocess import colorize, logits_to_mask
from unet_deploy.runtime.openvino_backend import openvino_installed

pytest.importorskip("starlette", reason="serve needs starlette (a dependency of unet-deploy)")
http = pytest.importorskip("tritonclient.http", reason="needs the client: pip install 'tritonclient[http]'")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

TOKEN = "oip-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  #: tritonclient adds to the headers it is given: pass a copy


@pytest.fixture(scope="module")
def served(tmp_path_factory, fit_on_heldout_cars) -> dict:
    """A base-8 U-Net fitted on 12 synthetic cars as ONNX and OpenVINO IR (with the openvino extra), four held-out
    cars at one odd size (JPEG and PNG) and one of another size."""
    model, cfg, images = fit_on_heldout_cars(12, 30)
    d = tmp_path_factory.mktemp("oip")
    files = {"ort": export_onnx(model, cfg, d / "tiny.onnx")}
    if openvino_installed():
        from unet_deploy.export.openvino_writer import convert_onnx_to_ir

        files["openvino"] = convert_onnx_to_ir(files["ort"], cfg, d / "tiny.xml")
    same = []
    for i, source in enumerate(images[12:16]):
        path = d / (f"car{i}.jpg" if i % 2 else f"car{i}.png")
        Image.open(source).convert("RGB").resize((151, 101)).save(path, quality=95)
        same.append(path)
    other = d / "other.png"
    Image.open(images[16]).convert("RGB").resize((97, 61)).save(other)
    return {"dir": d, "files": files, "same": same, "other": other}


@pytest.fixture(scope="module")
def ort_server(served):
    """ONNX Runtime, with a token (only the health routes are open)."""
    srv = Server(["-m", str(served["files"]["ort"]), "--device", "cpu", "--max-batch", "4", "--max-wait-ms", "30",
                  "--token", TOKEN], served["dir"])
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-2000:]


@pytest.fixture(scope="module", params=["ort", "openvino"])
def server(request, served, ort_server):
    """(backend, server, model name, headers): ONNX Runtime as ``unet`` with a token, OpenVINO as ``carvana``."""
    if request.param not in served["files"]:
        pytest.skip("--backend openvino needs the openvino extra: pip install 'unet-deploy[openvino]'")
    if request.param == "ort":
        yield "ort", ort_server, "unet", AUTH
        return
    srv = Server(["-m", str(served["files"]["openvino"]), "--device", "cpu", "--max-batch", "4", "--max-wait-ms",
                  "30", "--model-name", "carvana"], served["dir"])
    yield "openvino", srv, "carvana", {}
    assert srv.stop() == 0, srv.log.read_text()[-2000:]


def _client(srv: Server):
    return http.InferenceServerClient(srv.url.removeprefix("http://"), network_timeout=60)


def _image_input(paths: list[Path]):
    tensor = http.InferInput("image", [len(paths)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=object), binary_data=True)
    return tensor


def _predicted(predictor: Predictor, paths: list[Path]) -> np.ndarray:
    """What `predict` writes for each file (the mask PNG's pixels), stacked."""
    return np.stack([np.asarray(predictor.mask_image(predictor.predict(p))) for p in paths])


def test_health_and_metadata_through_tritonclient(server) -> None:
    backend, srv, name, headers = server
    client = _client(srv)
    assert client.is_server_live() and client.is_server_ready(), "health is open, with or without a token"
    assert client.is_model_ready(name) and not client.is_model_ready("no-such-model")
    assert client.is_model_ready(name, "1") and not client.is_model_ready(name, "2")
    meta = client.get_server_metadata(headers=dict(headers))
    assert meta["name"] == "unet-deploy" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(name, headers=dict(headers))
    assert model["name"] == name and model["versions"] == ["1"] and model["platform"].startswith("unet-deploy/")
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]} == {
        "image": ("BYTES", [-1]), "pixels": ("FP32", [-1, 3, -1, -1])}
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]} == {
        "mask": ("UINT8", [-1, -1, -1]), "probabilities": ("FP32", [-1, 2, -1, -1])}
    assert model["parameters"]["mask_values"] == [0, 255]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model", headers=dict(headers))
    assert e.value.status() == "404" and repr(name) in e.value.message()


def test_infer_masks_are_the_masks_predict_writes(server, served) -> None:
    """One image and a batch of 4, outputs in binary and as JSON, gzip and deflate bodies: `predict`'s pixels."""
    backend, srv, name, headers = server
    client = _client(srv)
    predictor = Predictor.load(served["files"][backend], device="cpu")
    cases = [([served["other"]], True, None), (served["same"], True, "gzip"), ([served["same"][1]], False, None),
             (served["same"], False, "deflate")]
    for paths, binary, compression in cases:
        outputs = [http.InferRequestedOutput("mask", binary_data=binary),
                   http.InferRequestedOutput("probabilities", binary_data=binary)]
        result = client.infer(name, [_image_input(paths)], outputs=outputs, headers=dict(headers), request_id="r7",
                              request_compression_algorithm=compression)
        mask, probs = result.as_numpy("mask"), result.as_numpy("probabilities")
        expected = _predicted(predictor, paths)
        assert mask.dtype == np.uint8 and mask.shape == expected.shape, (paths, binary)
        np.testing.assert_array_equal(mask, expected, err_msg=f"{backend} {len(paths)} image(s), binary {binary}")
        assert 0 < (mask > 0).mean() < 1, "the fixture model should find car and background"
        assert probs.dtype == np.float32 and probs.shape == (len(paths), 2, *expected.shape[1:])
        np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
        assert ((probs[:, 1] > 0.5) == (mask > 0)).mean() > 0.999
        assert result.get_response()["id"] == "r7" and result.get_response()["model_name"] == name
    default = client.infer(name, [_image_input(served["same"][:2])], headers=dict(headers))  # no outputs: mask, binary
    assert [o["name"] for o in default.get_response()["outputs"]] == ["mask"]
    low = client.infer(name, [_image_input([served["other"]])], headers=dict(headers), parameters={"threshold": 0.05})
    high = client.infer(name, [_image_input([served["other"]])], headers=dict(headers), parameters={"threshold": 0.95})
    assert (low.as_numpy("mask") > 0).sum() > (high.as_numpy("mask") > 0).sum()


def test_preprocessed_pixels_in_json_and_binary(server, served) -> None:
    backend, srv, name, headers = server
    client = _client(srv)
    predictor = Predictor.load(served["files"][backend], device="cpu")
    x = np.stack([preprocess(load_image(p), 0.5) for p in served["same"][:2]])
    expected = colorize(logits_to_mask(predictor.runner.native(x), None, 0.5), [0, 255])
    for binary in (False, True):
        pixels = http.InferInput("pixels", list(x.shape), "FP32")
        pixels.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(name, [pixels], outputs=[http.InferRequestedOutput("mask", binary_data=binary)],
                              headers=dict(headers))
        np.testing.assert_array_equal(result.as_numpy("mask"), expected)


def _raw(srv: Server, body: bytes, headers: dict[str, str] | None = None, model: str = "unet"):
    reply = request(f"{srv.url}/v2/models/{model}/infer", body, {**AUTH, **(headers or {})}, "POST")
    assert set(reply.json()) == {"error"} or reply.status == 200, reply.body[:300]
    return reply


def _binary_request(inputs: list[dict], binary: bytes, **extra: object) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + binary, {"Inference-Header-Content-Length": str(len(header))}


def _bytes_element(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def test_hostile_requests_get_one_line_400s(ort_server, served) -> None:
    srv = ort_server
    png = served["same"][0].read_bytes()
    element = _bytes_element(png)
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(element)}}
    ok = _raw(srv, *_binary_request([image], element))
    assert ok.status == 200 and ok.headers["content-type"] == "application/json"
    other = _bytes_element(served["other"].read_bytes())
    text = _bytes_element(b"plain text, not an image file of any kind")
    pixels = {"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32]}
    cases = [
        ("malformed JSON", b'{"inputs": [', {}),
        ("must be an object", b"[1, 2]", {}),
        ("has no 'inputs'", b'{"outputs": []}', {}),
        ("it must be BYTES [N]", *_binary_request([{**image, "datatype": "FP32"}], element)),
        ("it must be BYTES [N]", *_binary_request([{**image, "shape": [1, 1]}], element)),
        ("not one of the protocol's", *_binary_request([{**image, "datatype": "FLOAT"}], element)),
        ("truncated", *_binary_request([image], element[: len(element) // 2])),
        ("element 1 is", *_binary_request([{**image, "parameters": {"binary_data_size": 100}}], element[:100])),
        ("belong to no input", *_binary_request([image], element + b"extra")),
        ("Inference-Header-Content-Length", json.dumps({"inputs": [image]}).encode(),
         {"Inference-Header-Content-Length": "99999"}),
        ("different sizes", *_binary_request([{**image, "shape": [2], "parameters": {
            "binary_data_size": len(element) + len(other)}}], element + other)),
        ("this model takes 3", json.dumps({"inputs": [{**pixels, "shape": [1, 1, 32, 32], "data": [0.5] * 1024}]
                                          }).encode(), {}),
        ("'data' has 3 values", json.dumps({"inputs": [{**pixels, "data": [0.5] * 3}]}).encode(), {}),
        ("no output 'logits'", *_binary_request([image], element, outputs=[{"name": "logits"}])),
        ("not an image this server reads", *_binary_request([{**image, "parameters": {
            "binary_data_size": len(text)}}], text)),
        ("broken gzip body", gzip.compress(b"{}")[:10] + b"\xff" * 16, {"Content-Encoding": "gzip"}),
        ("truncated gzip body", gzip.compress(b'{"inputs": []}' * 50)[:-12], {"Content-Encoding": "gzip"}),
        ("Content-Encoding 'br'", b"{}", {"Content-Encoding": "br"}),
    ]
    for wanted, body, headers in cases:
        reply = _raw(srv, body, headers)
        assert reply.status == 400 and wanted in reply.json()["error"], (wanted, reply.status, reply.body)
    assert _raw(srv, b"{}", model="other").status == 404
    assert request(f"{srv.url}/v2/models/unet/infer", *_binary_request([image], element), "POST").status == 401
    assert request(f"{srv.url}/v2", headers={}).status == 401
    assert srv.metric('unet_deploy_requests_total{endpoint="infer",protocol="oip",status="400",worker="0"}',
                      AUTH) >= len(cases)


def test_a_gzip_bomb_is_refused_without_inflating_it(ort_server) -> None:
    """256 MiB of zeros in 256 KiB of gzip: refused at --max-upload-mb (20 MB) of output, memory flat."""
    srv = ort_server
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join([packer.compress(b'{"inputs": [{"name": "image", "data": ["'), *(packer.compress(zeros)
                                                                                   for _ in range(256)),
                     packer.flush()])
    assert len(bomb) < 400_000
    process = psutil.Process(srv.proc.pid)
    before = process.memory_info().rss
    start = time.perf_counter()
    reply = _raw(srv, bomb, {"Content-Encoding": "gzip"})
    seconds = time.perf_counter() - start
    assert reply.status == 413 and "inflates to more than" in reply.json()["error"], reply.body
    assert process.memory_info().rss - before < 24 * 2**20, "the bomb was not inflated in memory"
    assert seconds < 10


def test_mutated_request_bodies_are_400s_never_crashes() -> None:
    """3,000 seeded mutations of valid bodies (binary and JSON, BYTES and FP32) through the codec: every fault
    is an HTTPError with one line (the server answers it), never another exception."""
    import io

    from serve_helpers import mutate

    from unet_deploy.serve.decode import HTTPError
    from unet_deploy.serve.oip_codec import bytes_elements, numeric_array, read_request

    element = _bytes_element(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    image = {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 2 * len(element)}}
    x = np.linspace(0, 1, 2 * 3 * 4 * 5, dtype=np.float32)
    pixels = {"name": "pixels", "datatype": "FP32", "shape": [2, 3, 4, 5]}
    seeds = [_binary_request([image], element * 2, outputs=[{"name": "mask", "parameters": {"binary_data": True}}]),
             _binary_request([{**pixels, "parameters": {"binary_data_size": x.nbytes}}], x.tobytes()),
             (json.dumps({"inputs": [{**pixels, "data": x.reshape(2, 3, 20).tolist()}], "id": "a"}).encode(), {})]
    rng = np.random.default_rng(11)
    faults = 0
    for i in range(3000):
        body, headers = seeds[i % len(seeds)]
        damaged = mutate(body, rng)
        file = io.BytesIO(damaged)
        try:
            parsed = read_request(file, len(damaged), headers.get("Inference-Header-Content-Length"))
            for tensor in parsed.inputs:
                if tensor.datatype == "BYTES":
                    bytes_elements(file, tensor)
                else:
                    numeric_array(file, tensor)
        except HTTPError as e:
            assert e.status == 400 and "\n" not in e.message and len(e.message) < 400, e.message
            faults += 1
    assert faults > 1000, "the mutations should mostly break the bodies"
