"""Group normalization (rtxjit/ops/norm.py, passes/fuse_group_norm.py): torch's nn.GroupNorm (+SiLU)
from both exporters becomes one rtxjit.GroupNorm kernel that matches onnxruntime, non-finite values
included; long groups split into parts; other chains and ONNX's own GroupNormalization fuse too."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import pytest
import rtxjit
from tests.oprunner import rel_error, run_onnxruntime
from tests.passes.helpers import model, node, random

TOL = {np.float32: 1e-4, np.float16: 1e-2}


def _check(proto, feeds: dict, dtype, fused_ops: dict = None, launches: int = None):
    """The optimized session holds exactly ``fused_ops`` (where given) and matches onnxruntime and
    the unfused graph."""
    sess = rtxjit.InferenceSession(proto)
    if fused_ops is not None:
        assert Counter(n.op for n in sess.graph.nodes) == Counter(fused_ops)
    got = sess.run(None, feeds)
    if launches is not None:
        assert sess.launches_per_inference == launches
    for want in (run_onnxruntime(proto, feeds), rtxjit.InferenceSession(proto, optimize=False).run(None, feeds)):
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert rel_error(g, w) <= TOL[dtype], rel_error(g, w)
    return sess, got


# ---- torch exports -----------------------------------------------------------------------------

def _torch_model(groups: int, channels: int, silu: bool, dtype):
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.GroupNorm(groups, channels)
            with torch.no_grad():
                self.norm.weight.uniform_(-2, 2)
                self.norm.bias.uniform_(-1, 1)

        def forward(self, x):
            y = self.norm(x)
            return torch.nn.functional.silu(y) if silu else y

    return Block().eval().to(getattr(torch, dtype.__name__))


def _export(module, x: np.ndarray, exporter: str):
    torch = pytest.importorskip("torch")
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            pytest.importorskip("onnxscript")
            return torch.onnx.export(module, (torch.from_numpy(x),), dynamo=True, verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(module, (torch.from_numpy(x),), f, dynamo=False, opset_version=17, input_names=["x"])
        return onnx.load_from_string(f.getvalue())


CASES = [  # (shape, groups, silu, dtype, exporters)
    pytest.param((2, 64, 16, 16), 32, True, np.float32, ("torchscript", "dynamo"), id="2x64x16x16-g32-silu-fp32"),
    pytest.param((2, 8, 3, 4, 5), 4, True, np.float16, ("torchscript", "dynamo"), id="5d-g4-silu-fp16"),
    pytest.param((2, 6, 7), 3, False, np.float32, ("torchscript",), id="3d-g3-fp32"),
    pytest.param((2, 64, 16, 16), 32, True, np.float16, ("torchscript",), id="2x64x16x16-g32-silu-fp16"),
]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("shape,groups,silu,dtype,exporters", CASES)
def test_exported_group_norm_and_silu_are_one_kernel(exporter, shape, groups, silu, dtype, exporters):
    """Reshape -> InstanceNormalization -> Reshape -> Mul -> Add (-> Sigmoid, Mul), as both
    exporters write nn.GroupNorm (+ SiLU), runs as one rtxjit.GroupNorm launch."""
    if exporter not in exporters:
        pytest.skip("covered by the other cases")
    x = random(shape, dtype, 1)
    proto = _export(_torch_model(groups, shape[1], silu, dtype), x, exporter)
    name = proto.graph.input[0].name
    sess, _ = _check(proto, {name: x}, dtype, {"rtxjit.GroupNorm": 1}, launches=1)
    (fused,) = sess.graph.nodes
    assert fused.attrs["num_groups"] == groups
    assert [step[0] for step in fused.attrs["program"]] == (["Sigmoid", "Mul"] if silu else [])


def test_nan_and_inf_propagate_as_in_the_unfused_graph():
    """A NaN, +inf or -inf makes its (sample, group) NaN, and only that group, as onnxruntime and
    the unfused graph do; the other groups are unchanged."""
    x = random((2, 8, 5, 5), np.float32, 2)
    x[0, 1, 2, 2] = np.nan
    x[1, 5, 0, 0] = np.inf
    x[1, 0, 0, 0] = -np.inf
    proto = _export(_torch_model(4, 8, True, np.float32), x, "torchscript")
    sess = rtxjit.InferenceSession(proto)
    assert Counter(n.op for n in sess.graph.nodes) == {"rtxjit.GroupNorm": 1}
    got = sess.run(None, {"x": x})[0]
    for want in (run_onnxruntime(proto, {"x": x})[0],
                 rtxjit.InferenceSession(proto, optimize=False).run(None, {"x": x})[0]):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-4, atol=1e-5)
    nan_groups = np.isnan(got).reshape(2, 4, -1)
    assert nan_groups.all(-1).tolist() == [[True, False, False, False], [True, False, True, False]]
    assert not nan_groups[~nan_groups.all(-1)].any()


# ---- hand-written graphs -----------------------------------------------------------------------

def _exported_pattern(shape, groups, dtype, tail: list, y: str = "gn", extra_outputs=None, inputs=None):
    """The TorchScript export of GroupNorm (x's shape as a constant), then ``tail`` nodes."""
    c = shape[1]
    per_channel = (c,) + (1,) * (len(shape) - 2)
    nodes = [node("Reshape", ["x", "grouped_shape"], ["grouped"]),
             node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"], epsilon=1e-5),
             node("Reshape", ["normed", "x_shape"], ["back"]),
             node("Mul", ["back", "gamma"], ["scaled"]),
             node("Add", ["scaled", "beta"], ["gn"])] + tail
    inits = {"grouped_shape": np.array([0, groups, -1], np.int64), "x_shape": np.array(shape, np.int64),
             "ones": np.ones(groups, dtype), "zeros": np.zeros(groups, dtype),
             "gamma": random(per_channel, dtype, 3), "beta": random(per_channel, dtype, 4),
             "half": np.array(0.5, dtype), "one": np.array(1.0, dtype), "sqrt2": np.array(np.sqrt(2), dtype)}
    outputs = {y: (dtype, list(shape)), **(extra_outputs or {})}
    return model(nodes, {"x": (dtype, list(shape)), **(inputs or {})}, outputs, inits)


def test_long_groups_split_into_parts():
    """64x64 images in 4 groups of 8 channels (rows of 32768, as a diffusion UNet's first blocks):
    the statistics run in parts side by side, then the normalizing pass, 2 launches."""
    shape = (1, 32, 64, 64)
    proto = _exported_pattern(shape, 4, np.float32, [node("Sigmoid", ["gn"], ["sig"]), node("Mul", ["gn", "sig"], ["y"])],
                              y="y")
    x = random(shape, np.float32, 5) + 3.0  # a mean far from 0
    _check(proto, {"x": x}, np.float32, {"rtxjit.GroupNorm": 1}, launches=2)


@pytest.mark.parametrize("split", [True, False], ids=["parts-of-several-blocks", "one-program-per-row"])
def test_long_rows_walk_several_blocks(monkeypatch, split):
    """The loops over column blocks (Chan's combination of block statistics) that the GPU's rows
    take: parts of 4 blocks each, or (where rows are many) one program walking its whole row."""
    from rtxjit.ops import norm

    if split:
        monkeypatch.setattr(norm, "SPLIT_CHUNK", 4 * norm.INTERPRET_BLOCK_C)
    else:
        monkeypatch.setattr(norm, "SPLIT_MAX_ROWS", 0)
    shape = (1, 16, 64, 64)
    proto = _exported_pattern(shape, 2, np.float32, [node("Sigmoid", ["gn"], ["sig"]), node("Mul", ["gn", "sig"], ["y"])],
                              y="y")
    x = random(shape, np.float32, 11) * 4.0 + 10.0
    _check(proto, {"x": x}, np.float32, {"rtxjit.GroupNorm": 1}, launches=2 if split else 1)


def test_a_norm_of_a_flattened_view_reads_x_through_a_reshape():
    """diffusers' attention blocks normalize ``[N, C, H*W]`` of a ``[N, C, H, W]`` tensor; with the
    Reshapes merged, the norm's input and restored shapes differ: fused all the same."""
    shape, restored = (2, 8, 4, 3), (2, 8, 12)
    nodes = [node("Reshape", ["x", "grouped_shape"], ["grouped"]),
             node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"], epsilon=1e-6),
             node("Reshape", ["normed", "flat_shape"], ["back"]),
             node("Mul", ["back", "gamma"], ["scaled"]),
             node("Add", ["scaled", "beta"], ["y"])]
    inits = {"grouped_shape": np.array([2, 4, -1], np.int64), "flat_shape": np.array(restored, np.int64),
             "ones": np.ones(4, np.float32), "zeros": np.zeros(4, np.float32),
             "gamma": random((8, 1), np.float32, 3), "beta": random((8, 1), np.float32, 4)}
    proto = model(nodes, {"x": (np.float32, list(shape))}, {"y": (np.float32, list(restored))}, inits)
    _check(proto, {"x": random(shape, np.float32, 12)}, np.float32, {"rtxjit.GroupNorm": 1, "Reshape": 1}, launches=1)


def test_erf_gelu_after_the_norm_fuses_and_a_second_reader_stops_the_chain():
    """GELU (x/sqrt2 -> Erf -> +1 -> *x -> *0.5, x read twice) joins the kernel; a value also read
    by a node outside the chain (the residual Add of a graph input) ends it before that value."""
    shape = (2, 6, 4, 4)
    gelu = [node("Div", ["gn", "sqrt2"], ["d"]), node("Erf", ["d"], ["e"]), node("Add", ["e", "one"], ["e1"]),
            node("Mul", ["gn", "e1"], ["m"]), node("Mul", ["m", "half"], ["y"])]
    x = random(shape, np.float32, 6)
    proto = _exported_pattern(shape, 3, np.float32, gelu, y="y")
    sess, _ = _check(proto, {"x": x}, np.float32, {"rtxjit.GroupNorm": 1}, launches=1)
    assert [s[0] for s in sess.graph.nodes[0].attrs["program"]] == ["Div", "Erf", "Add", "Mul", "Mul"]
    residual = gelu[:-1] + [node("Mul", ["m", "half"], ["g"]), node("Add", ["e1", "r"], ["y"])]
    proto = _exported_pattern(shape, 3, np.float32, residual, y="y", extra_outputs={"g": (np.float32, list(shape))},
                              inputs={"r": (np.float32, list(shape))})
    r = random(shape, np.float32, 7)
    sess, _ = _check(proto, {"x": x, "r": r}, np.float32)
    norms = [n for n in sess.graph.nodes if n.op == "rtxjit.GroupNorm"]
    assert len(norms) == 1 and norms[0].attrs["program"] == ()
    assert "InstanceNormalization" not in {n.op for n in sess.graph.nodes}


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_onnx_group_and_instance_normalization_take_the_activation(dtype):
    """GroupNormalization-21 + SiLU and InstanceNormalization + Relu: one kernel each."""
    shape = (2, 6, 5, 3)
    inits = {"scale": random((6,), dtype, 1), "bias": random((6,), dtype, 2)}
    for norm, tail, opset in (
            (node("GroupNormalization", ["x", "scale", "bias"], ["n"], num_groups=2, epsilon=1e-4),
             [node("Sigmoid", ["n"], ["s"]), node("Mul", ["s", "n"], ["y"])], 21),
            (node("InstanceNormalization", ["x", "scale", "bias"], ["n"]), [node("Relu", ["n"], ["y"])], 17)):
        proto = model([norm] + tail, {"x": (dtype, list(shape))}, {"y": (dtype, list(shape))}, inits, opset=opset)
        _check(proto, {"x": random(shape, dtype, 3)}, dtype, {"rtxjit.GroupNorm": 1}, launches=1)


def test_group_normalization_18_scales_per_group():
    """Version 18 takes scale and bias per group (its own declaration in rtxjit/ops/norm.py; version
    21 takes them per channel) and matches onnxruntime."""
    shape, groups = (2, 6, 3, 4), 3
    x = random(shape, np.float32, 8)
    inits = {"scale": random((groups,), np.float32, 9), "bias": random((groups,), np.float32, 10)}
    proto = model([node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=groups)],
                  {"x": (np.float32, list(shape))}, {"y": (np.float32, list(shape))}, inits, opset=18)
    got = rtxjit.InferenceSession(proto).run(None, {"x": x})[0]
    want = run_onnxruntime(proto, {"x": x})[0]
    assert rel_error(got, want) <= 1e-4


def test_group_normalization_rejects_channels_that_do_not_divide():
    proto = model([node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=4)],
                  {"x": (np.float32, [1, 6, 2])}, {"y": (np.float32, [1, 6, 2])},
                  {"s": np.ones(6, np.float32), "b": np.zeros(6, np.float32)}, opset=21)
    with pytest.raises(rtxjit.errors.ShapeError, match="6 channels do not divide into num_groups=4"):
        rtxjit.InferenceSession(proto)
