"""Quantized kernels on the GPU (issue 19): the same files as the CPU tests (tests/test_quant_gemm.py,
tests/test_quant_conv.py) at sizes where the GPU takes its own paths -- the 4-bit GEMV's unrolled
block steps with 16-byte loads and split-K, the int8 / fp8 tensor-core dots with K-major weights,
the int8 implicit-GEMM conv -- generic kernels first, then the specialized (tuned) ones, against
onnxruntime (int8, int4) or onnx's reference (fp8, which onnxruntime's CPU MatMul lacks)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

import rtxjit
from tests.oprunner import rel_error
from tests.test_quant_conv import SHAPE, _init, _quantized
from tests.test_quant_gemm import _matmul_model, _nbits_quantized, _ort, _qdq_model

pytestmark = pytest.mark.gpu


def _runs(model, feeds: dict, **options):
    """The output of a generic run, then of a run once the specialized kernels serve."""
    sess = rtxjit.InferenceSession(model, device="cuda", **options)
    first = np.asarray(sess.run(None, feeds)[0], np.float64)
    sess.wait_for_specialization(timeout=300)
    return first, np.asarray(sess.run(None, feeds)[0], np.float64)


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, 128, False), (8, 64, False)])
@pytest.mark.parametrize("rows", [1, 3, 40], ids=["gemv1", "gemv3", "gemm"])
def test_gpu_matmul_nbits_matches_onnxruntime(bits, block, symmetric, rows):
    """K 1024 x N 1536 (the GEMV splits K over the SMs), fp32 activations: fp32 FMA in the GEMV,
    tf32 in the GEMM's dot (1e-2 there)."""
    q = _nbits_quantized(_matmul_model(1024, 1536, rows, seed=3), bits, block, symmetric, "QOperator")
    x = np.random.default_rng(4).standard_normal((rows, 1024)).astype(np.float32)
    want = _ort(q, {"x": x})[0]
    for got in _runs(q, {"x": x}):
        assert rel_error(got, want) <= (1e-4 if rows <= 4 else 1e-2), rel_error(got, want)


@pytest.mark.parametrize("rows", [1, 12, 16])
def test_gpu_matmul_nbits_fp16_matches_onnxruntime(rows):
    """The fp32 file run in fp16: one row by the 4-bit GEMV's row loop, 12 and 16 by its tensor-core
    form (fp16 nibbles and activations, fp32 sums), against onnxruntime's fp32 result (1e-2)."""
    q = _nbits_quantized(_matmul_model(1024, 1536, rows, seed=8), 4, 32, True, "QOperator")
    x = np.random.default_rng(9).standard_normal((rows, 1024)).astype(np.float32)
    want = _ort(q, {"x": x})[0]
    for got in _runs(q, {"x": x}, precision="fp16"):
        assert rel_error(got, want) <= 1e-2, rel_error(got, want)


@pytest.mark.parametrize("a_type,op,per_channel,requant", [(TensorProto.UINT8, "MatMul", True, True),
                                                           (TensorProto.INT8, "Gemm", False, False)])
def test_gpu_int8_qdq_product_matches_onnxruntime(a_type, op, per_channel, requant):
    """An int8 x int8 -> int32 dot (exact) at K 512 x N 384 x 64 rows: requantized outputs within
    one step of onnxruntime's (where its fp32 rounding differs), float ones within 1e-5."""
    m, x = _qdq_model(a_type, TensorProto.INT8, op, per_channel, requant, seed=5, k=512, n=384, rows=64)
    want = _ort(m, {"x": x})[0]
    for got in _runs(m, {"x": x}):
        if requant:
            assert np.mean(got == want) > 0.95 and np.abs(got - want).max() <= 0.06 + 1e-6
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_type", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2], ids=["e4m3fn", "e5m2"])
def test_gpu_fp8_qdq_product_matches_the_onnx_reference(w_type):
    """An fp8 x fp8 -> fp32 tensor-core dot (K-major weight) at K 512 x N 384 x 64 rows, float
    output. fp8 products are exact, but Hopper's fp8 tensor cores accumulate with fewer bits than
    fp32 (Triton's default for fp8 dots: no promotion to fp32 within the K loop, as cuBLAS's
    fast-accumulation mode): measured 8.0e-4 relative on an H100 (e4m3fn), so 2e-3 here, where the
    CPU interpreter's exact fp32 sums meet 1e-5 (tests/test_quant_gemm.py)."""
    from onnx.reference import ReferenceEvaluator

    m, x = _qdq_model(w_type, w_type, "Gemm", True, False, seed=6, k=512, n=384, rows=64)
    want = ReferenceEvaluator(m).run(None, {"x": x})[0]
    for got in _runs(m, {"x": x}):
        assert rel_error(got, want) <= 2e-3, rel_error(got, want)


def test_gpu_int8_cnn_from_quantize_static_matches_onnxruntime(tmp_path):
    """The quantize_static CNN of tests/test_quant_conv.py (int8 convs, residual, Relu stages): its
    outputs' integers within one step of onnxruntime's in at most 1% of places."""
    q = _quantized(tmp_path, True, False, "QUInt8")
    x = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    want = _ort(q, {"x": x})[0]
    step = float(_init(q, next(n.input[1] for n in q.graph.node if n.output[0] == "y")))
    for got in _runs(q, {"x": x}):
        steps = np.rint(np.abs(got - want) / step)
        assert steps.max() <= 1 and np.mean(steps > 0) <= 0.01, (steps.max(), np.mean(steps > 0))
