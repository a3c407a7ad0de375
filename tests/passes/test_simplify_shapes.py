import numpy as np
import pytest

from rtxjit.passes.eliminate_dead_code import eliminate_dead_code
from rtxjit.passes.simplify_shapes import simplify_shapes
from tests.passes.helpers import apply, model, node, ops, random

F32 = np.float32


def _shape(*dims):
    return np.array(dims, np.int64)


def test_identity_dropout_and_same_dtype_cast_are_removed():
    m = model([node("Identity", ["x"], ["a"]), node("Dropout", ["a"], ["b"]),
               node("Cast", ["b"], ["c"], to=1), node("Relu", ["c"], ["y"])],
              {"x": (F32, [2, 3])}, {"y": (F32, [2, 3])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((2, 3))})
    assert modified and ops(g) == {"Relu": 1}
    assert g.nodes[0].inputs[0] is g.inputs[0]


def test_cast_to_another_dtype_stays():
    m = model([node("Cast", ["x"], ["c"], to=10), node("Relu", ["c"], ["y"])],
              {"x": (F32, [2, 3])}, {"y": (np.float16, [2, 3])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((2, 3))})
    assert not modified and ops(g) == {"Cast": 1, "Relu": 1}


def test_removed_node_that_made_a_graph_output_keeps_the_output_name():
    m = model([node("Relu", ["x"], ["r"]), node("Identity", ["r"], ["y"])], {"x": (F32, [4])}, {"y": (F32, [4])})
    _, g, _ = apply(simplify_shapes, m, {"x": random((4,))})
    assert ops(g) == {"Relu": 1} and g.nodes[0].outputs[0] is g.outputs[0] and g.outputs[0].name == "y"


def test_identity_of_a_graph_input_that_is_a_graph_output_stays():
    m = model([node("Identity", ["x"], ["y"])], {"x": (F32, [4])}, {"y": (F32, [4])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((4,))})
    assert not modified and ops(g) == {"Identity": 1}


def test_dropout_whose_mask_is_read_stays():
    m = model([node("Dropout", ["x"], ["d", "mask"])], {"x": (F32, [2, 3])},
              {"d": (F32, [2, 3]), "mask": (np.bool_, [2, 3])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((2, 3))})
    assert not modified and ops(g) == {"Dropout": 1}


def test_reshape_chain_becomes_one_reshape():
    m = model([node("Flatten", ["x"], ["f"], axis=1), node("Reshape", ["f", "s1"], ["r"]),
               node("Reshape", ["r", "s2"], ["y"])],
              {"x": (F32, [2, 3, 4])}, {"y": (F32, [4, 6])}, {"s1": _shape(6, 4), "s2": _shape(4, -1)})
    before, g, modified = apply(simplify_shapes, m, {"x": random((2, 3, 4))})
    last = g.nodes[-1]
    assert modified and last.op == "Reshape" and last.inputs[0] is g.inputs[0]


