"""Conv fusion in diffusion models (issue 15): a diffusers UNet's ResNet blocks run their
timestep-embedding add (conv1) and residual add + division by ``output_scale_factor`` (conv2) in
the conv kernels' epilogues (passes/fuse_epilogue.py), and Upsample2D's nearest 2x Resize is read
by the next conv's input indexing instead of being materialized (passes/fuse_upsample_conv.py,
rtxjit.UpsampleConv).

Each model is exported with both torch.onnx exporters; the tests count the ops left after
``optimize`` and compare the fused graph with the unfused one (the pipeline without the two conv
fusions) and with onnxruntime, in fp32 and in fp16 (``precision="fp16"``: the same export run in
fp16 by rtxjit, against onnxruntime's fp32). The roofline's flop counts of the conv kernels are
checked here too.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import rtxjit  # noqa: F401  (before diffusers: it imports triton, and the CPU needs its interpreter)
from rtxjit.exec import roofline
from rtxjit.onnx.importer import import_model
from rtxjit.passes import PIPELINE, optimize
from rtxjit.session import InferenceSession
from tests.oprunner import rel_error
from tests.passes.helpers import apply, model, node, ops, random

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

TOL = {"fp32": 1e-4, "fp16": 1e-2}
EXPORTERS = {"torchscript": False, "dynamo": True}
UNFUSED = [step for step in PIPELINE if step[0] not in ("fuse_upsample_conv", "fuse_epilogue")]
CONVS = ("Conv", "ConvTranspose", "rtxjit.UpsampleConv")


def _export(module, args: tuple, names: list, dynamo: bool, path) -> str:
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(module, args, str(path), input_names=names, output_names=["y"], dynamo=True,
                              verbose=False)
        else:
            torch.onnx.export(module, args, str(path), input_names=names, output_names=["y"], dynamo=False,
                              opset_version=17)
    return str(path)


def _anchor(n) -> str:
    return n.attrs["anchor"] if n.op == "rtxjit.Epilogue" else n.op


def _upsample_of(n) -> tuple:
    attrs = dict(n.attrs["anchor_attrs"]) if n.op == "rtxjit.Epilogue" else n.attrs
    return tuple(attrs["upsample"])


def _run(graph, feeds: dict, steps=None, precision=None):
    """(the kernels launched, the output) of ``graph`` optimized by ``steps``."""
    optimized, _ = optimize(graph, steps=steps, precision=precision)
    sess = InferenceSession(optimized, optimize=False)
    out = sess.run(None, feeds)[0]
    return [step.kernel for step in sess.last_executable.plan.steps], out


def _check_numerics(path: str, feeds: dict, float_type: str) -> list:
    """The fused graph equals the unfused one and onnxruntime (fp32) within ``float_type``'s tolerance,
    with NaN and inf at the same positions. Returns the fused graph's kernels."""
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    graph = import_model(onnx.load(path))
    precision = None if float_type == "fp32" else float_type
    kernels, fused = _run(graph, feeds, precision=precision)
    _, unfused = _run(graph, feeds, steps=UNFUSED, precision=precision)
    for other, what in ((unfused, "unfused graph"), (want, "onnxruntime")):
        assert fused.shape == other.shape
        assert np.array_equal(np.isnan(fused), np.isnan(other)), f"NaN positions differ from the {what}'s"
        finite = ~np.isnan(other)
        assert np.array_equal(np.isinf(fused[finite]), np.isinf(other[finite])), f"inf differs from the {what}"
        ok = np.isfinite(other)
        err = rel_error(fused[ok], other[ok])
        assert err <= TOL[float_type], f"{err:.2e} against the {what}"
    return kernels


# --- diffusers' ResnetBlock2D -------------------------------------------------------------------

def _resnet_block():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)  # 16 -> 32 channels: a 1x1 conv_shortcut; a scale factor, so the Div is exported
    block = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=24, groups=8, output_scale_factor=2.0)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 16, 5, 6, generator=g), torch.randn(2, 24, generator=g))
    return block.eval(), args


