"""``python -m unet_deploy.bench SPEC.json RESULT.json``: the same as ``python -m unet_deploy.bench.worker``."""

from __future__ import annotations

import sys

from unet_deploy.bench.worker import main

sys.exit(main(sys.argv[1:]))
