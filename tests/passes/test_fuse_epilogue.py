import numpy as np
import pytest

from rtxjit.passes.fuse_epilogue import fuse_epilogue
from rtxjit.passes.fuse_pointwise import fuse_pointwise
from tests.passes.helpers import apply, model, node, ops, random

F32, F16 = np.float32, np.float16


def _fused(graph):
    return fuse_pointwise(graph).graph


def _both(graph):
    return fuse_epilogue(_fused(graph))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_matmul_bias_gelu_runs_in_the_matmul(dtype):
    nodes = [node("MatMul", ["x", "w"], ["p"]), node("Add", ["p", "b"], ["a"]), node("Gelu", ["a"], ["y"])]
    m = model(nodes, {"x": (dtype, [2, 5, 8])}, {"y": (dtype, [2, 5, 6])},
              {"w": random((8, 6), dtype, 1), "b": random((6,), dtype, 2)}, opset=20)
    _, g, modified = apply(_both, m, {"x": random((2, 5, 8), dtype)}, dtype, onnxruntime=dtype == F32)
    assert modified and ops(g) == {"rtxjit.Epilogue": 1}
    assert g.nodes[0].attrs["anchor"] == "MatMul" and g.nodes[0].outputs[0] is g.outputs[0]


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_conv_residual_relu_runs_in_the_conv(dtype):
    nodes = [node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("Add", ["c", "r"], ["a"]),
             node("Relu", ["a"], ["y"])]
    m = model(nodes, {"x": (dtype, [2, 3, 6, 6]), "r": (dtype, [2, 4, 6, 6])}, {"y": (dtype, [2, 4, 6, 6])},
              {"w": random((4, 3, 3, 3), dtype, 1), "b": random((4,), dtype, 2)})
    feeds = {"x": random((2, 3, 6, 6), dtype), "r": random((2, 4, 6, 6), dtype, 3)}
    _, g, _ = apply(_both, m, feeds, dtype, onnxruntime=dtype == F32)
    assert ops(g) == {"rtxjit.Epilogue": 1}
    assert [v.name for v in g.nodes[0].inputs] == ["x", "w", "b", "r"]


def test_gemm_with_alpha_beta_then_relu():
    nodes = [node("Gemm", ["x", "w", "c"], ["p"], alpha=0.5, beta=2.0, transB=1), node("Relu", ["p"], ["y"])]
    m = model(nodes, {"x": (F32, [4, 7])}, {"y": (F32, [4, 3])}, {"w": random((3, 7), F32, 1), "c": random((3,), F32, 2)})
    _, g, _ = apply(fuse_epilogue, m, {"x": random((4, 7))}, F32)
    assert ops(g) == {"rtxjit.Epilogue": 1}


def test_a_product_with_two_readers_or_a_dtype_change_is_not_fused():
    nodes = [node("MatMul", ["x", "w"], ["p"]), node("Relu", ["p"], ["y"]), node("Exp", ["p"], ["z"]),
             node("MatMul", ["x", "w"], ["q"]), node("Cast", ["q"], ["c"], to=10)]
    m = model(nodes, {"x": (F32, [3, 4])}, {"y": (F32, [3, 5]), "z": (F32, [3, 5]), "c": (F16, [3, 5])},
              {"w": random((4, 5))})
    _, g, modified = apply(fuse_epilogue, m, {"x": random((3, 4))}, F32)
    assert not modified and ops(g)["MatMul"] == 2


def test_a_product_that_is_a_graph_output_is_not_fused():
    nodes = [node("MatMul", ["x", "w"], ["p"]), node("Relu", ["p"], ["y"])]
    m = model(nodes, {"x": (F32, [3, 4])}, {"y": (F32, [3, 5]), "p": (F32, [3, 5])}, {"w": random((4, 5))})
    _, g, modified = apply(fuse_epilogue, m, {"x": random((3, 4))}, F32)
    assert not modified


