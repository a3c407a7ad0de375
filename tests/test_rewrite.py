"""The graph-editing helpers of ``rtxjit.ir.rewrite``."""

import numpy as np
import pytest

from rtxjit.errors import ModelError
from rtxjit.ir.rewrite import (FreshNames, copy_graph, make_constant, make_node, remove_nodes, replace_all_uses,
                               sort_topologically, use_count)
from rtxjit.ir.verify import verify
from rtxjit.onnx.importer import import_model
from tests.passes.helpers import model, node

F32 = np.float32


def _graph():
    """x -> Relu r -> Neg n -> Exp y (output); r is also an output."""
    return import_model(model([node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["n"]), node("Exp", ["n"], ["y"])],
                              {"x": (F32, [4])}, {"y": (F32, [4]), "r": (F32, [4])}, {"c": np.ones(4, F32)}))


def test_replace_redirects_readers():
    g = _graph()
    relu, neg, exp = g.nodes
    assert replace_all_uses(g, neg.outputs[0], relu.outputs[0])
    remove_nodes(g, [neg])
    assert exp.inputs[0] is relu.outputs[0] and neg.outputs[0].producer is None
    verify(g)


def test_replacing_a_graph_output_keeps_its_value():
    g = _graph()
    relu, neg, exp = g.nodes
    y = exp.outputs[0]
    assert replace_all_uses(g, y, neg.outputs[0])
    remove_nodes(g, [exp])
    assert neg.outputs[0] is y and y.producer is neg and g.outputs[0] is y
    verify(g)


def test_graph_output_cannot_be_replaced_by_an_input_or_another_output():
    g = _graph()
    relu, _, exp = g.nodes
    assert not replace_all_uses(g, exp.outputs[0], g.inputs[0])
    assert not replace_all_uses(g, exp.outputs[0], relu.outputs[0])
    assert exp.outputs[0].producer is exp


def test_graph_output_replaced_by_a_constant_becomes_that_constant():
    g = _graph()
    exp = g.nodes[2]
    c = make_constant(FreshNames(g), "c", np.full(4, 2.0, F32))
    assert replace_all_uses(g, exp.outputs[0], c)
    remove_nodes(g, [exp])
    assert g.outputs[0].name == "y" and g.outputs[0].is_const
    verify(g)


def test_use_count_counts_graph_outputs():
    g = _graph()
    assert use_count(g, g.nodes[0].outputs[0]) == 2 and use_count(g, g.nodes[2].outputs[0]) == 1


def test_fresh_names_avoid_values_and_nodes():
    g = _graph()
    names = FreshNames(g)
    assert names("r") == "r_1" and names("r") == "r_2" and names("new") == "new"
    assert names(g.nodes[0].name) != g.nodes[0].name


def test_make_node_infers_types_and_sort_puts_it_in_place():
    g = _graph()
    names = FreshNames(g)
    add = make_node(names, "Add", [g.nodes[0].outputs[0], g.nodes[1].outputs[0]])
    g.nodes[2].inputs[0] = add.outputs[0]
    g.nodes.insert(0, add)
    sort_topologically(g)
    assert [n.op for n in g.nodes] == ["Relu", "Neg", "Add", "Exp"]
    assert add.outputs[0].type == g.inputs[0].type and add.outputs[0].producer is add
    verify(g)


def test_sort_finds_cycles():
    g = _graph()
    g.nodes[0].inputs[0] = g.nodes[2].outputs[0]
    with pytest.raises(ModelError, match="cycle"):
        sort_topologically(g)


def test_copy_graph_is_independent_but_shares_constant_data():
    g = import_model(model([node("Add", ["x", "c"], ["y"])], {"x": (F32, [4])}, {"y": (F32, [4])},
                           {"c": np.ones(4, F32)}))
    h = copy_graph(g)
    assert str(h) == str(g)
    assert h.nodes[0] is not g.nodes[0] and h.nodes[0].inputs[0] is h.inputs[0]
    assert h.nodes[0].outputs[0].producer is h.nodes[0] and h.outputs[0] is h.nodes[0].outputs[0]
    assert h.nodes[0].inputs[1].const is g.nodes[0].inputs[1].const
