"""QuantizeLinear / DequantizeLinear (rtxjit/ops/quant.py) on the types the registry samples cannot
hold (fp8, int4: onnxruntime's Python API takes no ml_dtypes feeds, so they are initializers or
are checked against onnx's reference evaluator), rounding ties and special values, and quantized
models from onnxruntime.quantization against onnxruntime on the same file."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import rtxjit
from rtxjit.ir.types import DType
from rtxjit.onnx.importer import import_model

FP8 = {TensorProto.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E5M2: ml_dtypes.float8_e5m2}
TORCH_FP8 = {TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, TensorProto.FLOAT8E5M2: torch.float8_e5m2}


def _model(nodes, inputs, outputs, inits=(), opset=21):
    g = helper.make_graph(nodes, "q", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _run(model, feeds, **options):
    """rtxjit's outputs as torch tensors (numpy has no fp8): feeds go in as torch tensors."""
    feeds = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in feeds.items()}
    return rtxjit.InferenceSession(model, device="cpu", **options).run(None, feeds)


SPECIALS = np.array([0.0, -0.0, 0.3, 1.0625, 1.1875, -2.5, 450, 460, 464, 470, 500, 1e6, -1e6, np.inf, -np.inf,
                     np.nan, 1e-10, 9.765625e-4, 1.46484375e-3, 1.3e-3, 2.0 ** -10, 2.0 ** -17, 3 * 2.0 ** -17,
                     57344, 59392, 60000, 61440, 70000, -3e-5, 6.1e-5], np.float32)


@pytest.mark.parametrize("code", list(FP8), ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("saturate", [1, 0])
def test_quantize_to_fp8_rounds_and_saturates_as_onnx(code, saturate):
    """Ties to even, subnormals, the overflow threshold, inf and NaN, with and without saturation,
    bit for bit as onnx's reference (ml_dtypes' conversion)."""
    x = np.concatenate([SPECIALS, np.random.default_rng(0).uniform(-600, 600, 40).astype(np.float32)])
    zero = numpy_helper.from_array(np.zeros((), FP8[code]), "z")
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], saturate=saturate)],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
               [helper.make_tensor_value_info("y", code, list(x.shape))],
               [numpy_helper.from_array(np.float32(0.5), "s"), zero])
    want = ReferenceEvaluator(m).run(None, {"x": x})[0]
    got = _run(m, {"x": x})[0]
    assert got.dtype == TORCH_FP8[code]
    got_bits, want_bits = got.view(torch.uint8).numpy(), want.view(np.uint8)
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.float().numpy()), nan)
    np.testing.assert_array_equal(got_bits[~nan], want_bits[~nan])


@pytest.mark.parametrize("code", list(FP8), ids=["e4m3fn", "e5m2"])
def test_dequantize_every_fp8_code(code):
    """All 256 codes (NaN, inf, subnormals, -0) from a graph input and from an initializer."""
    bits = np.arange(256, dtype=np.uint8)
    x = bits.view(FP8[code])
    scale = np.float32(0.75)
    want = x.astype(np.float32) * scale
    m = _model([helper.make_node("DequantizeLinear", ["x", "s"], ["y"])],
               [helper.make_tensor_value_info("x", code, [256])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])],
               [numpy_helper.from_array(scale, "s")])
    got = _run(m, {"x": torch.from_numpy(bits.copy()).view(TORCH_FP8[code])})[0].numpy()
    np.testing.assert_array_equal(got, want)  # NaN positions compare equal
    const = _model([helper.make_node("DequantizeLinear", ["x", "s"], ["y"])], [],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])],
                   [numpy_helper.from_array(x, "x"), numpy_helper.from_array(scale, "s")])
    np.testing.assert_array_equal(np.asarray(_run(const, {})[0]), want)


def test_int4_initializers_unpack_and_dequantize_block_wise_as_onnxruntime():
    """An odd count of int4 values (packed two per byte, the last byte half used), block-wise along
    axis 0 with a shorter last block, and uint4 per-axis with zero points, against onnxruntime."""
    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, (7, 3)).astype(ml_dtypes.int4)
    scale = rng.uniform(0.01, 0.1, (4, 3)).astype(np.float32)
    zero = rng.integers(-8, 8, (4, 3)).astype(ml_dtypes.int4)
    u = rng.integers(0, 16, (3, 5)).astype(ml_dtypes.uint4)
    uscale = rng.uniform(0.01, 0.1, (5,)).astype(np.float32)
    uzero = rng.integers(0, 16, (5,)).astype(ml_dtypes.uint4)
    m = _model([helper.make_node("DequantizeLinear", ["w", "s", "z"], ["a"], axis=0, block_size=2),
                helper.make_node("DequantizeLinear", ["u", "us", "uz"], ["b"], axis=1),
                helper.make_node("MatMul", ["a", "x"], ["y"]), helper.make_node("Add", ["b", "bias"], ["c"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2]),
                helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3, 5])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 2]),
                helper.make_tensor_value_info("c", TensorProto.FLOAT, [3, 5])],
               [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
                numpy_helper.from_array(zero, "z"), numpy_helper.from_array(u, "u"),
                numpy_helper.from_array(uscale, "us"), numpy_helper.from_array(uzero, "uz")])
    assert len(m.graph.initializer[0].raw_data) == 11  # 21 values, two per byte
    graph = import_model(m)
    consts = {v.name: v for v in graph.constants()}
    assert consts["w"].type.dtype is DType.INT4 and consts["w"].const.dtype == ml_dtypes.int4
    np.testing.assert_array_equal(consts["w"].const, w)
    feeds = {"x": rng.standard_normal((3, 2)).astype(np.float32), "bias": np.zeros((3, 5), np.float32)}
    for optimize in (True, False):  # folded to fp32 constants, and run by the kernels
        got = _run(m, feeds, optimize=optimize)
        for g, w_ in zip(got, _ort(m, feeds)):
            np.testing.assert_allclose(g.numpy(), w_, rtol=1e-5, atol=1e-6)


