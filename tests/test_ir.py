"""IR: types, broadcasting with symbols, the text form, the verifier, import from files."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import rtxjit
from rtxjit.errors import ModelError
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.types import DType, TensorType, broadcast_shapes
from rtxjit.ir.verify import verify
from rtxjit.onnx.importer import import_model
from rtxjit.models import bert_encoder, demo_inputs


def test_broadcast_with_symbols():
    assert broadcast_shapes((2, 1, 4), (3, 1)) == (2, 3, 4)
    assert broadcast_shapes(("N", 1), (1, 5)) == ("N", 5)
    assert broadcast_shapes(("N", 4), ("N", 1)) == ("N", 4)
    with pytest.raises(ValueError):
        broadcast_shapes((2, 3), (4, 3))


def test_dtypes_round_trip_onnx_codes():
    for d in DType:
        assert DType.from_onnx(d.onnx_code) is d
    assert DType.from_numpy(np.float16) is DType.FP16


def test_text_form_names_ops_types_and_symbols():
    graph = import_model(bert_encoder())
    text = str(graph)
    assert text.startswith("graph bert_encoder (opset 20) (%hidden: fp32[N,S,64], %mask: fp32[N,S])")
    assert "Softmax(" in text and "LayerNormalization(" in text and "fp32[N,4,S,S]" in text


def test_shape_ops_on_static_inputs_fold_at_import():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    graph = import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op for n in graph.nodes] == ["Reshape"] and graph.nodes[0].inputs[1].is_const


def test_verifier_rejects_use_before_definition():
    t = TensorType(DType.FP32, (2,))
    a, b = Value("a", t), Value("b", t)
    x = Value("x", t)
    graph = Graph("g", [x], [b], [Node("Relu", "n2", [a], [b]), Node("Relu", "n1", [x], [a])])
    with pytest.raises(ModelError, match="n2.*'a' is used before"):
        verify(graph)


def test_model_with_external_data_loads_from_its_path(tmp_path):
    model = bert_encoder()
    path = tmp_path / "enc.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="enc.weights", size_threshold=0)
    assert (tmp_path / "enc.weights").exists()
    feeds = demo_inputs(model, batch=1, seq=4)
    got = rtxjit.InferenceSession(str(path)).run(None, feeds)[0]
    want = rtxjit.InferenceSession(bert_encoder()).run(None, feeds)[0]  # save_model moved the weights out of `model`
    np.testing.assert_array_equal(got, want)
