"""int16 / uint16 (DType.INT16 / UINT16): QuantizeLinear / DequantizeLinear-21 with 16-bit
quantized types, per tensor, per axis and block-wise, unfused and fused into pointwise chains, and
Cast to and from them, against onnxruntime without graph optimizations (its QDQ fusions round
otherwise). Saturation at both ends ([-32768, 32767], [0, 65535]), negative zero points, ties to
even, NaN and inf are exact: the integers must be onnxruntime's bit for bit. int2 / uint2 (opset 25,
held one value per byte as int4 is) through a Q -> DQ round trip as well."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit

ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int16: TensorProto.INT16,
             np.uint16: TensorProto.UINT16, np.int32: TensorProto.INT32, np.int64: TensorProto.INT64,
             np.int8: TensorProto.INT8, np.bool_: TensorProto.BOOL}
RANGE = {np.int16: (-32768, 32767), np.uint16: (0, 65535)}


def _model(nodes, inputs, outputs, inits, opset=21):
    g = helper.make_graph(nodes, "q16", [helper.make_tensor_value_info(n, ONNX_TYPE[t], s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, ONNX_TYPE[t], s) for n, t, s in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset < 25 else 11
    return m


def _ort(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _check(model, feeds, exact=True):
    """rtxjit, fused and unfused, against onnxruntime: the same dtypes and (integers) the same values."""
    want = _ort(model, feeds)
    for optimize in (True, False):
        got = rtxjit.InferenceSession(model, device="cpu", optimize=optimize).run(None, feeds)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            if exact:
                np.testing.assert_array_equal(g, w)
            else:
                np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-2 if
                                           w.dtype == np.float16 else 1e-6)


def _params(qtype, kind, shape, rng, scale_type=np.float32):
    """(scale, zero point, attributes) for ``kind``: per tensor, per axis 1, or blocks of 2 along
    axis 1 (its length odd, so the last block is short). Zero points spread over the type's range
    (negative ones for int16)."""
    lo, hi = RANGE[qtype]
    if kind == "tensor":
        pshape, attrs = (), {}
    elif kind == "axis":
        pshape, attrs = (shape[1],), {"axis": 1}
    else:
        pshape, attrs = (shape[0], -(-shape[1] // 2)) + tuple(shape[2:]), {"axis": 1, "block_size": 2}
    scale = rng.uniform(0.005, 0.05, pshape).astype(scale_type)
    zero = rng.integers(lo // 2, hi // 2 + 1, pshape).astype(qtype)
    if qtype is np.int16:
        zero.flat[0] = -1234  # a negative zero point in every case
    return scale, zero, attrs


def _saturating_floats(shape, rng, dtype):
    """Random non-zero values of both signs whose quotients leave the 16-bit ranges at both ends,
    with ties, NaN, infinities and -0.0 at the front."""
    x = rng.uniform(-2500.0, 2500.0, shape)
    x = np.where(np.abs(x) < 1e-3, 0.5, x).astype(dtype)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e4, -1e4], dtype)
    x.flat[:special.size] = special
    return x


@pytest.mark.parametrize("qtype", [np.int16, np.uint16])
@pytest.mark.parametrize("kind", ["tensor", "axis", "block"])
@pytest.mark.parametrize("xtype", [np.float32, np.float16])
def test_quantize_linear_16bit_matches_onnxruntime(qtype, kind, xtype):
    rng = np.random.default_rng(16)
    shape = [2, 5, 6]
    scale, zero, attrs = _params(qtype, kind, shape, rng, xtype)
    x = _saturating_floats(shape, rng, xtype)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    m = _model([node], [("x", xtype, shape)], [("y", qtype, shape)], {"s": scale, "z": zero})
    _check(m, {"x": x})
    lo, hi = RANGE[qtype]
    got = rtxjit.InferenceSession(m, device="cpu").run(None, {"x": x})[0]
    assert got.min() == lo and got.max() == hi  # both ends reached


@pytest.mark.parametrize("qtype", [np.int16, np.uint16])
def test_quantize_linear_16bit_rounds_ties_to_even(qtype):
    """Quotients k / 2 for every k: each .5 goes to the even neighbour, before the zero point."""
    k = np.arange(-40, 41, dtype=np.float32)
    x = k * np.float32(0.125)  # scale 0.25: quotients k / 2
    zero = np.array(-3 if qtype is np.int16 else 7, qtype)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    m = _model([node], [("x", np.float32, [k.size])], [("y", qtype, [k.size])], {"s": np.float32(0.25), "z": zero})
    _check(m, {"x": x})
    got = rtxjit.InferenceSession(m, device="cpu").run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np.clip(np.rint(k / 2) + zero, *RANGE[qtype]).astype(qtype))


@pytest.mark.parametrize("output_dtype,qtype", [(TensorProto.INT16, np.int16), (TensorProto.UINT16, np.uint16)])
def test_quantize_linear_output_dtype_without_zero_point(output_dtype, qtype):
    """``output_dtype`` picks the 16-bit type where no zero point gives it."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-60000, 110000, (3, 7)).astype(np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["y"], output_dtype=output_dtype)
    m = _model([node], [("x", np.float32, [3, 7])], [("y", qtype, [3, 7])], {"s": np.float32(1.5)})
    _check(m, {"x": x})


