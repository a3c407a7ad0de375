"""Quantized products as epilogue anchors (passes/fuse_epilogue.py): the bias, SiLU, SwiGLU's gate
product and the residual Add after com.microsoft MatMulNBits and a float-output rtxjit.QLinearMatMul
run in the product kernel's store. Fused vs the unfused graph (``optimize=False``: every op its
own kernel) vs onnxruntime (MatMulNBits at accuracy level 1), fp32 and fp16."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.quant.contrib import packed_shape

ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float16: dict(rtol=1e-2, atol=2e-2)}


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _fused_ops(sess) -> list:
    return sorted(n.op if n.op != "rtxjit.Epilogue" else f"Epilogue({n.attrs['anchor']})" for n in sess.graph.nodes)


def _nbits(rng, name, k, n, bits, block, zero, inits, dtype):
    """Inputs of a MatMulNBits node computing ``[., k] -> [., n]`` (random packed weights)."""
    nn, kb, blob = packed_shape(n, k, bits, block)
    inits[f"{name}_b"] = rng.integers(0, 256, (nn, kb, blob)).astype(np.uint8)
    inits[f"{name}_s"] = (rng.uniform(0.005, 0.03, (nn, kb)) / (16 if bits == 8 else 1)).astype(dtype)
    names = [f"{name}_b", f"{name}_s"]
    if zero:
        inits[f"{name}_z"] = rng.integers(0, 256, (nn, -(-kb * bits // 8))).astype(np.uint8)
        names.append(f"{name}_z")
    return names


def _swiglu(hidden, ffn, dtype, seed=0):
    """``y = down(silu(gate(x) + b) * up(x)) + x`` with 4-bit (gate, down; packed zero points) and
    8-bit (up) MatMulNBits projections."""
    rng = np.random.default_rng(seed)
    inits = {"bg": (rng.standard_normal(ffn) * 0.3).astype(dtype)}

    def mm(name, src, out, k, n, bits, zero):
        return helper.make_node("MatMulNBits", [src] + _nbits(rng, name, k, n, bits, 32, zero, inits, dtype), [out],
                                domain="com.microsoft", K=k, N=n, bits=bits, block_size=32, accuracy_level=1)

    nodes = [mm("gate", "x", "g", hidden, ffn, 4, True),
             helper.make_node("Add", ["g", "bg"], ["gb"]),
             helper.make_node("Sigmoid", ["gb"], ["sg"]),
             helper.make_node("Mul", ["gb", "sg"], ["act"]),
             mm("up", "x", "u", hidden, ffn, 8, False),
             helper.make_node("Mul", ["act", "u"], ["h"]),
             mm("down", "h", "d", ffn, hidden, 4, True),
             helper.make_node("Add", ["d", "x"], ["y"])]
    t = ONNX_TYPE[dtype]
    g = helper.make_graph(nodes, "swiglu", [helper.make_tensor_value_info("x", t, [None, hidden])],
                          [helper.make_tensor_value_info("y", t, [None, hidden])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [2, 20], ids=["gemv", "gemm"])
def test_swiglu_epilogues_run_in_the_matmul_nbits_kernels(dtype, rows):
    m = _swiglu(64, 96, dtype)
    x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(dtype)
    sess = rtxjit.InferenceSession(m, device="cpu")
    assert _fused_ops(sess) == ["Epilogue(com.microsoft.MatMulNBits)"] * 2 + ["com.microsoft.MatMulNBits"]
    kernel = "qgemv" if rows <= 16 else "qmatmul"
    assert [s.kernel.name for s in sess.plan_for({"x": x}).steps] == [kernel] * 3
    got = sess.run(None, {"x": x})[0]
    assert got.dtype == dtype
    unfused = rtxjit.InferenceSession(m, device="cpu", optimize=False).run(None, {"x": x})[0]
    for other in (unfused, _ort(m, {"x": x})[0]):
        np.testing.assert_allclose(got.astype(np.float32), other.astype(np.float32), **TOL[dtype])


def _qdq_mlp(dtype, rows, seed=1):
    """Q(x) -> DQ -> MatMul <- DQ(int8 per-channel weight) -> Add(bias) -> SiLU -> Add(x[:, :n]):
    the product leaves as a float, so the bias, activation and residual join its kernel."""
    rng = np.random.default_rng(seed)
    k, n = 48, 48
    inits = {"xs": np.array(0.03, dtype), "xz": np.array(121, np.uint8),
             "w": rng.integers(-127, 128, (k, n)).astype(np.int8),
             "ws": rng.uniform(0.002, 0.01, n).astype(dtype), "b": (rng.standard_normal(n) * 0.5).astype(dtype)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["p"]),
             helper.make_node("Add", ["p", "b"], ["pb"]),
             helper.make_node("Sigmoid", ["pb"], ["s"]),
             helper.make_node("Mul", ["pb", "s"], ["a"]),
             helper.make_node("Add", ["a", "x"], ["y"])]
    t = ONNX_TYPE[dtype]
    g = helper.make_graph(nodes, "qdq_mlp", [helper.make_tensor_value_info("x", t, [rows, k])],
                          [helper.make_tensor_value_info("y", t, [rows, n])],
                          [numpy_helper.from_array(np.asarray(v), name) for name, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m, (rng.standard_normal((rows, k)) * 2).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_float_qlinear_matmul_takes_bias_silu_and_residual_into_its_store(dtype):
    m, x = _qdq_mlp(dtype, 6)
    sess = rtxjit.InferenceSession(m, device="cpu")
    assert "Epilogue(rtxjit.QLinearMatMul)" in _fused_ops(sess)
    assert [s.kernel.name for s in sess.plan_for({"x": x}).steps] == ["pointwise", "qdot"]  # Q(x), the product
    got = sess.run(None, {"x": x})[0]
    unfused = rtxjit.InferenceSession(m, device="cpu", optimize=False).run(None, {"x": x})[0]
    for other in (unfused, _ort(m, {"x": x})[0]):
        np.testing.assert_allclose(got.astype(np.float32), other.astype(np.float32), **TOL[dtype])
