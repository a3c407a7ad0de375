import numpy as np
import pytest

import rtxjit
from rtxjit.models import bert_encoder, demo_inputs
from rtxjit.passes.merge_parallel_matmuls import merge_parallel_matmuls
from tests.passes.helpers import apply, model, node, ops, random

F32, F16 = np.float32, np.float16


def _three_projections(dtype, bias_on=(True, True, False)):
    nodes, inits, outputs = [], {}, {}
    for i, (n, has_bias) in enumerate(zip((4, 6, 3), bias_on)):
        inits[f"w{i}"] = random((5, n), dtype, i)
        nodes.append(node("MatMul", ["x", f"w{i}"], [f"p{i}" if has_bias else f"y{i}"]))
        if has_bias:
            inits[f"b{i}"] = random((n,), dtype, 10 + i)
            nodes.append(node("Add", [f"p{i}", f"b{i}"], [f"y{i}"]))
        nodes.append(node("Relu", [f"y{i}"], [f"r{i}"]))
        outputs[f"r{i}"] = (dtype, [2, 3, n])
    return model(nodes, {"x": (dtype, [2, 3, 5])}, outputs, inits)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_projections_of_one_input_become_one_matmul(dtype):
    m = _three_projections(dtype)
    _, g, modified = apply(merge_parallel_matmuls, m, {"x": random((2, 3, 5), dtype)}, dtype,
                           onnxruntime=dtype == F32)
    assert modified and ops(g) == {"MatMul": 1, "Add": 1, "Slice": 3, "Relu": 3}


def test_the_slices_are_views_in_the_plan():
    model_ = bert_encoder()
    sess = rtxjit.InferenceSession(model_)
    sess.run(None, demo_inputs(model_))
    slices = [n.name for n in sess.graph.nodes if n.op == "Slice"]
    assert len(slices) == 3 and all(sess.last_trace[s] == ["alias"] for s in slices)
    products = [n for n in sess.graph.nodes if "MatMul" in (n.op, n.attrs.get("anchor"))]
    assert len(products) == 4  # qkv, out-proj, two feed-forward


def test_a_single_projection_is_left_alone():
    m = model([node("MatMul", ["x", "w"], ["y"])], {"x": (F32, [3, 5])}, {"y": (F32, [3, 4])},
              {"w": random((5, 4))})
    _, g, modified = apply(merge_parallel_matmuls, m, {"x": random((3, 5))}, F32)
    assert not modified and ops(g) == {"MatMul": 1}
