"""Sharded, resumable prediction: the processes of a torchrun job and the RLE journal.

``predict_files`` runs the same way in one process and under torchrun: every rank expands the same
ordered input list, rank 0 decides which inputs are already done (``--skip-existing``), the rest is dealt
out ``todo[rank::world]`` and each rank appends the submission rows it computes to its own journal file.
After the ranks meet, rank 0 merges the journal rows into the submission in input order.

Journal: a hidden folder beside the submission, ``.<name>.parts/``, holding one append-only file per
rank and run, ``<run>.rank<r>-of-<w>.jsonl``. Its first line names the format and a fingerprint of the
model and the options that change masks; each further line is ``<crc32 hex> <json>`` and is flushed and
fsync'd before the next image. A line is trusted only when it is complete (newline-terminated), its
checksum matches and its runs fit the image size it records, so a crash mid-write loses at most that
one row, which is predicted again. Rows of a journal with another fingerprint are never used.

torch (``torch.distributed``) is imported inside the functions that use it: every predict run imports
this module, and ONNX Runtime prediction in one process must not load torch.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.errors import UserError
from unet_deploy.fileio import sha256_file

__all__ = ["Group", "process_group", "split", "rank_device", "JournalRow", "JournalWriter", "journal_dir",
           "read_journal", "rle_fits", "new_run_id", "model_digest", "fingerprint", "SharedError",
           "JOURNAL_FORMAT", "GROUP_TIMEOUT"]

JOURNAL_FORMAT = "unet-deploy rle journal 1"
#: How long a rank waits for the others (e.g. rank 0, done with its share, for the slowest rank).
#: torchrun stops every worker as soon as one dies, so a long wait never hangs on a crashed rank.
GROUP_TIMEOUT = datetime.timedelta(hours=24)


# ------------------------------------------------------------------------------------- processes
class Group:
    """The processes predicting together: torchrun's ranks (a gloo group), or this process alone.

    Only small control messages travel through it (input lists' digests, indices, counts), so gloo is
    used even when the models run on GPUs.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, pg: Any = None) -> None:
        self.rank, self.world, self.local_rank, self._pg = rank, world, local_rank, pg

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    def broadcast(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self._pg)
        return box[0]

    def sum(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum of every rank's ``values``."""
        if self.world == 1:
            return [int(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._pg)
        return [int(v) for v in t.tolist()]


@contextlib.contextmanager
def process_group() -> Iterator[Group]:
    """Join torchrun's processes when ``WORLD_SIZE`` > 1 (else a one-process :class:`Group`).

    Uses the default process group when one exists (a gloo side group when it is not gloo); otherwise
    creates a gloo group and destroys it on exit.
    """
    from unet_deploy.distributed import dist_env

    env = dist_env()
    if not env.enabled:
        yield Group()
        return
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=GROUP_TIMEOUT)
        created = True
    pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), env.local_rank, pg)
    finally:
        if created:
            dist.destroy_process_group()


def split(n: int, rank: int, world: int) -> list[int]:
    """The positions ``rank`` predicts out of ``n``: ``rank, rank + world, ...`` (every one exactly once).

    Interleaving balances the ranks when image sizes cluster in the (name-sorted) input order, and
    consecutive same-size inputs of a rank still batch together.
    """
    return list(range(rank, n, world))


def rank_device(device: str, local_rank: int, world: int) -> str:
    """``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun when GPUs are visible; otherwise unchanged."""
    import torch

    if world <= 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{local_rank % torch.cuda.device_count()}"


# --------------------------------------------------------------------------------------- journal
def journal_dir(rle: str | os.PathLike[str]) -> Path:
    """The hidden folder beside the submission that holds its journal: ``.<name>.parts``."""
    rle = Path(rle)
    return rle.parent / f".{rle.name}.parts"


@dataclass(frozen=True)
class JournalRow:
    key: str  #: the input as expanded (path text): unique within a run, stable across re-runs
    id: str  #: the submission's image name
    height: int
    width: int
    rle: str


