"""The CPU capability probe and its switch (UNET_DEPLOY_CPU_HIDE): what it hides reaches every probe (ours,
OpenVINO's, torch's, the roofline's), child processes included; the precision a verdict record picks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unet_deploy.errors import UserError
from unet_deploy.runtime import cpu_features
from unet_deploy.runtime.cpu_features import HIDE_ENV, bf16_hidden, bf16_kernels, cpu_flags, cpu_summary, int8_kernels
from unet_deploy.runtime.precision import VERDICTS_KEY, choose_precision

ROOT = Path(__file__).parents[1]
AMX = frozenset("avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8".split())
ZEN4 = frozenset("avx2 avx512f avx512_vnni avx512_bf16".split())


@pytest.fixture
def flags(monkeypatch: pytest.MonkeyPatch):
    """Pretend /proc/cpuinfo shows the given flags."""

    def use(shown: frozenset[str]) -> None:
        monkeypatch.setattr(cpu_features, "raw_flags", lambda: shown)

    return use


def test_hiding_bf16_leaves_an_avx512_vnni_cpu(flags, monkeypatch: pytest.MonkeyPatch) -> None:
    flags(AMX)
    monkeypatch.delenv(HIDE_ENV, raising=False)
    assert (bf16_kernels(), int8_kernels(), bf16_hidden()) == ("amx", "amx", False)
    monkeypatch.setenv(HIDE_ENV, "amx")
    assert (bf16_kernels(), int8_kernels()) == ("avx512_bf16", "vnni")  # an AMX Xeon seen as a Zen 4
    assert cpu_flags() == ZEN4
    monkeypatch.setenv(HIDE_ENV, " BF16 ")
    assert (bf16_kernels(), int8_kernels(), bf16_hidden()) == (None, "vnni", True)
    assert cpu_summary() == {"isa": ["avx2", "avx512f", "avx512_vnni"], "hidden": ["bf16"], "bf16_kernels": None,
                             "int8_kernels": "vnni"}


def test_an_unknown_word_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HIDE_ENV, "bf16,avx9")
    with pytest.raises(UserError, match=r"UNET_DEPLOY_CPU_HIDE=bf16,avx9: unknown word 'avx9'; use amx or bf16"):
        cpu_flags()


def test_the_switch_reaches_openvino_torch_and_the_roofline_in_a_child_process() -> None:
    """What a command started with the switch sees, whatever this CPU has."""
    code = ("import json; from unet_deploy.runtime.openvino_backend import openvino_cpu_has; "
            "from unet_deploy.runtime import cpu_supports_bf16; "
            "from unet_deploy.bench.uarch import read_cpu, per_cycle; "
            "ops = per_cycle(read_cpu()); print(json.dumps([openvino_cpu_has('bf16'), openvino_cpu_has('fp16'), "
            "cpu_supports_bf16(), sorted(f for f in read_cpu().flags if 'bf16' in f or 'amx' in f), "
            "ops['bf16'] == ops['fp32']]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), HIDE_ENV: "bf16"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, False, False, [], True]


def _meta(precisions: dict, kernels: str | None = "avx512_bf16") -> dict[str, str]:
    return {VERDICTS_KEY: json.dumps({"cpu": {"bf16_kernels": kernels}, "precisions": precisions})}


def test_auto_runs_the_fastest_precision_verified_on_this_kind_of_cpu(flags, monkeypatch) -> None:
    flags(ZEN4)
    monkeypatch.delenv(HIDE_ENV, raising=False)
    ok = {"fp32": {"passed": True}, "bf16": {"passed": True, "worst_rel_err": 0.004}}
    bf16_only = lambda p: p == "bf16"  # noqa: E731 - OpenVINO's kernels on a Zen 4

    assert choose_precision(_meta(ok), bf16_only).precision == "bf16"
    failed = choose_precision(_meta({**ok, "bf16": {"passed": False, "worst_rel_err": 0.2}}), bf16_only)
    assert failed.precision == "fp32" and "bf16 failed its parity check at export, rel err 0.2" in failed.why
    elsewhere = choose_precision(_meta(ok, kernels="amx"), bf16_only)
    assert elsewhere.precision == "fp32" and "verified on another CPU kind (amx, here avx512_bf16)" in elsewhere.why
    unknown = choose_precision({}, bf16_only)
    assert unknown.precision == "fp32" and "re-export it here to check bf16" in unknown.why
    assert "no bf16 kernels" in choose_precision(_meta(ok), lambda p: False).why
    monkeypatch.setenv(HIDE_ENV, "bf16")  # an IR verified on this CPU, now run as if on a CPU without bf16
    assert choose_precision(_meta(ok), lambda p: False).precision == "fp32"