@pytest.fixture(scope="module", params=list(EXPORTERS))
def resnet_block(request, tmp_path_factory):
    block, args = _resnet_block()
    path = _export(block, args, ["x", "temb"], EXPORTERS[request.param], tmp_path_factory.mktemp("rb") / "rb.onnx")
    return path, {"x": args[0].numpy(), "temb": args[1].numpy()}


def test_resnet_block_adds_run_in_the_conv_epilogues(resnet_block):
    """conv1 + the timestep embedding ([N, C, 1, 1], computed by the Gemm): one kernel; conv2 +
    conv_shortcut's output, divided by 2: one kernel; nothing pointwise is left after a conv."""
    graph, _ = optimize(import_model(onnx.load(resnet_block[0])))
    epilogues = [n for n in graph.nodes if n.op == "rtxjit.Epilogue" and n.attrs["anchor"] == "Conv"]
    programs = sorted(tuple(step[0] for step in n.attrs["program"]) for n in epilogues)
    assert programs == [("Add",), ("Add", "Div")], programs
    assert ops(graph)["Conv"] == 1  # conv_shortcut, whose output conv2's epilogue reads
    assert not {"Add", "Div", "Mul", "Sigmoid"} & set(ops(graph))
    temb = next(n for n in epilogues if len(n.attrs["program"]) == 1).inputs[3]
    assert temb.type.shape == (2, 32, 1, 1) and temb.const is None


@pytest.mark.parametrize("float_type", ["fp32", "fp16"])
def test_resnet_block_fused_equals_unfused_and_onnxruntime(resnet_block, float_type):
    _check_numerics(resnet_block[0], resnet_block[1], float_type)


# --- nearest 2x upsampling read by the next conv ----------------------------------------------------

class Decoder(torch.nn.Module):
    """diffusers' Upsample2D (interpolate x2 + 3x3 conv, 16 input channels: the tap-major loop) on
    an odd-sized input, its residual add and scale (the UpsampleConv's epilogue), then another
    nearest 2x + 3x3 conv with 8 input channels (the flat loop)."""

    def __init__(self):
        super().__init__()
        from diffusers.models.upsampling import Upsample2D

        self.up = Upsample2D(16, use_conv=True, out_channels=8)
        self.conv = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, skip):
        h = (self.up(x) + skip) * 0.5
        return self.conv(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))


