"""Views in plans: Transpose, Slice, Expand and constant-index Gather run no kernel; readers address
them through strides and get the same numbers as onnxruntime."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from tests.oprunner import run_onnxruntime


def _model(nodes, x_shape, y_shape, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # readable by older onnxruntime builds too
    return m


def test_gather_of_a_constant_index_of_a_transpose_is_a_view():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Gather", ["t", "i"], ["g"], axis=0), helper.make_node("Relu", ["g"], ["y"])]
    m = _model(nodes, [3, 4, 5], [3, 5], [numpy_helper.from_array(np.array(-2, np.int64), "i")])
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    sess = rtxjit.InferenceSession(m)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], run_onnxruntime(m, {"x": x})[0])
    assert sess.last_trace["Transpose_0"] == ["alias"] and sess.last_trace["Gather_1"] == ["alias"]


def test_a_reshape_no_view_can_express_copies_once():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["t", "s"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    m = _model(nodes, [2, 3, 4], [2, 12], [numpy_helper.from_array(np.array([2, 12], np.int64), "s")])
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    sess = rtxjit.InferenceSession(m)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], run_onnxruntime(m, {"x": x})[0], rtol=1e-5)
    assert len(sess.last_trace["Reshape_1"]) == 1 and sess.last_trace["Transpose_0"] == ["alias"]
