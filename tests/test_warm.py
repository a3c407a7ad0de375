"""A warm start: the runtime cache records the optimized graph of a model file, and a later
session over the same file and options reads it instead of importing and optimizing again."""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import onnx
import pytest

import rtxjit
from rtxjit.jit import warm
from rtxjit.models import bert_encoder, demo_inputs


def _written(tmp_path, seed: int = 0) -> tuple:
    model = bert_encoder(seed=seed)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return model, path


def _join_writers() -> None:
    for thread in threading.enumerate():
        if thread.name == "rtxjit-cache-writer":
            thread.join()


def _session(path, cache, **kw):
    sess = rtxjit.InferenceSession(str(path), device="cpu", runtime_cache=cache, **kw)
    _join_writers()
    return sess


def test_a_second_session_reads_the_optimized_graph_from_the_cache(tmp_path, monkeypatch):
    model, path = _written(tmp_path)
    feeds = demo_inputs(model, batch=2, seq=8)
    cold = _session(path, tmp_path / "cache")
    expected = cold.run(None, feeds)[0]
    import rtxjit.onnx.importer as importer

    monkeypatch.setattr(importer, "import_model", lambda *a, **k: pytest.fail("imported again"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = _session(path, tmp_path / "cache")
    assert str(again.graph) == str(cold.graph)
    assert again._model_key == cold._model_key  # the shape histogram stays the model's
    np.testing.assert_array_equal(again.run(None, feeds)[0], expected)


def test_a_changed_model_file_or_other_options_are_not_served_from_the_record(tmp_path):
    model, path = _written(tmp_path)
    cache = tmp_path / "cache"
    _session(path, cache)
    entries = len(os.listdir(cache))
    # other options: a record of their own
    _session(path, cache, precision="fp16")
    assert len(os.listdir(cache)) > entries
    # the file rewritten with other weights: imported again, never the stale graph
    changed = onnx.load(path)
    init = changed.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init) + np.float32(0.5)
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)),
                                               init.name))
    onnx.save(changed, path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    feeds = demo_inputs(model, batch=2, seq=8)
    fresh = rtxjit.InferenceSession(changed, device="cpu")
    np.testing.assert_array_equal(_session(path, cache).run(None, feeds)[0], fresh.run(None, feeds)[0])


def test_a_corrupt_graph_record_is_rebuilt_with_a_warning(tmp_path):
    model, path = _written(tmp_path)
    cache = tmp_path / "cache"
    feeds = demo_inputs(model, batch=2, seq=8)
    expected = _session(path, cache).run(None, feeds)[0]
    blobs = sorted((cache).glob("*.a0.*.bin"))
    assert blobs, "the graph's arrays are stored as blobs"
    data = bytearray(blobs[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    blobs[0].write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="sha256"):
        again = _session(path, cache)
    np.testing.assert_array_equal(again.run(None, feeds)[0], expected)
    with warnings.catch_warnings():  # rebuilt by that session: intact again
        warnings.simplefilter("error", RuntimeWarning)
        np.testing.assert_array_equal(_session(path, cache).run(None, feeds)[0], expected)


def test_model_identity_is_a_files_stat_or_the_bytes_hash(tmp_path):
    _, path = _written(tmp_path)
    ident = warm.model_identity(path)
    assert ident["size"] == path.stat().st_size and ident["path"] == str(path.resolve())
    assert warm.model_identity(path.read_bytes())["sha256"]
    assert warm.model_identity(onnx.load(path)) is None and warm.model_identity(tmp_path / "missing.onnx") is None
