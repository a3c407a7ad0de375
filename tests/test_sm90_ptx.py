"""What kernels planned for an H100 compile to (tests/sm90.py: Triton's CUDA backend on the CPU): the
loads a fused epilogue makes."""

from __future__ import annotations

import io
import re

import rtxjit
from rtxjit.kernels.keys import specialized_source
from rtxjit.plan.plan import PlanBuilder
from tests.sm90 import ptx
from tests.test_fallback_specialization import H100


def test_a_gelu_epilogue_reads_its_constants_once_not_per_element():
    """GPT-2's fc1: x @ W + b, then GELU's tanh form, whose 0.5, 0.044715, sqrt(2/pi) and 1 are
    one-element constants (fp16 here): each is one scalar load a thread (the bias a vector load),
    not a broadcast tile (128 scalar 2-byte loads a thread before, 2026-12-08)."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = nn.Linear(768, 3072), nn.Linear(3072, 768)

        def forward(self, x):
            return self.proj(nn.functional.gelu(self.fc(x), approximate="tanh"))

    buf = io.BytesIO()
    torch.onnx.export(MLP().eval(), (torch.randn(1, 128, 768),), buf, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    graph = rtxjit.InferenceSession(buf.getvalue(), precision="fp16").graph
    types = {v.name: v.type for v in graph.inputs}
    plan = PlanBuilder(graph, H100, frozenset(v.name for v in graph.constants())).build(types, {})
    step = next(s for s in plan.steps if s.kernel.name == "matmul")
    assert "epilogue=" in step.kernel.text
    src = specialized_source(step)
    assert src.text.count("mask=mask") <= 2  # the bias tile and the store; the constants are scalar loads
    text = ptx(plan, step, src)
    assert len(re.findall(r"ld\.global(\.nc)?\.b16", text)) <= 8, text.count("ld.global")


def test_a_pointwise_kernel_reads_its_one_element_constants_once():
    """The same GELU where it is its own kernel (it reads a graph output's Cast, so it is not fused
    into the product): its constants are one scalar load each, not a broadcast load per element
    (32 scalar 2-byte loads a thread before)."""
    import torch
    from torch import nn

    class FC(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 256)

        def forward(self, x):
            return nn.functional.gelu(self.fc(x), approximate="tanh")

    buf = io.BytesIO()
    torch.onnx.export(FC().eval(), (torch.randn(1, 16, 64),), buf, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    graph = rtxjit.InferenceSession(buf.getvalue(), precision="fp16").graph
    plan = PlanBuilder(graph, H100, frozenset(v.name for v in graph.constants())).build(
        {v.name: v.type for v in graph.inputs}, {})
    step = [s for s in plan.steps if s.kernel.name == "pointwise"][-1]
    src = specialized_source(step)
    assert "Tanh" in src.text or "tl.exp" in src.text
    assert len(re.findall(r"ld\.global(\.nc)?\.b16", ptx(plan, step, src))) <= 6
