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


def _ort(model, feeds, optimized=True):
    options = ort.SessionOptions()
    if not optimized:  # onnxruntime's graph optimizations get fp8 Q/DQ products wrong (docs/quantization.md)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


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
    return _contrib_model(nodes, "swiglu", dtype, {"x": hidden}, hidden, inits)


def _contrib_model(nodes, name, dtype, inputs: dict, width: int, inits: dict):
    """An opset-21 + com.microsoft model: inputs ``[rows, d]`` per ``inputs`` (name -> d), output ``y``
    ``[rows, width]``."""
    t = ONNX_TYPE[dtype]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info(k, t, [None, d]) for k, d in inputs.items()],
                          [helper.make_tensor_value_info("y", t, [None, width])],
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


def _qdq_mlp(dtype, rows, fp8=False, seed=1):
    """Q(x) -> DQ -> MatMul <- DQ(int8 / e4m3 per-channel weight) -> Add(bias) -> SiLU -> Add(x):
    the product leaves as a float, so the bias, activation and residual join its kernel."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    k, n = 48, 48
    if fp8:
        w = (rng.standard_normal((k, n)) * 40).astype(ml_dtypes.float8_e4m3fn)
        xz = np.zeros((), ml_dtypes.float8_e4m3fn)
    else:
        w, xz = rng.integers(-127, 128, (k, n)).astype(np.int8), np.array(121, np.uint8)
    inits = {"xs": np.array(0.03, dtype), "xz": xz, "w": w,
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


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_float_qlinear_matmul_takes_bias_silu_and_residual_into_its_store(dtype, fp8):
    """int8 x int8 and e4m3 x e4m3 products (fuse.py stores the fp8 weight as its bits, so the
    anchor's constants upload as they are)."""
    m, x = _qdq_mlp(dtype, 6, fp8)
    sess = rtxjit.InferenceSession(m, device="cpu")
    assert "Epilogue(rtxjit.QLinearMatMul)" in _fused_ops(sess)
    kernels = [s.kernel.name for s in sess.plan_for({"x": x}).steps]
    assert kernels == ["qdot"]  # the product alone: it quantizes x as it loads it (no Q(x) kernel)
    got = sess.run(None, {"x": x})[0]
    unfused = rtxjit.InferenceSession(m, device="cpu", optimize=False).run(None, {"x": x})[0]
    for other in (unfused, _ort(m, {"x": x}, optimized=not fp8)[0]):
        np.testing.assert_allclose(got.astype(np.float32), other.astype(np.float32), **TOL[dtype])


# ---- split-K GEMV ---------------------------------------------------------------------------------

def test_split_k_is_chosen_for_the_decoder_down_projection():
    """K 11008 x N 4096 at one token: 64-128 column programs for 132 SMs, so K is split (each split
    a whole number of every candidate's BLOCK_K); the up-projection (N 11008) fills the SMs as is."""
    from rtxjit.codegen.templates.quant_gemm import nbits_configs, split_k
    from rtxjit.ir.types import DType

    cfgs = nbits_configs(1, 4096, 11008, True, False, DType.FP16, 90, 132)
    splits, k_per = split_k(4096, 11008, cfgs, 132)
    assert splits > 1 and -(-4096 // cfgs[0]["BLOCK_N"]) * splits >= 132
    assert all(k_per % c["BLOCK_K"] == 0 for c in cfgs) and (splits - 1) * k_per < 11008 <= splits * k_per
    cfgs = nbits_configs(1, 11008, 4096, True, False, DType.FP16, 90, 132)
    assert split_k(11008, 4096, cfgs, 132) == (1, 4096)
    assert split_k(4096, 11008, cfgs, 1) == (1, 11008)  # the interpreter's one "SM"


def _nbits_residual(k, n, dtype, seed=4):
    """``y = MatMulNBits(x; 4 bits, block 32, packed zero points, bias) + r``."""
    rng = np.random.default_rng(seed)
    inits = {"bias": rng.standard_normal(n).astype(dtype)}
    names = ["x"] + _nbits(rng, "w", k, n, 4, 32, True, inits, dtype) + ["", "bias"]
    nodes = [helper.make_node("MatMulNBits", names, ["p"], domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
                              accuracy_level=1),
             helper.make_node("Add", ["p", "r"], ["y"])]
    return _contrib_model(nodes, "nbits_res", dtype, {"x": k, "r": n}, n, inits)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_split_k_gemv_matches_the_unsplit_kernel_and_onnxruntime(dtype, monkeypatch):
    """The interpreter counts one SM; with 132 the GEMV of K 776 (not a multiple of the block) x N
    40 splits K in 3 (384 + 384 + 8), and the reduction adds the bias and the fused residual."""
    from rtxjit.plan.plan import LowerCtx

    k, n, rows = 776, 40, 3
    m = _nbits_residual(k, n, dtype)
    rng = np.random.default_rng(9)
    feeds = {"x": rng.standard_normal((rows, k)).astype(dtype), "r": rng.standard_normal((rows, n)).astype(dtype)}
    plain = rtxjit.InferenceSession(m, device="cpu")
    assert [s.kernel.name for s in plain.plan_for(feeds).steps] == ["qgemv"]
    want = plain.run(None, feeds)[0]
    monkeypatch.setattr(LowerCtx, "sm_count", property(lambda self: 132))
    split = rtxjit.InferenceSession(m, device="cpu")
    steps = split.plan_for(feeds).steps
    assert [s.kernel.name for s in steps] == ["qgemv", "qsplit_reduce"]
    assert steps[0].grid[-1] == 3
    got = split.run(None, feeds)[0]
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), **TOL[dtype])
    np.testing.assert_allclose(got.astype(np.float32), _ort(m, feeds)[0].astype(np.float32), **TOL[dtype])