def test_reshape_with_zero_dims_reads_past_the_inner_view_with_the_static_shape():
    m = model([node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
              {"x": (F32, [2, 3, 4])}, {"y": (F32, [6, 2, 2])}, {"s1": _shape(6, 4), "s2": _shape(0, 2, 2)})
    _, g, _ = apply(simplify_shapes, m, {"x": random((2, 3, 4))})
    last = g.nodes[-1]
    assert last.inputs[0] is g.inputs[0] and last.inputs[1].const.tolist() == [6, 2, 2]


def test_reshape_chain_over_a_symbolic_batch():
    m = model([node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
              {"x": (F32, ["N", 3, 4])}, {"y": (F32, ["N", 3, 4])},
              {"s1": _shape(-1, 12), "s2": _shape(-1, 3, 4)})
    _, g, _ = apply(simplify_shapes, m, {"x": random((2, 3, 4))})
    assert g.nodes[-1].op == "Reshape"


@pytest.mark.parametrize("op, extra, inits", [("Reshape", ["s"], {"s": _shape(2, 3)}), ("Flatten", [], {}),
                                               ("Squeeze", [], {})], ids=["Reshape", "Flatten", "Squeeze"])
def test_view_to_the_same_static_shape_is_removed(op, extra, inits):
    m = model([node(op, ["x"] + extra, ["v"]), node("Relu", ["v"], ["y"])],
              {"x": (F32, [2, 3])}, {"y": (F32, [2, 3])}, inits)
    _, g, _ = apply(simplify_shapes, m, {"x": random((2, 3))})
    assert ops(g) == {"Relu": 1}


def test_view_that_changes_the_shape_stays():
    m = model([node("Unsqueeze", ["x", "axes"], ["v"]), node("Relu", ["v"], ["y"])],
              {"x": (F32, [2, 3])}, {"y": (F32, [2, 1, 3])}, {"axes": _shape(1)})
    _, g, modified = apply(simplify_shapes, m, {"x": random((2, 3))})
    assert not modified and ops(g) == {"Unsqueeze": 1, "Relu": 1}


@pytest.mark.parametrize("op, attrs", [("Concat", {"axis": 1}), ("Sum", {}), ("Max", {}), ("Min", {})])
def test_one_input_variadic_op_is_removed(op, attrs):
    m = model([node(op, ["x"], ["c"], **attrs), node("Relu", ["c"], ["y"])],
              {"x": (F32, [2, 3])}, {"y": (F32, [2, 3])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((2, 3))})
    assert modified and ops(g) == {"Relu": 1} and g.nodes[0].inputs[0] is g.inputs[0]


def test_two_input_concat_stays():
    m = model([node("Concat", ["x", "x"], ["c"], axis=1), node("Relu", ["c"], ["y"])],
              {"x": (F32, [2, 3])}, {"y": (F32, [2, 6])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((2, 3))})
    assert not modified and ops(g) == {"Concat": 1, "Relu": 1}


def test_identity_transpose_is_removed():
    m = model([node("Transpose", ["x"], ["t"], perm=[0, 1, 2]), node("Relu", ["t"], ["y"])],
              {"x": (F32, [2, 3, 4])}, {"y": (F32, [2, 3, 4])})
    _, g, _ = apply(simplify_shapes, m, {"x": random((2, 3, 4))})
    assert ops(g) == {"Relu": 1}


def test_transpose_chain_becomes_one_transpose():
    m = model([node("Transpose", ["x"], ["t"], perm=[1, 2, 0]), node("Transpose", ["t"], ["y"], perm=[0, 2, 1])],
              {"x": (F32, [2, 3, 4])}, {"y": (F32, [3, 2, 4])})
    _, g, _ = apply(simplify_shapes, m, {"x": random((2, 3, 4))})
    last = g.nodes[-1]
    assert last.inputs[0] is g.inputs[0] and last.attrs["perm"] == [1, 0, 2]


def test_inverse_transposes_cancel():
    m = model([node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]), node("Transpose", ["t"], ["u"], perm=[0, 3, 1, 2]),
               node("Relu", ["u"], ["y"])],
              {"x": (F32, [1, 2, 3, 4])}, {"y": (F32, [1, 2, 3, 4])})
    _, g, _ = apply(simplify_shapes, m, {"x": random((1, 2, 3, 4))})
    assert ops(g)["Transpose"] <= 1 and g.nodes[-1].inputs[0] is g.inputs[0]


def test_fp16_chain():
    f16 = np.float16
    m = model([node("Transpose", ["x"], ["t"], perm=[1, 0]), node("Identity", ["t"], ["i"]),
               node("Transpose", ["i"], ["u"], perm=[1, 0]), node("Cast", ["u"], ["c"], to=10),
               node("Relu", ["c"], ["y"])],
              {"x": (f16, [3, 5])}, {"y": (f16, [3, 5])})
    _, g, _ = apply(simplify_shapes, m, {"x": random((3, 5), f16)}, f16)
    assert [n.op for n in g.nodes] == ["Transpose", "Relu"]  # the first Transpose is dead now
    assert g.nodes[-1].inputs[0] is g.inputs[0]


def test_cast_between_a_graph_input_and_a_graph_output_stays():
    m = model([node("Cast", ["x"], ["y"], to=1)], {"x": (F32, [4])}, {"y": (F32, [4])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((4,))})
    assert not modified and ops(g) == {"Cast": 1}


def test_a_transpose_of_size_one_dims_becomes_a_reshape():
    m = model([node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), node("Relu", ["t"], ["y"])],
              {"x": (F32, [5, 1, 4])}, {"y": (F32, [1, 5, 4])})
    _, g, modified = apply(simplify_shapes, m, {"x": random((5, 1, 4))}, F32)
    assert modified and ops(g) == {"Reshape": 1, "Relu": 1}


