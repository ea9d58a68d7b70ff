"""The roofline behind `benchmark --roofline`: the network's work is counted right, the clock is timed, the
per-cycle table maps real cpuinfo samples, the layer probe runs every installed runtime, and ceilings and
fractions follow from the two peaks - never from the network's own run."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from unet_deploy import bench
from unet_deploy.bench import cpu_clock
from unet_deploy.bench.analysis import ceilings
from unet_deploy.bench.peaks import measure_layer_peaks
from unet_deploy.bench.render.markdown import roofline_section
from unet_deploy.bench.render.table import render_roofline
from unet_deploy.bench.roofline import ROOFLINE_SCHEMA, measure_peaks, network_work, precision_of, roofline_report
from unet_deploy.bench.uarch import per_cycle, read_cpu
from unet_deploy.config import ModelConfig

pytestmark = pytest.mark.export
ROOT = Path(__file__).resolve().parents[1]
SMALL_LAYER = {"channels": 32, "height": 24, "width": 40}
X86_LINUX = platform.machine().lower() in ("x86_64", "amd64") and Path("/proc/cpuinfo").exists()


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


# --- the clock ---------------------------------------------------------------------------------------------

def test_add_chain_machine_code_loops_back_to_its_first_add() -> None:
    code = cpu_clock.add_chain_code(adds=3)
    assert code[:8] == bytes.fromhex("4831c0ba01000000") and code[8:17] == bytes.fromhex("4801d0") * 3
    jnz_end = len(code) - 1  # ret follows the jnz
    rel = int.from_bytes(code[jnz_end - 4:jnz_end], "little", signed=True)
    assert jnz_end + rel == 8 and code[-1] == 0xC3


@pytest.mark.skipif(not X86_LINUX, reason="the machine-code clock needs x86-64 Linux")
def test_clock_is_timed_on_a_dependent_add_chain_in_under_a_second() -> None:
    t0 = time.process_time()  # CPU time: the wall time also holds whatever else shares the cores
    clock = cpu_clock.measure_clock(threads=1)
    took = time.process_time() - t0
    assert took < 1.0, took
    assert clock["measured"] is True and clock["method"].startswith("measured"), clock
    assert 0.5 <= clock["ghz"] <= 6.0, clock
    assert clock["reported_ghz"] is not None
    assert 0.5 * clock["reported_ghz"] <= clock["ghz"] <= 1.5 * clock["reported_ghz"], clock  # ±50 % of cpuinfo
    assert len(clock["samples"]) == 5


def test_clock_falls_back_to_the_reported_clock_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_args: object) -> list[float]:
        raise OSError("mmap: PROT_EXEC refused")

    monkeypatch.setattr(cpu_clock, "_time_add_chain", refused)
    monkeypatch.setattr(cpu_clock, "reported_ghz", lambda: 2.45)
    clock = cpu_clock.measure_clock(threads=2)
    assert clock["measured"] is False and clock["ghz"] == 2.45 and clock["samples"] == []
    assert clock["method"].startswith("reported by the OS (not measured: mmap: PROT_EXEC refused")


# --- per-cycle table ---------------------------------------------------------------------------------------

def _cpuinfo(vendor: str, family: int, model: int, name: str, flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"model name\t: {name}\ncpu MHz\t\t: 2445.410\nflags\t\t: fpu sse sse2 {flags}\n\nprocessor\t: 1\n")


AVX2 = "avx fma avx2"
AVX512 = AVX2 + " avx512f avx512bw avx512vl"
CPUINFO = {  # name: (cpuinfo text, uarch, source, (fp32, bf16, int8), capped)
    "zen3": (_cpuinfo("AuthenticAMD", 25, 1, "AMD EPYC", AVX2), "Zen 3", "table", (32, 32, 64), []),
    "zen4": (_cpuinfo("AuthenticAMD", 25, 0x11, "AMD EPYC 9654 96-Core Processor",
                      AVX512 + " avx512_bf16 avx512_vnni"), "Zen 4", "table", (32, 64, 128), []),
    "zen4-avx512-hidden": (_cpuinfo("AuthenticAMD", 25, 0x11, "AMD EPYC", AVX2), "Zen 4", "table", (32, 32, 64),
                           ["bf16", "int8"]),
    "sapphire-rapids": (_cpuinfo("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8480+",
                                 AVX512 + " avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8"),
                        "Sapphire Rapids", "table", (64, 1024, 2048), []),
    "unknown-cascade-lake": (_cpuinfo("GenuineIntel", 6, 0x55, "Intel(R) Xeon(R) Gold 6248", AVX512 + " avx512_vnni"),
                             "unknown model, AVX-512 VNNI", "flags", (64, 64, 256), []),
    # a VM that reports a made-up model number (family 6 model 167) for a Xeon with AMX: decided by the flags
    "xeon-amx-vm": (_cpuinfo("GenuineIntel", 6, 167, "Intel(R) Xeon(R) Processor",
                             AVX512 + " avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8"),
                    "unknown model, AMX", "flags", (64, 1024, 2048), []),
    "unknown-arm64": ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp bf16\n", "unknown model, asimd",
                      "flags",
                      (16, 32, 64), []),
    "unknown-nothing": ("processor\t: 0\nvendor_id\t: Nobody\n", "unknown", "unknown", (None, None, None), []),
}


@pytest.mark.parametrize("name", list(CPUINFO))
def test_microarchitecture_table_maps_cpuinfo_samples(name: str) -> None:
    text, uarch, source, (fp32, bf16, int8), capped = CPUINFO[name]
    ops = per_cycle(read_cpu(text))
    assert (ops["uarch"], ops["source"], ops["capped"]) == (uarch, source, capped)
    assert (ops["fp32"], ops["bf16"], ops["int8"]) == (fp32, bf16, int8)


def test_cpuinfo_parse_reads_the_first_processor_only() -> None:
    cpu = read_cpu(CPUINFO["zen4"][0])
    assert (cpu.vendor, cpu.family, cpu.model, cpu.model_name) == ("AuthenticAMD", 25, 0x11,
                                                                  "AMD EPYC 9654 96-Core Processor")
    assert "avx512_vnni" in cpu.flags and cpu.arch == "x86_64"


# --- the layer probe ---------------------------------------------------------------------------------------

def test_layer_probe_times_every_installed_runtime_and_skips_the_rest() -> None:
    from unet_deploy.bench.peaks import PROBES

    def absent(*_args: object) -> None:
        raise ImportError("no module named nothere")

    def broken(*_args: object) -> None:
        raise RuntimeError("kernel refused\nsecond line")

    probes = PROBES + (("nothere", "fp32", absent), ("broken", "int8", broken))
    peaks = measure_layer_peaks(threads=1, runs=2, layer=SMALL_LAYER, probes=probes)
    assert peaks["gflop"] == pytest.approx(2 * 32 * 32 * 9 * 24 * 40 / 1e9)
    ran = {(r["runtime"], r["precision"]) for r in peaks["rates"]}
    assert {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32"), ("torch", "bf16")} <= ran
    assert peaks["skipped"]["nothere fp32"] == "not installed"
    assert peaks["skipped"]["broken int8"] == "kernel refused"
    for r in peaks["rates"]:
        assert math.isfinite(r["gops"]) and r["gops"] == pytest.approx(peaks["gflop"] / (r["ms"] / 1e3))
        assert r["gops"] <= peaks["best"][r["precision"]]["gops"]
    for precision, best in peaks["best"].items():
        assert best["gops"] == max(r["gops"] for r in peaks["rates"] if r["precision"] == precision)


@pytest.mark.skipif(not X86_LINUX, reason="needs /proc/cpuinfo on x86-64")
def test_measure_peaks_multiplies_per_cycle_by_the_timed_clock_and_cores() -> None:
    peaks = measure_peaks(threads=1, runs=2, layer=SMALL_LAYER)
    assert peaks["cores"] == 1 and peaks["clock"]["measured"] is True
    for p, ops in peaks["cpu"]["per_cycle"].items():
        assert peaks["theoretical"][p] == pytest.approx(ops * peaks["clock"]["ghz"])
    assert peaks["layer"]["best"]["fp32"]["gops"] > 0


# --- the report --------------------------------------------------------------------------------------------

def _case(backend: str, precision: str, ms: float) -> dict:
    return {"backend": backend, "precision": precision, "scale": 0.5, "input": "959x640", "input_width": 959,
            "input_height": 640, "latency": {"p50_ms": ms}, "peak_mib": 100.0, "parity": {"passed": True}}


def _peaks(best_fp32: float = 180.0, best_int8: float = 350.0) -> dict:
    """A hand-made Zen 3-like machine: theoretical 200 / 200 / 400, best layer fp32 and int8 (no bf16)."""
    return {"cpu": {"model_name": "AMD EPYC", "vendor": "AuthenticAMD", "family": 25, "model": 1, "uarch": "Zen 3",
                    "source": "table", "capped": [], "per_cycle": {"fp32": 32, "bf16": 32, "int8": 64}},
            "clock": {"ghz": 3.125, "method": "measured: test", "measured": True, "reported_ghz": 2.45,
                      "samples": [], "threads": 2},
            "cores": 2, "theoretical": {"fp32": 200.0, "bf16": 200.0, "int8": 400.0},
            "layer": {"layer": "conv 3x3 256->256 on 160x120", "gflop": 22.6, "threads": 2, "runs": 10,
                      "rates": [{"runtime": "onnxruntime", "precision": "fp32", "ms": 1.0, "runs": 3,
                                 "gops": best_fp32},
                                {"runtime": "openvino", "precision": "int8", "ms": 1.0, "runs": 3,
                                 "gops": best_int8}],
                      "skipped": {"openvino bf16": "this CPU runs f32 when asked for bf16"},
                      "best": {"fp32": {"gops": best_fp32, "runtime": "onnxruntime"},
                               "int8": {"gops": best_int8, "runtime": "openvino"}}}}


def _cases(ort_ms: float = 5500.0) -> list[dict]:
    return [_case("torch", "fp32", 6800.0), _case("torch-bf16-cl", "bf16", 9000.0), _case("ort", "fp32", ort_ms),
            _case("ort-int8", "int8", 3000.0)]


GFLOP = network_work(ModelConfig(bilinear=False), 959, 640)["gflop"]


def test_fractions_floors_and_ceilings_on_a_hand_made_report() -> None:
    roof = roofline_report({"cases": _cases()}, ModelConfig(bilinear=False), _peaks())
    assert roof["schema"] == ROOFLINE_SCHEMA
    (entry,) = roof["sizes"]
    eager = GFLOP / 6.8
    assert entry["eager_gflops"] == pytest.approx(eager)
    ort, int8, bf16 = entry["cases"]["ort"], entry["cases"]["ort-int8"], entry["cases"]["torch-bf16-cl"]
    assert ort["of_theoretical"] == pytest.approx(GFLOP / 5.5 / 200.0)
    assert ort["of_best_layer"] == pytest.approx(GFLOP / 5.5 / 180.0)
    assert int8["of_theoretical"] == pytest.approx(GFLOP / 3.0 / 400.0)
    assert int8["of_best_layer"] == pytest.approx(GFLOP / 3.0 / 350.0)
    assert bf16["of_theoretical"] == pytest.approx(GFLOP / 9.0 / 200.0) and bf16["of_best_layer"] is None
    assert entry["floor_ms"]["int8"] == pytest.approx({"best_layer": 1e3 * GFLOP / 350.0,
                                                       "theoretical": 1e3 * GFLOP / 400.0})
    assert entry["floor_ms"]["bf16"] == pytest.approx({"theoretical": 1e3 * GFLOP / 200.0})  # no bf16 layer ran
    assert entry["ceiling_speedup"] == pytest.approx({"fp32": 180.0 / eager, "int8": 350.0 / eager})
    assert entry["ceiling_speedup_theoretical"] == pytest.approx(
        {"fp32": 200.0 / eager, "bf16": 200.0 / eager, "int8": 400.0 / eager})
    best = entry["best"]
    assert (best["backend"], best["precision"]) == ("ort-int8", "int8")
    assert best["speedup"] == pytest.approx(6800.0 / 3000.0)
    assert best["of_theoretical_int8"] == pytest.approx(int8["of_theoretical"])
    assert best["of_best_layer_int8"] == pytest.approx(int8["of_best_layer"])


def test_a_network_faster_than_the_probe_still_gets_ceilings_from_the_peaks_not_its_own_rate() -> None:
    # the probe ran while the machine was busy: 100 GFLOP/s, but ORT did the whole network at ~195
    config = ModelConfig(bilinear=False)
    roof = roofline_report({"cases": _cases(ort_ms=4600.0)}, config, _peaks(best_fp32=100.0))
    (entry,) = roof["sizes"]
    assert "raised" not in roof["peaks"]
    assert entry["cases"]["ort"]["of_best_layer"] == pytest.approx(GFLOP / 4.6 / 100.0)  # > 1, reported as is
    ort_speedup = 6800.0 / 4600.0
    assert entry["ceiling_speedup"]["fp32"] == pytest.approx(100.0 / (GFLOP / 6.8))
    assert entry["ceiling_speedup"]["fp32"] != pytest.approx(ort_speedup)
    assert entry["ceiling_speedup_theoretical"]["fp32"] == pytest.approx(200.0 / (GFLOP / 6.8))
    # by construction: a faster or slower ORT run changes no ceiling
    faster = roofline_report({"cases": _cases(ort_ms=3000.0)}, config, _peaks(best_fp32=100.0))["sizes"][0]
    for key in ("ceiling_speedup", "ceiling_speedup_theoretical", "floor_ms"):
        assert faster[key] == entry[key]


def test_precision_comes_from_the_case_or_the_variant_name() -> None:
    assert precision_of({"backend": "openvino-int8"}) == "int8"
    assert precision_of({"backend": "torch-bf16-cl"}) == "bf16"
    assert precision_of({"backend": "ort-fp16-iob"}) == "fp16"
    assert precision_of({"backend": "openvino"}) == "fp32"
    assert precision_of({"backend": "ort", "precision": "int8"}) == "int8"


def test_targets_quote_the_best_layer_ceiling() -> None:
    cases = _cases()
    roof = roofline_report({"cases": cases}, ModelConfig(bilinear=False), _peaks())
    report = {"settings": {"quick": False, "image_size": list(bench.CARVANA_SIZE), "scales": [0.5],
                           "device": "cpu"}, "cases": cases, "roofline": roof}
    goals = {g["target"].split(" >=")[0]: g for g in bench.targets(report)}
    assert goals["onnxruntime int8"]["ceiling"] == pytest.approx(roof["sizes"][0]["ceiling_speedup"]["int8"])
    assert goals["onnxruntime"]["reachable"] is (goals["onnxruntime"]["ceiling"] >= 2.5)


def test_rendered_roofline_names_both_peaks_and_the_fractions() -> None:
    cases = _cases()
    roof = roofline_report({"cases": cases}, ModelConfig(bilinear=False), _peaks())
    report = {"settings": {"scales": [0.5]}, "cases": cases, "roofline": roof}
    md = "\n".join(roofline_section(report))
    int8_of = f"{100 * GFLOP / 3.0 / 400.0:.0f}% of the theoretical and {100 * GFLOP / 3.0 / 350.0:.0f}% of the best"
    for text in ("**Zen 3**", "3.12 GHz", "the OS reports 2.45 GHz", "| fp32 | 32 | 200 | 180 (onnxruntime) | 90% |",
                 "| int8 | 64 | 400 | 350 (openvino) | 88% |", "openvino bf16: this CPU runs f32", "898.6",
                 "| onnxruntime int8 | int8 | 300 | 75% | 86% |", int8_of, "fastest onnxruntime int8 (int8)",
                 "(best layer) /", "bf16 4,493 ms (theoretical), int8"):
        assert text in md, (text, md)
    terminal = "\n".join(render_roofline(report))
    for text in ("Zen 3", "3.12 GHz (measured)", "roofline peak int8: theoretical 400 (64/core/cycle), best layer "
                 "350 (openvino)", "onnxruntime int8 300 (75% / 86%)", int8_of, "largest speed-up over eager fp32"):
        assert text in terminal, (text, terminal)


def test_reports_from_before_the_roofline_schema_still_render() -> None:
    report = json.loads((ROOT / "benchmarks" / "results-959x640.json").read_text())
    assert report["roofline"].get("schema") is None
    md = "\n".join(roofline_section(report))
    assert "ONNX Runtime's own convolution kernels" in md and "largest speed-up over eager fp32" in md
    assert render_roofline(report)[0].startswith("roofline: ONNX Runtime peak on")
    size = report["roofline"]["sizes"][0]
    assert ceilings(report, size["input"]) == size["ceiling_speedup"]


def test_a_busy_probe_is_flagged_but_the_theoretical_peak_is_not() -> None:
    cases = _cases()
    peaks = _peaks() | {"load_avg_1m": 5.3}
    report = {"settings": {"scales": [0.5]}, "cases": cases,
              "roofline": roofline_report({"cases": cases}, ModelConfig(bilinear=False), peaks)}
    md, terminal = "\n".join(roofline_section(report)), "\n".join(render_roofline(report))
    for text in (md, terminal):
        assert "? machine busy as the layer was timed (load 5.3 on 2 cores)" in text
    quiet = {"settings": {"scales": [0.5]}, "cases": cases, "roofline": roofline_report(
        {"cases": cases}, ModelConfig(bilinear=False), _peaks() | {"load_avg_1m": 1.2})}
    assert "machine busy" not in "\n".join(roofline_section(quiet) + render_roofline(quiet))


def test_a_gpu_run_without_cpu_peaks_still_renders_rates_and_the_fastest_case() -> None:
    cases = [c | {"device": "cuda"} for c in _cases()]
    roof = roofline_report({"cases": cases}, ModelConfig(bilinear=False), None)
    (entry,) = roof["sizes"]
    assert entry["ceiling_speedup"] == {} and entry["floor_ms"] == {}
    assert entry["cases"]["ort"]["of_theoretical"] is None
    report = {"settings": {"scales": [0.5]}, "cases": cases, "roofline": roof}
    terminal = "\n".join(render_roofline(report))
    assert "fastest onnxruntime int8 (int8): 2.27x eager fp32" in terminal, terminal
    assert "fastest onnxruntime int8" in "\n".join(roofline_section(report))
