"""Quantized convolutions (issue 19): Q/DQ around Conv from onnxruntime.quantization.quantize_static,
folded by rtxjit/quant/fuse.py into rtxjit.QLinearConv (rtxjit/quant/qlinear.py) on the conv
template's ``quant`` option (codegen/templates/conv.py, quant_gemm.QuantConv): int8 x int8 -> int32,
scales, bias, Relu, requantization and the residual Add in the epilogue, int8 activations between
convs. Checked against the unfused graph and onnxruntime on the same file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit

SHAPE = (2, 3, 10, 10)


def _cnn():
    """A small CNN with residual blocks: a 3-channel stem (flat K loop), 3x3 convs of 24 channels
    (tap-major), a residual Add + Relu, a strided 1x1 conv (tap-major 1x1), a grouped 3x3 conv (16
    channels per group: flat) with a residual Add and no Relu, whose quantized output is the
    model's output (so the test sees the integers)."""
    rng = np.random.default_rng(3)

    def t(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [t("w1", 24, 3, 3, 3, scale=0.3), t("b1", 24, scale=0.1), t("w2", 24, 24, 3, 3, scale=0.1),
             t("b2", 24, scale=0.1), t("w3", 24, 24, 3, 3, scale=0.1), t("b3", 24, scale=0.1),
             t("w4", 32, 24, 1, 1, scale=0.3), t("b4", 32, scale=0.1), t("w5", 32, 16, 3, 3, scale=0.1)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c3", "r1"], ["a3"]),
             helper.make_node("Relu", ["a3"], ["r3"]),
             helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"], strides=[2, 2]),
             helper.make_node("Relu", ["c4"], ["r4"]),
             helper.make_node("Conv", ["r4", "w5"], ["c5"], pads=[1, 1, 1, 1], group=2),
             helper.make_node("Add", ["r4", "c5"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32, 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _quantized(tmp_path, per_channel, reduce_range, activation):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(5)
            self.batches = iter([{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(_cnn(), src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                    per_channel=per_channel, reduce_range=reduce_range,
                    extra_options={"ActivationSymmetric": activation == "QInt8"})
    return onnx.load(dst)


def _ops(model) -> list:
    from rtxjit.onnx.importer import import_model
    from rtxjit.passes import optimize

    return [n.op for n in optimize(import_model(model))[0].nodes]


def _init(model, name) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


# (per_channel, reduce_range, activation type); QInt8 activations are symmetric: onnxruntime's
# quantizer then keeps each Relu between its own DQ and Q (a stage of the quantized conv)
CASES = [(False, False, "QUInt8"), (True, False, "QUInt8"), (True, True, "QUInt8"), (False, True, "QUInt8"),
         (True, False, "QInt8"), (False, True, "QInt8")]


@pytest.mark.parametrize("per_channel,reduce_range,activation", CASES)
def test_quantize_static_cnn_runs_int8_convs_with_the_graphs_integers(tmp_path, per_channel, reduce_range, activation):
    """Every Conv becomes one rtxjit.QLinearConv (its Relu, requantization and residual Add inside),
    no DequantizeLinear is left but the output's, and the output's integers (y = DQ(y_q)) equal the
    unfused graph's and onnxruntime's. The fused int32 sum is exact where the unfused graph's fp32
    sum of dequantized products rounds (and onnxruntime requantizes acc * (sx sw / sy) in one
    multiplication), so a value next to a rounding boundary may land one step apart. Measured: 0
    of 8000 outputs (5 random inputs) apart, from either, in each of the six models; the bound
    allows 1% one step apart, never more."""
    q = _quantized(tmp_path, per_channel, reduce_range, activation)
    ops = _ops(q)
    assert ops.count("rtxjit.QLinearConv") == 5 and "Conv" not in ops and "Add" not in ops, ops
    assert ops.count("DequantizeLinear") == 1 and "Relu" not in ops, ops
    x = np.random.default_rng(6).standard_normal(SHAPE).astype(np.float32)
    sess = rtxjit.InferenceSession(q, device="cpu")
    got = sess.run(None, {"x": x})[0]
    kernels = [step.kernel.name for step in sess.plan_for({"x": x}).steps]
    assert kernels.count("conv2d") == 5 and len(kernels) == 7, kernels  # + the input's Q and the output's DQ
    unfused = rtxjit.InferenceSession(q, device="cpu", optimize=False).run(None, {"x": x})[0]
    want = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    step = float(_init(q, next(n.input[1] for n in q.graph.node if n.output[0] == "y")))
    for other, allowed in ((unfused, 0.01), (want, 0.01)):
        steps = np.rint(np.abs(got - other) / step)
        assert steps.max() <= 1 and np.mean(steps > 0) <= allowed, (steps.max(), np.mean(steps > 0))


def _qdq_conv(x_shape, w_shape, attrs, x_type, seed):
    """Q(x) -> DQ -> Conv(., DQ(int8 weight, per channel), bias) -> Q -> DQ -> y, hand-built (opset 21)."""
    rng = np.random.default_rng(seed)
    np_type = np.uint8 if x_type == TensorProto.UINT8 else np.int8
    c_out = w_shape[0]
    inits = {"xs": np.float32(0.04), "xz": np.array(120 if np_type is np.uint8 else -7, np_type),
             "w": rng.integers(-127, 128, w_shape).astype(np.int8), "ws": rng.uniform(0.002, 0.01, c_out).astype(np.float32),
             "b": rng.standard_normal(c_out).astype(np.float32), "ys": np.float32(0.05),
             "yz": np.array(110 if np_type is np.uint8 else 4, np_type)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], **attrs),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    g = helper.make_graph(nodes, "qconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m, (rng.standard_normal(x_shape) * 2).astype(np.float32)


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((2, 20, 9), (6, 20, 3), {"pads": [2, 1], "strides": [2], "dilations": [2]}),  # 1-D (as 2-D), tap-major
    ((1, 8, 7, 6), (12, 4, 3, 2), {"group": 2, "pads": [0, 1, 2, 1], "strides": [2, 1]}),  # grouped, flat
    ((1, 32, 5, 6), (8, 32, 3, 3), {"pads": [2, 1, 2, 0], "dilations": [2, 1]}),  # padding taps: zero point
    ((1, 18, 3, 4, 4), (6, 18, 2, 3, 3), {"pads": [1, 1, 0, 0, 1, 1], "strides": [1, 2, 1]}),  # 3-D
], ids=["1d", "grouped", "padded_dilated", "3d"])
@pytest.mark.parametrize("x_type", [TensorProto.UINT8, TensorProto.INT8], ids=["uint8", "int8"])
def test_qdq_conv_geometries_fold_and_match_the_unfused_graph(x_shape, w_shape, attrs, x_type):
    """1-D, grouped, padded / dilated and 3-D Q/DQ convolutions with non-zero activation zero points
    (padding taps must read the zero point, not 0) and a float bias: one rtxjit.QLinearConv whose
    integers equal the unfused graph's and onnxruntime's (at most 1% one step apart; measured 0)."""
    m, x = _qdq_conv(x_shape, w_shape, attrs, x_type, seed=len(x_shape) + w_shape[1])
    assert "rtxjit.QLinearConv" in _ops(m) and "Conv" not in _ops(m)
    got = rtxjit.InferenceSession(m, device="cpu").run(None, {"x": x})[0]
    unfused = rtxjit.InferenceSession(m, device="cpu", optimize=False).run(None, {"x": x})[0]
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for other in (unfused, want):
        steps = np.rint(np.abs(got - other) / 0.05)
        assert steps.max() <= 1 and np.mean(steps > 0) <= 0.01, (steps.max(), np.mean(steps > 0))


def test_quant_conv_source_is_an_int8_dot_padded_with_the_zero_point():
    from rtxjit.codegen.templates.conv import render_conv2d
    from rtxjit.codegen.templates.quant_gemm import QuantConv
    from rtxjit.errors import InternalError
    from rtxjit.ir.types import DType

    quant = QuantConv(DType.UINT8, DType.UINT8, True, stages=((True, True),), res_dtype=DType.UINT8)
    for tap in (True, False):
        text = render_conv2d(DType.UINT8, False, tap_major=tap, quant=quant).text
        assert "dtype=tl.int32" in text and "other=a_pad" in text and "(a.to(tl.int32) - 128).to(tl.int8)" in text
        assert "acc = tl.dot(a, b, acc, out_dtype=tl.int32)" in text and "res_ptr + res_off" in text and "s1_scale" in text
    with pytest.raises(InternalError):
        render_conv2d(DType.UINT8, False, transposed=True, quant=quant)


def test_dynamic_batch_keeps_the_residual_inside_its_conv(tmp_path):
    """The quantize_static CNN with a symbolic batch ("N"): its residual Add still joins a quantized
    conv (its shapes equal symbolically), and batch 3 equals onnxruntime's integers."""
    q = _quantized(tmp_path, True, False, "QUInt8")
    for v in list(q.graph.input) + list(q.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del q.graph.value_info[:]
    ops = _ops(q)
    assert ops.count("rtxjit.QLinearConv") == 5 and "Add" not in ops, ops
    x = np.random.default_rng(6).standard_normal((3,) + SHAPE[1:]).astype(np.float32)
    got = rtxjit.InferenceSession(q, device="cpu").run(None, {"x": x})[0]
    want = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    step = float(_init(q, next(n.input[1] for n in q.graph.node if n.output[0] == "y")))
    steps = np.rint(np.abs(got - want) / step)
    assert steps.max() <= 1 and np.mean(steps > 0) <= 0.01