def test_quantize_to_int4_saturates_to_four_bits_also_when_folded():
    """x -> QuantizeLinear(int4) -> DequantizeLinear: values beyond [-8, 7] clamp to the 4-bit range,
    in the kernel and when a constant weight's QuantizeLinear is folded (the reference sees int4)."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-1.5, 1.5, (4, 6)).astype(np.float32)
    scale = np.array([0.1, 0.2, 0.05, 0.3], np.float32)
    zero = np.array([1, -2, 0, 7], ml_dtypes.int4)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=0),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)]
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])], out, inits)
    want = _ort(m, {"x": x})[0]
    np.testing.assert_array_equal(_run(m, {"x": x})[0].numpy(), want)
    assert np.abs(want).max() > 0  # and some values saturated:
    assert (np.abs(x / scale[:, None]) > 8).any()
    folded = _model(nodes, [], out, inits + [numpy_helper.from_array(x, "x")])
    np.testing.assert_array_equal(np.asarray(_run(folded, {})[0]), want)


def test_quantize_ties_nan_and_saturation_match_onnxruntime_exactly():
    """Half-way quotients round to even before the zero point is added; NaN gives the range's low
    end; per-axis uint8 and int8, block-wise with a shorter last block."""
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, np.nan, np.inf, -np.inf, 1e10, 0.5000001, 127.5]] * 3,
                 np.float32)
    for zero, scale, attrs in [(np.array([10, 0, 255], np.uint8), np.array([1, 0.5, 2], np.float32), {"axis": 0}),
                               (np.array([-3, 0, 127], np.int8), np.array([1, 0.25, 4], np.float32), {"axis": 0}),
                               (np.array([[1] * 6, [2] * 6, [3] * 6], np.int8),
                                np.full((3, 6), 0.5, np.float32), {"axis": 1, "block_size": 2}),
                               (np.array([[1] * 3, [2] * 3, [3] * 3], np.uint8),
                                np.full((3, 3), 0.5, np.float32), {"axis": 1, "block_size": 5})]:
        m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                   [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(zero.dtype), list(x.shape))],
                   [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")])
        np.testing.assert_array_equal(_run(m, {"x": x})[0].numpy(), _ort(m, {"x": x})[0], err_msg=str(attrs))


# ---- models from onnxruntime.quantization ------------------------------------------------------

def _cnn():
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2, "w2"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b2"),
             numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32) * 0.3, "wf"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "bf")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Add", ["c2", "c2"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits, opset=17), "x", (2, 3, 8, 8)


def _transformer_block():
    """x -> MatMul+Add (q, k, v) -> q k^T / sqrt(d) -> Softmax -> @ v -> MatMul+Add -> + x -> LayerNorm."""
    rng = np.random.default_rng(4)
    d = 16
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32) * 0.25, n)
             for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(rng.standard_normal(d).astype(np.float32) * 0.1, n)
              for n in ("bq", "bk", "bv", "bo", "beta")]
    inits += [numpy_helper.from_array(np.ones(d, np.float32), "gamma"),
              numpy_helper.from_array(np.float32(1 / np.sqrt(d)), "scale")]
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"]),
                  helper.make_node("Add", [f"{n}0", f"b{n}"], [n])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["s0"]),
              helper.make_node("Mul", ["s0", "scale"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["a"]),
              helper.make_node("MatMul", ["a", "wo"], ["o0"]),
              helper.make_node("Add", ["o0", "bo"], ["o"]),
              helper.make_node("Add", ["o", "x"], ["h"]),
              helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["y"], axis=-1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, d])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, d])], inits, opset=17), "x", (2, 6, d)


class _Reader:
    """Calibration data for quantize_static: a few random batches."""

    def __init__(self, name, shape, seed):
        rng = np.random.default_rng(seed)
        self.batches = iter([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


@pytest.mark.parametrize("build,exact", [(_cnn, True), (_transformer_block, False)], ids=["cnn", "transformer_block"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_int8_models_from_quantize_static_match_onnxruntime(tmp_path, build, exact, per_channel):
    """QDQ int8 (uint8 activations, int8 weights, per-tensor or per-channel) from
    onnxruntime.quantization.quantize_static, run by rtxjit and onnxruntime on the same file.
    rtxjit computes each quantized op in fp32 between its DequantizeLinear and QuantizeLinear
    (weights folded), onnxruntime fuses them into integer kernels. The CNN (Conv, Add, Relu, pool,
    Gemm) gives the same values exactly. In the transformer block onnxruntime's integer Softmax /
    MatMul requantize with their own rounding (measured: 80% of outputs equal, the largest
    difference 0.07, a fifth of the quantized model's own error against fp32, 0.36): the bound is
    a third of that error."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model, name, shape = build()
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, src)
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(name, shape, 5)
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=per_channel)
    q = onnx.load(dst)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    want = _ort(q, {name: x})[0]
    got = _run(q, {name: x})[0].numpy()
    if exact:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        return
    quant_error = np.abs(want - _ort(model, {name: x})[0]).max()
    assert np.abs(got - want).max() <= quant_error / 3
    assert np.mean(np.isclose(got, want, rtol=1e-5, atol=1e-5)) > 0.7


