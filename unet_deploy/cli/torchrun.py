"""``python -m unet_deploy.cli.torchrun ARGS``: ``torch.distributed.run`` (torchrun) as ``--nproc`` starts it, except
that a signal that stops the run (SIGTERM from a scheduler, Ctrl-C) ends it with exit code 128 + the signal
instead of torchrun's own traceback: the workers have already stopped cleanly and rank 0 has said, in one
line, what was kept and how to go on. torch's elastic agent logs errors only (``LOGLEVEL``)."""

from __future__ import annotations

import logging
import os
import sys


def main() -> None:
    os.environ.setdefault("LOGLEVEL", "ERROR")  # read by the agent's loggers when they are made (imports below)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # and the others under it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:])
    except SignalException as e:
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
