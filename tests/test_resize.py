"""Resize as torch's two ONNX exporters emit it, against onnxruntime.

F.interpolate's nearest 2x upsampling (UNet decoders: nearest, asymmetric, floor, scales
[1, 1, 2, 2]) and bilinear resizing with align_corners False (half_pixel) and True, by scale and
by size, as segmentation heads (DeepLabV3, SegFormer) use it; exported with the TorchScript
exporter (opset 17: scales as a Constant node, sizes from Shape -> Slice -> Concat) and with the
dynamo exporter (opset 20+: scales or sizes as initializers). Every registry sample is run by
tests/test_ops.py; these tests cover the exported graphs, strided inputs and host-computed sizes.
"""

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit

torch = pytest.importorskip("torch")
F = torch.nn.functional


class Interpolate(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return F.interpolate(x, **self.kw)


class SegHead(torch.nn.Module):
    """Logits at 1/2 resolution, resized back to the image's size (read from its shape)."""

    def __init__(self, align_corners: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.align_corners = align_corners

    def forward(self, x):
        return F.interpolate(self.conv(x), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


def _export(module, x, dynamo: bool, dynamic: bool = False) -> onnx.ModelProto:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({2: torch.export.Dim("h", min=4, max=64), 3: torch.export.Dim("w", min=4, max=64)},) \
                if dynamic else None
            return torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=shapes).model_proto
        f = io.BytesIO()
        axes = {"x": {2: "h", 3: "w"}} if dynamic else None
        torch.onnx.export(module, (x,), f, opset_version=17, dynamo=False, input_names=["x"], dynamic_axes=axes)
        return onnx.load_from_string(f.getvalue())


def _ort(model, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


CASES = {
    "nearest_2x": dict(scale_factor=2, mode="nearest"),
    "bilinear_2x": dict(scale_factor=2, mode="bilinear", align_corners=False),
    "bilinear_align_corners_size": dict(size=(13, 7), mode="bilinear", align_corners=True),
    "bilinear_down_size": dict(size=(5, 6), mode="bilinear", align_corners=False),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("case", list(CASES))
def test_exported_interpolate_matches_onnxruntime(case, dynamo):
    x = torch.randn(2, 3, 6, 9)
    model = _export(Interpolate(**CASES[case]), x, dynamo)
    assert any(n.op_type == "Resize" for n in model.graph.node)
    name = model.graph.input[0].name
    feeds = {name: x.numpy()}
    got = rtxjit.InferenceSession(model).run(None, feeds)[0]
    want = _ort(model, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if case == "nearest_2x":
        np.testing.assert_array_equal(got, np.repeat(np.repeat(x.numpy(), 2, axis=2), 2, axis=3))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_segmentation_head_resizes_to_the_input_size_of_each_run(align_corners, dynamo):
    """The output size comes from the input's shape (host arithmetic on Shape): two sizes, one
    session."""
    torch.manual_seed(0)
    model = _export(SegHead(align_corners), torch.randn(1, 3, 10, 12), dynamo, dynamic=True)
    name = model.graph.input[0].name
    sess = rtxjit.InferenceSession(model)
    for h, w in ((10, 12), (7, 9)):
        feeds = {name: np.random.default_rng(h).standard_normal((1, 3, h, w)).astype(np.float32)}
        got = sess.run(None, feeds)[0]
        want = _ort(model, feeds)[0]
        assert got.shape == (1, 4, h, w)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _model(nodes, inputs, out_dtype, inits=(), opset=19):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", out_dtype, None)], list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_reads_a_strided_input(mode):
    """An NHWC tensor transposed to NCHW is a strided view: the kernel reads it through its
    strides, no copy first."""
    x = np.random.default_rng(1).uniform(-2, 2, (2, 5, 6, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Resize", ["t", "", "", "sizes"], ["y"], mode=mode,
                              coordinate_transformation_mode="pytorch_half_pixel")]
    sizes = numpy_helper.from_array(np.array([2, 3, 9, 4], np.int64), "sizes")
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)], TensorProto.FLOAT, [sizes])
    sess = rtxjit.InferenceSession(m)
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _ort(m, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert sess.launches_per_inference == 1


def test_nearest_ties_round_as_onnxruntime():
    """asymmetric 3 -> 2 (scale 2/3): output 1 maps to 1 / float32(2/3), 1.49999996 exactly but
    1.5 in float32 division, onnxruntime's: a tie, which each nearest_mode breaks its own way.
    The kernel computes coordinates in float32 as onnxruntime does (the float64 reference would
    not see the tie)."""
    x = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4) + 1
    scales = numpy_helper.from_array(np.array([1, 1, 2 / 3, 0.5], np.float32), "scales")
    for nearest_mode in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", nearest_mode=nearest_mode,
                                coordinate_transformation_mode="asymmetric")
        m = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)], TensorProto.FLOAT,
                   [scales])
        got = rtxjit.InferenceSession(m).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, _ort(m, {"x": x})[0], err_msg=nearest_mode)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_integer_linear_and_cubic_round_half_to_even_and_saturate(mode):
    """uint8 images: the weighted sum is rounded half to even and clamped into [0, 255] (cubic
    overshoots near edges), as onnx's reference does; tf_crop_and_resize's fill of 300 saturates
    to 255. (onnxruntime truncates toward zero and wraps the fill: compared with the reference.)"""
    x = np.random.default_rng(2).integers(0, 256, (1, 2, 5, 6)).astype(np.uint8)
    x[0, 0, 2] = 255
    x[0, 0, 3] = 0  # a step edge: cubic overshoots on both sides
    attrs = dict(mode=mode, coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=300.0,
                 axes=[2, 3])
    roi = np.array([-0.1, 0.0, 1.0, 1.2], np.float32)
    sizes = np.array([11, 9], np.int64)
    node = helper.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], **attrs)
    m = _model([node], [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)], TensorProto.UINT8,
               [numpy_helper.from_array(roi, "roi"), numpy_helper.from_array(sizes, "sizes")])
    got = rtxjit.InferenceSession(m).run(None, {"x": x})[0]
    opdef = rtxjit.ir.registry.all_ops()["Resize"]
    want = opdef.run_reference([x, roi.astype(np.float64), None, sizes], opdef.bind_attrs(attrs, "Resize"), 1)[0]
    assert got.dtype == np.uint8 and (want == 255).any() and (mode == "linear" or (want == 0).any())
    np.testing.assert_array_equal(got, want)
