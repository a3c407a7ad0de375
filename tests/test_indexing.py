"""Index semantics of the gather/scatter ops (rtxjit/ops/indexing.py, Gather in ops/movement.py)
beyond the registry samples: out-of-range indices are masked (never read or written outside a
tensor), strided (Expand-ed) index tensors, deterministic scatters with duplicate indices, and
which kernels Einsum's common equations run on."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.ir.registry import all_ops


def _model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _vi(name, code, shape):
    return helper.make_tensor_value_info(name, code, shape)


def _index_from_input(name="i"):
    """The index is computed in the graph (``i + 0``), not fed straight from a graph input."""
    zero = numpy_helper.from_array(np.zeros((), np.int64), "zero")
    return helper.make_node("Add", [name, "zero"], ["idx"]), zero


@pytest.mark.parametrize("axis", [0, 1])
def test_gather_out_of_range_index_reads_nothing_and_gives_zero(axis):
    data = np.arange(1, 21, dtype=np.float32).reshape(5, 4) + 100
    idx = np.array([0, 9, -9, 2, 1000000, -1], np.int64)
    add, zero = _index_from_input()
    out_shape = [6, 4] if axis == 0 else [5, 6]
    m = _model([add, helper.make_node("Gather", ["x", "idx"], ["y"], axis=axis)],
               [_vi("x", TensorProto.FLOAT, [5, 4]), _vi("i", TensorProto.INT64, [6])],
               [_vi("y", TensorProto.FLOAT, out_shape)], [zero])
    got = rtxjit.InferenceSession(m).run(None, {"x": data, "i": idx})[0]
    n = data.shape[axis]
    want = np.take(data, np.clip(np.where(idx < 0, idx + n, idx), 0, n - 1), axis=axis)
    bad = (idx >= n) | (idx < -n)
    sel = (slice(None),) * axis + (bad,)
    want[sel] = 0
    np.testing.assert_array_equal(got, want)


def test_gather_constant_out_of_range_index_is_not_a_view():
    idx = numpy_helper.from_array(np.array(7, np.int64), "idx")
    m = _model([helper.make_node("Gather", ["x", "idx"], ["y"])], [_vi("x", TensorProto.FLOAT, [3, 4])],
               [_vi("y", TensorProto.FLOAT, [4])], [idx])
    got = rtxjit.InferenceSession(m).run(None, {"x": np.ones((3, 4), np.float32)})[0]
    np.testing.assert_array_equal(got, np.zeros(4, np.float32))


def test_gather_nd_and_elements_mask_out_of_range():
    data = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    add, zero = _index_from_input()
    m = _model([add, helper.make_node("GatherND", ["x", "idx"], ["y"])],
               [_vi("x", TensorProto.FLOAT, [3, 4]), _vi("i", TensorProto.INT64, [4, 2])],
               [_vi("y", TensorProto.FLOAT, [4])], [zero])
    idx = np.array([[0, 1], [3, 0], [-1, -1], [2, -5]], np.int64)
    got = rtxjit.InferenceSession(m).run(None, {"x": data, "i": idx})[0]
    np.testing.assert_array_equal(got, [data[0, 1], 0, data[2, 3], 0])

    m = _model([add, helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1)],
               [_vi("x", TensorProto.FLOAT, [3, 4]), _vi("i", TensorProto.INT64, [3, 2])],
               [_vi("y", TensorProto.FLOAT, [3, 2])], [zero])
    idx = np.array([[0, 4], [-5, -4], [3, 99]], np.int64)
    got = rtxjit.InferenceSession(m).run(None, {"x": data, "i": idx})[0]
    np.testing.assert_array_equal(got, [[data[0, 0], 0], [0, data[1, 0]], [data[2, 3], 0]])


@pytest.mark.parametrize("op", ["ScatterND", "ScatterElements"])
def test_scatter_out_of_range_update_is_skipped(op):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    add, zero = _index_from_input()
    if op == "ScatterND":
        idx, upd = np.array([[1], [5], [-4]], np.int64), np.full((3, 4), -1, np.float32)
        want = data.copy()
        want[1] = -1
    else:
        idx, upd = np.array([[0, 9, -5, 3]], np.int64), np.full((1, 4), -1, np.float32)
        want = data.copy()
        want[0, 0] = want[0, 3] = -1
    node = helper.make_node(op, ["x", "idx", "u"], ["y"], **({"axis": 1} if op == "ScatterElements" else {}))
    inputs = [_vi("x", TensorProto.FLOAT, [3, 4]), _vi("i", TensorProto.INT64, list(idx.shape)),
              _vi("u", TensorProto.FLOAT, list(upd.shape))]
    m = _model([add, node], inputs, [_vi("y", TensorProto.FLOAT, [3, 4])], [zero])
    got = rtxjit.InferenceSession(m).run(None, {"x": data, "i": idx, "u": upd})[0]
    np.testing.assert_array_equal(got, want)


def test_gather_nd_with_an_expanded_index_tensor():
    """The dynamo exporter's attention-mask pattern: an index built in the graph and Expand-ed
    (batch stride 0), read in place by the GatherND kernel."""
    b, s = 3, 6
    j = np.broadcast_to(np.arange(s)[None, None, :, None], (1, s, s, 1)).astype(np.int64).copy()
    inits = [numpy_helper.from_array(j, "j"), numpy_helper.from_array(np.array([b, s, s, 1], np.int64), "shape")]
    nodes = [helper.make_node("Expand", ["j", "shape"], ["idx"]),
             helper.make_node("GatherND", ["x", "idx"], ["y"], batch_dims=1)]
    m = _model(nodes, [_vi("x", TensorProto.INT64, [b, s])], [_vi("y", TensorProto.INT64, [b, s, s])], inits)
    x = np.random.default_rng(0).integers(0, 2, size=(b, s)).astype(np.int64)
    sess = rtxjit.InferenceSession(m)
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np.broadcast_to(x[:, None, :], (b, s, s)))
    assert sess.last_trace  # the Expand stays a view: one kernel (GatherND), no copy of the index
    kernels = [k for ks in sess.last_trace.values() for k in ks if k not in ("alias", "host")]
    assert len(kernels) == 1 and kernels[0].startswith("gather_nd"), sess.last_trace


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_nd_duplicates_are_deterministic_and_ordered(reduction, rng):
    opdef = all_ops()["ScatterND"]
    data = rng.uniform(0.5, 1.5, size=(6, 8)).astype(np.float32)
    idx = rng.integers(-6, 6, size=(40, 1)).astype(np.int64)  # many duplicates
    upd = rng.uniform(0.5, 1.5, size=(40, 8)).astype(np.float32)
    m = _model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction=reduction)],
               [_vi("x", TensorProto.FLOAT, [6, 8]), _vi("i", TensorProto.INT64, [40, 1]),
                _vi("u", TensorProto.FLOAT, [40, 8])], [_vi("y", TensorProto.FLOAT, [6, 8])])
    sess = rtxjit.InferenceSession(m)
    feeds = {"x": data, "i": idx, "u": upd}
    first, second = sess.run(None, feeds)[0], sess.run(None, feeds)[0]
    np.testing.assert_array_equal(first, second)
    want = opdef.run_reference([data, idx, upd], {"reduction": reduction}, 1)[0]
    np.testing.assert_allclose(first, want, rtol=1e-5)  # "none": the last duplicate wins, as in order


@pytest.mark.parametrize("reduction", ["none", "add", "max"])
def test_scatter_elements_duplicates_follow_the_reference(reduction, rng):
    opdef = all_ops()["ScatterElements"]
    data = rng.uniform(-1, 1, size=(3, 5)).astype(np.float32)
    idx = rng.integers(-5, 5, size=(3, 12)).astype(np.int64)
    upd = rng.uniform(-1, 1, size=(3, 12)).astype(np.float32)
    m = _model([helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=1, reduction=reduction)],
               [_vi("x", TensorProto.FLOAT, [3, 5]), _vi("i", TensorProto.INT64, [3, 12]),
                _vi("u", TensorProto.FLOAT, [3, 12])], [_vi("y", TensorProto.FLOAT, [3, 5])])
    got = rtxjit.InferenceSession(m).run(None, {"x": data, "i": idx, "u": upd})[0]
    want = opdef.run_reference([data, idx, upd], {"axis": 1, "reduction": reduction}, 1)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("equation,shapes,kernel", [
    ("bhid,bhjd->bhij", [(2, 3, 4, 5), (2, 3, 6, 5)], "matmul"),
    ("...ij,...jk->...ik", [(2, 3, 4), (4, 5)], "matmul"),
    ("bi,j->bij", [(3, 4), (5,)], "einsum"),
    ("ij->ji", [(3, 4)], None),
])
def test_einsum_common_equations_run_on_the_expected_kernel(equation, shapes, kernel, rng):
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    want = np.einsum(equation, *xs)
    names = [f"x{i}" for i in range(len(xs))]
    m = _model([helper.make_node("Einsum", names, ["y"], equation=equation)],
               [_vi(n, TensorProto.FLOAT, list(x.shape)) for n, x in zip(names, xs)],
               [_vi("y", TensorProto.FLOAT, list(want.shape))])
    sess = rtxjit.InferenceSession(m)
    got = sess.run(None, dict(zip(names, xs)))[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    trace = sess.last_trace[m.graph.node[0].name or "Einsum_0"]
    if kernel is None:
        assert trace == ["alias"], trace
    else:
        assert len(trace) == 1 and trace[0].startswith(kernel), trace
