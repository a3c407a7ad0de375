"""sink_transpose: a Transpose moves below the pointwise ops that read it, so ConvNeXt's
``Linear -> permute back -> * layer_scale -> + residual`` runs in the Linear's kernel."""

import importlib

import numpy as np
import pytest

from rtxjit.passes.fuse_epilogue import fuse_epilogue
from rtxjit.passes.fuse_pointwise import fuse_pointwise
from rtxjit.passes.sink_transpose import sink_transpose
from tests.passes.helpers import apply, model, node, ops, random

F32, F16 = np.float32, np.float16
sink_module = importlib.import_module("rtxjit.passes.sink_transpose")
NHWC, NCHW = [2, 3, 4, 8], [2, 8, 3, 4]


def _all(graph):
    return fuse_epilogue(fuse_pointwise(sink_transpose(graph).graph).graph)


def _block(dtype, residual_shape=NCHW):
    """x [N, H, W, 16] @ w + b, permuted to NCHW, times gamma [C, 1, 1], plus r."""
    nodes = [node("MatMul", ["x", "w"], ["p"]), node("Add", ["p", "b"], ["a"]),
             node("Transpose", ["a"], ["t"], perm=[0, 3, 1, 2]), node("Mul", ["g", "t"], ["s"]),
             node("Add", ["s", "r"], ["y"])]
    inits = {"w": random((16, 8), dtype, 1), "b": random((8,), dtype, 2), "g": random((8, 1, 1), dtype, 3)}
    m = model(nodes, {"x": (dtype, NHWC[:3] + [16]), "r": (dtype, residual_shape)}, {"y": (dtype, NCHW)}, inits)
    feeds = {"x": random(NHWC[:3] + [16], dtype, 4), "r": random(residual_shape, dtype, 5)}
    return m, feeds


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_bias_scale_and_residual_after_a_permute_run_in_the_matmul(dtype):
    m, feeds = _block(dtype)
    _, g, modified = apply(_all, m, feeds, dtype, onnxruntime=dtype == F32)
    assert modified
    counts = ops(g)
    assert counts["rtxjit.Epilogue"] == 1 and "rtxjit.Pointwise" not in counts and "Mul" not in counts
    [epilogue] = [n for n in g.nodes if n.op == "rtxjit.Epilogue"]
    assert [s[0] for s in epilogue.attrs["program"]] == ["Add", "Mul", "Add"]
    # what remains besides the product: views (Transposes, the scale's Reshape to full rank)
    assert set(counts) == {"rtxjit.Epilogue", "Transpose", "Reshape"}
    assert g.outputs[0].producer.op == "Transpose"


def test_a_broadcast_residual_sinks_too_and_the_switch_turns_it_off(monkeypatch):
    m, feeds = _block(F32, residual_shape=[8, 1, 1])
    _, g, _ = apply(_all, m, feeds)
    assert "rtxjit.Pointwise" not in ops(g)
    monkeypatch.setattr(sink_module, "ENABLED", False)
    _, g, _ = apply(_all, m, feeds)
    assert ops(g)["rtxjit.Pointwise"] == 1


def test_a_transpose_whose_reader_broadcasts_it_stays():
    """Add(Transpose(a) [2, 8, 3, 1], r [2, 8, 3, 4]): the sum has another shape than the
    transposed value; nothing moves (and the pass ends: inverse views are never sunk back)."""
    nodes = [node("Relu", ["x"], ["a"]), node("Transpose", ["a"], ["t"], perm=[0, 3, 1, 2]),
             node("Add", ["t", "r"], ["y"])]
    m = model(nodes, {"x": (F32, [2, 3, 1, 8]), "r": (F32, NCHW)}, {"y": (F32, NCHW)})
    _, g, modified = apply(sink_transpose, m, {"x": random([2, 3, 1, 8]), "r": random(NCHW, seed=1)})
    assert not modified and ops(g)["Transpose"] == 1
