"""Split-K convolutions: a one-group tap-major conv with few output tiles (a 3x3 conv at 14 x 14
pixels at batch 1) splits its taps over programs and writes fp32 partials to a workspace; the last
split of each tile adds them and runs the epilogue in the same launch (``SPLIT_FIXUP``; without it
a second kernel does). On the interpreter ``SPLIT_K`` forces the split; checked
against onnxruntime: strides, padding, a channel tail, no bias, fused residual + activation, fp16,
3-D, a channels-last output read by the next conv; and the GPU heuristic's choices."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import rtxjit
from rtxjit.ir.types import DType
from rtxjit.ops.conv import WindowGeometry
from tests.oprunner import rel_error

conv_ops = importlib.import_module("rtxjit.ops.conv")
matmul_ops = importlib.import_module("rtxjit.ops.matmul")

ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
TOL = {np.float32: 1e-4, np.float16: 1e-2}


def _const(name, a):
    return helper.make_tensor(name, ONNX_TYPE[a.dtype.type], a.shape, a.tobytes(), raw=True)


def _convs(x_shape, layers, dtype, rng, tail=(), extra_inputs=()):
    """A chain of Convs (``layers``: (out channels, kernel, attrs, bias)) then ``tail`` nodes."""
    nodes, inits, prev, c = [], [], "x", x_shape[1]
    for i, (cout, kernel, attrs, bias) in enumerate(layers):
        w = (rng.standard_normal((cout, c, *kernel)) / np.sqrt(c * np.prod(kernel))).astype(dtype)
        inits.append(_const(f"w{i}", w))
        ins = [prev, f"w{i}"]
        if bias:
            inits.append(_const(f"b{i}", rng.standard_normal(cout).astype(dtype)))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}", kernel_shape=list(kernel), **attrs))
        prev, c = f"c{i}", cout
    nodes += list(tail) or [helper.make_node("Identity", [prev], ["y"])]
    inputs = [helper.make_tensor_value_info("x", ONNX_TYPE[dtype], list(x_shape))]
    inputs += [helper.make_tensor_value_info(n, ONNX_TYPE[dtype], list(s)) for n, s in extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", ONNX_TYPE[dtype], None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture(params=[True, False], ids=["fixup", "sum-kernel"])
def fixup(request, monkeypatch):
    monkeypatch.setattr(matmul_ops, "SPLIT_FIXUP", request.param)
    return request.param


def _check(monkeypatch, proto, feeds, dtype, splits):
    monkeypatch.setattr(conv_ops, "SPLIT_K", splits)
    sess = rtxjit.InferenceSession(proto.SerializeToString())
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for _ in range(2):  # the second run finds the arrival counters set back to zero
        (got,) = sess.run(None, feeds)
        assert got.shape == want.shape and rel_error(got, want) <= TOL[dtype], rel_error(got, want)
    return [s for s in sess.last_executable.plan.steps if "split" in s.kernel.name or "split_k" in s.kernel.text]


def _product_and_sum(split: list, fixup: bool) -> tuple:
    """The split product's launch and the one that adds its partials (the same with the fix-up)."""
    if fixup:
        (conv,) = split
        assert "split_k fixup" in conv.kernel.text.split("\n")[0]
        return conv, conv
    conv, total = split
    assert total.kernel.name.endswith("_split_sum")
    return conv, total


CASES = [  # x shape, (out channels, kernel, attrs, bias), splits, expected grid dim 2
    ((1, 32, 14, 14), (48, (3, 3), {"pads": [1, 1, 1, 1]}, True), 9, 9),
    ((1, 32, 14, 14), (48, (3, 3), {"pads": [1, 1, 1, 1]}, True), 4, 3),  # 9 taps in ranges of 3
    ((2, 20, 9, 11), (24, (3, 3), {"pads": [1, 0, 1, 2], "strides": [2, 2]}, False), 3, 3),  # channel tail, no bias
    ((1, 16, 6, 5, 7), (16, (3, 3, 3), {"pads": [1] * 6}, True), 5, 5),  # 3-D: 27 taps in ranges of 6
]


