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
