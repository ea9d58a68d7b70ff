"""Atomic writes: an interrupt at any step of :func:`unet_deploy.fileio.atomic_path` leaves the old file and no
temporary file behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from unet_deploy import fileio
from unet_deploy.fileio import atomic_path, atomic_write_bytes

#: each step of atomic_path that an interrupt can land on: the os function it calls
STEPS = ("open", "close", "fsync", "replace")


def _interrupting(real: Callable[..., Any], after: bool) -> Callable[..., Any]:
    """``real`` with Ctrl-C (KeyboardInterrupt) landing just before it runs, or just after it has run."""

    def step(*args: Any, **kwargs: Any) -> Any:
        if after:
            real(*args, **kwargs)
        raise KeyboardInterrupt

    return step


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("step", STEPS)
def test_an_interrupt_at_any_step_leaves_no_temporary_file(tmp_path: Path, monkeypatch, step: str,
                                                           after: bool) -> None:
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")
    real = getattr(os, step)
    with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the patch must cover the whole write and only it
        with monkeypatch.context() as patch:
            patch.setattr(fileio.os, step, _interrupting(real, after))
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"], f"interrupted at {step}"
    expected = b"new" if (step == "replace" and after) else b"old"  # the rename happened, or nothing did
    assert target.read_bytes() == expected


def test_an_interrupt_in_the_writer_and_an_error_keep_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "rows.csv"
    target.write_bytes(b"old")
    for error in (KeyboardInterrupt, OSError):
        with pytest.raises(error), atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"] and target.read_bytes() == b"old"


def test_a_write_replaces_the_target_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_bytes(target, b"{}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.read_bytes() == b"{}" and stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    with atomic_path(target, suffix=".png") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".png.tmp") and tmp.exists()
        tmp.write_bytes(b"[]")
    assert target.read_bytes() == b"[]"