@pytest.mark.parametrize("x_shape, layer, splits, grid2", CASES, ids=["9", "4->3", "tail-nobias", "3d"])
def test_split_conv_matches_onnxruntime(monkeypatch, fixup, x_shape, layer, splits, grid2):
    rng = np.random.default_rng(0)
    proto = _convs(x_shape, [layer], np.float32, rng)
    split = _check(monkeypatch, proto, {"x": rng.standard_normal(x_shape).astype(np.float32)}, np.float32, splits)
    conv, _ = _product_and_sum(split, fixup)
    assert conv.grid[2] == grid2


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_split_conv_runs_a_fused_residual_and_activation_in_its_sum(monkeypatch, fixup, dtype):
    rng = np.random.default_rng(1)
    tail = [helper.make_node("Add", ["c0", "r"], ["s"]), helper.make_node("Sigmoid", ["s"], ["y"])]
    proto = _convs((1, 32, 14, 14), [(48, (3, 3), {"pads": [1, 1, 1, 1]}, True)], dtype, rng, tail,
                   [("r", (1, 48, 14, 14))])
    feeds = {"x": rng.standard_normal((1, 32, 14, 14)).astype(dtype),
             "r": rng.standard_normal((1, 48, 14, 14)).astype(dtype)}
    conv, total = _product_and_sum(_check(monkeypatch, proto, feeds, dtype, 9), fixup)
    assert f"bias={fixup}" in conv.kernel.text.split("\n")[0] and "split_k" in conv.kernel.text.split("\n")[0]
    assert "sigmoid" in total.kernel.text.lower() and "bias=True" in total.kernel.text.split("\n")[0]