def test_fp8_qdq_matmul_matches_onnx_reference():
    """x -> Q(e4m3fn) -> DQ -> MatMul with a DQ(e4m3fn weight) -> y: the fp8 values are the
    reference's bits, so only the fp32 MatMul's summation order differs."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((16, 8)) * 2).astype(ml_dtypes.float8_e4m3fn)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(np.float32(0.02), "xs"), numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "xz"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.uniform(0.01, 0.1, 8).astype(np.float32), "ws")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    x = rng.standard_normal((4, 16)).astype(np.float32) * 3
    want = ReferenceEvaluator(m).run(None, {"x": x})[0]
    for optimize in (True, False):
        np.testing.assert_allclose(_run(m, {"x": x}, optimize=optimize)[0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_fp8_qdq_below_sm89_is_an_error_naming_the_node_and_sm():
    """Precision legality (passes/precision_legality.py) sees the fp8 values of a Q/DQ model: a
    build for sm_86 is refused naming the QuantizeLinear that makes them; sm_89 builds."""
    from rtxjit.errors import UnsupportedOpError

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant_x"),
             helper.make_node("DequantizeLinear", ["q", "s"], ["d"]),
             helper.make_node("MatMul", ["d", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e5m2), "z"),
             numpy_helper.from_array(np.ones((4, 2), np.float32), "w")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])], inits)
    with pytest.raises(UnsupportedOpError, match=r"sm_86.*node 'quant_x' \(QuantizeLinear\).*fp8e5m2.*sm_89"):
        rtxjit.build(m, targets=["sm_86"], optimize=False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_wise_int4_from_matmul_nbits_quantizer_matches_onnxruntime(symmetric):
    """Weight-only int4 in QDQ form from onnxruntime's MatMulNBitsQuantizer: a block-wise uint4
    DequantizeLinear (blocks of 16 along K, zero points where asymmetric) before a MatMul."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    rng = np.random.default_rng(8)
    w = numpy_helper.from_array(rng.standard_normal((48, 24)).astype(np.float32), "w")
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 48])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])], [w])
    config = DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=symmetric, quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(m, algo_config=config)
    quantizer.process()
    q = quantizer.model.model
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and helper.get_attribute_value(dq[0].attribute[1]) == 16
    assert {i.data_type for i in q.graph.initializer} & {TensorProto.INT4, TensorProto.UINT4}
    x = rng.standard_normal((3, 48)).astype(np.float32)
    # onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits, by default at accuracy level 4
    # (activations quantized to int8: 2% off); level 1 keeps them fp32, the model's meaning
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    want = ort.InferenceSession(q.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for optimize in (True, False):
        np.testing.assert_allclose(_run(q, {"x": x}, optimize=optimize)[0].numpy(), want, rtol=1e-4, atol=1e-4)


def test_fp8_calibration_quantizes_products_whose_weight_comes_through_identity():
    """The TorchScript exporter shares equal weights (an nn.TransformerEncoder's cloned layers) through
    Identity nodes: calibrate.fp8_qdq quantizes those products too, and rtxjit fuses each into an
    fp8 product."""
    from rtxjit.onnx.importer import import_model
    from rtxjit.passes import optimize
    from rtxjit.quant.calibrate import fp8_qdq

    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Identity", ["w"], ["w_again"]), helper.make_node("MatMul", ["r", "w_again"], ["y"])]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
               [numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w")])
    q = fp8_qdq(m, [{"x": rng.standard_normal((4, 16)).astype(np.float32)}])
    products = [n for n in q.graph.node if n.op_type == "MatMul"]
    assert all(n.input[1].endswith("_dq") for n in products), [n.input[1] for n in products]
    ops = [n.attrs.get("anchor", n.op) for n in optimize(import_model(q))[0].nodes]  # the Relu joins an epilogue
    assert ops.count("rtxjit.QLinearMatMul") == 2 and "MatMul" not in ops, ops
