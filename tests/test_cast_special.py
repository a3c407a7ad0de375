"""Cast to and from fp8 (e4m3fn, e5m2: round to nearest even, ``saturate``) and to 4- and 2-bit ints
(toward zero, out of range -> 0, as numpy's ml_dtypes conversion and the onnx suite's data; ints wrap)
run as kernels of their own, never fused into a neighbouring pointwise chain. Checked against
ml_dtypes on values that cover ties, subnormals, the range's ends, +-inf and NaN."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

import rtxjit

FP8 = {"e4m3fn": (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 448.0),
       "e5m2": (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2, 57344.0)}
SUB = {"int4": (TensorProto.INT4, ml_dtypes.int4), "uint4": (TensorProto.UINT4, ml_dtypes.uint4),
       "int2": (TensorProto.INT2, ml_dtypes.int2), "uint2": (TensorProto.UINT2, ml_dtypes.uint2)}


def _chain(to: int, back: int, src=TensorProto.FLOAT, saturate: int = 1, shape=(4, 16)):
    """y = Cast(Cast(x * 1, to), back): a pointwise op before, so fusion has something to join."""
    nodes = [helper.make_node("Mul", ["x", "one"], ["m"]),
             helper.make_node("Cast", ["m"], ["c"], to=to, saturate=saturate) if to in (
                 TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2) else helper.make_node("Cast", ["m"], ["c"], to=to),
             helper.make_node("Cast", ["c"], ["y"], to=back)]
    one = helper.make_tensor("one", src, [], [1])
    graph = helper.make_graph(nodes, "cast", [helper.make_tensor_value_info("x", src, list(shape))],
                              [helper.make_tensor_value_info("y", back, list(shape))], [one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _values(scale: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.standard_normal(41) * scale, [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-9, -1e-9,
                                                          scale * 1e3, -scale * 1e3, 0.5, 1.5, 2.5, -2.5,
                                                          0.0009765625, 0.001953125, 0.0029296875, 240.0, 232.0,
                                                          464.0, 57344.0, 61440.0, -61440.0, 1.0625]])
    return v[:64].astype(np.float32).reshape(4, 16)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("saturate", [1, 0])
def test_cast_through_fp8_rounds_and_saturates_as_onnx_says(fmt, saturate):
    code, np_type, top = FP8[fmt]
    x = _values(top / 8)
    sess = rtxjit.InferenceSession(_chain(code, TensorProto.FLOAT, saturate=saturate))
    assert [n.op for n in sess.graph.nodes].count("Cast") == 2  # not fused into the Mul
    got = sess.run(None, {"x": x})[0]
    wide = np.clip(x, -top, top) if saturate else x  # NaN stays NaN through np.clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = wide.astype(np_type).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])


@pytest.mark.parametrize("name", list(SUB))
def test_cast_to_4_and_2_bit_ints_truncates_and_zeroes_what_is_out_of_range(name):
    code, np_type = SUB[name]
    x = (np.random.default_rng(2).uniform(-20, 20, 64).astype(np.float32)).reshape(4, 16)
    x[0, :6] = [np.nan, np.inf, -np.inf, 7.9, -8.9, -0.7]
    got = rtxjit.InferenceSession(_chain(code, TensorProto.FLOAT)).run(None, {"x": x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = x.astype(np_type).astype(np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["int4", "uint2"])
def test_ints_wrap_to_the_low_bits(name):
    code, np_type = SUB[name]
    x = np.arange(-40, 24, dtype=np.int32).reshape(4, 16)
    got = rtxjit.InferenceSession(_chain(code, TensorProto.INT32, src=TensorProto.INT32)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x.astype(np_type).astype(np.int32))
