"""The fallback kernels of other shape buckets, compiled in the background after a session's first
binding (jit/fallbacks.py, issue 17): planned for an H100 on the CPU, Triton replaced by a counting
fake (tests/test_buckets.py)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.exec import compiler
from rtxjit.ir.types import DType, TensorType
from rtxjit.jit import fallbacks
from rtxjit.jit import specializer as jit
from rtxjit.kernels.keys import GENERIC
from rtxjit.plan.plan import PlanBuilder
from rtxjit.plan.profiles import Profile
from tests.test_buckets import _FakeCompiler
from tests.test_fallback_specialization import H100

W = np.random.default_rng(190).standard_normal((2048, 64)).astype(np.float32)


def _skinny():
    """x[M, 2048] @ w[2048, 64]: planned for an H100, its fallback matmul's source changes with M's
    bucket (split-K decided on M rounded to a power of two): M <= 256, 1024 and 4096 differ."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "skinny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 2048])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 64])],
                              [numpy_helper.from_array(W, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _types(m: int) -> dict:
    return {"x": TensorType(DType.FP32, (m, 2048))}


@pytest.fixture
def fake_compiles(monkeypatch):
    fake = _FakeCompiler()
    monkeypatch.setattr(compiler, "_warm", fake)
    monkeypatch.setattr(compiler, "_warmed", {})  # as in a fresh process
    monkeypatch.setattr(compiler, "_worker_pool", lambda: None)  # compiled in the calling thread
    return fake


def _generic_keys(build, m: int) -> list:
    from types import SimpleNamespace

    owner = SimpleNamespace(plan=build(_types(m)), device=H100, kernels=None)
    return [k for _, k in compiler._keyed_items(owner, GENERIC)]


def test_the_other_buckets_fallback_kernels_are_loaded_before_their_first_request(fake_compiles):
    from rtxjit.plan import statics

    graph = rtxjit.InferenceSession(_skinny()).graph
    consts = frozenset(v.name for v in graph.constants())

    def build(types):  # a real binding: the graph's kept verdicts
        return PlanBuilder(graph, H100, consts).build(types, {})

    def probe(types):  # as the session's task plans a probe
        return PlanBuilder(graph, H100, consts, statics.of_graph(graph).detached()).build(types, {})

    first = _generic_keys(build, 64)  # the session's first binding
    verdicts = {s: dict(v) for s, v in statics.of_graph(graph).sites.items()}
    stats = jit.Stats()
    loaded = fallbacks.prewarm(graph, probe, H100, None, _types(64), None, stats)
    assert statics.of_graph(graph).sites == verdicts  # the probes demoted nothing kept
    assert _generic_keys(build, 64) == first
    assert loaded == len(fake_compiles.compiled) >= 1 and stats.compiles == loaded
    for m in (32, 256, 1024):  # within SPAN (16x) of 64: nothing left to compile at their first request
        assert all(k in compiler._warmed for k in _generic_keys(build, m))
    far = _generic_keys(build, 4096)  # 64x away (no split-K there: another source), left to its own request
    assert set(far) != set(_generic_keys(build, 64)) and not any(k in compiler._warmed for k in far)
    before = len(fake_compiles.compiled)
    assert fallbacks.prewarm(graph, build, H100, None, _types(128), None, stats) == 0  # loaded once
    assert len(fake_compiles.compiled) == before


def test_probes_stay_inside_the_profile_and_move_one_dim_at_a_time():
    from rtxjit import models

    graph = rtxjit.InferenceSession(models.bert_encoder()).graph
    types = {v.name: TensorType(v.type.dtype, tuple(2 if d == "N" else 16 if d == "S" else d for d in v.type.shape))
             for v in graph.inputs}
    profile = Profile({"hidden": ((1, 8, 64), (2, 16, 64), (8, 64, 64)), "mask": ((1, 8), (2, 16), (8, 64))})
    probes = fallbacks.probe_types(graph, types, profile)
    assert 0 < len(probes) <= fallbacks.LIMIT
    moved = set()
    for p in probes:
        n, s = p["hidden"].shape[:2]
        assert p["mask"].shape == (n, s)  # a symbol moves in every input it sizes
        assert profile.contains("hidden", p["hidden"].shape) and (n, s) != (2, 16)
        assert (n == 2) != (s == 16)  # one dim moved
        moved.add((n, s))
        assert (n & (n - 1)) == 0 and (s & (s - 1)) == 0  # powers of two
    assert {(1, 16), (4, 16), (2, 8), (2, 32)} <= moved and (2, 128) not in moved  # nearest first; 128 > max
    assert [p["hidden"].shape[:2] for p in probes[:2]] in ([(1, 16), (2, 8)], [(4, 16), (2, 32)], [(1, 16), (2, 32)],
                                                          [(4, 16), (2, 8)])


def test_a_queued_task_runs_in_the_background_and_is_pending_until_done():
    import threading
    import warnings

    stats, ran = jit.Stats(), threading.Event()
    jit.specializer().submit_task(ran.set, stats)
    assert jit.wait(stats, 30) and ran.is_set() and stats.pending == 0

    def broken() -> None:
        raise ValueError("no plan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        jit.specializer().submit_task(broken, stats)
        assert jit.wait(stats, 30)
    assert stats.failed == 1 and "no plan" in stats.errors[-1]


def test_sessions_without_a_gpu_queue_no_fallbacks():
    sess = rtxjit.InferenceSession(_skinny(), specialize="lazy")
    sess.run(None, {"x": np.ones((3, 2048), np.float32)})
    assert not sess._fallbacks_queued
