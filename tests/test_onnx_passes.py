"""The ONNX rewrites behind the int8 export: exact on real exported models and on hand-built graphs, and
they leave alone what they cannot rewrite exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from unet_deploy.config import DeployConfig, ModelConfig
from unet_deploy.export import export_onnx
from unet_deploy.export.onnx_passes import conv_transpose_to_depth_to_space, fold_qdq_data_movement
from unet_deploy.model import UNet

pytestmark = pytest.mark.export


def _run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def transposed_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = UNet(3, 2, bilinear=False, base_channels=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and up-convolution biases
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.ConvTranspose2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    config = DeployConfig(model=ModelConfig(bilinear=False, base_channels=8))
    return export_onnx(model, config, tmp_path_factory.mktemp("passes") / "t.onnx")


@pytest.mark.parametrize("shape", [(1, 3, 61, 97), (2, 3, 64, 80), (1, 3, 33, 17)])
def test_conv_transpose_rewrite_is_exact_on_a_real_export(transposed_onnx: Path, shape: tuple[int, ...]) -> None:
    original = onnx.load(str(transposed_onnx))
    assert _ops(original).count("ConvTranspose") == 4
    rewritten = onnx.load(str(transposed_onnx))
    assert conv_transpose_to_depth_to_space(rewritten) == 4
    onnx.checker.check_model(rewritten, full_check=True)
    assert "ConvTranspose" not in _ops(rewritten) and _ops(rewritten).count("DepthToSpace") == 4
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    (want,) = _run(original, {"input": x})
    (got,) = _run(rewritten, {"input": x})
    assert got.shape == want.shape == (shape[0], 2, shape[2], shape[3])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def _conv_transpose_graph(kernel: int, stride: int, pads: list[int] | None = None, group: int = 1
                          ) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(3 * group).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[kernel, kernel],
                            strides=[stride, stride], pads=pads or [0, 0, 0, 0], group=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_conv_transpose_rewrite_handles_other_block_sizes_and_skips_overlapping_kernels() -> None:
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 7)).astype(np.float32)
    three = _conv_transpose_graph(3, 3)
    (want,) = _run(three, {"x": x})
    assert conv_transpose_to_depth_to_space(three) == 1
    (got,) = _run(three, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # overlapping windows (kernel 3, stride 2), padded and grouped ones: left as they are
    for model in (_conv_transpose_graph(3, 2), _conv_transpose_graph(2, 2, pads=[1, 1, 1, 1]),
                  _conv_transpose_graph(2, 2, group=2)):
        before = model.SerializeToString()
        assert conv_transpose_to_depth_to_space(model) == 0
        assert model.SerializeToString() == before


def _qdq_graph(op: str, out_scale: float = 0.05, pad_value: float | None = None, out_zero: int = 128,
               per_channel: bool = False) -> onnx.ModelProto:
    """uint8 x -> DequantizeLinear(0.05, 128) -> op -> QuantizeLinear(out_scale, 128) -> y."""
    shape = (8,) if per_channel else ()
    inits = [numpy_helper.from_array(np.full(shape, 0.05, np.float32), "s_in"),
             numpy_helper.from_array(np.full(shape, 128, np.uint8), "z_in"),
             numpy_helper.from_array(np.full(shape, out_scale, np.float32), "s_out"),
             numpy_helper.from_array(np.full(shape, out_zero, np.uint8), "z_out")]
    axis: dict[str, Any] = {"axis": 1} if per_channel else {}
    nodes = [helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["xf"], **axis)]
    if op == "Pad":
        inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"))
        pad_inputs = ["xf", "pads"]
        if pad_value is not None:
            inits.append(numpy_helper.from_array(np.array(pad_value, np.float32), "value"))
            pad_inputs.append("value")
        nodes.append(helper.make_node("Pad", pad_inputs, ["yf"], mode="constant"))
    else:
        nodes.append(helper.make_node("DepthToSpace", ["xf"], ["yf"], blocksize=2, mode="CRD"))
    nodes.append(helper.make_node("QuantizeLinear", ["yf", "s_out", "z_out"], ["y"], **axis))
    out_shape = [1, 8, 4, 6] if op == "Pad" else [1, 2, 6, 10]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, out_shape)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("op,pad_value", [("DepthToSpace", None), ("Pad", None), ("Pad", 0.0)])
def test_qdq_folding_runs_the_op_on_uint8_with_identical_results(op: str, pad_value: float | None) -> None:
    x = np.random.default_rng(3).integers(0, 256, (1, 8, 3, 5), dtype=np.uint8)
    model = _qdq_graph(op, pad_value=pad_value)
    (want,) = _run(model, {"x": x})
    assert fold_qdq_data_movement(model) == 1
    assert _ops(model) == [op]
    onnx.checker.check_model(model, full_check=True)
    (got,) = _run(model, {"x": x})
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    if op == "Pad":  # the new border holds the zero point, i.e. 0.0
        assert (got[..., -1] == 128).all() and (got[..., -1, :] == 128).all()


@pytest.mark.parametrize("op,kwargs", [("DepthToSpace", {"out_scale": 0.1}), ("Pad", {"pad_value": 1.0}),
                                       ("Pad", {"out_zero": 127}), ("DepthToSpace", {"per_channel": True})])
def test_qdq_folding_leaves_inexact_cases_alone(op: str, kwargs: dict) -> None:
    model = _qdq_graph(op, **kwargs)
    assert fold_qdq_data_movement(model) == 0
    assert _ops(model) == ["DequantizeLinear", op, "QuantizeLinear"]
