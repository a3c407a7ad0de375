"""Depthwise convolutions (one input and one output channel per group: MobileNet, EfficientNet,
ConvNeXt) run the conv template's direct form (tiles of pixels x channels, no dot) instead of a
per-group GEMM one column wide. Checked against onnxruntime and the float64 reference on random
inputs: 1-D, 2-D and 3-D, strides, dilations, asymmetric pads, no bias, fp16, a non-contiguous
input, a fused epilogue (residual add + activation), and against the per-group GEMM it replaces."""

from __future__ import annotations

import importlib

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import rtxjit
from tests.oprunner import rel_error

conv_ops = importlib.import_module("rtxjit.ops.conv")

TOL = {np.float32: 1e-4, np.float16: 1e-2}
ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _const(name: str, array: np.ndarray):
    return helper.make_tensor(name, ONNX_TYPE[array.dtype.type], array.shape, array.tobytes(), raw=True)


def _model(x_shape, kernel, dtype, rng, bias=True, tail=(), transpose_in=False, r_shape=None, **attrs):
    """Conv(x, w[, b]) with ``group`` = channels, then the nodes of ``tail`` reading ``y0``."""
    c = x_shape[1] if not transpose_in else x_shape[-1]
    w = rng.standard_normal((c, 1, *kernel)).astype(dtype)
    inits = [_const("w", w)]
    ins = ["xc", "w"]
    if bias:
        inits.append(_const("b", rng.standard_normal(c).astype(dtype)))
        ins.append("b")
    nodes = []
    if transpose_in:  # x arrives channels-last and is transposed to NC..: the conv reads a strided view
        perm = [0, len(x_shape) - 1, *range(1, len(x_shape) - 1)]
        nodes.append(helper.make_node("Transpose", ["x"], ["xc"], perm=perm))
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["xc"]))
    out = "y0" if tail else "y"
    nodes.append(helper.make_node("Conv", ins, [out], name="dw", group=c, kernel_shape=list(kernel), **attrs))
    nodes += tail
    inputs = [helper.make_tensor_value_info("x", ONNX_TYPE[dtype], list(x_shape))]
    if r_shape is not None:
        inputs.append(helper.make_tensor_value_info("r", ONNX_TYPE[dtype], list(r_shape)))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", ONNX_TYPE[dtype], None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _check(proto, feeds: dict, dtype) -> rtxjit.InferenceSession:
    sess = rtxjit.InferenceSession(proto.SerializeToString())
    (got,) = sess.run(None, feeds)
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert got.shape == want.shape and rel_error(got, want) <= TOL[dtype], rel_error(got, want)
    return sess


def _depthwise_launches(sess) -> list:
    return [s for s in sess.last_executable.plan.steps if "loop=depthwise" in s.kernel.text]


CASES = [  # x shape, kernel, attributes
    ((2, 40, 13, 11), (3, 3), {"pads": [1, 1, 1, 1]}),
    ((1, 96, 14, 14), (7, 7), {"pads": [3, 3, 3, 3]}),  # ConvNeXt
    ((2, 24, 15, 15), (5, 5), {"pads": [2, 2, 2, 2], "strides": [2, 2]}),  # EfficientNet / MobileNet, strided
    ((1, 33, 9, 10), (3, 3), {"pads": [2, 0, 1, 2], "dilations": [2, 2]}),
    ((2, 20, 30), (5,), {"pads": [2, 2]}),  # 1-D
    ((1, 12, 4, 6, 5), (3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1], "strides": [1, 2, 1]}),  # 3-D
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape, kernel, attrs", CASES, ids=[f"{len(c[1])}d-{c[1][0]}x-{i}" for i, c in
                                                              enumerate(CASES)])
def test_depthwise_conv_matches_onnxruntime(x_shape, kernel, attrs, dtype):
    rng = np.random.default_rng(0)
    proto = _model(x_shape, kernel, dtype, rng, bias=dtype is np.float32, **attrs)
    sess = _check(proto, {"x": rng.standard_normal(x_shape).astype(dtype)}, dtype)
    assert len(_depthwise_launches(sess)) == 1


def test_depthwise_reads_a_strided_input_and_fuses_residual_and_activation():
    rng = np.random.default_rng(1)
    tail = [helper.make_node("Add", ["y0", "r"], ["s"]), helper.make_node("Sigmoid", ["s"], ["y"])]
    proto = _model((2, 9, 11, 48), (3, 3), np.float32, rng, tail=tail, transpose_in=True,
                   r_shape=(2, 48, 9, 11), pads=[1, 1, 1, 1])
    feeds = {"x": rng.standard_normal((2, 9, 11, 48)).astype(np.float32),
             "r": rng.standard_normal((2, 48, 9, 11)).astype(np.float32)}
    sess = _check(proto, feeds, np.float32)
    (launch,) = _depthwise_launches(sess)
    assert "Sigmoid" in launch.kernel.text or "sigmoid" in launch.kernel.text  # the tail runs in the conv kernel


