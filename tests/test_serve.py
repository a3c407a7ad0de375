"""rtxjit.serve: the Open Inference Protocol's encode/decode and the replica's batching without Ray,
then ``rtxjit serve`` with 2 replicas on a local Ray instance (CPU, Triton's interpreter), spoken to
over HTTP: the same outputs as a local session, and the second replica reads the optimized graph
that the first wrote into the shared runtime cache."""

from __future__ import annotations

import importlib.util
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.ir.types import DType
from rtxjit.serve.metrics import Metrics, MetricsCollector, render_prometheus
from rtxjit.serve.oip import (HEADER_LENGTH, InferRequest, ProtocolError, decode_infer_request,
                              encode_infer_response, kserve_datatype, model_metadata)
from rtxjit.serve.server import ModelServer, ServeConfig
from rtxjit.session import NodeArg

ROOT = Path(__file__).resolve().parents[1]


def _mlp(path: Path, seed: int = 0) -> Path:
    """x [batch, 4] -> y = Relu(x W + b) [batch, 3], s = ReduceSum(y, 1) [batch, 1]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"]), helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _lookup(path: Path) -> Path:
    """ids INT64 [batch, 2] -> Gather of a [5, 3] table: an out-of-range id is an error of that request."""
    table = numpy_helper.from_array(np.arange(15, dtype=np.float32).reshape(5, 3) / 4, "table")
    node = helper.make_node("Gather", ["table", "ids"], ["e"], axis=0)
    graph = helper.make_graph([node], "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", 2, 3])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _centered(path: Path) -> Path:
    """y = x - mean(x, axis 0): rows interact, so requests must not be concatenated."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "m"], ["y"])]
    graph = helper.make_graph(nodes, "centered", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


X = NodeArg("x", ["batch", 4], "tensor(float)", DType.FP32)
IDS = NodeArg("ids", ["batch", 2], "tensor(int64)", DType.INT64)
MASK = NodeArg("mask", [2], "tensor(bool)", DType.BOOL)
HALF = NodeArg("h", [2], "tensor(float16)", DType.FP16)
Y = NodeArg("y", ["batch", 3], "tensor(float)", DType.FP32)


def _body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": [dict(zip(("name", "shape", "datatype", "data"), i)) for i in inputs], **extra}).encode()


# --- the protocol, without Ray ------------------------------------------------------------------

def test_metadata_uses_kserve_datatypes_and_minus_one_for_dynamic_dims():
    meta = model_metadata("m", [X, IDS, HALF, MASK], [Y])
    assert meta["name"] == "m" and meta["platform"] == "rtxjit"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "ids", "datatype": "INT64", "shape": [-1, 2]},
                              {"name": "h", "datatype": "FP16", "shape": [2]},
                              {"name": "mask", "datatype": "BOOL", "shape": [2]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    with pytest.raises(ProtocolError, match="input 'q' has type fp8e4m3"):
        kserve_datatype(DType.FP8E4M3, "input 'q'")


def test_decode_reads_flat_and_nested_data_of_each_type():
    req = decode_infer_request(_body(("x", [2, 4], "FP32", list(range(8))), ("ids", [2, 2], "INT64", [[0, 1], [2, 3]]),
                                     ("h", [2], "FP16", [0.5, -1]), ("mask", [2], "BOOL", [True, False]), id="r1"),
                               [X, IDS, HALF, MASK], [Y])
    assert req.id == "r1" and req.outputs is None and req.rows == 2
    assert list(req.feeds) == ["x", "ids", "h", "mask"]
    np.testing.assert_array_equal(req.feeds["x"], np.arange(8, dtype=np.float32).reshape(2, 4))
    assert req.feeds["x"].dtype == np.float32 and req.feeds["ids"].dtype == np.int64
    assert req.feeds["h"].dtype == np.float16 and req.feeds["mask"].tolist() == [True, False]
    bf16 = NodeArg("b", [1], "tensor(bfloat16)", DType.BF16)
    assert decode_infer_request(_body(("b", [1], "BF16", [1.5])), [bf16], []).feeds["b"].dtype == torch.bfloat16


@pytest.mark.parametrize("inputs, outputs, message", [
    ([("z", [1, 4], "FP32", [1, 2, 3, 4])], None, "unknown input 'z'"),
    ([("x", [1, 4], "FP64", [1, 2, 3, 4])], None, "input 'x': datatype 'FP64', the model expects FP32"),
    ([("x", [2, 4], "FP32", [1, 2, 3])], None, "input 'x': its shape holds 8 values, 'data' has 3"),
    ([("x", [1, -4], "FP32", [])], None, "input 'x': shape must be a list of integers >= 0"),
    ([("x", [1, 4], "FP32", ["a", "b", "c", "d"])], None, "input 'x': FP32 data must be numbers, got string"),
    ([("x", [1, 4], "FP32", [[1, 2], [3]])], None, "input 'x': 'data' is not a flat"),
    ([("x", [1, 4], "FP32", [1, 2, 3, 4]), ("ids", [1, 2], "INT64", [0.5, 1])], None,
     "input 'ids': INT64 data must be integers, got floating-point"),
    ([("x", [1, 4], "FP32", [1, 2, 3, 4])], None, "missing input 'ids'"),
    ([("x", [1, 4], "FP32", [1, 2, 3, 4]), ("ids", [1, 2], "INT64", [0, 1])], [{"name": "w"}], "unknown output 'w'"),
    ([("x", [1, 4], "FP32", [1, 2, 3, 4]), ("x", [1, 4], "FP32", [1, 2, 3, 4])], None, "input 'x' is given twice"),
])
def test_bad_requests_are_400_naming_the_input(inputs, outputs, message):
    extra = {} if outputs is None else {"outputs": outputs}
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        decode_infer_request(_body(*inputs, **extra), [X, IDS], [Y])
    assert info.value.status == 400


def test_integer_ranges_and_booleans_are_checked():
    u8 = NodeArg("p", [2], "tensor(uint8)", DType.UINT8)
    with pytest.raises(ProtocolError, match=r"input 'p': value 300 is out of the range of UINT8 \[0, 255\]"):
        decode_infer_request(_body(("p", [2], "UINT8", [1, 300])), [u8], [])
    with pytest.raises(ProtocolError, match=r"input 'p': value -1 is out of the range of UINT8"):
        decode_infer_request(_body(("p", [2], "UINT8", [-1, 3])), [u8], [])
    with pytest.raises(ProtocolError, match="input 'mask': BOOL data must be true/false"):
        decode_infer_request(_body(("mask", [2], "BOOL", [1, 0])), [MASK], [])
    for bad in (b"not json", b"[1, 2]", b"{}"):
        with pytest.raises(ProtocolError):
            decode_infer_request(bad, [X], [Y])


def test_binary_extension_round_trip():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    ids = np.array([[4, 0], [1, 2]], dtype=np.int64)
    header = json.dumps({"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
        {"name": "ids", "shape": [2, 2], "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    req = decode_infer_request(header + x.tobytes() + ids.tobytes(), [X, IDS], [Y], header_length=len(header))
    np.testing.assert_array_equal(req.feeds["x"], x)
    np.testing.assert_array_equal(req.feeds["ids"], ids)
    assert req.outputs == ["y"] and req.binary == {"y"}
    with pytest.raises(ProtocolError, match="input 'x': its shape holds 8 values of 4 bytes, binary_data_size is 28"):
        bad = header.replace(b'"binary_data_size": 32', b'"binary_data_size": 28')
        decode_infer_request(bad + x.tobytes()[:28] + ids.tobytes(), [X, IDS], [Y], header_length=len(bad))
    y = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    body, headers = encode_infer_response("m", req, [("y", DType.FP32, y)])
    n = int(headers[HEADER_LENGTH])
    doc = json.loads(body[:n])
    assert doc["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}]
    np.testing.assert_array_equal(np.frombuffer(body[n:], dtype="<f4").reshape(2, 3), y)


def test_encode_json_response():
    req = InferRequest({}, id="7")
    body, headers = encode_infer_response("m", req, [("y", DType.FP32, np.array([[1.5, -2.0]], dtype=np.float32)),
                                                     ("b", DType.BOOL, np.array([True, False])),
                                                     ("h", DType.BF16, torch.tensor([0.5], dtype=torch.bfloat16))])
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"model_name": "m", "model_version": "1", "id": "7", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2.0]},
        {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "h", "datatype": "BF16", "shape": [1], "data": [0.5]}]}


def test_prometheus_text_has_a_series_per_replica():
    collector = MetricsCollector()
    for replica, n in (("a", 2), ("b", 1)):
        m = Metrics("mlp", replica)
        for _ in range(n):
            m.request(0.003, ok=True)
        m.request(0.2, ok=False)
        m.batch(n)
        m.session_stats = {"compiles": 3, "cache_hits": 0, "graph_from_cache": int(replica == "b")}
        collector.report(m.snapshot())
    text = collector.render()
    assert text == render_prometheus(collector.snapshots())
    lines = text.splitlines()
    assert '# TYPE rtxjit_requests_total counter' in lines
    assert 'rtxjit_requests_total{model="mlp",replica="a",status="success"} 2' in lines
    assert 'rtxjit_requests_total{model="mlp",replica="b",status="failure"} 1' in lines
    assert 'rtxjit_request_duration_seconds_bucket{model="mlp",replica="a",le="0.0025"} 0' in lines
    assert 'rtxjit_request_duration_seconds_bucket{model="mlp",replica="a",le="0.005"} 2' in lines
    assert 'rtxjit_request_duration_seconds_bucket{model="mlp",replica="a",le="+Inf"} 3' in lines
    assert 'rtxjit_request_duration_seconds_count{model="mlp",replica="a"} 3' in lines
    assert 'rtxjit_graph_from_cache{model="mlp",replica="b"} 1' in lines
    assert all(line.startswith("#") or len(line.rsplit(" ", 1)) == 2 for line in lines)


# --- one replica's model, without Ray -----------------------------------------------------------

def _request(feeds: dict, outputs=None) -> InferRequest:
    return InferRequest(dict(feeds), outputs)


def test_concurrent_requests_are_concatenated_and_split_back(tmp_path, rng):
    server = ModelServer(ServeConfig(str(_mlp(tmp_path / "mlp.onnx"))))
    assert server.batch_symbol == "batch", server.no_batch_reason
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 3, 2)]
    requests = [_request({"x": x}) for x in xs] + [_request({"x": xs[0]}, outputs=["s"])]
    results = server.run_batch(requests)
    assert server.metrics.snapshot()["batches"] == 1 and server.metrics.snapshot()["batched"] == 4
    reference = rtxjit.InferenceSession(str(tmp_path / "mlp.onnx"))
    for x, result in zip(xs, results):
        y, s = reference.run(None, {"x": x})
        assert [(n, d) for n, d, _ in result] == [("y", DType.FP32), ("s", DType.FP32)]
        np.testing.assert_allclose(result[0][2], y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result[1][2], s, rtol=1e-5, atol=1e-6)
    assert [n for n, _, _ in results[3]] == ["s"]


