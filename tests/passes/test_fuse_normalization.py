import numpy as np
import pytest

from rtxjit.passes import PassResult, optimize
from rtxjit.passes.fuse_normalization import fuse_normalization
from onnx import helper

from rtxjit.ir.types import DType
from tests.passes.helpers import apply, model, node, ops, random

F32, F16 = np.float32, np.float16
DTYPES = pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
SHAPE = (2, 3, 8)


def _mean(x: str, out: str, opset: int, axes=(-1,)) -> list:
    """ReduceMean(x) with keepdims=1: axes as an attribute before opset 18, as an input from it."""
    if opset < 18:
        return [node("ReduceMean", [x], [out], axes=list(axes), keepdims=1)]
    return [node("ReduceMean", [x, "axes"], [out], keepdims=1)]


def _square(d: str, out: str, square: str) -> list:
    return [node("Pow", [d, "two"], [out])] if square == "pow" else [node("Mul", [d, d], [out])]


def _scaled_by_rstd(d: str, var: str, out: str, divide: str) -> list:
    """d / Sqrt(var + eps), as a Div or as a Mul by Reciprocal (or by Div(1, .))."""
    nodes = [node("Add", [var, "eps"], ["var_eps"]), node("Sqrt", ["var_eps"], ["std"])]
    if divide == "div":
        return nodes + [node("Div", [d, "std"], [out])]
    if divide == "one_over":
        return nodes + [node("Div", ["one", "std"], ["rstd"]), node("Mul", ["rstd", d], [out])]
    return nodes + [node("Reciprocal", ["std"], ["rstd"]), node("Mul", [d, "rstd"], [out])]


def _affine(y: str, gamma: bool, beta: bool) -> tuple:
    """Optional Mul by gamma, then Add of beta; returns (nodes, result name)."""
    nodes = []
    if gamma:
        nodes.append(node("Mul", [y, "gamma"], ["scaled"]))
        y = "scaled"
    if beta:
        nodes.append(node("Add", [y, "beta"], ["shifted"]))
        y = "shifted"
    return nodes, y


def _inits(dtype, opset: int, axes=(-1,), d: int = SHAPE[-1]) -> dict:
    inits = {"two": np.array(2.0, dtype), "eps": np.array(1e-5, dtype), "one": np.array(1.0, dtype),
             "gamma": random((d,), dtype, 1), "beta": random((d,), dtype, 2)}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
    return inits


def _model(nodes, y: str, dtype, opset: int, shape=SHAPE, inits=None, outputs=None):
    outputs = {y: (dtype, list(shape)), **(outputs or {})}
    return model(nodes, {"x": (dtype, list(shape))}, outputs, inits or _inits(dtype, opset, d=shape[-1]),
                 opset=opset)


def _layer_norm_nodes(opset=17, square="pow", divide="div", gamma=True, beta=True) -> tuple:
    nodes = _mean("x", "mean", opset) + [node("Sub", ["x", "mean"], ["d"])]
    nodes += _square("d", "sq", square) + _mean("sq", "var", opset) + _scaled_by_rstd("d", "var", "y", divide)
    more, out = _affine("y", gamma, beta)
    return nodes + more, out


def _layer_norm(dtype, opset=17, square="pow", divide="div", gamma=True, beta=True):
    nodes, out = _layer_norm_nodes(opset, square, divide, gamma, beta)
    return _model(nodes, out, dtype, opset), out


def _rms_norm(dtype, opset=17, square="pow", divide="reciprocal", gamma=True, shape=SHAPE):
    nodes = _square("x", "sq", square) + _mean("sq", "ms", opset) + _scaled_by_rstd("x", "ms", "y", divide)
    more, out = _affine("y", gamma, beta=False)
    return _model(nodes + more, out, dtype, opset, shape), out


def _softmax(dtype, opset=17, shift=True, axis=-1, shape=SHAPE):
    axes = np.array([axis], np.int64)
    nodes = []
    if shift:
        reduce_max = (node("ReduceMax", ["x"], ["peak"], axes=[axis], keepdims=1) if opset < 18
                      else node("ReduceMax", ["x", "sm_axes"], ["peak"], keepdims=1))
        nodes += [reduce_max, node("Sub", ["x", "peak"], ["shifted"])]
    nodes += [node("Exp", ["shifted" if shift else "x"], ["e"]),
              node("ReduceSum", ["e", "sm_axes"], ["total"], keepdims=1), node("Div", ["e", "total"], ["y"])]
    return _model(nodes, "y", dtype, opset, shape, {"sm_axes": axes}), "y"


def _check_fused(proto, dtype, op: str, shape=SHAPE):
    _, g, modified = apply(fuse_normalization, proto, {"x": random(shape, dtype, 3)}, dtype)
    assert modified and ops(g) == {op: 1}
    assert g.nodes[0].outputs[0] is g.outputs[0] and g.nodes[0].inputs[0].name == "x"
    assert g.outputs[0].type.dtype is g.inputs[0].type.dtype
    return g.nodes[0]


def _with_output(proto, name: str, shape: list):
    """``proto`` with its intermediate ``name`` (fp32, of ``shape``) also a graph output."""
    proto.graph.output.append(helper.make_tensor_value_info(name, DType.FP32.onnx_code, shape))
    return proto


def _left_alone(proto):
    _, g, modified = apply(fuse_normalization, proto, {"x": random(SHAPE)}, F32)
    assert not modified
    return g


