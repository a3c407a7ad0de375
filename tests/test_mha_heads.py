"""torch's nn.MultiheadAttention as torch.onnx's TorchScript exporter writes it (torch
TransformerEncoder layers, torchvision's ViT): its heads are split by merging batch and heads,
which copied q, k and v in every layer; simplify_shapes turns the chain into views the fused
attention reads (passes/simplify_shapes.py ``_heads_of_merged_batch``). Against onnxruntime."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

import rtxjit
from tests.oprunner import rel_error, run_onnxruntime


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_torch_encoder_layer_reads_its_heads_without_copies(batch_first):
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                             batch_first=batch_first)
    net = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()  # as benchmarks/bench_quant.py
    x = torch.randn((2, 6, 32) if batch_first else (6, 2, 32))
    buf = io.BytesIO()  # no torch.no_grad(): it would take the layer's fused fast path, which has no export
    torch.onnx.export(net, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    feeds = {"x": x.detach().numpy()}
    sess = rtxjit.InferenceSession(model, device="cpu")
    got = sess.run(None, feeds)[0]
    want = run_onnxruntime(model, feeds)[0]
    assert rel_error(got, want) <= 1e-4, rel_error(got, want)
    heads = [s for s in sess.plan_for(feeds).steps if s.kernel.name == "attention"]
    copies = [s for s in sess.plan_for(feeds).steps if s.kernel.name == "pointwise" and "expr=x0\n" in s.kernel.text]
    assert len(heads) == 1 and not copies, [s.kernel.text.splitlines()[0] for s in sess.plan_for(feeds).steps]


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_batch_first_attention_writes_rows_for_the_projection_and_its_residual(precision):
    """passes/attention_row_order.py: the attention writes [B, S, H, D], so the output projection's
    rows are batch-first and the Transpose back goes; the residual Add joins the projection's
    kernel: 7 launches a layer (LayerNorm twice, QKV, attention, projection + residual, FFN twice)."""
    import torch

    import importlib

    aro = importlib.import_module("rtxjit.passes.attention_row_order")

    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn((3, 5, 32))
    buf = io.BytesIO()
    # static shapes: with dynamic axes the exporter's shape arithmetic leaves the projection's output
    # dims unknown, and the residual Add is not proven free of broadcasting (the Transpose still goes)
    torch.onnx.export(net, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    counts = {}
    for enabled in (False, True):
        aro.ENABLED = enabled
        try:
            sess = rtxjit.InferenceSession(model, device="cpu", precision=precision)
            for shape in ((3, 5, 32),):
                feeds = {"x": np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)}
                got = sess.run(None, feeds)[0]
                want = run_onnxruntime(model, feeds)[0]
                assert rel_error(got, want) <= (1e-4 if precision is None else 1e-2), (enabled, shape)
            counts[enabled] = len(sess.plan_for(feeds).steps)
            ops = [n.op for n in sess.graph.nodes]
        finally:
            aro.ENABLED = True
    assert counts[True] == counts[False] - 2, counts  # one launch less in each of the two layers
    assert not [n for n in sess.graph.nodes if n.op == "Transpose" and tuple(n.attrs["perm"]) == (1, 0, 2)], ops
    # a dynamic batch (the sequence length is baked into the export's head reshapes): right at each
    buf = io.BytesIO()
    torch.onnx.export(net, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "B"}, "y": {0: "B"}})
    model = onnx.load_from_string(buf.getvalue())
    sess = rtxjit.InferenceSession(model, device="cpu", precision=precision)
    attention = [n for n in sess.graph.nodes if n.op == "rtxjit.Attention"]
    assert len(attention) == 2 and all(tuple(n.attrs["out_perm"]) == (0, 2, 1, 3) for n in attention)  # [B, S, H, D]
    for batch in (3, 1, 4):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 5, 32)).astype(np.float32)}
        assert rel_error(sess.run(None, feeds)[0], run_onnxruntime(model, feeds)[0]) <= (1e-4 if precision is None else 1e-2)
