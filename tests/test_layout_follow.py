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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = rtxjit.InferenceSession(model, device="cpu")
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], 1 / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
    plan = sess.plan({"x": NHWC})
    texts = [s.kernel.text for s in plan.steps]
    assert len(texts) <= 2 and any("size0=480" in t and "size1" not in t for t in texts), texts


def _convnext_blocks(dtype, rng, c: int = 32, blocks: int = 2):
    """A ConvNeXt stem (4x4 stride-4 conv) and ``blocks`` torchvision CNBlocks built node by node:
    depthwise 7x7 -> permute to NHWC -> LayerNorm -> Linear -> Gelu -> Linear -> permute back ->
    * layer scale -> + residual; then a global average pool."""
    onnx_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT

    def const(name, a):
        return helper.make_tensor(name, onnx_type, a.shape, a.astype(dtype).tobytes(), raw=True)

    inits = [const("stem_w", rng.standard_normal((c, 3, 4, 4)) / 7), const("stem_b", rng.standard_normal(c) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["r0"], strides=[4, 4])]
    for i in range(blocks):
        p = f"b{i}_"
        inits += [const(p + "dw", rng.standard_normal((c, 1, 7, 7)) / 7), const(p + "dwb", rng.standard_normal(c) * .1),
                  const(p + "ln_s", 1 + 0.2 * rng.standard_normal(c)), const(p + "ln_b", 0.1 * rng.standard_normal(c)),
                  const(p + "w1", rng.standard_normal((c, 4 * c)) / np.sqrt(c)),
                  const(p + "b1", 0.1 * rng.standard_normal(4 * c)),
                  const(p + "w2", rng.standard_normal((4 * c, c)) / np.sqrt(4 * c)),
                  const(p + "b2", 0.1 * rng.standard_normal(c)), const(p + "g", rng.standard_normal((c, 1, 1)))]
        r, nxt = f"r{i}", f"r{i + 1}"
        nodes += [helper.make_node("Conv", [r, p + "dw", p + "dwb"], [p + "d"], group=c, pads=[3, 3, 3, 3]),
                  helper.make_node("Transpose", [p + "d"], [p + "t"], perm=[0, 2, 3, 1]),
                  helper.make_node("LayerNormalization", [p + "t", p + "ln_s", p + "ln_b"], [p + "n"], epsilon=1e-6),
                  helper.make_node("MatMul", [p + "n", p + "w1"], [p + "m1"]),
                  helper.make_node("Add", [p + "m1", p + "b1"], [p + "a1"]),
                  helper.make_node("Gelu", [p + "a1"], [p + "gl"]),
                  helper.make_node("MatMul", [p + "gl", p + "w2"], [p + "m2"]),
                  helper.make_node("Add", [p + "m2", p + "b2"], [p + "a2"]),
                  helper.make_node("Transpose", [p + "a2"], [p + "tb"], perm=[0, 3, 1, 2]),
                  helper.make_node("Mul", [p + "g", p + "tb"], [p + "s"]),
                  helper.make_node("Add", [p + "s", r], [nxt])]
    nodes.append(helper.make_node("GlobalAveragePool", [f"r{blocks}"], ["y"]))
    graph = helper.make_graph(nodes, "convnext", [helper.make_tensor_value_info("x", onnx_type, [2, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", onnx_type, [2, c, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


def _check_convnext(dtype, device):
    rng = np.random.default_rng(5)
    model = _convnext_blocks(dtype, rng)
    want = ort.InferenceSession(_convnext_blocks(np.float32, np.random.default_rng(5)).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, 32, 32)).astype(dtype)
    (ref,) = want.run(None, {"x": x.astype(np.float32)})
    sess = rtxjit.InferenceSession(model, device=device)
    for _ in range(2):  # generic kernels, then (on a GPU) the specialized ones
        (got,) = sess.run(None, {"x": x})
        assert rel_error(got, ref) <= (1e-4 if dtype == np.float32 else 1e-2), rel_error(got, ref)
        sess.wait_for_specialization(timeout=300)
    kinds = [n.attrs.get("anchor", n.op) for n in sess.graph.nodes]
    # per block: the depthwise conv, the LayerNorm (alone or in the first Linear: fuse_norm_matmul),
    # the second Linear with the bias, layer scale and residual add in its epilogue; no pointwise
    # kernel of its own
    assert "rtxjit.Pointwise" not in kinds, kinds
    assert kinds.count("rtxjit.NormMatMul") + kinds.count("LayerNormalization") == 2, kinds
    return sess


def test_convnext_blocks_run_in_four_kernels_each_and_match_onnxruntime():
    sess = _check_convnext(np.float32, None)
    # stem, 2 x (depthwise, norm, linear, linear + residual), the pool (and its layout copy)
    assert sess.launches_per_inference <= 11, [s.kernel.name for s in sess.last_executable.plan.steps]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_gpu_convnext_blocks_match_onnxruntime(dtype):
    _check_convnext(dtype, "cuda")
