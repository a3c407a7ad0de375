import numpy as np
import pytest

from rtxjit.passes.fold_batchnorm import fold_batchnorm
from tests.passes.helpers import apply, model, node, ops, random

F32, F16 = np.float32, np.float16
C = 4


def _bn_params(dtype, seed: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {"scale": rng.uniform(0.5, 1.5, C).astype(dtype), "beta": rng.uniform(-0.5, 0.5, C).astype(dtype),
            "mean": rng.uniform(-0.5, 0.5, C).astype(dtype), "var": rng.uniform(0.5, 2.0, C).astype(dtype)}


def _bn(x: str, y: str):
    return node("BatchNormalization", [x, "scale", "beta", "mean", "var"], [y], epsilon=1e-3)


def _conv_bn_model(dtype, bias: bool, extra_nodes=(), extra_outputs=None):
    inits = {"w": random((C, 3, 3, 3), dtype, 5), **_bn_params(dtype)}
    if bias:
        inits["b"] = random((C,), dtype, 6)
    conv = node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], pads=[1, 1, 1, 1])
    outputs = {"y": (dtype, [1, C, 5, 5]), **(extra_outputs or {})}
    return model([conv, _bn("c", "y"), *extra_nodes], {"x": (dtype, [1, 3, 5, 5])}, outputs, inits)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_conv_then_batchnorm_becomes_one_conv(dtype, bias):
    m = _conv_bn_model(dtype, bias)
    _, g, modified = apply(fold_batchnorm, m, {"x": random((1, 3, 5, 5), dtype)}, dtype, onnxruntime=dtype == F32)
    assert modified and ops(g) == {"Conv": 1}
    conv = g.nodes[0]
    assert conv.outputs[0] is g.outputs[0] and g.outputs[0].name == "y"
    assert [v.type.dtype for v in conv.inputs] == [g.inputs[0].type.dtype] * 3


def test_folded_weights_are_computed_in_float64():
    m = _conv_bn_model(F32, bias=True)
    _, g, _ = apply(fold_batchnorm, m, {"x": random((1, 3, 5, 5))})
    inits = {i.name: np.frombuffer(i.raw_data, np.float32) for i in m.graph.initializer}
    p = {k: inits[k].astype(np.float64) for k in ("scale", "beta", "mean", "var", "b")}
    factor = p["scale"] / np.sqrt(p["var"] + 1e-3)
    w = inits["w"].astype(np.float64).reshape(C, -1) * factor[:, None]
    conv = g.nodes[0]
    np.testing.assert_array_equal(conv.inputs[1].const.reshape(C, -1), w.astype(F32))
    np.testing.assert_array_equal(conv.inputs[2].const, ((p["b"] - p["mean"]) * factor + p["beta"]).astype(F32))


def test_batchnorm_not_after_a_conv_stays():
    m = model([node("Relu", ["x"], ["r"]), _bn("r", "y")], {"x": (F32, [1, C, 3, 3])}, {"y": (F32, [1, C, 3, 3])},
              _bn_params(F32))
    _, g, modified = apply(fold_batchnorm, m, {"x": random((1, C, 3, 3))})
    assert not modified and ops(g) == {"Relu": 1, "BatchNormalization": 1}


def test_conv_output_read_twice_does_not_fold():
    m = _conv_bn_model(F32, True, [node("Relu", ["c"], ["r"])], {"r": (F32, [1, C, 5, 5])})
    _, g, modified = apply(fold_batchnorm, m, {"x": random((1, 3, 5, 5))})
    assert not modified and ops(g) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}


def test_conv_output_that_is_a_graph_output_does_not_fold():
    m = _conv_bn_model(F32, True, extra_outputs={"c": (F32, [1, C, 5, 5])})
    _, g, modified = apply(fold_batchnorm, m, {"x": random((1, 3, 5, 5))})
    assert not modified and ops(g) == {"Conv": 1, "BatchNormalization": 1}


def test_shared_weight_is_not_changed_in_place():
    inits = {"w": random((C, 3, 3, 3), F32, 5), **_bn_params(F32)}
    m = model([node("Conv", ["x", "w"], ["c1"]), _bn("c1", "y1"), node("Conv", ["x", "w"], ["y2"])],
              {"x": (F32, [1, 3, 5, 5])}, {"y1": (F32, [1, C, 3, 3]), "y2": (F32, [1, C, 3, 3])}, inits)
    before, g, _ = apply(fold_batchnorm, m, {"x": random((1, 3, 5, 5))})
    assert ops(g) == {"Conv": 2}
    assert g.nodes[1].inputs[1].const is before.nodes[2].inputs[1].const
    np.testing.assert_array_equal(before.nodes[0].inputs[1].const, inits["w"])


def test_a_second_batchnorm_of_a_folded_output_read_twice_stays():
    """Conv -> BN_a -> y1; BN_b(y1) -> y2; Add(y1, y2): BN_a folds into the Conv, whose output then
    has two readers, so BN_b must stay (it was once folded into the same Conv: a wrong result
    found by tools/fuzz.py)."""
    inits = {"w": random((C, 3, 3, 3), F32, 5), "b": random((C,), F32, 6), **_bn_params(F32)}
    nodes = [node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), _bn("c", "y1"), _bn("y1", "y2"),
             node("Add", ["y1", "y2"], ["s"])]
    m = model(nodes, {"x": (F32, [1, 3, 5, 5])}, {"s": (F32, [1, C, 5, 5])}, inits)
    _, g, modified = apply(fold_batchnorm, m, {"x": random((1, 3, 5, 5))}, onnxruntime=True)
    assert modified and ops(g) == {"Conv": 1, "BatchNormalization": 1, "Add": 1}