# ---- LayerNorm ---------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("opset", [17, 18], ids=["axes_attr", "axes_input"])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("divide", ["div", "reciprocal"])
def test_layer_norm_becomes_one_node(dtype, opset, square, divide):
    proto, _ = _layer_norm(dtype, opset, square, divide)
    fused = _check_fused(proto, dtype, "LayerNormalization")
    assert fused.attrs["axis"] == 2 and fused.attrs["epsilon"] == pytest.approx(1e-5, rel=1e-2)
    assert [v.const.shape for v in fused.inputs[1:]] == [(8,), (8,)]


@DTYPES
@pytest.mark.parametrize("gamma,beta", [(False, False), (True, False), (False, True)],
                         ids=["plain", "gamma", "beta"])
def test_layer_norm_without_gamma_or_beta(dtype, gamma, beta):
    proto, _ = _layer_norm(dtype, gamma=gamma, beta=beta)
    fused = _check_fused(proto, dtype, "LayerNormalization")
    assert len(fused.inputs) == (3 if beta else 2)
    if not gamma:
        assert np.all(fused.inputs[1].const == 1)


def test_layer_norm_over_the_two_last_axes():
    nodes = _mean("x", "mean", 18) + [node("Sub", ["x", "mean"], ["d"])]
    nodes += _square("d", "sq", "mul") + _mean("sq", "var", 18) + _scaled_by_rstd("d", "var", "y", "div")
    nodes += [node("Mul", ["y", "gamma"], ["scaled"])]
    inits = {**_inits(F32, 18, axes=(1, 2)), "gamma": random((1, 3, 1), F32, 1)}
    fused = _check_fused(_model(nodes, "scaled", F32, 18, inits=inits), F32, "LayerNormalization")
    assert fused.attrs["axis"] == 1 and fused.inputs[1].const.shape == (3, 8)


def test_layer_norm_over_a_leading_axis_is_left_alone():
    nodes = _mean("x", "mean", 17, axes=(1,)) + [node("Sub", ["x", "mean"], ["d"])]
    nodes += _square("d", "sq", "pow") + _mean("sq", "var", 17, axes=(1,)) + _scaled_by_rstd("d", "var", "y", "div")
    assert ops(_left_alone(_model(nodes, "y", F32, 17)))["ReduceMean"] == 2


def test_layer_norm_whose_variance_is_a_graph_output_is_left_alone():
    g = _left_alone(_with_output(_layer_norm(F32)[0], "var", [2, 3, 1]))
    assert ops(g)["ReduceMean"] == 2


def test_a_gamma_that_grows_the_output_stays_a_mul():
    nodes, out = _layer_norm_nodes(beta=False)
    inits = {**_inits(F32, 17), "gamma": random((4, 1, 1, 8), F32, 1)}
    proto = model(nodes, {"x": (F32, list(SHAPE))}, {out: (F32, [4, *SHAPE])}, inits)
    _, g, modified = apply(fuse_normalization, proto, {"x": random(SHAPE)}, F32)
    assert modified and ops(g) == {"LayerNormalization": 1, "Mul": 1}


# ---- RMSNorm -----------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("opset", [17, 18], ids=["axes_attr", "axes_input"])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("divide", ["div", "reciprocal", "one_over"])
def test_rms_norm_becomes_one_node(dtype, opset, square, divide):
    proto, _ = _rms_norm(dtype, opset, square, divide)
    fused = _check_fused(proto, dtype, "rtxjit.RMSNorm")
    assert fused.attrs["axis"] == 2 and fused.inputs[1].const.shape == (8,)


@DTYPES
def test_rms_norm_without_gamma(dtype):
    proto, _ = _rms_norm(dtype, gamma=False)
    assert len(_check_fused(proto, dtype, "rtxjit.RMSNorm").inputs) == 1


@DTYPES
def test_rms_norm_of_long_rows_loops_over_column_blocks(dtype):
    proto, _ = _rms_norm(dtype, shape=(2, 5000))
    _check_fused(proto, dtype, "rtxjit.RMSNorm", shape=(2, 5000))


def test_rms_norm_whose_square_has_another_reader_is_left_alone():
    proto, _ = _rms_norm(F32, gamma=False)
    proto.graph.node.append(node("Neg", ["sq"], ["neg"]))
    g = _left_alone(_with_output(proto, "neg", list(SHAPE)))
    assert "rtxjit.RMSNorm" not in ops(g)


# ---- Softmax -----------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("opset", [17, 18], ids=["axes_attr", "axes_input"])
@pytest.mark.parametrize("shift", [True, False], ids=["max_shift", "plain_exp"])
def test_softmax_becomes_one_node(dtype, opset, shift):
    proto, _ = _softmax(dtype, opset, shift)
    assert _check_fused(proto, dtype, "Softmax").attrs["axis"] == 2


def test_softmax_over_a_middle_axis():
    proto, _ = _softmax(F32, axis=1)
    assert _check_fused(proto, F32, "Softmax").attrs["axis"] == 1


def test_softmax_whose_exp_is_a_graph_output_is_left_alone():
    g = _left_alone(_with_output(_softmax(F32)[0], "e", list(SHAPE)))
    assert ops(g)["Exp"] == 1


@pytest.mark.parametrize("build,op", [(_softmax, "Softmax"), (_layer_norm, "LayerNormalization"),
                                      (_rms_norm, "rtxjit.RMSNorm")], ids=["softmax", "layer_norm", "rms_norm"])
def test_the_pipeline_fuses_normalizations_before_pointwise_fusion(build, op):
    proto, _ = build(F32)
    _, g, _ = apply(lambda graph: PassResult(optimize(graph)[0], True), proto, {"x": random(SHAPE)}, F32)
    assert ops(g) == {op: 1}