def test_depthwise_matches_the_per_group_gemm_it_replaces(monkeypatch):
    rng = np.random.default_rng(2)
    proto = _model((2, 32, 10, 12), (3, 3), np.float32, rng, pads=[1, 1, 1, 1], strides=[2, 1])
    x = {"x": rng.standard_normal((2, 32, 10, 12)).astype(np.float32)}
    (direct,) = rtxjit.InferenceSession(proto.SerializeToString()).run(None, x)
    monkeypatch.setattr(conv_ops, "DEPTHWISE", False)
    gemm_sess = rtxjit.InferenceSession(proto.SerializeToString())
    (gemm,) = gemm_sess.run(None, x)
    assert not _depthwise_launches(gemm_sess)
    assert rel_error(direct, gemm) <= 1e-5


def test_a_grouped_conv_with_several_channels_per_group_keeps_the_gemm():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_const("w", w)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = _check(proto, {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}, np.float32)
    assert not _depthwise_launches(sess)


def test_depthwise_configs_fill_the_gpu_first_and_fit_the_problem():
    cfgs = conv_ops.depthwise_configs(8 * 56 * 56, 96, interpret=False, sm_count=132)
    assert 1 <= len(cfgs) <= 5
    for c in cfgs:
        assert c["BLOCK_M"] <= 256 and c["BLOCK_N"] <= 128 and c["BLOCK_N"] >= 16
    few = conv_ops.depthwise_configs(7 * 7, 24, interpret=False, sm_count=132)
    assert all(c["BLOCK_M"] <= 64 and c["BLOCK_N"] <= 32 for c in few)  # clipped to 49 pixels, 24 channels


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_a_conv_read_through_a_transpose_to_nhwc_writes_channels_last(dtype):
    """ConvNeXt: depthwise conv -> Transpose(0, 2, 3, 1) -> LayerNormalization over channels. The
    conv writes NHWC, so the Transpose is a contiguous view and no copy kernel runs before the norm."""
    rng = np.random.default_rng(4)
    c = 24
    tail = [helper.make_node("Transpose", ["y0"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("LayerNormalization", ["t", "g", "beta"], ["y"], axis=-1)]
    proto = _model((2, c, 7, 9), (7, 7), dtype, rng, tail=tail, pads=[3, 3, 3, 3])
    proto.graph.initializer.extend([_const("g", rng.standard_normal(c).astype(dtype)),
                                    _const("beta", rng.standard_normal(c).astype(dtype))])
    sess = _check(proto, {"x": rng.standard_normal((2, c, 7, 9)).astype(dtype)}, dtype)
    names = [s.kernel.name for s in sess.last_executable.plan.steps]
    assert names == ["conv2d", "reduce_layernorm"], names


def test_a_conv_with_another_reader_beside_the_transpose_stays_nchw():
    rng = np.random.default_rng(5)
    tail = [helper.make_node("Transpose", ["y0"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Relu", ["y0"], ["r0"]),
            helper.make_node("Transpose", ["r0"], ["r1"], perm=[0, 2, 3, 1]),
            helper.make_node("Add", ["t", "r1"], ["y"])]
    proto = _model((1, 16, 5, 6), (3, 3), np.float32, rng, tail=tail, pads=[1, 1, 1, 1])
    _check(proto, {"x": rng.standard_normal((1, 16, 5, 6)).astype(np.float32)}, np.float32)


def test_on_a_gpu_a_channels_last_depthwise_tile_loads_16_bytes_at_a_time():
    """Planned and compiled for an H100 here (tests/sm90.py): ConvNeXt's 7x7 depthwise conv over a
    channels-last input loads each tap's tile with 16-byte vector loads (its addresses no longer
    hold the group's program id, whose unknown value left Triton 2-byte scalar loads: on the H100 the
    stage-1 conv of ConvNeXt-T b8 took 75.8 us against a 3.2 us floor, 2026-12-08)."""
    from rtxjit.ir.types import TensorType
    from rtxjit.kernels.keys import specialized_source
    from rtxjit.plan.plan import PlanBuilder
    from tests.sm90 import ptx
    from tests.test_fallback_specialization import H100

    rng = np.random.default_rng(18)
    proto = _model((8, 56, 56, 96), (7, 7), np.float16, rng, transpose_in=True, pads=[3, 3, 3, 3])
    graph = rtxjit.InferenceSession(proto.SerializeToString()).graph
    types = {v.name: TensorType(v.type.dtype, v.type.shape) for v in graph.inputs}
    plan = PlanBuilder(graph, H100, frozenset(v.name for v in graph.constants())).build(types, {})
    (step,) = [s for s in plan.steps if "loop=depthwise" in s.kernel.text]
    text = ptx(plan, step, specialized_source(step))
    assert "ld.global.v4.b32" in text and "ld.global.b16" not in text
