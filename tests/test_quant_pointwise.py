"""QuantizeLinear / DequantizeLinear in fused pointwise kernels (ops/quant.py ``expr`` hooks, asked
by passes/fuse_pointwise.py through ``pointwise_form``): with constant per-tensor parameters and an
int8 / uint8 side, Q/DQ chains that no quantized product absorbed (a residual Add outside a conv,
the Q/DQ pairs around a MaxPool) join their neighbours' kernels. The integers are those of the
unfused graph and of onnxruntime without graph optimizations (its QDQ fusions round otherwise):
ties to even, saturation, NaN and inf included."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit

ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.uint8: TensorProto.UINT8,
             np.int8: TensorProto.INT8}


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info(n, ONNX_TYPE[t], s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, ONNX_TYPE[t], s) for n, t, s in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _ort(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _check(model, feeds, kernels):
    """Fused: ``kernels`` launches; every output equal to the unfused graph's and onnxruntime's."""
    sess = rtxjit.InferenceSession(model, device="cpu")
    assert [s.kernel.name for s in sess.plan_for(feeds).steps] == kernels
    got = sess.run(None, feeds)
    unfused = rtxjit.InferenceSession(model, device="cpu", optimize=False).run(None, feeds)
    for other in (unfused, _ort(model, feeds)):
        for g, o in zip(got, other):
            assert g.dtype == o.dtype
            np.testing.assert_array_equal(g, o)
    return sess


@pytest.mark.parametrize("qtype", [np.uint8, np.int8])
def test_residual_add_of_two_dequantized_tensors_is_one_kernel(qtype):
    """DQ(a) + DQ(b) -> Q -> (the integers, and DQ of them): one pointwise kernel, two outputs' worth
    of arithmetic; the graph's integers exactly."""
    rng = np.random.default_rng(0)
    lo, hi = (0, 256) if qtype is np.uint8 else (-128, 128)
    z = (lambda v: np.array(v, qtype))
    inits = {"sa": np.float32(0.05), "za": z(120 if qtype is np.uint8 else -7), "sb": np.float32(0.031),
             "zb": z(131 if qtype is np.uint8 else 4), "sy": np.float32(0.07), "zy": z(125 if qtype is np.uint8 else 2)}
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["ad"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"]),
             helper.make_node("Add", ["ad", "bd"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "sy", "zy"], ["y"])]
    shape = [2, 8, 5, 5]
    m = _model(nodes, [("a", qtype, shape), ("b", qtype, shape)], [("y", qtype, shape)], inits)
    feeds = {k: rng.integers(lo, hi, shape).astype(qtype) for k in "ab"}
    sess = _check(m, feeds, ["pointwise"])
    assert [n.op for n in sess.graph.nodes] == ["rtxjit.Pointwise"]


def test_fused_quantize_rounds_ties_to_even_saturates_and_maps_nan_as_its_kernel():
    """x * 0.5 -> Q(scale 0.25, zero 3): quotients 2x, so x = k / 4 hits every tie; NaN goes to the
    low end, inf and big values saturate, -0.0 is 0."""
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 0.125, 2.375, -2.625, 1e30, -1e30, np.inf, -np.inf,
                  np.nan, -0.0, 31.25, 31.75, -33.25, 0.3749999, 0.3750001], np.float32)
    inits = {"c": np.float32(0.5), "s": np.float32(0.25), "z": np.array(3, np.int8)}
    nodes = [helper.make_node("Mul", ["x", "c"], ["h"]),
             helper.make_node("QuantizeLinear", ["h", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    m = _model(nodes, [("x", np.float32, [x.size])], [("q", np.int8, [x.size]), ("y", np.float32, [x.size])], inits)
    _check(m, {"x": x}, ["pointwise", "pointwise"])  # q is an output, so y's DQ is a kernel of its own


def test_fp16_chain_quantizes_the_value_the_unfused_graph_stores():
    """fp16 scales: the DQ's product is rounded to fp16 and the Add's sum too before the fused
    QuantizeLinear divides (the unfused graph stores both in fp16): the same integers."""
    rng = np.random.default_rng(2)
    inits = {"sa": np.float16(0.0173), "za": np.array(119, np.uint8), "sy": np.float16(0.0291),
             "zy": np.array(128, np.uint8), "r": (rng.standard_normal((4, 16)) * 0.7).astype(np.float16)}
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["ad"]),
             helper.make_node("Add", ["ad", "r"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "sy", "zy"], ["y"])]
    m = _model(nodes, [("a", np.uint8, [4, 16])], [("y", np.uint8, [4, 16])], inits)
    a = rng.integers(0, 256, (4, 16)).astype(np.uint8)
    sess = rtxjit.InferenceSession(m, device="cpu")
    assert [n.op for n in sess.graph.nodes] == ["rtxjit.Pointwise"]
    got = sess.run(None, {"a": a})[0]
    np.testing.assert_array_equal(got, rtxjit.InferenceSession(m, device="cpu", optimize=False).run(None, {"a": a})[0])
    want = (a.astype(np.float16) - np.float16(119)) * inits["sa"] + inits["r"]  # fp16 arithmetic, as stored
    np.testing.assert_array_equal(got, np.clip(np.rint(want.astype(np.float32) / np.float32(inits["sy"])) + 128, 0,
                                               255).astype(np.uint8))


def test_qdq_pairs_around_a_maxpool_join_their_neighbours():
    """Q -> DQ -> MaxPool -> Q -> DQ -> Relu (what quantize_static leaves around a pool): the pair
    before the pool is one kernel, the pair after it joins the Relu."""
    rng = np.random.default_rng(4)
    inits = {"s": np.float32(0.02), "z": np.array(128, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("MaxPool", ["xd"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["pd"]),
             helper.make_node("Relu", ["pd"], ["y"])]
    m = _model(nodes, [("x", np.float32, [2, 3, 8, 8])], [("y", np.float32, [2, 3, 4, 4])], inits)
    x = (rng.standard_normal((2, 3, 8, 8)) * 2).astype(np.float32)
    _check(m, {"x": x}, ["pointwise", "pool_max", "pointwise"])


def test_per_axis_and_fp8_quantization_keep_their_own_kernels():
    """A per-channel scale does not broadcast numpy-style along axis 1, and fp8 encodings take
    statements: neither is fused (and the results still match)."""
    import ml_dtypes

    rng = np.random.default_rng(5)
    inits = {"s": np.array([0.02, 0.05, 0.03], np.float32), "z": np.array([3, -4, 0], np.int8),
             "s8": np.float32(0.1), "z8": np.zeros((), ml_dtypes.float8_e4m3fn)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"], axis=1),
             helper.make_node("Abs", ["x"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s8", "z8"], ["q8"]),
             helper.make_node("DequantizeLinear", ["q8", "s8", "z8"], ["y8"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                          [helper.make_tensor_value_info("q", TensorProto.INT8, [2, 3, 3]),
                           helper.make_tensor_value_info("y8", TensorProto.FLOAT, [2, 3, 3])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    x = rng.standard_normal((2, 3, 3)).astype(np.float32)
    sess = _check(m, {"x": x}, ["pointwise"] * 5)
    assert sorted(n.op for n in sess.graph.nodes).count("QuantizeLinear") == 2
