"""Small ONNX models built in the tests, and the check every pass test makes: the rewritten graph
is valid and computes what the original computes (and what onnxruntime computes)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from onnx import helper, numpy_helper

from rtxjit.ir.rewrite import copy_graph
from rtxjit.ir.types import DType
from rtxjit.ir.verify import verify
from rtxjit.onnx.importer import import_model
from rtxjit.session import InferenceSession
from tests.oprunner import rel_error, run_onnxruntime

TOL = {np.float32: 1e-4, np.float16: 1e-2}


def model(nodes: list, inputs: dict, outputs: dict, inits: dict = None, opset: int = 17):
    """``inputs`` / ``outputs``: name -> (numpy dtype, shape); ``inits``: name -> array."""
    def infos(d):
        return [helper.make_tensor_value_info(n, DType.from_numpy(dt).onnx_code, s) for n, (dt, s) in d.items()]

    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()]
    graph = helper.make_graph(nodes, "test", infos(inputs), infos(outputs), inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def node(op: str, inputs: list, outputs: list, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0] + "_node", **attrs)


def random(shape, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Uniform in [-2, 2], never near zero."""
    a = np.random.default_rng(seed).uniform(-2, 2, size=shape)
    return np.where(np.abs(a) < 1e-2, 0.5, a).astype(dtype)


def ops(graph) -> Counter:
    return Counter(n.op for n in graph.nodes)


def run(graph, feeds: dict) -> list:
    return InferenceSession(graph, optimize=False).run(None, feeds)


def apply(pass_fn, proto, feeds: dict, dtype=np.float32, onnxruntime: bool = True):
    """Run ``pass_fn`` on the imported model; check the result verifies and matches the original
    graph (and onnxruntime) on ``feeds``. Returns (original graph, rewritten graph, modified)."""
    before = import_model(proto)
    result = pass_fn(copy_graph(before))
    verify(result.graph)
    assert [v.name for v in result.graph.outputs] == [v.name for v in before.outputs]
    got = run(result.graph, feeds)
    wants = [run(before, feeds)]
    if onnxruntime:
        wants.append(run_onnxruntime(proto, feeds))
        assert wants[-1] is not None, "onnxruntime could not run the model"
    for want in wants:
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_error(g, w) <= TOL[dtype], rel_error(g, w)
    return before, result.graph, result.modified
