"""Bad input gets a clear error that names what is wrong."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import rtxjit
from rtxjit.errors import InputError, ModelError, UnsupportedOpError


def _model(op="Relu", opset=17, **attrs):
    node = helper.make_node(op, ["x"], ["y"], name="the_node", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def session():
    return rtxjit.InferenceSession(_model())


def test_unsupported_op_names_node_op_and_opset():
    with pytest.raises(UnsupportedOpError) as e:
        rtxjit.InferenceSession(_model("Hardmax"))
    assert "the_node" in str(e.value) and "Hardmax" in str(e.value) and "opset 17" in str(e.value)


def test_unsupported_attribute_names_it():
    with pytest.raises(UnsupportedOpError, match="attribute 'bogus'.*Relu"):
        rtxjit.InferenceSession(_model(bogus=3))


def test_foreign_domain_is_unsupported():
    m = _model()
    m.graph.node[0].domain = "com.example"
    with pytest.raises(UnsupportedOpError, match="com.example"):
        rtxjit.InferenceSession(m)


def test_truncated_model_file_names_the_file(tmp_path):
    data = _model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.onnx"):
        rtxjit.InferenceSession(str(path))


def test_garbage_and_missing_files(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\xff not a model at all \x13\x37" * 8)
    with pytest.raises(ModelError, match="garbage.onnx"):
        rtxjit.InferenceSession(str(path))
    with pytest.raises(ModelError, match="nowhere.onnx"):
        rtxjit.InferenceSession(str(tmp_path / "nowhere.onnx"))


def test_dangling_input_and_cycle_are_model_errors():
    m = _model()
    m.graph.node[0].input[0] = "ghost"
    with pytest.raises(ModelError, match="ghost"):
        rtxjit.InferenceSession(m)
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    with pytest.raises(ModelError, match="cycle"):
        rtxjit.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_old_opset_is_rejected():
    with pytest.raises(UnsupportedOpError, match="opset 9"):
        rtxjit.InferenceSession(_model(opset=9))


def test_unknown_input_name(session):
    with pytest.raises(InputError, match="unknown input 'z'"):
        session.run(None, {"x": np.ones((2, 4), np.float32), "z": np.ones(1)})


def test_missing_input(session):
    with pytest.raises(InputError, match="missing input 'x'"):
        session.run(None, {})


def test_wrong_dtype(session):
    with pytest.raises(InputError, match="'x'.*expected dtype fp32, got fp64"):
        session.run(None, {"x": np.ones((2, 4), np.float64)})


def test_wrong_rank(session):
    with pytest.raises(InputError, match="'x'.*expected rank 2"):
        session.run(None, {"x": np.ones((2, 4, 1), np.float32)})


def test_wrong_static_dim(session):
    with pytest.raises(InputError, match="'x': dim 1 must be 4, got 5"):
        session.run(None, {"x": np.ones((2, 5), np.float32)})


def test_unknown_output_name(session):
    with pytest.raises(InputError, match="unknown output 'nope'"):
        session.run(["nope"], {"x": np.ones((2, 4), np.float32)})


def test_errors_share_one_base_class():
    for cls in (InputError, ModelError, UnsupportedOpError):
        assert issubclass(cls, rtxjit.RtxjitError)
