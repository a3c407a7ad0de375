"""Split-K products: a MatMul / Gemm / 1x1 conv with few output tiles (bert-base's
``[128, 3072] @ [3072, 768]`` at batch 1) splits K over programs, writes fp32 partials to a
workspace, and the last split of each tile to arrive adds them and runs the epilogue (alpha,
beta * C, a fused residual / activation) in the same launch (``SPLIT_FIXUP``; without it a second
kernel does). On the interpreter ``SPLIT_K`` forces the split; checked against onnxruntime (twice:
the arrival counters are back at zero after a run), and the GPU heuristic's choices."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import rtxjit
from rtxjit.ir.types import DType
from tests.oprunner import rel_error

mm = importlib.import_module("rtxjit.ops.matmul")
conv_ops = importlib.import_module("rtxjit.ops.conv")

ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
TOL = {np.float32: 1e-4, np.float16: 1e-2}


def _const(name, a):
    return helper.make_tensor(name, ONNX_TYPE[a.dtype.type], a.shape, a.tobytes(), raw=True)


def _model(nodes, inputs: dict, inits: dict, dtype):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, ONNX_TYPE[dtype], list(s))
                                           for n, s in inputs.items()],
                              [helper.make_tensor_value_info("y", ONNX_TYPE[dtype], None)],
                              [_const(n, a) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(params=[True, False], ids=["fixup", "sum-kernel"])
def fixup(request, monkeypatch):
    monkeypatch.setattr(mm, "SPLIT_FIXUP", request.param)
    return request.param


def _run(monkeypatch, proto, feeds, dtype, splits):
    monkeypatch.setattr(mm, "SPLIT_K", splits)
    sess = rtxjit.InferenceSession(proto.SerializeToString())
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for _ in range(2):  # the second run finds the counters the first set back
        (got,) = sess.run(None, feeds)
        assert got.shape == want.shape and rel_error(got, want) <= TOL[dtype], rel_error(got, want)
    exe = sess.last_executable
    for offset, nbytes in exe.arena_plan.zeroed:
        assert not exe.active.arena[offset:offset + nbytes].any()
    return exe.plan.steps


def _kernels(steps, fixup: bool) -> list:
    names = [s.kernel.name for s in steps]
    if fixup:
        assert all("fixup" in s.kernel.text.split("\n")[0] for s in steps if s.grid[1:] and s.grid[1] > 1)
    return names


def _split_names(fixup: bool) -> list:
    return ["matmul"] if fixup else ["matmul", "matmul_split_sum"]


def _w(rng, shape, dtype, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("k", [3072, 2000], ids=["even", "k-tail"])  # the interpreter's BLOCK_K is 256
def test_split_matmul_with_residual_and_gelu_matches_onnxruntime(monkeypatch, fixup, dtype, k):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "r"], ["s"]),
             helper.make_node("Tanh", ["s"], ["y"])]
    proto = _model(nodes, {"x": (1, 40, k), "r": (1, 40, 48)}, {"w": _w(rng, (k, 48), dtype, k)}, dtype)
    feeds = {"x": rng.standard_normal((1, 40, k)).astype(dtype), "r": rng.standard_normal((1, 40, 48)).astype(dtype)}
    steps = _run(monkeypatch, proto, feeds, dtype, 4)
    names = _kernels(steps, fixup)
    assert names == _split_names(fixup), names
    product, total = steps[0], steps[-1]
    assert product.grid[1] > 1 and "split_k" in product.kernel.text.split("\n")[0]
    assert "tanh" in total.kernel.text.lower()  # the fused tail runs after the sum


def test_split_gemm_keeps_alpha_beta_and_transposes(monkeypatch, fixup):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5, beta=-2.0)]
    proto = _model(nodes, {"x": (24, 1536)}, {"w": _w(rng, (40, 1536), np.float32, 1536),
                                              "c": rng.standard_normal((1, 40)).astype(np.float32)}, np.float32)
    steps = _run(monkeypatch, proto, {"x": rng.standard_normal((24, 1536)).astype(np.float32)}, np.float32, 8)
    assert _kernels(steps, fixup) == _split_names(fixup)
    assert steps[0].grid[1] == 3  # at most K / (2 x BLOCK_K 256) splits


def test_split_1x1_conv_at_batch_one(monkeypatch, fixup):
    """A 1x1 conv runs as W @ x[n] per image: with one image, the product splits too."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    proto = _model(nodes, {"x": (1, 1024, 7, 7)}, {"w": _w(rng, (64, 1024, 1, 1), np.float32, 1024),
                                                   "b": rng.standard_normal(64).astype(np.float32)}, np.float32)
    steps = _run(monkeypatch, proto, {"x": rng.standard_normal((1, 1024, 7, 7)).astype(np.float32)}, np.float32, 4)
    assert _kernels(steps, fixup) == _split_names(fixup)