@pytest.mark.parametrize("qtype", [np.int16, np.uint16])
@pytest.mark.parametrize("kind", ["tensor", "axis", "block"])
@pytest.mark.parametrize("stype", [np.float32, np.float16])
def test_dequantize_linear_16bit_matches_onnxruntime(qtype, kind, stype):
    rng = np.random.default_rng(61)
    shape = [2, 5, 6]
    lo, hi = RANGE[qtype]
    scale, zero, attrs = _params(qtype, kind, shape, rng, stype)
    if stype is np.float16:
        scale = (scale * 0.05).astype(stype)  # (hi - lo) * scale within fp16's range
    x = rng.integers(lo, hi + 1, shape).astype(qtype)
    x.flat[:2] = (lo, hi)
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    m = _model([node], [("x", qtype, shape)], [("y", stype, shape)], {"s": scale, "z": zero})
    _check(m, {"x": x}, exact=False)


def test_fused_16bit_chain_is_one_kernel():
    """DQ(int16 a) + DQ(uint16 b) -> Q(uint16): one pointwise kernel; the integers are the unfused
    graph's and onnxruntime's (saturating at both ends of uint16)."""
    rng = np.random.default_rng(5)
    shape = [3, 4, 5]
    inits = {"sa": np.float32(0.03), "za": np.array(-700, np.int16), "sb": np.float32(0.011),
             "zb": np.array(30000, np.uint16), "sy": np.float32(0.02), "zy": np.array(20000, np.uint16)}
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["ad"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"]),
             helper.make_node("Add", ["ad", "bd"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "sy", "zy"], ["y"])]
    m = _model(nodes, [("a", np.int16, shape), ("b", np.uint16, shape)], [("y", np.uint16, shape)], inits)
    feeds = {"a": rng.integers(-32768, 32768, shape).astype(np.int16),
             "b": rng.integers(0, 65536, shape).astype(np.uint16)}
    sess = rtxjit.InferenceSession(m, device="cpu")
    assert [n.op for n in sess.graph.nodes] == ["rtxjit.Pointwise"]
    _check(m, feeds)
    got = sess.run(None, feeds)[0]
    assert got.min() == 0 and got.max() == 65535


CASTS = [(np.float32, np.int16), (np.float16, np.uint16), (np.int16, np.float32), (np.uint16, np.float16),
         (np.int32, np.int16), (np.int64, np.uint16), (np.int16, np.uint16), (np.uint16, np.int32),
         (np.int16, np.bool_), (np.bool_, np.uint16)]


