"""Squeeze-and-excitation: the SE scale of a block's feature map is read inside the 1x1 projection
conv (rtxjit.ScaledConv, passes/fuse_channel_scale.py) instead of being written as a scaled map.
EfficientNet- and MobileNetV3-style blocks exported with both torch.onnx exporters, against
onnxruntime in fp32 and in fp16 (precision="fp16"); the rewrite's conditions one by one; the op's
reference."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import rtxjit
from rtxjit.ir.registry import get_op
from rtxjit.onnx.importer import import_model
from rtxjit.passes import optimize
from rtxjit.passes.fuse_channel_scale import fuse_channel_scale
from tests.oprunner import rel_error
from tests.passes.helpers import apply, model, node, ops, random

fcs = importlib.import_module("rtxjit.passes.fuse_channel_scale")
TOL = {"fp32": 1e-4, "fp16": 1e-2}


class MBConv(torch.nn.Module):
    """Expand 1x1, depthwise 3x3, squeeze-and-excitation (sigmoid or hardsigmoid gate), project
    1x1 with folded BatchNorm, residual add: EfficientNet-B0's / MobileNetV3's block."""

    def __init__(self, c=16, expand=4, gate=torch.nn.Sigmoid):
        super().__init__()
        e = c * expand
        self.expand = torch.nn.Sequential(torch.nn.Conv2d(c, e, 1, bias=False), torch.nn.BatchNorm2d(e), torch.nn.SiLU())
        self.dw = torch.nn.Sequential(torch.nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False),
                                      torch.nn.BatchNorm2d(e), torch.nn.SiLU())
        self.se = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(e, c // 4, 1), torch.nn.SiLU(),
                                      torch.nn.Conv2d(c // 4, e, 1), gate())
        self.project = torch.nn.Sequential(torch.nn.Conv2d(e, c, 1, bias=False), torch.nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.dw(self.expand(x))
        return x + self.project(h * self.se(h))


@pytest.fixture(scope="module", params=[("sigmoid", False), ("sigmoid", True), ("hardsigmoid", False)],
                ids=["sigmoid-torchscript", "sigmoid-dynamo", "hardsigmoid-torchscript"])
def block(request, tmp_path_factory):
    gate, dynamo = request.param
    torch.manual_seed(0)
    m = MBConv(gate=torch.nn.Sigmoid if gate == "sigmoid" else torch.nn.Hardsigmoid).eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 16, 9, 7)
    path = tmp_path_factory.mktemp("se") / f"{gate}-{dynamo}.onnx"
    with torch.no_grad():
        torch.onnx.export(m, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=dynamo,
                          **({} if dynamo else {"opset_version": 17}))
    return str(path), {"x": x.numpy()}


def test_the_se_scale_is_read_by_the_projection(block):
    path, _ = block
    graph, _ = optimize(import_model(onnx.load(path)))
    scaled = [n for n in graph.nodes if n.op == "rtxjit.ScaledConv" or n.attrs.get("anchor") == "rtxjit.ScaledConv"]
    assert len(scaled) == 1, ops(graph)
    assert scaled[0].op == "rtxjit.Epilogue"  # the residual add after the projection stays fused


@pytest.mark.parametrize("float_type", ["fp32", "fp16"])
def test_the_block_matches_onnxruntime_and_the_unfused_graph(block, float_type, monkeypatch):
    path, feeds = block
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    precision = "fp16" if float_type == "fp16" else None
    got = rtxjit.InferenceSession(path, precision=precision).run(None, feeds)[0]
    assert rel_error(got, want) <= TOL[float_type], rel_error(got, want)
    monkeypatch.setattr(fcs, "ENABLED", False)
    unfused = rtxjit.InferenceSession(path, precision=precision)
    assert rel_error(unfused.run(None, feeds)[0], got) <= TOL[float_type]
    assert "rtxjit.ScaledConv" not in str([n.attrs.get("anchor", n.op) for n in unfused.graph.nodes])


def _conv_after_mul(scale_shape, conv_attrs=None, w_shape=(5, 6, 1, 1), second_reader=False):
    nodes = [node("Mul", ["x", "s"], ["m"]), node("Conv", ["m", "w"], ["y"], **(conv_attrs or {}))]
    outputs = {"y": (np.float32, None)}
    if second_reader:
        nodes.append(node("Relu", ["m"], ["r"]))
        outputs["r"] = (np.float32, None)
    return model(nodes, {"x": (np.float32, [2, 6, 4, 5]), "s": (np.float32, list(scale_shape))}, outputs,
                 {"w": random(w_shape)})


@pytest.mark.parametrize("scale_shape", [(2, 6, 1, 1), (1, 6, 1, 1)])
def test_a_per_channel_scale_before_a_1x1_conv_is_folded(scale_shape):
    m = _conv_after_mul(scale_shape)
    _, g, modified = apply(fuse_channel_scale, m, {"x": random((2, 6, 4, 5)), "s": random(scale_shape)},
                           onnxruntime=False)
    assert modified and ops(g) == {"rtxjit.ScaledConv": 1}


@pytest.mark.parametrize("case", ["spatial-scale", "3x3", "strided", "two-readers"])
def test_what_is_not_a_channel_scale_of_a_1x1_conv_stays(case):
    scale = (2, 6, 4, 1) if case == "spatial-scale" else (2, 6, 1, 1)
    attrs = {"strides": [2, 2]} if case == "strided" else None
    m = _conv_after_mul(scale, attrs, (5, 6, 3, 3) if case == "3x3" else (5, 6, 1, 1), case == "two-readers")
    _, g, modified = apply(fuse_channel_scale, m, {"x": random((2, 6, 4, 5)), "s": random(scale)},
                           onnxruntime=False)
    assert not modified and "rtxjit.ScaledConv" not in ops(g)


def test_the_op_reference_is_conv_of_the_scaled_input():
    rng = np.random.default_rng(0)
    x, s, w = rng.standard_normal((2, 6, 3, 4)), rng.standard_normal((2, 6, 1, 1)), rng.standard_normal((5, 6, 1, 1))
    got = get_op("rtxjit.ScaledConv").run_reference([x, s, w], {}, 1)[0]
    want = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x * s)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("float_type", ["fp32", "fp16"])
def test_the_op_samples_match_the_reference(index, float_type):
    from tests.oprunner import assert_close, make_inputs, reference, single_node_model

    opdef = get_op("rtxjit.ScaledConv")
    sample = opdef.samples[index]
    arrays = make_inputs(sample, float_type, np.random.default_rng(index))
    proto, feeds = single_node_model(opdef, sample, arrays)
    got = rtxjit.InferenceSession(proto).run(None, feeds)[0]
    assert_close(got, np.asarray(reference(opdef, sample, arrays)[0]), float_type, f"ScaledConv sample {index}")
