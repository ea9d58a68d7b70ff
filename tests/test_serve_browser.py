"""The web page of `unet-deploy serve` in a real headless browser (Debian's chromium + chromedriver, driven by
selenium): upload an image, wait for the overlay, and check that the mask shown is the API's mask."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import Server, png_pixels

from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.export import export_onnx

pytest.importorskip("starlette", reason="serve needs starlette (a dependency of unet-deploy)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: .ci/run installs the browser and sets this: there, a missing browser is a failure, not a skip
REQUIRED = os.environ.get("UNET_DEPLOY_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if REQUIRED:
            pytest.fail("chromium and chromedriver are required: apt-get install chromium chromium-driver")
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, fit_on_heldout_cars):
    model, cfg, images = fit_on_heldout_cars(8, 20)
    d = tmp_path_factory.mktemp("page")
    save_checkpoint(d / "tiny.pth", model, cfg)
    onnx_file = export_onnx(model, cfg, d / "tiny.onnx")
    photo = d / "car.png"
    Image.open(images[10]).convert("RGB").resize((211, 141)).save(photo)
    srv = Server(["-m", str(onnx_file), "--device", "cpu"], d)
    yield srv, photo
    assert srv.stop() == 0


def _blob_bytes(driver, element_id: str) -> bytes:
    """The bytes behind an <img>'s blob: URL, read in the page."""
    script = """
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById(arguments[0]).src).then(r => r.arrayBuffer()).then(buf => {
            let s = ""; new Uint8Array(buf).forEach(b => s += String.fromCharCode(b)); done(btoa(s));
        }).catch(e => done("ERROR " + e));
    """
    encoded = driver.execute_async_script(script, element_id)
    assert not encoded.startswith("ERROR"), encoded
    return base64.b64decode(encoded)


def test_page_shows_the_overlay_and_the_apis_mask(browser, page_server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    srv, photo = page_server
    browser.set_script_timeout(30)
    served = 'unet_deploy_requests_total{endpoint="predict",protocol="v1",status="200",worker="0"}'
    predictions = srv.metric(served)
    browser.get(srv.url + "/")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "model"), "class"))
    assert "2 class(es)" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "file").send_keys(str(Path(photo).resolve()))
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1")
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("car.png: model and post-processing") and " ms" in status
    assert srv.metric(served) == predictions + 1, "one request per image"
    overlay = png_pixels(_blob_bytes(browser, "overlay"))
    shown = png_pixels(_blob_bytes(browser, "mask"))  # drawn in the page: RGBA, white on black
    assert overlay.shape[:2] == (141, 211) and shown.shape[:2] == (141, 211)
    api = png_pixels(srv.post("/v1/predict", photo.read_bytes()).body)
    np.testing.assert_array_equal(shown[..., 0], api)
    tinted = overlay[..., 1].astype(int) - overlay[..., 0]  # the foreground turns green
    assert tinted[api > 0].mean() > tinted[api == 0].mean() + 50
    assert 0 < (shown > 0).mean() < 1, "the fixture model should find car and background"
    naturally = browser.execute_script("return document.getElementById('overlay').naturalWidth")
    assert naturally == 211, "the overlay image must have loaded in the page"
