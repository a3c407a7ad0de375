"""Replay of lowerings within a binding (plan/plan.py ``REPLAY``): a node whose signature (op,
attributes, input views and host values, output types, readers) matches an earlier node's gets that
lowering's buffers and launches renumbered instead of lowering anew. The plan must be the very plan
lowering gives: every buffer, launch (kernel, grid, arguments, configurations, node), output view and
trace entry equal, for real architectures through both exporters, planned for an sm_90 GPU (generic
configurations, split-K, tuned choices) and for the interpreter; and a session's results unchanged."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import rtxjit
from rtxjit.engine.aot import target_device
from rtxjit.exec.device import detect
from rtxjit.ir.types import TensorType
from rtxjit.plan.plan import PlanBuilder
from tests.zoo import archs

plan_module = importlib.import_module("rtxjit.plan.plan")

MODELS = [("bert", False), ("gpt2", True), ("llama", False), ("t5_encoder", True), ("whisper_encoder", False)]


def _plan(monkeypatch, sess, device, types, replay: bool):
    monkeypatch.setattr(plan_module, "REPLAY", replay)
    return PlanBuilder(sess.graph, device, frozenset(sess._const_tensors))._lower(types, {})


def _same(a, b) -> None:
    assert len(a.buffers) == len(b.buffers)
    for i, (x, y) in enumerate(zip(a.buffers, b.buffers)):
        assert (x.dtype, x.numel, x.role, x.name) == (y.dtype, y.numel, y.role, y.name), i
        assert (x.data is None) == (y.data is None) and (x.data is None or np.array_equal(x.data, y.data)), i
    assert len(a.steps) == len(b.steps)
    for x, y in zip(a.steps, b.steps):
        assert (x.kernel.key, x.grid, x.args, x.constexprs, x.node, x.choices, x.tune_key, x.generic) == \
               (y.kernel.key, y.grid, y.args, y.constexprs, y.node, y.choices, y.tune_key, y.generic), x.node
    assert a.outputs == b.outputs and a.inputs == b.inputs and a.trace == b.trace


@pytest.mark.parametrize("name,dynamo", MODELS, ids=[f"{n}-{'dynamo' if d else 'torchscript'}" for n, d in MODELS])
def test_replayed_plan_is_the_lowered_plan(monkeypatch, tmp_path, name, dynamo):
    model, make_feeds = archs.build(name, "tiny")
    feeds = make_feeds("left", 2, 9) if name not in ("whisper_encoder", "clip_vision") else make_feeds("right")
    path = archs.export(name, model, feeds, dynamo, str(tmp_path / f"{name}.onnx"))
    sess = rtxjit.InferenceSession(path, specialize="none")
    host = {k: v for k, v in archs.to_numpy(feeds).items()}
    types = {v.name: TensorType(v.type.dtype, tuple(host[v.name].shape)) for v in sess.graph.inputs}
    for device in (target_device(90), detect("cpu")):
        _same(_plan(monkeypatch, sess, device, types, False), _plan(monkeypatch, sess, device, types, True))


def test_replay_takes_part_and_results_stay(monkeypatch, tmp_path):
    """The 2-layer tiny BERT replays its second layer (some nodes are not lowered anew) and a session
    with replay gives the results of one without."""
    model, make_feeds = archs.build("bert", "tiny")
    feeds = make_feeds("left", 2, 9)
    path = archs.export("bert", model, feeds, False, str(tmp_path / "bert.onnx"))
    host = archs.to_numpy(feeds)
    outputs = {}
    for replay in (False, True):
        monkeypatch.setattr(plan_module, "REPLAY", replay)
        sess = rtxjit.InferenceSession(path)
        outputs[replay] = sess.run(None, host)
    for a, b in zip(outputs[False], outputs[True]):
        np.testing.assert_array_equal(a, b)
    calls = []
    monkeypatch.setattr(plan_module, "REPLAY", True)
    real = PlanBuilder._replay

    def counting(self, *args):
        done = real(self, *args)
        calls.append(done)
        return done

    monkeypatch.setattr(PlanBuilder, "_replay", counting)
    sess = rtxjit.InferenceSession(path)
    sess.run(None, host)
    assert sum(calls) >= 5, calls  # the second layer's products, norms and pointwise chains