@pytest.mark.parametrize("src,dst", CASTS, ids=[f"{s.__name__}-{d.__name__}" for s, d in CASTS])
def test_cast_to_and_from_16bit(src, dst):
    """Values inside the target's range for float sources (outside it a float -> int conversion is
    undefined in onnxruntime's C++); integer narrowing wraps, as onnxruntime's static_cast does."""
    rng = np.random.default_rng(7)
    shape = [4, 9]
    if src is np.bool_:
        x = rng.random(shape) < 0.5
    elif np.issubdtype(src, np.floating):
        lo, hi = RANGE[dst]
        x = rng.uniform(max(lo, -2000), min(hi, 2000) if src is np.float16 else hi, shape).astype(src)
    else:
        info = np.iinfo(src)
        x = rng.integers(max(info.min, -10 ** 6), min(info.max, 10 ** 6) + 1, shape).astype(src)
        x.flat[:2] = (max(info.min, -10 ** 6), min(info.max, 10 ** 6))
    to = ONNX_TYPE[dst]
    node = helper.make_node("Cast", ["x"], ["y"], to=to)
    m = _model([node], [("x", src, shape)], [("y", dst, shape)], {})
    _check(m, {"x": x})


@pytest.mark.parametrize("qtype", [np.int16, np.uint16])
@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_16bit_reductions_pad_masked_lanes_with_the_types_identity(op, qtype):
    """Rows of 37 (a masked tail in the block): the masked lanes hold the type's own extreme, so a
    row of all-minimum uint16 values reduces to 0, not to a wrapped -32768."""
    info = np.iinfo(qtype)
    x = np.random.default_rng(9).integers(info.min, info.max + 1, (3, 37)).astype(qtype)
    x[0], x[1] = info.max, info.min
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)
    m = _model([node], [("x", qtype, [3, 37])], [("y", qtype, [3])], {"axes": np.array([1], np.int64)})
    got = rtxjit.InferenceSession(m, device="cpu").run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x.max(1) if op == "ReduceMax" else x.min(1))


@pytest.mark.parametrize("qtype,kind", [(ml_dtypes.int2, "tensor"), (ml_dtypes.uint2, "axis"),
                                        (ml_dtypes.int2, "block")])
def test_2bit_quantize_dequantize_round_trip_matches_onnxruntime(qtype, kind):
    """Q(x) -> int2 / uint2 -> DQ, the integers read through a Cast to int8 (onnxruntime's Python API
    cannot pass 2-bit arrays; the zero point is an initializer): saturation at both ends ([-2, 1],
    [0, 3]), ties to even, against onnxruntime at opset 25."""
    rng = np.random.default_rng(2)
    shape = [2, 5, 6]
    info = ml_dtypes.iinfo(qtype)
    pshape = {"tensor": (), "axis": (5,), "block": (2, 3, 6)}[kind]
    attrs = {"tensor": {}, "axis": {"axis": 1}, "block": {"axis": 1, "block_size": 2}}[kind]
    scale = rng.uniform(0.2, 0.5, pshape).astype(np.float32)
    zero = rng.integers(int(info.min), int(info.max) + 1, pshape).astype(qtype)
    x = rng.uniform(-3.0, 3.0, shape).astype(np.float32)
    x.flat[:4] = (0.25, -0.25, 0.75, 100.0)  # with scale 0.5 at index 0: ties 0.5 and -0.5, 1.5; saturation
    if kind == "tensor":
        scale = np.float32(0.5)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("Cast", ["q"], ["q8"], to=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    m = _model(nodes, [("x", np.float32, shape)], [("q8", np.int8, shape), ("y", np.float32, shape)],
               {"s": scale, "z": zero}, opset=25)
    _check(m, {"x": x})
    q8 = rtxjit.InferenceSession(m, device="cpu").run(None, {"x": x})[0]
    assert q8.min() == int(info.min) and q8.max() == int(info.max)
