"""A pointwise node whose full-size inputs share one dense layout other than row-major (channels-last
activations: ConvNeXt's residual stream, read through Transposes) writes its output in that layout,
where every reader takes strided views (pointwise ops, Transpose, a conv's data input); and a
pointwise kernel iterates in its output's memory order. Before, such an Add iterated NCHW over
NHWC inputs: every load strided by the channel count. Checked against onnxruntime on random
inputs, with the layout each plan chose, and with the switch off for comparison."""

from __future__ import annotations

import importlib
import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import rtxjit
from tests.oprunner import rel_error

plan_module = importlib.import_module("rtxjit.plan.plan")

NHWC = (2, 5, 6, 8)
TO_NCHW = [0, 3, 1, 2]


def _model(tail: str):
    """x, y channels-last [N, H, W, C], each transposed to NCHW, added; then ``tail`` reads the sum:
    "conv" (Relu, then a 3x3 conv: both take strided views), "reshape" (a Reshape: it needs
    row-major data) or "output" (the sum is a graph output)."""
    rng = np.random.default_rng(7)
    c = NHWC[-1]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=TO_NCHW),
             helper.make_node("Transpose", ["y"], ["yt"], perm=TO_NCHW),
             helper.make_node("Add", ["xt", "yt"], ["s"], name="add")]
    inits, out_shape = [], [NHWC[0], c, NHWC[1], NHWC[2]]
    if tail == "conv":
        w = rng.standard_normal((4, c, 3, 3)).astype(np.float32)
        inits.append(helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.tobytes(), raw=True))
        nodes += [helper.make_node("Relu", ["s"], ["r"]),
                  helper.make_node("Mul", ["r", "s"], ["m"]),
                  helper.make_node("Conv", ["m", "w"], ["out"], pads=[1, 1, 1, 1])]
        out_shape = [NHWC[0], 4, NHWC[1], NHWC[2]]
    elif tail == "reshape":
        shape = np.array([NHWC[0], -1], np.int64)
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [2], shape))
        nodes.append(helper.make_node("Reshape", ["s", "shape"], ["out"]))
        out_shape = [NHWC[0], int(np.prod(NHWC[1:]))]
    else:
        nodes[2] = helper.make_node("Add", ["xt", "yt"], ["out"], name="add")
    graph = helper.make_graph(nodes, "layout", [helper.make_tensor_value_info(n, TensorProto.FLOAT, NHWC)
                                                for n in ("x", "y")],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _add_strides(sess, feeds) -> str:
    """The ``# static:`` line of the Add's kernel (its sizes and strides, collapsed; with "conv" the
    Add, Relu and Mul are one fused pointwise kernel)."""
    plan = sess.plan({k: v.shape for k, v in feeds.items()})
    [step] = [s for s in plan.steps if s.kernel.name == "pointwise"]
    return re.search(r"# static: (.*)", step.kernel.text).group(1)


@pytest.mark.parametrize("tail", ["conv", "reshape", "output"])
def test_a_pointwise_sum_of_channels_last_views_follows_their_layout_where_readers_allow(tail, monkeypatch):
    rng = np.random.default_rng(3)
    feeds = {n: rng.standard_normal(NHWC).astype(np.float32) for n in ("x", "y")}
    model = _model(tail)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    sess = rtxjit.InferenceSession(model, device="cpu")
    out = sess.run(None, feeds)[0]
    assert rel_error(out, ref) <= 1e-4
    strides = _add_strides(sess, feeds)
    if tail == "conv":  # one contiguous run in memory order: every load and the store coalesced
        assert "size0=480" in strides and "size1" not in strides, strides
    else:  # a Reshape reader or a graph output: the planned row-major output
        assert "size1" in strides, strides
    monkeypatch.setattr(plan_module, "LAYOUT_FOLLOWS_INPUTS", False)
    off = rtxjit.InferenceSession(model, device="cpu")
    np.testing.assert_allclose(off.run(None, feeds)[0], out, rtol=1e-5, atol=1e-5)
    assert "size1" in _add_strides(off, feeds)


def test_a_pointwise_kernel_iterates_in_its_outputs_memory_order():
    """Concat's inputs written into channel slices of a channels-last buffer are strided outputs;
    a Relu of a transposed input alone follows the input (the readers: a graph output after a
    Transpose back)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(NHWC).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=TO_NCHW),
             helper.make_node("Sigmoid", ["xt"], ["s"], name="sig"),
             helper.make_node("Transpose", ["s"], ["out"], perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "order", [helper.make_tensor_value_info("x", TensorProto.FLOAT, NHWC)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, NHWC)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = rtxjit.InferenceSession(model, device="cpu")
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], 1 / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
    plan = sess.plan({"x": NHWC})
    texts = [s.kernel.text for s in plan.steps]
    assert len(texts) <= 2 and any("size0=480" in t and "size1" not in t for t in texts), texts
