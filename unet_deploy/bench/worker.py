"""The fresh process of :func:`unet_deploy.bench.probe.run_case_isolated`:
``python -m unet_deploy.bench.worker SPEC.json RESULT.json`` measures one case and writes its result."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from unet_deploy.bench.probe import CaseSpec, run_case

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """Read the :class:`CaseSpec` JSON at ``argv[0]``, run it, write the result JSON to ``argv[1]``."""
    spec = CaseSpec(**json.loads(Path(argv[0]).read_text()))
    result = run_case(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
