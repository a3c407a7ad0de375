"""Every registry op, on every sample it declares, in fp32 and fp16: rtxjit against onnxruntime
(or the float64 numpy reference where onnxruntime has no CPU kernel for the dtype)."""

import numpy as np
import pytest

import rtxjit
from rtxjit.ir.registry import Kind, all_ops
from tests.oprunner import assert_close, make_inputs, reference, run_onnxruntime, single_node_model

CASES = []
for name, opdef in sorted(all_ops().items()):
    if name.startswith("rtxjit."):
        continue
    for i, sample in enumerate(opdef.samples):
        for ft in sample.float_types:
            CASES.append(pytest.param(name, i, ft, id=f"{name}-{i}-{ft}"))


def test_every_op_has_samples_and_a_reference():
    for name, opdef in all_ops().items():
        if name.startswith("rtxjit."):
            continue  # internal ops made by fusion passes are tested with their passes
        if name != "Constant":
            assert opdef.samples, f"{name} declares no test samples"
        assert opdef.reference_fn is not None, f"{name} has no reference"
        if opdef.kind is not Kind.SHAPE:
            assert opdef.lower_fn is not None, f"{name} has no lowering"


@pytest.mark.parametrize("name,index,float_type", CASES)
def test_op_matches_onnxruntime(name, index, float_type, rng):
    opdef = all_ops()[name]
    sample = opdef.samples[index]
    arrays = make_inputs(sample, float_type, rng)
    model, feeds = single_node_model(opdef, sample, arrays)
    got = rtxjit.InferenceSession(model).run(None, feeds)
    want = run_onnxruntime(model, feeds)
    source = "onnxruntime"
    if want is None:
        want, source = reference(opdef, sample, arrays), "numpy float64"
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, np.asarray(w), float_type, f"{name} sample {index} {float_type} output {k} vs {source}")


def test_relu_keeps_nan_as_onnxruntime_does():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    x[0, 1] = x[1, 3] = np.nan
    x[1, 0] = -np.inf
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = rtxjit.InferenceSession(model, device="cpu").run(None, {"x": x})[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


@pytest.mark.parametrize("op_name", ["ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean"])
def test_a_long_reduction_over_few_rows_runs_in_two_stages_as_onnxruntime(op_name):
    """One row of 65536 elements (with a NaN in one of them, for max/min): two launches (parts,
    then the parts' results), onnxruntime's value."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.random.default_rng(5).uniform(-2, 2, (4, 8, 2048)).astype(np.float32)
    if op_name in ("ReduceMax", "ReduceMin"):
        x[2, 3, 100] = np.nan
    g = helper.make_graph([helper.make_node(op_name, ["x"], ["y"], keepdims=0)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    sess = rtxjit.InferenceSession(m)
    got = sess.run(None, {"x": x})[0]
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert sess.launches_per_inference == 2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mean", [-0.99, -2.0, -1.2, 1.5])
def test_a_long_integer_mean_truncates_the_whole_mean(mean):
    """An int64 ReduceMean over 65536 elements: the mean of the whole, truncated (onnxruntime's
    and numpy's value), not the truncated mean of truncated part means (-0.99 gave -1, -2 gave -1)."""
    from onnx import TensorProto, helper

    x = np.random.default_rng(5).integers(-1000, 1000, (4, 8, 2048)).astype(np.int64)
    x.flat[0] += int(round(mean * x.size)) - int(x.sum())
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.INT64, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [])])
    got = rtxjit.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])).run(
        None, {"x": x})[0]
    assert int(got) == int(np.trunc(x.sum() / x.size))
