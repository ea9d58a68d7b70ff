"""ONNX graph rewrites that make the int8 model run in int8 from end to end on ONNX Runtime's CPU provider.

ONNX Runtime has no int8 ``ConvTranspose`` kernel, so a static QDQ model runs the U-Net's 2x2/stride-2
up-convolutions in float32 between Dequantize/Quantize pairs, and the ``Pad`` before each skip
concatenation (its pads are computed from the input size) does the same. Two exact rewrites fix that:

* :func:`conv_transpose_to_depth_to_space` - a ConvTranspose with kernel = stride = k (no padding, no
  groups) maps every input pixel to its own k x k output block, so it equals a 1x1 Conv to k*k*C_out
  channels followed by ``DepthToSpace`` (CRD order). Run on the float32 model before quantisation, it
  turns each up-convolution into an int8 ``QLinearConv``.
* :func:`fold_qdq_data_movement` - after quantisation, ``DequantizeLinear -> DepthToSpace|Pad ->
  QuantizeLinear`` with one scale and zero point on both sides is the same as running DepthToSpace or Pad
  on the uint8 tensor (Pad filling with the zero point, which is what 0.0 quantises to).

Both keep tensor names at the boundaries, so the rest of the graph is untouched; the export path verifies
the result against eager PyTorch like every other export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper, numpy_helper

__all__ = ["conv_transpose_to_depth_to_space", "fold_qdq_data_movement"]


def _attrs(node: Any) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _unique(existing: set[str], base: str) -> str:
    name, i = base, 0
    while name in existing:
        i += 1
        name = f"{base}_{i}"
    existing.add(name)
    return name


def conv_transpose_to_depth_to_space(model: Any) -> int:
    """Rewrite, in place, every ConvTranspose with a square kernel k = stride, no padding, dilation 1,
    group 1 and constant weights into Conv 1x1 (k*k*C_out channels) + DepthToSpace(k, CRD).
    Returns how many nodes were rewritten."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | set(inits)
    rewritten = 0
    new_nodes = []
    for node in graph.node:
        if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        a = _attrs(node)
        weight = numpy_helper.to_array(inits[node.input[1]])  # (C_in, C_out / group, kH, kW)
        if weight.ndim != 4:
            new_nodes.append(node)
            continue
        k = weight.shape[2]
        strides = list(a.get("strides", [1, 1]))
        ok = (weight.shape[3] == k and k > 1 and strides == [k, k] and a.get("group", 1) == 1
              and not any(a.get("pads", [0] * 4)) and list(a.get("dilations", [1, 1])) == [1, 1]
              and not any(a.get("output_padding", [0, 0])) and "output_shape" not in a
              and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
              and list(a.get("kernel_shape", [k, k])) == [k, k])
        if not ok:
            new_nodes.append(node)
            continue
        c_in, c_out = weight.shape[:2]
        # out[o, k*i + a, k*j + b] = sum_c x[c, i, j] * W[c, o, a, b] + bias[o]; DepthToSpace (CRD) reads
        # input channel o*k*k + a*k + b into output (o, k*i + a, k*j + b).
        w1 = np.ascontiguousarray(weight.transpose(1, 2, 3, 0).reshape(c_out * k * k, c_in, 1, 1))
        w_name = _unique(names, f"{node.input[1]}_as_conv1x1")
        graph.initializer.append(numpy_helper.from_array(w1.astype(weight.dtype), w_name))
        conv_inputs = [node.input[0], w_name]
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                new_nodes.append(node)
                graph.initializer.pop()
                continue
            bias = numpy_helper.to_array(inits[node.input[2]])
            b_name = _unique(names, f"{node.input[2]}_as_conv1x1")
            graph.initializer.append(numpy_helper.from_array(np.repeat(bias, k * k).astype(bias.dtype), b_name))
            conv_inputs.append(b_name)
        mid = _unique(names, f"{node.output[0]}_blocks")
        base = node.name or node.output[0]
        new_nodes.append(helper.make_node("Conv", conv_inputs, [mid], name=_unique(names, f"{base}_conv1x1"),
                                          kernel_shape=[1, 1], strides=[1, 1]))
        new_nodes.append(helper.make_node("DepthToSpace", [mid], [node.output[0]],
                                          name=_unique(names, f"{base}_depth_to_space"), blocksize=k, mode="CRD"))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(new_nodes)
        _drop_unused_initializers(graph)
        del graph.value_info[:]  # intermediate shapes changed; shape inference recomputes them
    return rewritten