def rle_fits(rle: str, height: int, width: int) -> bool:
    """True when ``rle`` is ``start length`` pairs of ordered, disjoint runs inside a ``height x width`` mask.

    The checks of :func:`unet_deploy.images.rle.rle_decode`, without building the mask.
    """
    tokens = rle.split()
    if len(tokens) % 2 or not all(t.isascii() and t.isdigit() and len(t) < 19 for t in tokens):
        return False
    if not tokens:
        return True
    nums = np.array(tokens, dtype=np.int64)
    starts, lengths = nums[0::2], nums[1::2]
    ends = starts - 1 + lengths
    return bool((starts >= 1).all() and (lengths >= 1).all() and ends[-1] <= height * width
                and (starts[1:] - 1 >= ends[:-1]).all())


def _line(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
    return f"{zlib.crc32(text.encode()):08x} {text}\n".encode()


def _parse(line: bytes) -> dict[str, Any] | None:
    """The payload of one complete journal line, or None when it is torn or corrupt."""
    crc, sep, text = line.rstrip(b"\n").partition(b" ")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(text):
            return None
        payload = json.loads(text)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


class JournalWriter:
    """One rank's append-only journal file for one run; each row is on disk before :meth:`append` returns."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._f = open(self.path, "xb")  # noqa: SIM115 - closed in close(); a new name per run and rank
        self._write(_line({"format": JOURNAL_FORMAT, "fingerprint": fingerprint}))

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, row: JournalRow) -> None:
        self._write(_line({"key": row.key, "id": row.id, "h": row.height, "w": row.width, "rle": row.rle}))
        self.rows += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_file(path: Path, fingerprint: str) -> tuple[list[JournalRow], int]:
    """(trusted rows, rows not trusted) of one journal file."""
    try:
        data = path.read_bytes()
    except OSError:
        return [], 0
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is a torn write (or empty)
    torn = 1 if lines[-1] else 0
    if not complete:
        return [], torn
    header = _parse(complete[0])
    if header is None or header.get("format") != JOURNAL_FORMAT or header.get("fingerprint") != fingerprint:
        return [], len(complete) - 1 + torn
    rows: list[JournalRow] = []
    bad = torn
    for line in complete[1:]:
        p = _parse(line)
        if p is None:
            bad += 1
            continue
        try:
            row = JournalRow(str(p["key"]), str(p["id"]), int(p["h"]), int(p["w"]), str(p["rle"]))
        except (TypeError, KeyError, ValueError):
            bad += 1
            continue
        if row.height < 1 or row.width < 1 or not rle_fits(row.rle, row.height, row.width):
            bad += 1
            continue
        rows.append(row)
    return rows, bad


def read_journal(folder: str | os.PathLike[str], fingerprint: str, last: str | None = None
                 ) -> tuple[dict[str, JournalRow], int]:
    """Trusted rows of every journal file in ``folder`` by key, and the number of lines not trusted.

    Files are read in name order, those whose name starts with ``last`` (this run's) at the end; a later
    row for a key replaces an earlier one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}, 0
    files = sorted(folder.glob("*.jsonl"), key=lambda p: (last is not None and p.name.startswith(last), p.name))
    rows: dict[str, JournalRow] = {}
    bad = 0
    for path in files:
        found, n_bad = _read_file(path, fingerprint)
        bad += n_bad
        rows.update((r.key, r) for r in found)
    return rows, bad


def new_run_id() -> str:
    """A name prefix for this run's journal files (unique, sortable by time)."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def model_digest(path: str | os.PathLike[str], known: dict[str, Any] | None = None) -> str:
    """sha256 of a model file (the same model under another name or on another machine matches).

    ``known``: a config ``source`` dict; when it already holds this very file's hash (checkpoints are
    hashed as they load), it is used instead of reading the file again.
    """
    if known and known.get("sha256") and os.path.abspath(str(known.get("path", ""))) == os.path.abspath(path):
        return str(known["sha256"])
    return sha256_file(path)


def fingerprint(parts: dict[str, Any]) -> str:
    """A short digest of what decides the masks (model digest, scale, threshold, TTA, CRF, precision)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class SharedError(UserError):
    """A problem raised alike on every rank (e.g. the merge failed); the CLI prints it on rank 0 only."""
