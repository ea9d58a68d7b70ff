"""Atomic writes: a crash or error never leaves a half-written file under the target name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def _read_umask() -> int:
    # Read once at import: os.umask can only be read by setting it, which would race with other threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "sha256_file", "require_file"]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename.

    On any exception the temporary file is removed and ``target`` is left as it was.
    ``suffix`` defaults to the target's own suffix (some writers pick a format from it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=(suffix if suffix is not None
                                                                         else target.suffix) + ".tmp",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a normal write would have, and make
        # the data durable before the rename makes it visible under the real name.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_file(path: str | os.PathLike[str], what: str, missing_hint: str, empty_hint: str = "") -> Path:
    """``path`` as a Path if it is a non-empty file, else a one-line :class:`UserError` saying which of
    missing / a folder / empty it is (``what``: "image", "checkpoint", ...)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found; {missing_hint}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected {'an' if what[0] in 'aeiou' else 'a'} {what} file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty {what} file (0 bytes)" + (f"; {empty_hint}" if empty_hint else ""))
    return path
