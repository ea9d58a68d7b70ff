"""Which precision an OpenVINO model runs at when the user does not say: the fastest one whose parity was
verified for this model on this kind of CPU.

``unet-deploy export --format openvino`` writes the IR once its fp32 check passes, then checks each reduced
runtime precision the CPU has (bf16 with AVX512_BF16 or AMX; fp16 with AVX512_FP16 / AMX-FP16) and records
the verdicts in the IR's metadata (rt_info key :data:`VERDICTS_KEY`, JSON)::

    {"cpu": {"bf16_kernels": "avx512_bf16", "int8_kernels": "vnni", "isa": [...], "hidden": []},
     "precisions": {"fp32": {"passed": true, "worst_rel_err": 2e-07, ...},
                    "bf16": {"passed": true, "worst_rel_err": 0.011, "min_pixel_agreement": 0.9993, ...}}}

For an int8 IR the entries say at which precision its non-quantised layers may run. A verdict holds for the
CPU kind it was made on (the bf16 kernels: AMX and AVX512_BF16 round differently), so on another kind the
model runs fp32 until it is exported (checked) there. No OpenVINO imports here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from unet_deploy.runtime.cpu_features import bf16_kernels, cpu_summary

__all__ = ["VERDICTS_KEY", "REDUCED", "AUTO", "DEFAULT", "Choice", "verdict_entry", "verdict_record", "read_verdicts",
           "choose_precision"]

#: rt_info key (under the ``unet_deploy`` section) of the verdicts.
VERDICTS_KEY = "unet_deploy.runtime_precisions"
#: Reduced runtime precisions, fastest first.
REDUCED = ("bf16", "fp16")
#: The precision word meaning "the fastest verified here".
AUTO = "auto"
#: The precision word meaning "no hint: OpenVINO's own choice" (bf16 on a CPU with bf16; the benchmark's
#: plain-recipe comparison).
DEFAULT = "default"


@dataclass(frozen=True)
class Choice:
    """The precision to compile with and, in a few words, why (shown in the start line)."""

    precision: str
    why: str


def verdict_entry(report: Any) -> dict[str, Any]:
    """A :class:`~unet_deploy.export.parity.ParityReport` as one verdict: passed, and its worst measures."""
    rows = report.rows
    return {"passed": bool(report.passed), "worst_rel_err": max((r.rel_err for r in rows), default=None),
            "min_pixel_agreement": min((r.pixel_agreement for r in rows), default=None),
            "min_dice": min((r.dice for r in rows), default=None), "cases": len(rows),
            "thresholds": report.thresholds.describe()}


def verdict_record(verdicts: dict[str, dict[str, Any]]) -> str:
    """The JSON stored in the IR: this CPU's kind and the verdict per precision."""
    return json.dumps({"cpu": cpu_summary(), "precisions": verdicts}, sort_keys=True)


def read_verdicts(meta: dict[str, str]) -> dict[str, Any]:
    """The verdict record of an IR's metadata ({} when there is none or it is unreadable)."""
    try:
        record = json.loads(meta.get(VERDICTS_KEY) or "{}")
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def choose_precision(meta: dict[str, str], has: Any) -> Choice:
    """The fastest precision verified for this model on this CPU kind, else fp32 with the reason.

    ``has(precision)`` says whether the device has native kernels for it (``openvino_cpu_has``)."""
    record = read_verdicts(meta)
    verdicts = record.get("precisions") or {}
    made_on = (record.get("cpu") or {}).get("bf16_kernels")
    reasons = []
    for precision in REDUCED:
        verdict = verdicts.get(precision)
        if not has(precision):
            if precision == "bf16":
                reasons.append("this CPU has no bf16 kernels")
            continue
        if verdict is None:
            reasons.append(f"{precision} not verified for this model (re-export it here to check {precision})")
        elif made_on != bf16_kernels():
            reasons.append(f"{precision} was verified on another CPU kind ({made_on}, here {bf16_kernels()}); "
                           "re-export here to use it")
        elif not verdict.get("passed"):
            err = verdict.get("worst_rel_err")
            detail = f", rel err {err:.3g}" if isinstance(err, float) else ""
            reasons.append(f"{precision} failed its parity check at export{detail}")
        else:
            return Choice(precision, f"{precision} verified for this model on this CPU ({made_on})")
    return Choice("fp32", "fp32: " + ("; ".join(reasons) or "no reduced precision here"))