def test_a_bad_request_in_a_batch_gets_its_own_error(tmp_path):
    server = ModelServer(ServeConfig(str(_lookup(tmp_path / "lookup.onnx"))))
    assert server.batch_symbol == "batch"
    good = np.array([[0, 4]], dtype=np.int64)
    results = server.run_batch([_request({"ids": good}), _request({"ids": np.array([[1, 7]], dtype=np.int64)})])
    assert isinstance(results[1], ProtocolError) and results[1].status == 400
    assert "input 'ids': index 7 is out of range" in str(results[1])
    np.testing.assert_array_equal(results[0][0][2], (np.arange(15, dtype=np.float32).reshape(5, 3) / 4)[good])


def test_rows_that_interact_are_never_concatenated(tmp_path):
    server = ModelServer(ServeConfig(str(_centered(tmp_path / "centered.onnx"))))
    assert server.batch_symbol is None and "rows are not independent: output 'y'" in server.no_batch_reason
    a, b = np.ones((1, 3), np.float32), np.full((2, 3), 5, np.float32)
    results = server.run_batch([_request({"x": a}), _request({"x": b})])
    np.testing.assert_array_equal(results[0][0][2], np.zeros((1, 3), np.float32))
    assert ModelServer(ServeConfig(str(tmp_path / "centered.onnx"), max_batch=1)).batch_symbol is None