def test_split_conv_writes_channels_last_for_the_next_conv(monkeypatch, fixup):
    rng = np.random.default_rng(2)
    layers = [(32, (3, 3), {"pads": [1, 1, 1, 1]}, True), (16, (3, 3), {"pads": [1, 1, 1, 1]}, True)]
    proto = _convs((1, 16, 8, 8), layers, np.float32, rng)
    split = _check(monkeypatch, proto, {"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)}, np.float32, 3)
    assert len(split) == (2 if fixup else 4)  # both convs split (and each has its sum kernel without the fix-up)


def _ctx(sm_count=132, interpret=False):
    return SimpleNamespace(interpret=interpret, sm=90, sm_count=sm_count)


def test_auto_splits_only_convs_that_leave_most_sms_idle(monkeypatch):
    monkeypatch.setattr(conv_ops, "SPLIT_K", "auto")
    geo3 = WindowGeometry(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads_begin=(1, 1), pads_end=(1, 1),
                          out=(14, 14))
    # resnet50 layer3 3x3 at batch 1: M 196, N 256: 16 tiles of 64 x 64 on 132 SMs -> split
    assert conv_ops._splits(_ctx(), 196, 256, 256 * 9, 256, geo3, DType.FP16) > 1
    # the same conv at batch 32 fills the GPU: no split; nor on the interpreter, nor fp64
    assert conv_ops._splits(_ctx(), 32 * 196, 256, 256 * 9, 256, geo3, DType.FP16) == 1
    assert conv_ops._splits(_ctx(interpret=True), 196, 256, 256 * 9, 256, geo3, DType.FP16) == 1
    assert conv_ops._splits(_ctx(), 196, 256, 256 * 9, 256, geo3, DType.FP64) == 1
    monkeypatch.setattr(conv_ops, "SPLIT_K", "off")
    assert conv_ops._splits(_ctx(), 196, 256, 256 * 9, 256, geo3, DType.FP16) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_gpu_resnet_and_mobilenet_convs_split_and_depthwise_match_onnxruntime(dtype):
    """On the GPU at batch 1: a 3x3 conv at 14 x 14 pixels (16 tiles: auto split-K), a depthwise
    3x3 and a 1x1 conv with a fused ReLU; generic kernels first, then the specialized (tuned) ones,
    each against onnxruntime in fp32 on the same (rounded) inputs and weights."""
    _check_block(dtype, "cuda")


def test_the_block_of_the_gpu_test_on_the_interpreter(monkeypatch):
    monkeypatch.setattr(conv_ops, "SPLIT_K", 9)  # the interpreter never splits on its own
    _check_block(np.float32, None)


def _check_block(dtype, device):
    rng = np.random.default_rng(7)
    layers = [(256, (3, 3), {"pads": [1, 1, 1, 1]}, True)]
    proto = _convs((1, 256, 14, 14), layers, dtype, rng,
                   tail=[helper.make_node("Relu", ["c0"], ["r0"])])
    c = 256
    w_dw = (rng.standard_normal((c, 1, 3, 3)) / 3).astype(dtype)
    w_pw = (rng.standard_normal((64, c, 1, 1)) / 16).astype(dtype)
    proto.graph.initializer.extend([_const("wdw", w_dw), _const("wpw", w_pw)])
    proto.graph.node.extend([helper.make_node("Conv", ["r0", "wdw"], ["d0"], group=c, kernel_shape=[3, 3],
                                              pads=[1, 1, 1, 1]),
                             helper.make_node("Conv", ["d0", "wpw"], ["p0"], kernel_shape=[1, 1]),
                             helper.make_node("Relu", ["p0"], ["y"])])
    x = rng.standard_normal((1, 256, 14, 14)).astype(dtype)
    proto32 = helper.make_model(proto.graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    for init in proto32.graph.initializer:  # the same weights in fp32
        if init.data_type == TensorProto.FLOAT16:
            a = np.frombuffer(init.raw_data, np.float16).astype(np.float32)
            init.CopyFrom(helper.make_tensor(init.name, TensorProto.FLOAT, init.dims, a.tobytes(), raw=True))
    for v in list(proto32.graph.input) + list(proto32.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT
    (want,) = ort.InferenceSession(proto32.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float32)})
    sess = rtxjit.InferenceSession(proto.SerializeToString(), device=device)
    for _ in range(2):
        (got,) = sess.run(None, {"x": x})
        assert rel_error(got, want) <= TOL[dtype], rel_error(got, want)
        sess.wait_for_specialization(timeout=300)
    texts = [s.kernel.text.split("\n")[0] for s in sess.last_executable.plan.steps]
    assert any("split_k" in t for t in texts) and any("loop=depthwise" in t for t in texts), texts


@pytest.mark.parametrize("group", [1, 24], ids=["split", "depthwise"])
def test_nan_and_inf_inputs_come_out_where_onnxruntime_has_them(monkeypatch, fixup, group):
    """A NaN and both infinities in the input: the split partial sums and the depthwise kernel give
    NaN and +-inf at the places the unsplit reference gives them."""
    rng = np.random.default_rng(9)
    c = 24
    w = (rng.standard_normal((c, c // group, 3, 3)) / 3).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_const("w", w)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = rng.standard_normal((1, c, 9, 9)).astype(np.float32)
    x[0, 3, 2, 2], x[0, 5, 6, 6], x[0, 7, 6, 5] = np.nan, np.inf, -np.inf
    monkeypatch.setattr(conv_ops, "SPLIT_K", 3)
    sess = rtxjit.InferenceSession(proto.SerializeToString())
    (got,) = sess.run(None, {"x": x})
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.isnan(want).any() and np.isinf(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.where(np.isinf(got), got, 0), np.where(np.isinf(want), want, 0))
    finite = np.isfinite(want)
    assert rel_error(got[finite], want[finite]) <= TOL[np.float32]
    texts = [s.kernel.text.split("\n")[0] for s in sess.last_executable.plan.steps]
    assert any(("split_k" if group == 1 else "loop=depthwise") in t for t in texts), texts