class Signal(torch.nn.Module):
    """1-D: nearest upsampling to a given size (Resize by ``sizes``), then a strided Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 5, 4, padding=2, stride=2)

    def forward(self, x, skip):
        return self.conv(torch.nn.functional.interpolate(x, size=18, mode="nearest")) + skip


def _upsample_case(name: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if name == "decoder":
        return Decoder().eval(), (torch.randn(1, 16, 5, 7, generator=g), torch.randn(1, 8, 10, 14, generator=g))
    return Signal().eval(), (torch.randn(2, 3, 9, generator=g), torch.randn(2, 5, 10, generator=g))


@pytest.fixture(scope="module", params=[(n, e) for n in ("decoder", "signal") for e in EXPORTERS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def upsample(request, tmp_path_factory):
    name, exporter = request.param
    module, args = _upsample_case(name)
    path = _export(module, args, ["x", "skip"], EXPORTERS[exporter], tmp_path_factory.mktemp("up") / "up.onnx")
    return name, path, {"x": args[0].numpy(), "skip": args[1].numpy()}


def test_upsampling_is_read_by_the_conv_not_materialized(upsample):
    name, path, _ = upsample
    graph, _ = optimize(import_model(onnx.load(path)))
    assert "Resize" not in ops(graph) and "Conv" not in ops(graph), ops(graph)
    convs = [n for n in graph.nodes if _anchor(n) == "rtxjit.UpsampleConv"]
    assert [_upsample_of(n) for n in convs] == ([(2, 2), (2, 2)] if name == "decoder" else [(2,)])
    assert ops(graph)["rtxjit.Epilogue"] == 1  # the residual add (and scale) of the first
    assert not {"Add", "Mul", "rtxjit.Pointwise"} & set(ops(graph))


@pytest.mark.parametrize("float_type", ["fp32", "fp16"])
def test_upsampling_fused_equals_unfused_and_onnxruntime(upsample, float_type):
    kernels = _check_numerics(upsample[1], upsample[2], float_type)
    assert not any(k.name.startswith("resize") for k in kernels)
    headers = [k.text.splitlines()[0] for k in kernels if "upsample=" in k.text.splitlines()[0]]
    assert len(headers) == (2 if upsample[0] == "decoder" else 1), headers
    if upsample[0] == "decoder":  # tap-major with the residual epilogue, then flat
        assert "loop=tap epilogue=" in headers[0] and "loop=flat" in headers[1], headers


def test_nan_and_inf_inputs_propagate_as_in_the_unfused_graph(upsample):
    name, path, feeds = upsample
    x = feeds["x"].copy()
    x.reshape(-1)[[3, 40]] = [np.nan, np.inf]
    x.reshape(-1)[-1] = -np.inf
    feeds = dict(feeds, x=x)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.isnan(want).any()  # the check below sees NaN (and inf: after the decoder's two convs,
    assert np.isinf(want).any() or name == "decoder"  # +-inf taps of mixed-sign weights meet: NaN only)
    _check_numerics(path, feeds, "fp32")


# --- the pass on single Resize -> Conv pairs ------------------------------------------------------

RESIZES = {
    # (coordinate_transformation_mode, nearest_mode, scales of H and W) -> fused
    "asymmetric-floor": ("asymmetric", "floor", [2, 2], True),
    "half_pixel-round_prefer_floor-2x3": ("half_pixel", "round_prefer_floor", [2, 3], True),
    "pytorch_half_pixel-round_prefer_ceil-3x1": ("pytorch_half_pixel", "round_prefer_ceil", [3, 1], True),
    "asymmetric-round_prefer_floor-2x2": ("asymmetric", "round_prefer_floor", [2, 2], True),  # o/2 ties go down
    "asymmetric-round_prefer_ceil": ("asymmetric", "round_prefer_ceil", [2, 2], False),
    "half_pixel-floor": ("half_pixel", "floor", [2, 2], False),
    "align_corners-floor": ("align_corners", "floor", [2, 2], False),
    # o * (n - 1) / (2n - 1) is o / 2 less at most 1/2 (less exactly 1/2 only at an odd o): rounds to o // 2
    "align_corners-round_prefer_ceil": ("align_corners", "round_prefer_ceil", [2, 2], True),
    "asymmetric-floor-1.5": ("asymmetric", "floor", [1.5, 2], False),
}


@pytest.mark.parametrize("case", list(RESIZES))
def test_which_nearest_resizes_fuse(case):
    transform, nearest, (sh, sw), fused = RESIZES[case]
    h, w = 3, 4
    oh, ow = int(h * sh), int(w * sw)
    nodes = [node("Resize", ["x", "", "scales"], ["u"], mode="nearest", coordinate_transformation_mode=transform,
                  nearest_mode=nearest),
             node("Conv", ["u", "w", "b"], ["y"], pads=[1, 0, 1, 2])]
    m = model(nodes, {"x": (np.float32, [1, 3, h, w])}, {"y": (np.float32, [1, 4, oh, ow])},
              {"scales": np.array([1, 1, sh, sw], np.float32), "w": random((4, 3, 3, 3), np.float32, 1),
               "b": random((4,), np.float32, 2)})
    from rtxjit.passes.fuse_upsample_conv import fuse_upsample_conv

    _, g, modified = apply(fuse_upsample_conv, m, {"x": random((1, 3, h, w))})
    assert modified == fused
    assert ops(g) == ({"rtxjit.UpsampleConv": 1} if fused else {"Resize": 1, "Conv": 1})


@pytest.mark.parametrize("channels", [2, 16], ids=["flat", "tap_major"])
def test_a_3d_upsampling_fuses_into_conv3d(channels):
    from rtxjit.passes.fuse_upsample_conv import fuse_upsample_conv

    nodes = [node("Resize", ["x", "", "scales"], ["u"], mode="nearest", coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor"),
             node("Conv", ["u", "w", "b"], ["y"], pads=[1, 1, 0, 1, 1, 2], strides=[1, 2, 1])]
    m = model(nodes, {"x": (np.float32, [1, channels, 2, 3, 2])}, {"y": (np.float32, [1, 3, 4, 3, 7])},
              {"scales": np.array([1, 1, 2, 2, 3], np.float32), "w": random((3, channels, 3, 3, 2), np.float32, 1),
               "b": random((3,), np.float32, 2)})
    _, g, modified = apply(fuse_upsample_conv, m, {"x": random((1, channels, 2, 3, 2))})
    assert modified and ops(g) == {"rtxjit.UpsampleConv": 1} and g.nodes[0].attrs["upsample"] == (2, 2, 3)


def test_a_symbolic_batch_keeps_the_graph_types():
    """With a symbolic batch, Resize infers its spatial dims only where its input is static (ops/resize.py),
    so the Conv's output type has unknown dims; the fused node would infer known ones, and the pass
    changes no type: it fuses only where the two agree. Either way the graph runs at any batch."""
    from rtxjit.passes.fuse_upsample_conv import fuse_upsample_conv

    nodes = [node("Resize", ["x", "", "scales"], ["u"], mode="nearest", coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor"),
             node("Conv", ["u", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 1])]
    m = model(nodes, {"x": (np.float32, ["N", 2, 3, 5])}, {"y": (np.float32, ["N", 3, 3, 10])},
              {"scales": np.array([1, 1, 2, 2], np.float32), "w": random((3, 2, 3, 3), np.float32, 1)})
    for batch in (1, 3):
        before, g, modified = apply(fuse_upsample_conv, m, {"x": random((batch, 2, 3, 5), np.float32, batch)})
        known = all(isinstance(d, int) for d in before.nodes[0].outputs[0].type.shape[2:])
        assert modified == known and ops(g) == ({"rtxjit.UpsampleConv": 1} if known else {"Resize": 1, "Conv": 1})


def test_a_resize_with_two_readers_stays():
    from rtxjit.passes.fuse_upsample_conv import fuse_upsample_conv

    nodes = [node("Resize", ["x", "", "scales"], ["u"], mode="nearest", coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor"),
             node("Conv", ["u", "w"], ["c"], pads=[1, 1, 1, 1]), node("Relu", ["u"], ["r"])]
    outs = {"c": (np.float32, [1, 2, 6, 6]), "r": (np.float32, [1, 2, 6, 6])}
    m = model(nodes, {"x": (np.float32, [1, 2, 3, 3])}, outs,
              {"scales": np.array([1, 1, 2, 2], np.float32), "w": random((2, 2, 3, 3), np.float32, 1)})
    _, g, modified = apply(fuse_upsample_conv, m, {"x": random((1, 2, 3, 3))})
    assert not modified


# --- a tiny diffusers UNet ------------------------------------------------------------------------

class _UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _unet():
    """Smaller than the zoo's tiny UNet2DConditionModel (8x8 latents, 16/32 channels), the same blocks:
    2 down (cross-attention, plain), a mid block, 2 up (plain with an Upsample2D, cross-attention)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([999.0]), torch.randn(1, 3, 16, generator=g))
    return _UNet(unet.eval()), args


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """exporter -> (path, feeds) of the tiny UNet, exported once per module."""
    module, args = _unet()
    names = ["sample", "timestep", "encoder_hidden_states"]
    feeds = dict(zip(names, (a.numpy() for a in args)))
    out = {}
    for exporter, dynamo in EXPORTERS.items():
        path = _export(module, args, names, dynamo, tmp_path_factory.mktemp("unet") / f"{exporter}.onnx")
        kept = {i.name for i in onnx.load(path).graph.input}  # an exporter drops inputs the graph does not read
        out[exporter] = path, {k: v for k, v in feeds.items() if k in kept}
    return out


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_unet_convs_fuse_their_epilogues_and_the_upsampling(unet, exporter):
    """8 ResNet blocks (conv1 + temb add, conv2 + residual add: 16 epilogues) and 4 transformer
    proj_out 1x1 convs + residual; the Upsample2D conv reads the un-upsampled input. What stays a plain
    Conv: conv_in (3 readers), the downsampler (3 readers), proj_in (read by a Transpose), the
    conv_shortcuts read by conv2's epilogue, conv_out (the graph output)."""
    graph, _ = optimize(import_model(onnx.load(unet[exporter][0])))
    counts = ops(graph)
    assert "Resize" not in counts and counts["rtxjit.UpsampleConv"] == 1
    conv_epilogues = [n for n in graph.nodes if n.op == "rtxjit.Epilogue" and n.attrs["anchor"] in CONVS]
    assert len(conv_epilogues) == 20
    uses = graph.consumers()
    for n in graph.nodes:  # no pointwise node reads a conv's output: each went into an epilogue
        if _anchor(n) in CONVS:
            readers = [r.op for r, _ in uses.get(n.outputs[0].name, [])]
            assert not {"Add", "Div", "Mul", "rtxjit.Pointwise"} & set(readers), (n.name, readers)


