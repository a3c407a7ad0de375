"""Pad, DepthToSpace and SpaceToDepth (rtxjit/ops/pad.py) beyond the registry samples: torch's
F.pad in every mode through both exporters (the TorchScript one at opset 17, the dynamo one at its
default), the Swin pattern of padding a [B, H, W, C] map to a multiple of the window with sizes known
only at run time, and inputs that are strided views or computed on the device. Every result is
compared with onnxruntime on the same file; a pad is a copy, so the values must be equal."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.errors import ShapeError, UnsupportedOpError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
WINDOW = 4


class PadModes(torch.nn.Module):
    """Every F.pad mode on an NCHW map, negative pads (cropping), a [B, H, W, C] pad and the
    DepthToSpace that pixel_shuffle exports to (of a channel slice: a strided input)."""

    def forward(self, x, s):
        return (F.pad(x, (1, 2, 3, 0), value=0.5),
                F.pad(x, (2, 1, 1, 2), mode="reflect"),
                F.pad(x, (1, 3, 2, 0), mode="replicate"),
                F.pad(x, (2, 1, 1, 2), mode="circular"),
                F.pad(x, (-1, 2, 0, -1)),
                F.pad(s, (0, 0, 0, 3, 0, 2)),
                F.pixel_shuffle(x[:, :4], 2))


class SwinPad(torch.nn.Module):
    """transformers' Swin ``maybe_pad`` and window partition: pad H and W of [B, H, W, C] up to a
    multiple of the window (by 0 where they already are one), then split into windows."""

    def forward(self, x):
        b, h, w, c = x.shape
        pad_r = (WINDOW - w % WINDOW) % WINDOW
        pad_b = (WINDOW - h % WINDOW) % WINDOW
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        x = x.view(b, (h + pad_b) // WINDOW, WINDOW, (w + pad_r) // WINDOW, WINDOW, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, WINDOW * WINDOW, c) * 2


def _export(module, args, path, dynamo: bool, dynamic: dict = None) -> str:
    names = ["x", "s"][:len(args)]
    with torch.no_grad():
        if dynamo:
            shapes = None
            if dynamic:
                shapes = {n: {a: torch.export.Dim(f"{n}{a}", min=2, max=64) for a in dynamic[n]} for n in dynamic}
            torch.onnx.export(module, args, path, input_names=names, dynamo=True, verbose=False, dynamic_shapes=shapes)
        else:
            axes = {n: {a: f"{n}{a}" for a in dims} for n, dims in (dynamic or {}).items()}
            torch.onnx.export(module, args, path, input_names=names, dynamo=False, opset_version=17,
                              dynamic_axes=axes or None)
    return str(path)


def _onnxruntime(path, feeds: dict) -> list:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_equal(got: list, want: list) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {k}: {g.dtype}{g.shape} != {w.dtype}{w.shape}"
        np.testing.assert_array_equal(g, w, err_msg=f"output {k}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torch_pad_modes_match_onnxruntime(exporter, dtype, tmp_path):
    import onnx

    x = torch.randn(2, 4, 6, 8, dtype=DTYPES[dtype])
    s = torch.randn(2, 5, 6, 3, dtype=DTYPES[dtype])
    path = _export(PadModes().eval(), (x, s), tmp_path / "pad.onnx", dynamo=exporter == "dynamo")
    modes = {helper.get_attribute_value(a).decode() for n in onnx.load(path).graph.node if n.op_type == "Pad"
             for a in n.attribute if a.name == "mode"}
    # the TorchScript exporter writes circular padding as Slice + Concat (opset 17 has no wrap)
    assert modes == ({"constant", "reflect", "edge", "wrap"} if exporter == "dynamo" else {"constant", "reflect", "edge"})
    feeds = {"x": x.numpy(), "s": s.numpy()}
    sess = rtxjit.InferenceSession(path)
    _assert_equal(sess.run(None, feeds), _onnxruntime(path, feeds))
    kernels = [k for ks in sess.last_trace.values() for k in ks]
    assert any(k.startswith("pad_wrap") for k in kernels) == (exporter == "dynamo")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_swin_window_pad_with_sizes_known_at_run_time(exporter, dtype, tmp_path):
    """The pads are computed from the input's shape in the graph (Shape, Mod, Sub, Concat), so they
    are known on the host once the sizes are bound; sizes already a multiple of the window pad by 0,
    and the Pad is then the input itself (no kernel)."""
    x = torch.randn(2, 7, 9, 3, dtype=DTYPES[dtype])
    path = _export(SwinPad().eval(), (x,), tmp_path / "swin.onnx", dynamo=exporter == "dynamo",
                   dynamic={"x": (1, 2)})
    sess = rtxjit.InferenceSession(path)
    for shape, padded in [((2, 7, 9, 3), True), ((2, 8, 8, 3), False), ((2, 5, 12, 3), True)]:
        feeds = {"x": np.random.default_rng(sum(shape)).standard_normal(shape).astype(x.numpy().dtype)}
        _assert_equal(sess.run(None, feeds), _onnxruntime(path, feeds))
        pad_node = [ks for name, ks in sess.last_trace.items() if "pad" in name.lower()]
        assert len(pad_node) == 1 and (pad_node[0] != ["alias"]) == padded, sess.last_trace


def _vi(name, code, shape):
    return helper.make_tensor_value_info(name, code, shape)


def _model(nodes, inputs, outputs, inits=(), opset=19):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _pads(values, name="pads"):
    return numpy_helper.from_array(np.array(values, np.int64), name)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_of_a_transposed_view_with_a_value_computed_on_the_device(mode):
    """The input is a strided view (a Transpose is an alias), and constant_value comes out of a
    kernel (ReduceMax), so the pad kernel reads it from device memory."""
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
             helper.make_node("ReduceMax", ["x"], ["v"], keepdims=0),
             helper.make_node("Pad", ["t", "pads", "v"], ["y"], mode=mode)]
    m = _model(nodes, [_vi("x", TensorProto.FLOAT, [3, 5, 4])], [_vi("y", TensorProto.FLOAT, None)],
               [_pads([1, 0, 2, -1, 2, 3])])
    feeds = {"x": x}
    _assert_equal(rtxjit.InferenceSession(m).run(None, feeds),
                  ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds))


@pytest.mark.parametrize("op,attrs", [("DepthToSpace", {"blocksize": 2, "mode": "DCR"}),
                                      ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}),
                                      ("SpaceToDepth", {"blocksize": 2})])
def test_depth_space_of_a_view_that_no_reshape_splits(op, attrs):
    """A transposed input cannot be split into the 6-D shape as a view: it is made dense first."""
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 2, 1]), helper.make_node(op, ["t"], ["y"], **attrs)]
    m = _model(nodes, [_vi("x", TensorProto.FLOAT, [2, 4, 8, 4])], [_vi("y", TensorProto.FLOAT, None)], opset=13)
    sess = rtxjit.InferenceSession(m)
    _assert_equal(sess.run(None, {"x": x}),
                  ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x}))


def test_a_pad_that_only_crops_is_a_view():
    m = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"), helper.make_node("Relu", ["y"], ["z"])],
               [_vi("x", TensorProto.FLOAT, [4, 6])], [_vi("z", TensorProto.FLOAT, None)], [_pads([-1, 0, 0, -2])])
    sess = rtxjit.InferenceSession(m)
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(x[1:, :4], 0))
    assert sess.last_trace["Pad_0"] == ["alias"]


@pytest.mark.parametrize("mode,pads,error,words", [
    ("edge", [-4, 0, 1, 0], ShapeError, "no element is left"),
    ("constant", [-3, 0, -2, 0], ShapeError, "crop more than"),
    ("mirror", [1, 0, 1, 0], UnsupportedOpError, "mode 'mirror'"),
    ("constant", [1, 2, 3], ShapeError, "two per axis"),
])
def test_bad_pads_are_clear_errors_naming_the_node(mode, pads, error, words):
    m = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode, name="the_pad")],
               [_vi("x", TensorProto.FLOAT, [4, 6])], [_vi("y", TensorProto.FLOAT, None)], [_pads(pads)])
    with pytest.raises(error, match=words) as info:
        rtxjit.InferenceSession(m)
    assert "the_pad" in str(info.value)