def test_a_later_replica_reads_the_graph_and_warms_up_the_recorded_shapes(tmp_path):
    cache = tmp_path / "cache"
    config = ServeConfig(str(_mlp(tmp_path / "mlp.onnx")), runtime_cache=str(cache))
    first = ModelServer(config, "first")
    assert not first.session.graph_from_cache and first.warmed == 0
    first.run_batch([_request({"x": np.ones((5, 4), np.float32)})])
    second = ModelServer(config, "second")
    stats = second.metrics.snapshot()
    assert stats["graph_from_cache"] == 1 and stats["warmup_bindings"] >= 1
    assert any(s == {"x": (5, 4)} for s, _ in second.session.recorded_shapes())


# --- rtxjit serve on a local Ray instance -------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: bytes = None, timeout: float = 60) -> tuple:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _metric(text: str, family: str) -> dict:
    """replica -> value of ``family`` (one series per replica)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line[len(family) + 1:].rsplit("} ", 1)
            replica = labels.split('replica="')[1].split('"')[0]
            out[replica] = float(value)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rtxjit_serve_two_replicas_share_the_runtime_cache(tmp_path, rng, device):
    if importlib.util.find_spec("ray") is None:  # not imported here: the server runs in a process of its own
        pytest.skip("rtxjit serve needs the 'serve' extra (ray[serve])")
    model = _mlp(tmp_path / "mlp.onnx", seed=3)
    cache = tmp_path / "cache"
    # the shapes a replica warms up with: recorded by a session given the model's bytes, so the
    # replicas (given its path) still import and optimize it once, and the second reads the first's
    reference = rtxjit.InferenceSession(model.read_bytes(), runtime_cache=str(cache))
    reference.run(None, {"x": np.ones((2, 4), np.float32)})
    reference.flush_runtime_cache(60)
    reference.wait_for_specialization(120)
    tolerance = 1e-5 if device == reference.device.kind == "cpu" else 1e-3  # tf32 on a GPU
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("RTXJIT_DEVICE", "TRITON_INTERPRET")}
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if device == "cpu":
        env.update(RTXJIT_DEVICE="cpu", TRITON_INTERPRET="1")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "rtxjit", "serve", "--onnx", str(model), "--replicas", "2",
                             "--port", str(port), "--runtime-cache", str(cache), "--device", device,
                             "--address", "local", "--num-cpus", "2", "--max-batch", "4",
                             "--cpus-per-replica", "1" if device == "cpu" else "0.5", "--gpus-per-replica",
                             "0" if device == "cpu" else "0.5"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "rtxjit serve: ready" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(0.5)
        # the replicas started one after the other: exactly one imported and optimized the model,
        # the other read the optimized graph from the shared runtime cache (and on a GPU compiled
        # nothing: the kernels and variants were there too); both warmed up with x: 2x4
        text = _http(base + "/metrics")[1].decode()
        from_cache = _metric(text, "rtxjit_graph_from_cache")
        assert sorted(from_cache.values()) == [0.0, 1.0], text
        assert min(_metric(text, "rtxjit_warmup_bindings").values()) >= 1, text
        if device == "cuda":
            later = next(r for r, v in from_cache.items() if v == 1.0)
            assert _metric(text, "rtxjit_compiles_total")[later] == 0, text
        assert _http(base + "/v2/health/live") == (200, b'{"live": true}')
        assert _http(base + "/v2/health/ready") == (200, b'{"ready": true}')
        status, meta = _http(base + "/v2/models/mlp")
        assert status == 200 and json.loads(meta)["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert json.loads(_http(base + "/v2/models/mlp/ready")[1]) == {"name": "mlp", "ready": True}

        xs = [rng.standard_normal((int(n), 4)).astype(np.float32) for n in rng.integers(1, 4, size=16)]

        def infer(i):
            body = {"id": str(i), "inputs": [{"name": "x", "shape": list(xs[i].shape), "datatype": "FP32",
                                              "data": xs[i].reshape(-1).tolist()}]}
            return _http(base + "/v2/models/mlp/infer", json.dumps(body).encode())

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(infer, range(len(xs))))
        for i, (status, body) in enumerate(answers):
            assert status == 200, body
            doc = json.loads(body)
            assert doc["id"] == str(i) and doc["model_name"] == "mlp"
            for out, want in zip(doc["outputs"], reference.run(None, {"x": xs[i]})):
                assert out["datatype"] == "FP32" and out["shape"] == list(want.shape)
                np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(want.shape), want,
                                           rtol=tolerance, atol=tolerance)
        status, body = _http(base + "/v2/models/mlp/infer", _body(("x", [1, 4], "INT64", [1, 2, 3, 4])))
        assert status == 400 and "input 'x'" in json.loads(body)["error"]
        assert _http(base + "/v2/models/other")[0] == 404

        deadline = time.monotonic() + 60
        while True:  # a replica sends its counters a moment after its last request
            status, text = _http(base + "/metrics")
            text = text.decode()
            ok = _metric(text, "rtxjit_request_duration_seconds_count")
            if status == 200 and sum(ok.values()) == len(xs) + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert sum(ok.values()) == len(xs) + 1, text
        assert sum(_metric(text, "rtxjit_batched_requests_total").values()) == len(xs)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-4000:]
    assert "rtxjit serve: stopping" in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--onnx", "missing.onnx"], "model file '.*missing.onnx' does not exist"),
    (["--onnx", "{model}", "--replicas", "0"], "--replicas must be at least 1, got 0"),
    (["--onnx", "{model}", "--max-batch", "0"], "max_batch must be an integer >= 1, got 0"),
])
def test_serve_arguments_are_checked_before_ray_starts(tmp_path, capsys, argv, message):
    from rtxjit.cli import main

    model = _mlp(tmp_path / "mlp.onnx")
    assert main(["serve", *(a.format(model=model) for a in argv)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rtxjit: error: ") and re.search(message, err), err
