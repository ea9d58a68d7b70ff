"""Atomic writes: a crash or error never leaves a half-written file under the target name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from unet_deploy.errors import InputError, UserError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "sha256_file", "require_file"]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename.

    On any exception (Ctrl-C and SIGTERM included, at any step) the temporary file is removed and ``target``
    is left as it was. ``suffix`` defaults to the target's own suffix (some writers pick a format from it).
    The temporary name is chosen before the file is created, so the cleanup knows it whatever step an
    interrupt lands on (``tempfile.mkstemp`` returns the name only once the file exists).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    ending = (suffix if suffix is not None else target.suffix) + ".tmp"
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}{ending}"
    ours = True  #: False only when the name was somebody else's file
    try:
        try:
            # the permissions a normal write would have (0o666 less the umask), never an existing file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # a 64-bit name taken (never in practice): not ours to remove
            ours = False
            raise
        yield tmp
        with open(tmp, "rb+") as f:  # the data is durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if ours:
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


def require_file(path: str | os.PathLike[str], what: str, missing_hint: str, empty_hint: str = "",
                 error: type[UserError] = InputError) -> Path:
    """``path`` as a Path if it is a non-empty file, else a one-line ``error`` (an :class:`InputError` unless
    given) saying which of missing / a folder / empty it is (``what``: "image", "checkpoint", ...)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} not found; {missing_hint}")
    if path.is_dir():
        raise error(f"{path}: is a folder, expected {'an' if what[0] in 'aeiou' else 'a'} {what} file")
    if path.stat().st_size == 0:
        raise error(f"{path}: empty {what} file (0 bytes)" + (f"; {empty_hint}" if empty_hint else ""))
    return path
