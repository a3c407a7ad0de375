"""Convolutions and pooling over 1, 2 and 3 spatial dims, and ConvTranspose, from PyTorch modules
exported with both torch.onnx exporters (TorchScript, opset 17; dynamo, its default opset), in fp32
and fp16, against onnxruntime; and their fused epilogues (residual + activation in the conv kernel).

The registry samples (tests/test_ops.py) cover every attribute one node at a time; these check what
the exporters write for real layers (BatchNorm3d folded into Conv3d, AdaptiveAvgPool3d(1) as
GlobalAveragePool, ConvTranspose's output_padding, constant weights rearranged on the host).
"""

from __future__ import annotations

import importlib

import numpy as np
import onnxruntime as ort
import pytest
import torch

import rtxjit
from rtxjit.passes.fuse_pointwise import fuse_pointwise
from tests.oprunner import rel_error
from tests.passes.helpers import apply, model, node, ops, random

fuse_epilogue_module = importlib.import_module("rtxjit.passes.fuse_epilogue")  # the package exports the function

TOL = {"fp32": 1e-4, "fp16": 1e-2}
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


class Video(torch.nn.Module):
    """An r3d / r(2+1)d-like stack: a 3x7x7 stem with stride 1x2x2 and folded BatchNorm3d, a
    MaxPool3d, a 3x1x1 (temporal) and a 1x3x3 (spatial, >= 16 channels: the tap-major loop) conv,
    AdaptiveAvgPool3d(1)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv3d(3, 8, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3),
                                                        bias=False),
                                        torch.nn.BatchNorm3d(8), torch.nn.ReLU())
        self.pool = torch.nn.MaxPool3d(3, stride=2, padding=1)
        self.temporal = torch.nn.Conv3d(8, 16, (3, 1, 1), padding=(1, 0, 0))
        self.spatial = torch.nn.Sequential(torch.nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1), bias=False),
                                           torch.nn.BatchNorm3d(16), torch.nn.ReLU())
        self.head = torch.nn.AdaptiveAvgPool3d(1)

    def forward(self, x):
        y = self.pool(self.stem(x))
        return self.head(self.spatial(self.temporal(y))).flatten(1)


class Decoder(torch.nn.Module):
    """ConvTranspose2d upsampling: stride 2 with output_padding 1 (16 channels: the tap-major loop,
    reading the Conv before it channels-last), then with 2 groups, stride 2 without padding, and a
    16-channel one that reads its producer's channels-last output."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.up0 = torch.nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, output_padding=1)
        self.up1 = torch.nn.ConvTranspose2d(16, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up2 = torch.nn.ConvTranspose2d(6, 16, 2, stride=2, bias=False)
        self.up3 = torch.nn.ConvTranspose2d(16, 5, 3, padding=1)

    def forward(self, x):
        return self.up3(self.up2(torch.relu(self.up1(self.up0(self.conv(x))))))


class Signal(torch.nn.Module):
    """1-D: ConvTranspose1d, AvgPool1d (padding not counted), Conv1d."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1)
        self.pool = torch.nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False)
        self.conv = torch.nn.Conv1d(6, 3, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.conv(self.pool(self.up(x)))


MODULES = {"video": (Video, (1, 3, 4, 16, 16), {"conv3d", "pool_max"}),
           "decoder": (Decoder, (1, 4, 3, 3), {"conv2d", "conv_transpose2d"}),
           "signal": (Signal, (2, 4, 9), {"conv_transpose2d", "pool_avg", "conv2d"})}


def _export(module, x, dynamo: bool, path) -> str:
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                              verbose=False)
        else:
            torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                              opset_version=17)
    return str(path)


def _randomize_batchnorm(module) -> None:
    """Running statistics and affine parameters away from their defaults, so the fold shows."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def _onnxruntime(path: str, x: np.ndarray):
    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime has no CPU kernel for this dtype (fp16 ConvTranspose, MaxPool3d)
        return None
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("float_type", ["fp32", "fp16"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(MODULES))
def test_exported_module_matches_onnxruntime(name, exporter, float_type, tmp_path):
    cls, shape, kernels = MODULES[name]
    torch.manual_seed(0)
    module = cls().eval()
    _randomize_batchnorm(module)
    x = torch.rand(shape) * 4 - 2
    dynamo = exporter == "dynamo"
    path = _export(module.to(TORCH_DTYPE[float_type]), x.to(TORCH_DTYPE[float_type]), dynamo, tmp_path / "m.onnx")
    feed = x.to(TORCH_DTYPE[float_type]).numpy()
    want = _onnxruntime(path, feed)
    if want is None:  # onnxruntime lacks an fp16 kernel: its fp32 run of the fp32 export, on the same inputs
        fp32_path = _export(module.float(), torch.from_numpy(feed).float(), dynamo, tmp_path / "m32.onnx")
        want = _onnxruntime(fp32_path, feed.astype(np.float32))
    sess = rtxjit.InferenceSession(path)
    got = sess.run(None, {"x": feed})[0]
    assert got.dtype == feed.dtype and got.shape == want.shape
    assert rel_error(got, want) <= TOL[float_type], rel_error(got, want)
    launched = {step.kernel.name for step in sess.last_executable.plan.steps}
    assert kernels <= launched, launched
    assert "nchw_to_nhwc" not in launched  # each tap-major conv reads its producer's channels-last output


# --- fused epilogues --------------------------------------------------------------------------

@pytest.fixture
def epilogue_anchors(monkeypatch):
    """fuse_epilogue (rtxjit/passes) takes Conv over 2 spatial dims only; the lowerings here take a
    fused epilogue for Conv over 1, 2 or 3 and for ConvTranspose: the pass's check is widened for
    these tests."""
    monkeypatch.setattr(fuse_epilogue_module, "ANCHORS", ("MatMul", "Gemm", "Conv", "ConvTranspose"))
    monkeypatch.setattr(fuse_epilogue_module, "_anchor_ok",
                        lambda n: n.op not in ("Conv", "ConvTranspose") or n.inputs[0].type.rank in (3, 4, 5))


def _fused(graph):
    return fuse_epilogue_module.fuse_epilogue(fuse_pointwise(graph).graph)


EPILOGUE_CASES = {
    # op, x shape, w shape, attrs, output shape
    "conv3d": ("Conv", (1, 3, 3, 5, 4), (4, 3, 3, 3, 3), {"pads": [1] * 6, "strides": [1, 2, 1]}, (1, 4, 3, 3, 4)),
    "conv3d_tap_major": ("Conv", (1, 16, 2, 3, 3), (8, 16, 1, 3, 3), {"pads": [0, 1, 1, 0, 1, 1]}, (1, 8, 2, 3, 3)),
    "conv1d": ("Conv", (2, 3, 8), (5, 3, 3), {"pads": [1, 1]}, (2, 5, 8)),
    "conv_transpose2d": ("ConvTranspose", (1, 4, 3, 4), (4, 3, 3, 3),
                         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (1, 3, 6, 8)),
    "conv_transpose3d_tap_major": ("ConvTranspose", (1, 16, 2, 2, 3), (16, 4, 2, 2, 2), {"strides": [2, 2, 2]},
                                   (1, 4, 4, 4, 6)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(EPILOGUE_CASES))
def test_residual_and_relu_run_in_the_conv_kernel(case, dtype, epilogue_anchors):
    op, xs, ws, attrs, ys = EPILOGUE_CASES[case]
    c_out = ys[1]
    nodes = [node(op, ["x", "w", "b"], ["c"], **attrs), node("Add", ["c", "r"], ["a"]), node("Relu", ["a"], ["y"])]
    m = model(nodes, {"x": (dtype, list(xs)), "r": (dtype, list(ys))}, {"y": (dtype, list(ys))},
              {"w": random(ws, dtype, 1), "b": random((c_out,), dtype, 2)})
    feeds = {"x": random(xs, dtype), "r": random(ys, dtype, 3)}
    _, g, _ = apply(_fused, m, feeds, dtype, onnxruntime=dtype == np.float32)
    assert ops(g) == {"rtxjit.Epilogue": 1}
    sess = rtxjit.InferenceSession(g, optimize=False)
    sess.run(None, feeds)
    assert sess.launches_per_inference == 1 + (case.endswith("tap_major"))  # + the channels-last copy


def test_conv3d_with_a_symbolic_batch_runs_every_batch():
    nodes = [node("Conv", ["x", "w"], ["y"], pads=[1] * 6)]
    m = model(nodes, {"x": (np.float32, ["n", 2, 3, 4, 4])}, {"y": (np.float32, ["n", 3, 3, 4, 4])},
              {"w": random((3, 2, 3, 3, 3), seed=1)})
    sess = rtxjit.InferenceSession(m)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = random((batch, 2, 3, 4, 4), seed=batch)
        want = ref.run(None, {"x": x})[0]
        assert rel_error(sess.run(None, {"x": x})[0], want) <= 1e-4