def test_an_add_of_two_convs_fuses_into_one_of_them():
    nodes = [node("Conv", ["x", "w1"], ["c1"]), node("Conv", ["x", "w2"], ["c2"]), node("Add", ["c1", "c2"], ["a"]),
             node("Relu", ["a"], ["y"])]
    m = model(nodes, {"x": (F32, [1, 3, 5, 5])}, {"y": (F32, [1, 4, 5, 5])},
              {"w1": random((4, 3, 1, 1), F32, 1), "w2": random((4, 3, 1, 1), F32, 2)})
    _, g, _ = apply(_both, m, {"x": random((1, 3, 5, 5))}, F32)
    assert ops(g) == {"Conv": 1, "rtxjit.Epilogue": 1}


def test_a_residual_add_behind_a_reshape_fuses_into_the_gemm():
    """ViT's attention output projection: Gemm on [B*S, E], Reshape to [B, S, E], residual Add."""
    shape = np.array([2, 3, 4], np.int64)
    nodes = [node("Gemm", ["x", "w", "b"], ["p"], transB=1),
             node("Reshape", ["p", "shape"], ["r"]), node("Add", ["r", "res"], ["y"])]
    m = model(nodes, {"x": (F32, [6, 5]), "res": (F32, [2, 3, 4])}, {"y": (F32, [2, 3, 4])},
              {"w": random((4, 5), F32, 1), "b": random((4,), F32, 2), "shape": shape})
    feeds = {"x": random((6, 5)), "res": random((2, 3, 4), F32, 3)}
    _, g, _ = apply(_both, m, feeds, F32)
    assert ops(g)["rtxjit.Epilogue"] == 1 and "Add" not in ops(g)


CONV_ANCHORS = {
    # op, x shape, w shape, attrs, output shape: each convolution form the conv template runs
    "conv1d": ("Conv", (2, 3, 8), (5, 3, 3), {"pads": [1, 1]}, (2, 5, 8)),
    "conv3d": ("Conv", (1, 3, 3, 4, 4), (4, 3, 3, 3, 3), {"pads": [1] * 6, "strides": [1, 2, 1]}, (1, 4, 3, 2, 4)),
    "conv_transpose2d": ("ConvTranspose", (1, 4, 3, 4), (4, 3, 3, 3),
                         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, (1, 3, 6, 8)),
    "conv_transpose1d": ("ConvTranspose", (2, 4, 5), (4, 2, 4), {"strides": [2], "pads": [1, 1]}, (2, 2, 10)),
}


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CONV_ANCHORS))
def test_conv_1d_3d_and_conv_transpose_take_a_broadcast_add_and_a_scale(case, dtype):
    """The ResNet-block chain: + a per-(image, channel) tensor ([N, C, 1...], a timestep embedding;
    a graph input here, read through broadcast strides), then / a constant (output_scale_factor),
    in the conv kernel."""
    op, xs, ws, attrs, ys = CONV_ANCHORS[case]
    emb = ys[:2] + (1,) * (len(ys) - 2)
    nodes = [node(op, ["x", "w", "b"], ["c"], **attrs), node("Add", ["c", "t"], ["a"]), node("Div", ["a", "s"], ["y"])]
    m = model(nodes, {"x": (dtype, list(xs)), "t": (dtype, list(emb))}, {"y": (dtype, list(ys))},
              {"w": random(ws, dtype, 1), "b": random((ys[1],), dtype, 2), "s": np.array(2.0, dtype)})
    feeds = {"x": random(xs, dtype), "t": random(emb, dtype, 3)}
    _, g, _ = apply(_both, m, feeds, dtype, onnxruntime=dtype == F32)
    assert ops(g) == {"rtxjit.Epilogue": 1}
    epilogue = g.nodes[0]
    assert epilogue.attrs["anchor"] == op and [s[0] for s in epilogue.attrs["program"]] == ["Add", "Div"]


def test_a_conv_over_4_spatial_dims_is_no_anchor():
    from rtxjit.ir.graph import Node, Value
    from rtxjit.ir.types import DType, TensorType
    from rtxjit.passes.fuse_epilogue import _anchor_ok

    def conv(rank):
        x = Value("x", TensorType(DType.FP32, (1, 2) + (3,) * rank))
        return Node("Conv", "c", [x, Value("w", TensorType(DType.FP32, (2, 2) + (1,) * rank))], [])
    assert [_anchor_ok(conv(r)) for r in (1, 2, 3, 4)] == [True, True, True, False]
