"""The shared names and limits (unet_deploy.names, the backend registry's suffixes), one-line exception text,
and options a backend refuses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from unet_deploy.errors import UserError, first_line
from unet_deploy.names import check_scale
from unet_deploy.runtime.registry import BACKENDS, backend_for_path, is_checkpoint_file, is_export_file


@pytest.mark.parametrize("name, backend", [
    ("best.pth", "torch"), ("MODEL.PT", "torch"), ("run/last.ckpt", "torch"),
    ("best.ts", "torchscript"), ("best.jit", "torchscript"), ("best.torchscript", "torchscript"),
    ("best.onnx", "ort"), ("best.int8.onnx", "ort"),
])
def test_suffix_names_the_backend(name: str, backend: str) -> None:
    assert backend_for_path(Path(name)) == backend in BACKENDS
    assert is_export_file(name) is (backend != "torch")
    assert is_checkpoint_file(name) is (backend == "torch")


def test_unknown_suffix_is_one_line_naming_the_file() -> None:
    with pytest.raises(UserError, match=r"model\.bin: cannot tell the backend from suffix '\.bin'.*--backend"):
        backend_for_path("model.bin")
    assert not is_export_file("model.bin") and not is_checkpoint_file("model")


@pytest.mark.parametrize("value", [1e-6, 0.5, 1.0, 4.0])
def test_scales_in_range_pass(value: float) -> None:
    assert check_scale(value, "--scale") == value


@pytest.mark.parametrize("value", [0.0, -0.5, 4.0001, 7.0, math.nan, math.inf])
def test_scales_out_of_range_name_the_flag(value: float) -> None:
    with pytest.raises(UserError, match=r"^--scales \S+: a scale must be in \(0, 4\], e\.g\. 0\.5$"):
        check_scale(value, "--scales")


def test_first_line_takes_the_first_non_empty_line() -> None:
    assert first_line(RuntimeError("\n  \n  out of memory  \nat frame 3\nat frame 4")) == "out of memory"
    assert first_line(ValueError("one line")) == "one line"


@pytest.mark.parametrize("error", [KeyError(), OSError(""), RuntimeError("  \n \n")])
def test_first_line_of_an_empty_message_is_the_class_name(error: BaseException) -> None:
    assert first_line(error) == type(error).__name__


def test_threads_with_the_torch_backend_is_refused_in_one_line(tmp_path: Path) -> None:
    from unet_deploy.runtime import load_backend

    checkpoint, onnx_file = tmp_path / "best.pth", tmp_path / "best.onnx"
    for path in (checkpoint, onnx_file):
        path.write_bytes(b"never read: options are checked before the file is loaded")
    with pytest.raises(UserError, match=r"^--threads applies to --backend ort \(an \.onnx model\) and --backend "
                                        r"openvino only, not to torch; drop --threads$"):
        load_backend(checkpoint, device="cpu", threads=2)
    with pytest.raises(UserError, match=r"^--channels-last applies to the eager torch backend \(a \.pth model\) "
                                        r"only, not to ort; drop --channels-last$"):
        load_backend(onnx_file, device="cpu", channels_last=True)


def test_options_left_at_their_defaults_are_accepted_by_every_backend(tmp_path: Path) -> None:
    from unet_deploy.runtime import load_backend

    checkpoint = tmp_path / "best.pth"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch checkpoint|not a readable PyTorch checkpoint"):
        load_backend(checkpoint, device="cpu", threads=None, profile="tuned", io_binding=None)