def test_a_batched_matmul_or_a_short_k_does_not_split(monkeypatch):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    proto = _model(nodes, {"x": (3, 8, 512)}, {"w": _w(rng, (3, 512, 16), np.float32, 512)}, np.float32)
    steps = _run(monkeypatch, proto, {"x": rng.standard_normal((3, 8, 512)).astype(np.float32)}, np.float32, 4)
    assert [s.kernel.name for s in steps] == ["matmul"]  # three products: no split
    proto = _model(nodes, {"x": (8, 40)}, {"w": _w(rng, (40, 16), np.float32, 40)}, np.float32)
    steps = _run(monkeypatch, proto, {"x": rng.standard_normal((8, 40)).astype(np.float32)}, np.float32, 4)
    assert [s.kernel.name for s in steps] == ["matmul"]  # K of 40: under two steps per split


def test_auto_splits_only_products_that_leave_most_sms_idle(monkeypatch):
    monkeypatch.setattr(mm, "SPLIT_K", "auto")
    gpu = SimpleNamespace(interpret=False, sm=90, sm_count=132)
    splits, k_per = mm._splits(gpu, 128, 768, 3072, DType.FP16)  # bert-base FFN out at s128 b1
    assert splits > 1 and k_per % 64 == 0 and splits * k_per >= 3072 > (splits - 1) * k_per
    assert mm._splits(gpu, 8 * 128, 3072, 768, DType.FP16) == (1, 768)  # enough tiles
    assert mm._splits(SimpleNamespace(interpret=True, sm=None, sm_count=1), 128, 768, 3072, DType.FP16) == (1, 3072)
    assert mm._splits(gpu, 128, 768, 3072, DType.FP64) == (1, 3072)
    assert mm._splits(gpu, 128, 768, "K", DType.FP16) == (1, "K")


def test_every_m_of_a_power_of_two_bucket_decides_split_k_alike(monkeypatch):
    """A split product is another kernel source: rows of one bucket (bert-base b4 at sequence 96, 80
    and 128: 384, 320 and 512) must decide alike, or a new shape compiles fallback kernels in its
    first request (0.8-1 s each on an H100). Across buckets the decision may differ."""
    monkeypatch.setattr(mm, "SPLIT_K", "auto")
    gpu = SimpleNamespace(interpret=False, sm=90, sm_count=132)
    for n, k in ((2304, 768), (768, 768), (768, 3072), (3072, 768)):
        for lo in (64, 128, 256, 512, 1024):
            decided = {mm._splits(gpu, m, n, k, DType.FP16)[0] > 1 for m in range(lo // 2 + 1, lo + 1, 8)}
            assert len(decided) == 1, (n, k, lo)
    assert mm._splits(gpu, 128, 768, 3072, DType.FP16)[0] > 1  # still splits where tiles are few
    conv_geo = SimpleNamespace(kernel=(3, 3))
    for lo in (64, 128, 256):
        decided = {conv_ops._splits(gpu, m, 256, 2304, 256, conv_geo, DType.FP16) > 1 for m in range(lo // 2 + 1, lo + 1, 4)}
        assert len(decided) == 1, lo


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_gpu_bert_ffn_out_split_with_fixup_is_right_on_every_run(dtype):
    """bert-base's FFN output product at batch 1 (``[128, 3072] @ [3072, 768]`` + bias + residual:
    auto split-K on an H100) on the GPU, one launch with the fix-up: 60 runs (eager, CUDA graph
    replays, then the specialized kernels) each against onnxruntime in fp32; a lost or stale
    partial or a counter left non-zero would show as a wrong tile on some run."""
    rng = np.random.default_rng(11)
    w = _w(rng, (3072, 768), dtype, 3072)
    bias = (rng.standard_normal(768) * 0.1).astype(dtype)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Add", ["hb", "r"], ["y"])]
    proto = _model(nodes, {"x": (1, 128, 3072), "r": (1, 128, 768)}, {"w": w, "b": bias}, dtype)
    proto.ir_version = 9  # the device's onnxruntime reads IR <= 13
    feeds = {"x": rng.standard_normal((1, 128, 3072)).astype(dtype), "r": rng.standard_normal((1, 128, 768)).astype(dtype)}
    ref = _model(nodes, {"x": (1, 128, 3072), "r": (1, 128, 768)},
                 {"w": w.astype(np.float32), "b": bias.astype(np.float32)}, np.float32)
    ref.ir_version = 9
    (want,) = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {k: v.astype(np.float32) for k, v in feeds.items()})
    sess = rtxjit.InferenceSession(proto.SerializeToString(), device="cuda")
    for i in range(60):
        (got,) = sess.run(None, feeds)
        assert rel_error(got, want) <= TOL[dtype], (i, rel_error(got, want))
        if i == 20:
            sess.wait_for_specialization(timeout=300)
    texts = [s.kernel.text.split("\n")[0] for s in sess.last_executable.plan.steps]
    assert any("split_k fixup" in t for t in texts), texts