def _same_constant(inits: dict[str, Any], a: str, b: str) -> bool:
    if a == b:
        return True
    if a not in inits or b not in inits:
        return False
    x, y = numpy_helper.to_array(inits[a]), numpy_helper.to_array(inits[b])
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))


def fold_qdq_data_movement(model: Any) -> int:
    """Run DepthToSpace and constant-zero Pad on quantised tensors: rewrite, in place, each
    ``DequantizeLinear -> (DepthToSpace | Pad) -> QuantizeLinear`` whose two quantisation parameters are
    equal (per-tensor) into the op alone on the uint8/int8 tensor. Returns how many were folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | set(inits)
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    remove: set[int] = set()
    replace: dict[int, Any] = {}
    for node in graph.node:
        if node.op_type not in ("DepthToSpace", "Pad") or node.domain not in ("", "ai.onnx"):
            continue
        pair = _qdq_pair(node, producers, consumers, graph_outputs, inits)
        if pair is None:
            continue
        dq, q = pair
        inputs = _quantized_inputs(node, dq, inits)
        if inputs is None:
            continue
        new = helper.make_node(node.op_type, inputs, [q.output[0]], name=_unique(names, f"{node.name}_quantized"))
        new.attribute.extend(node.attribute)
        replace[id(node)] = new
        remove.add(id(q))
        if len(consumers.get(dq.output[0], [])) == 1 and dq.output[0] not in graph_outputs:
            remove.add(id(dq))
    if replace:
        nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in remove]
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_initializers(graph)
    return len(replace)


def _qdq_pair(node: Any, producers: dict[str, Any], consumers: dict[str, list[Any]], graph_outputs: set[str],
              inits: dict[str, Any]) -> tuple[Any, Any] | None:
    """The ``(DequantizeLinear, QuantizeLinear)`` around ``node`` when the op can run on the quantised
    tensor: ``node`` is the Dequantize's consumer and the Quantize's only producer, its output is no graph
    output, and both sides share one constant per-tensor scale and zero point. ``None`` otherwise."""
    dq = producers.get(node.input[0])
    users = consumers.get(node.output[0], [])
    if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return None
    q = users[0]
    if len(dq.input) < 3 or len(q.input) < 3 or node.output[0] in graph_outputs:
        return None
    if dq.input[1] not in inits or not (_same_constant(inits, dq.input[1], q.input[1])
                                        and _same_constant(inits, dq.input[2], q.input[2])):
        return None
    if numpy_helper.to_array(inits[dq.input[1]]).size != 1:
        return None  # per-channel activations: a permutation would move channels across scales
    return dq, q


def _quantized_inputs(node: Any, dq: Any, inits: dict[str, Any]) -> list[str] | None:
    """The inputs of ``node`` rewired to the quantised tensor; for Pad only constant mode with a zero fill
    value and pads as an input qualifies, and the fill becomes the zero point. ``None``: keep the float op."""
    if node.op_type != "Pad":
        return [dq.input[0]] + list(node.input[1:])
    mode = _attrs(node).get("mode", b"constant")
    if mode not in (b"constant", "constant"):
        return None
    value = node.input[2] if len(node.input) > 2 else ""
    if value and (value not in inits or float(numpy_helper.to_array(inits[value]).reshape(-1)[0]) != 0.0):
        return None
    if len(node.input) < 2 or (len(node.input) > 3 and node.input[3]):
        return None  # pads as an attribute (opset < 11) or explicit axes: keep the float op
    return [dq.input[0], node.input[1], dq.input[2]]  # fill with the zero point (= 0.0)


def _drop_unused_initializers(graph: Any) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