@pytest.mark.parametrize("split", [[2, 3, 4, 5], [2, 3, 5, 4]], ids=["to_4d", "mismatch"])
def test_transpose_of_merged_batch_becomes_a_4d_transpose(split):
    """torch's dynamo exporter: K [B, H, S, D] -> Reshape [B*H, S, D] -> Transpose(0, 2, 1) ->
    Reshape [B, H, D, S] is Transpose(K, (0, 1, 3, 2)); a split that does not undo the merge stays."""
    nodes = [node("Reshape", ["x", "merged"], ["m"]), node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
             node("Reshape", ["t", "split"], ["y"])]
    proto = model(nodes, {"x": (np.float32, [2, 3, 5, 4])}, {"y": (np.float32, [2, 3, 4, 5])},
                  {"merged": np.array([6, 5, 4], np.int64), "split": np.array(split, np.int64)})
    proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value = split[2]
    proto.graph.output[0].type.tensor_type.shape.dim[3].dim_value = split[3]
    _, g, _ = apply(simplify_shapes, proto, {"x": random((2, 3, 5, 4))})
    last = g.nodes[-1]
    if split == [2, 3, 4, 5]:
        assert last.op == "Transpose" and list(last.attrs["perm"]) == [0, 1, 3, 2] and last.inputs[0].name == "x"
    else:
        assert last.op == "Reshape"


def test_merged_batch_of_a_repeated_k_splits_then_transposes():
    """The dynamo export of grouped-query attention merges [B, Hkv, g, S, D] straight into
    [B*Hkv*g, S, D]: the rewrite splits it to [B, Hkv*g, S, D] (a view of the repeat) and
    transposes that; the bypassed Reshape/Transpose are dead code (the pipeline removes them
    before fusion)."""
    nodes = [node("Reshape", ["x", "merged"], ["m"]), node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
             node("Reshape", ["t", "split"], ["y"])]
    proto = model(nodes, {"x": (np.float32, [2, 3, 2, 5, 4])}, {"y": (np.float32, [2, 6, 4, 5])},
                  {"merged": np.array([12, 5, 4], np.int64), "split": np.array([2, 6, 4, 5], np.int64)})
    _, g, _ = apply(simplify_shapes, proto, {"x": random((2, 3, 2, 5, 4))})
    g = eliminate_dead_code(g).graph
    assert [n.op for n in g.nodes] == ["Reshape", "Transpose"]
    assert g.nodes[0].inputs[0].name == "x" and g.nodes[0].outputs[0].type.shape == (2, 6, 5, 4)
    assert list(g.nodes[1].attrs["perm"]) == [0, 1, 3, 2]


def test_heads_of_a_merged_batch_become_a_4d_transpose_of_a_split():
    """nn.MultiheadAttention's heads (torch.onnx's TorchScript exporter): x [S, B, E] -> [S, B*H, D]
    -> Transpose(1, 0, 2) -> [B, H, S, D] is a split of E and one 4-D transpose, views both (the
    merge of B with H was a copy of a strided x)."""
    nodes = [node("Reshape", ["x", "merged"], ["m"]), node("Transpose", ["m"], ["t"], perm=[1, 0, 2]),
             node("Reshape", ["t", "split"], ["y"])]
    m = model(nodes, {"x": (F32, [5, 2, 12])}, {"y": (F32, [2, 3, 5, 4])},
              {"merged": np.array([5, 6, 4], np.int64), "split": np.array([2, 3, 5, 4], np.int64)})
    _, g, modified = apply(simplify_shapes, m, {"x": random((5, 2, 12))})
    g = eliminate_dead_code(g).graph
    assert modified and ops(g) == {"Reshape": 1, "Transpose": 1}
    t = next(n for n in g.nodes if n.op == "Transpose")
    assert t.attrs["perm"] == [1, 2, 0, 3] and t.inputs[0].type.shape == (5, 2, 3, 4)


def test_heads_rewrite_needs_the_heads_chain():
    """Another split of the merged dim (not [B, H, S, D] of the same B) stays as it was."""
    nodes = [node("Reshape", ["x", "merged"], ["m"]), node("Transpose", ["m"], ["t"], perm=[1, 0, 2]),
             node("Reshape", ["t", "split"], ["y"])]
    m = model(nodes, {"x": (F32, [5, 2, 12])}, {"y": (F32, [3, 2, 5, 4])},
              {"merged": np.array([5, 6, 4], np.int64), "split": np.array([3, 2, 5, 4], np.int64)})
    _, g, _ = apply(simplify_shapes, m, {"x": random((5, 2, 12))})
    assert ops(g).get("Reshape") == 2
