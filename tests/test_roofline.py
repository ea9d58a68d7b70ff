"""The roofline behind `benchmark --roofline`: the network's work is counted right, the peak probe runs
ONNX Runtime's real kernels, and the ceilings follow from both."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from unet_deploy import bench
from unet_deploy.bench.render.markdown import roofline_section
from unet_deploy.bench.roofline import measure_peaks, network_work, roofline_report
from unet_deploy.config import ModelConfig

pytestmark = pytest.mark.export


def test_seed_network_work_matches_the_published_figure() -> None:
    # 746 GFLOP at 959x640 for Pytorch-UNet's bilinear seed network (one multiply-add = 2 FLOP)
    work = network_work(ModelConfig(bilinear=True), 959, 640)
    assert work["gflop"] == pytest.approx(746.5, abs=0.05)
    assert work["gflop"] == pytest.approx(2 * work["gmac"])
    # 4x the pixels, 4x the work (up to the odd-size rounding inside the network)
    full = network_work(ModelConfig(bilinear=True), 1918, 1280)
    assert full["gflop"] / work["gflop"] == pytest.approx(4.0, rel=0.01)


@pytest.mark.parametrize("bilinear", [True, False])
def test_network_work_agrees_with_torch_flop_counter_at_odd_sizes(bilinear: bool) -> None:
    config = ModelConfig(bilinear=bilinear, base_channels=8)
    model = config.build().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 61, 97))
    assert network_work(config, 97, 61)["gflop"] * 1e9 == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_peak_probe_times_real_fp32_and_int8_kernels() -> None:
    layer = {"channels": 32, "height": 24, "width": 40}
    peaks = measure_peaks(threads=1, runs=2, layer=layer)
    assert peaks["gflop"] == pytest.approx(2 * 32 * 32 * 9 * 24 * 40 / 1e9)
    for key in ("fp32_ms", "int8_ms", "fp32_gflops", "int8_gops"):
        assert math.isfinite(peaks[key]) and peaks[key] > 0
    assert peaks["fp32_gflops"] == pytest.approx(peaks["gflop"] / (peaks["fp32_ms"] / 1e3))


def _case(backend: str, precision: str, ms: float) -> dict:
    return {"backend": backend, "precision": precision, "scale": 0.5, "input": "959x640", "input_width": 959,
            "input_height": 640, "latency": {"p50_ms": ms}, "peak_mib": 100.0, "parity": {"passed": True}}


def _roofline(fp32_peak: float, int8_peak: float) -> tuple[float, list[dict], dict]:
    """(network GFLOP, cases: eager 6.8 s / ORT 4.6 s / int8 1.5 s at 959x640, roofline with these peaks)."""
    config = ModelConfig(bilinear=False)
    peaks = {"layer": "probe", "gflop": 1.0, "threads": 2, "runs": 3, "fp32_ms": 1.0, "int8_ms": 1.0,
             "fp32_gflops": fp32_peak, "int8_gops": int8_peak}
    cases = [_case("torch", "fp32", 6800.0), _case("ort", "fp32", 4600.0), _case("ort-int8", "int8", 1500.0)]
    return network_work(config, 959, 640)["gflop"], cases, roofline_report({"cases": cases}, config, peaks)


def test_ceilings_follow_from_work_and_peaks_and_mark_targets_out_of_reach() -> None:
    gflop, cases, roof = _roofline(200.0, 800.0)
    (entry,) = roof["sizes"]
    assert entry["floor_ms"]["fp32"] == pytest.approx(1e3 * gflop / 200.0)
    assert entry["ceiling_speedup"]["int8"] == pytest.approx(6800.0 / (1e3 * gflop / 800.0))
    assert entry["cases"]["ort"]["share_of_peak"] == pytest.approx(gflop / 4.6 / 200.0)
    assert entry["cases"]["torch"]["share_of_peak"] is None  # eager is not an ORT kernel
    report = {"settings": {"quick": False, "image_size": list(bench.CARVANA_SIZE), "scales": [0.5],
                           "device": "cpu"}, "cases": cases, "roofline": roof}
    goals = {g["target"].split(" >=")[0]: g for g in bench.targets(report)}
    fp32 = goals["onnxruntime"]
    assert fp32["ceiling"] == pytest.approx(entry["ceiling_speedup"]["fp32"])
    assert fp32["reachable"] is (fp32["ceiling"] >= 2.5) and not fp32["met"]
    text = "\n".join(roofline_section(report))
    assert "200 GFLOP/s" in text and "898.6" in text


def test_a_disturbed_probe_never_gives_a_ceiling_below_what_was_observed() -> None:
    # the probe ran while the machine was busy: 100 GFLOP/s, but ORT did the whole network at ~195
    gflop, cases, roof = _roofline(100.0, 5000.0)
    assert roof["peaks"]["raised"] == ["fp32"]
    assert roof["peaks"]["fp32_gflops"] == pytest.approx(gflop / 4.6)
    assert roof["peaks"]["int8_gops"] == 5000.0  # not disturbed: kept
    (entry,) = roof["sizes"]
    assert entry["cases"]["ort"]["share_of_peak"] == pytest.approx(1.0)
    assert entry["ceiling_speedup"]["fp32"] == pytest.approx(6800.0 / 4600.0)
    report = {"settings": {"scales": [0.5]}, "cases": cases, "roofline": roof}
    assert "For fp32 a whole-network run beat the probe layer" in "\n".join(roofline_section(report))