@pytest.mark.parametrize("float_type", ["fp32", "fp16"])
def test_unet_fused_equals_unfused_and_onnxruntime(unet, float_type):
    """The TorchScript export (the dynamo one's graph is counted above, and it runs against onnxruntime
    in tests/zoo/test_vision_zoo.py)."""
    kernels = _check_numerics(*unet["torchscript"], float_type)
    assert not any(k.name.startswith("resize") for k in kernels)


# --- roofline: conv3d and conv_transpose kernels count their flops ------------------------------

def _single(op: str, xs: tuple, ws: tuple, attrs: dict, ys: tuple):
    return model([node(op, ["x", "w"], ["y"], **attrs)], {"x": (np.float32, list(xs))},
                 {"y": (np.float32, list(ys))}, {"w": np.ones(ws, np.float32)})


@pytest.mark.parametrize("case", ["conv3d", "conv_transpose2d", "conv_transpose3d"])
def test_roofline_counts_conv3d_and_the_useful_conv_transpose_flops(case):
    """conv3d: 2*M*N*K per group. ConvTranspose: 2 flops per (input pixel, tap, input channel, output
    channel) that lands in the output — with all-ones input and weight, the sum of the output (the
    float64 reference) is that count, per output channel times the output channels."""
    op, xs, ws, attrs, ys = {
        "conv3d": ("Conv", (1, 3, 4, 5, 6), (4, 3, 3, 3, 3), {"pads": [1] * 6, "strides": [1, 2, 1]}, (1, 4, 4, 3, 6)),
        "conv_transpose2d": ("ConvTranspose", (2, 4, 3, 4), (4, 3, 3, 3),
                             {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (2, 3, 6, 8)),
        "conv_transpose3d": ("ConvTranspose", (1, 4, 2, 3, 2), (4, 1, 2, 3, 2),
                             {"strides": [2, 1, 3], "pads": [0, 1, 1, 1, 0, 0], "group": 2}, (1, 2, 3, 4, 4)),
    }[case]
    sess = InferenceSession(_single(op, xs, ws, attrs, ys), optimize=False)
    out = sess.run(None, {"x": np.ones(xs, np.float32)})[0]
    plan = sess.last_executable.plan
    steps = [s for s in plan.steps if s.kernel.name.startswith("conv")]
    assert [s.kernel.name for s in steps] == [case]
    counts = roofline.step_counts(plan, steps[0])
    if op == "Conv":
        k = xs[1] * int(np.prod(ws[2:]))
        assert counts.flops == 2 * int(np.prod(ys[2:])) * ys[0] * ws[0] * k
    else:
        assert counts.flops == 2 * int(round(float(out.sum())))
    assert counts.operand == "fp32"
