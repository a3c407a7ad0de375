"""Feeds at the edges (issue 8): non-contiguous, wrongly typed, NaN/Inf, empty and very large
inputs behave as onnxruntime does or raise an InputError naming the input."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import rtxjit
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def encoder():
    model = bert_encoder(hidden=8, heads=2, ffn=16)
    return model, rtxjit.InferenceSession(model, device="cpu"), demo_inputs(model, batch=2, seq=4)


def test_a_non_contiguous_torch_feed_gives_the_contiguous_result(encoder):
    model, sess, feeds = encoder
    want = sess.run(None, feeds)[0]
    strided = {k: torch.from_numpy(v.copy()).transpose(0, -1).contiguous().transpose(0, -1) for k, v in feeds.items()}
    assert not strided["hidden"].is_contiguous()
    np.testing.assert_array_equal(sess.run(None, strided)[0].numpy(), want)


@pytest.mark.parametrize("make", [lambda v: v.astype(np.float64), lambda v: v.astype(np.int32), lambda v: v.tolist()],
                         ids=["float64", "int32", "list"])
def test_a_wrongly_typed_feed_is_an_input_error_naming_it(encoder, make):
    model, sess, feeds = encoder
    with pytest.raises(rtxjit.InputError, match="input 'hidden'.*expected dtype fp32"):
        sess.run(None, {k: make(v) if k == "hidden" else v for k, v in feeds.items()})


def test_nan_and_inf_in_a_feed_land_where_onnxruntime_puts_them(encoder):
    model, sess, feeds = encoder
    bad = {k: v.copy() for k, v in feeds.items()}
    bad["hidden"][0, 1, 2] = np.nan  # spreads over batch 0 (attention mixes positions); batch 1 stays finite
    bad["hidden"][0, 3, 0] = np.inf
    got, want = sess.run(None, bad)[0], _ort(model, bad)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    assert np.isnan(got).any() and finite.any()
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("indices", [False, True], ids=["values", "with_indices"])
def test_max_pooling_keeps_a_nan_wherever_it_lies_in_the_window(indices):
    """As torch's max_pool2d and numpy's max do; onnxruntime keeps a NaN only where it comes first
    in its window (it compares ``x > max``), an accident of its loop order rtxjit does not copy."""
    from onnx import TensorProto, helper

    outs = ["y", "i"] if indices else ["y"]
    node = helper.make_node("MaxPool", ["x"], outs, kernel_shape=[2, 2], strides=[2, 2])
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT if o == "y" else TensorProto.INT64,
                                                             None) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).standard_normal((1, 2, 4, 4)).astype(np.float32)
    x[0, 0, 1, 1] = np.nan   # last in its window
    x[0, 1, 2, 2] = np.nan   # first in its window
    x[0, 1, 0, 1] = np.inf
    got = rtxjit.InferenceSession(model, device="cpu").run(None, {"x": x})
    want, where = torch.nn.functional.max_pool2d(torch.from_numpy(x), 2, return_indices=True)
    np.testing.assert_array_equal(got[0], want.numpy())  # NaN positions included
    assert np.isnan(got[0]).sum() == 2
    if indices:
        plane = np.arange(2).reshape(1, 2, 1, 1) * 16  # ONNX counts over the whole tensor, torch per plane
        np.testing.assert_array_equal(got[1], where.numpy() + plane)


@pytest.mark.parametrize("case", ["encoder_seq", "cnn_batch"])
def test_an_empty_feed_runs_when_its_profile_allows_it(case):
    if case == "encoder_seq":
        model = bert_encoder(hidden=8, heads=2, ffn=16)
        feeds = {"hidden": np.ones((2, 0, 8), np.float32), "mask": np.zeros((2, 0), np.float32)}
    else:
        model = resnet_cnn(size=8, width=4)
        feeds = {"image": np.ones((0, 3, 8, 8), np.float32)}
    profile = {k: [v.shape, tuple(max(d, 1) for d in v.shape), tuple(4 if d == 0 else d for d in v.shape)]
               for k, v in feeds.items()}
    got = rtxjit.InferenceSession(model, device="cpu", profiles=profile).run(None, feeds)[0]
    assert got.shape == _ort(model, feeds).shape and got.size == 0


def test_empty_or_huge_feeds_outside_the_default_profile_are_input_errors_naming_the_range(encoder):
    model, sess, feeds = encoder
    with pytest.raises(rtxjit.InputError, match=r"input 'hidden' shape \(2, 0, 8\).*1\.\.4096"):
        sess.run(None, {"hidden": np.ones((2, 0, 8), np.float32), "mask": np.zeros((2, 0), np.float32)})
    with pytest.raises(rtxjit.InputError, match=r"input 'hidden' shape \(1, 100000, 8\)"):
        sess.run(None, {"hidden": np.ones((1, 100000, 8), np.float32), "mask": np.zeros((1, 100000), np.float32)})


def _embedding_model():
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])],
                          [numpy_helper.from_array(table, "table")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("bad", [5, -6, 1000])
def test_an_index_out_of_range_from_a_graph_input_is_an_input_error_naming_it(bad):
    """onnxruntime raises for an embedding id outside the table; so does rtxjit, naming the input,
    the value and the node, for the fused and unfused graph alike."""
    m = _embedding_model()
    ids = np.array([[0, 1, 2, 3], [4, -5, bad, 1]], np.int64)
    with pytest.raises(Exception):
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    for optimize in (True, False):
        sess = rtxjit.InferenceSession(m, optimize=optimize)
        with pytest.raises(rtxjit.InputError, match=rf"input 'ids': index {bad} is out of range \[-5, 4\].*'embed'"):
            sess.run(None, {"ids": ids})
        ok = np.array([[0, 1, 2, 3], [4, -5, -1, 1]], np.int64)
        want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ok})
        np.testing.assert_array_equal(sess.run(None, {"ids": ok})[0], want[0])


def test_an_out_of_range_index_in_a_torch_feed_never_reads_outside_the_table():
    """Feeds already on the device are not read back for the check: the kernel masks the index."""
    m = _embedding_model()
    ids = torch.tensor([[0, 1, 2, 3], [4, 7, -9, 1]], dtype=torch.int64)
    y = rtxjit.InferenceSession(m, optimize=False).run(None, {"ids": ids})[0]
    table = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.testing.assert_array_equal(y[0].cpu().numpy(), table[[0, 1, 2, 3]])
    assert np.isfinite(y.cpu().numpy()).all()
