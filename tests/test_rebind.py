"""Plans re-bound from a template (plan/rebind.py): a binding inside the box of dims where a traced
template reproduced the lowered plans number for number takes the template's plan, which must be
the plan lowering gives (every buffer, launch, configuration and output view), for an sm_90 GPU and
for the interpreter; a template that lost a dim's expression is dropped; results stay right."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import rtxjit
from rtxjit import models
from rtxjit.codegen import view as view_module
from rtxjit.engine.aot import target_device
from rtxjit.exec.device import Device
from rtxjit.ir.symint import Sym, pow2, prod, tracing
from rtxjit.plan import plan as plan_module
from rtxjit.plan import rebind, statics
from rtxjit.plan.plan import PlanBuilder
from tests.test_plan_replay import _same


def test_sym_keeps_expressions_and_records_guards():
    n = Sym(6, "$N$")
    with tracing() as t:
        m = (n * 4 + 3) // 2 - n % 4
        assert m == 11 and isinstance(m, Sym) and "$N$" in m.e
        assert pow2(n) == 8 and prod((n, 3, 2)) == 36 and isinstance(prod((n, 3)), Sym)
        assert max(n, 5) is n and not (n < 5)
    f = eval(f"lambda d: {m.e.replace('$N$', 'd')}")  # noqa: S307 - the test's own expression
    assert [f(d) for d in (1, 6, 17)] == [(d * 4 + 3) // 2 - d % 4 for d in (1, 6, 17)]
    assert "($N$<5)" in t.guards and t.guards["($N$<5)"] is False
    assert any(g.startswith("($N$>") for g in t.guards)  # pow2's doublings
    assert str(n) == "6" and f"{n}" == "6"


@pytest.fixture
def lowered(monkeypatch) -> list:
    """The bindings lowered (``PlanBuilder._lower``) while a test runs, in any thread."""
    calls = []
    real = PlanBuilder._lower

    def counting(self, types, feeds):
        calls.append(types)
        return real(self, types, feeds)

    monkeypatch.setattr(PlanBuilder, "_lower", counting)
    return calls


def _cnn_session(tmp_path):
    path = tmp_path / "cnn.onnx"
    import onnx

    onnx.save(models.resnet_cnn(batch="N", size=16, width=8), path)
    return path, rtxjit.InferenceSession(str(path), precision="fp16")


def _types(graph, n):
    return rebind.types_at({v.name: v.type for v in graph.inputs}, statics.symbolic_dims(graph), {"N": n})


def _build(graph, device, consts, kept, n):
    plan = PlanBuilder(graph, device, consts, kept).build(_types(graph, n), {})
    rebind.drain()
    return plan


@pytest.mark.parametrize("target", ["sm_90", "interpreter"])
def test_rebound_plan_is_the_lowered_plan(monkeypatch, tmp_path, target, lowered):
    device = target_device(90) if target == "sm_90" else Device("cpu", "interpreter")  # planned for, not run on
    _, sess = _cnn_session(tmp_path)
    graph, consts = sess.graph, frozenset(sess._const_tensors)
    kept, plain = statics.GraphStatics(), statics.GraphStatics()
    for n in (8, 6):  # one bucket of pow2: traced at 8, checked at 6
        _build(graph, device, consts, kept, n)
    templates = kept.templates[(device, consts)]
    assert any(t.covers({"N": 7}) for t in templates)
    lowered.clear()
    got = _build(graph, device, consts, kept, 7)
    assert lowered == []  # re-bound: nothing lowered
    monkeypatch.setattr(rebind, "ENABLED", False)
    for n in (8, 6):
        _build(graph, device, consts, plain, n)
    want = _build(graph, device, consts, plain, 7)
    _same(got, want)
    assert [(s.kernel.key, s.static) for s in got.steps] == [(s.kernel.key, s.static) for s in want.steps]
    assert got.outputs == want.outputs and got.inputs == want.inputs


def test_template_that_lost_a_dim_is_dropped(monkeypatch, tmp_path):
    """A lowering that turns a dim into a plain int (here: every view's shape) makes a template whose
    numbers stay fixed where the plan's move: its check at the next binding drops it for good."""
    _, sess = _cnn_session(tmp_path)
    graph, consts, device = sess.graph, frozenset(sess._const_tensors), target_device(90)
    monkeypatch.setattr(view_module, "whole", int)
    kept = statics.GraphStatics()
    for n in (8, 6, 7, 5):
        plan = _build(graph, device, consts, kept, n)
        assert plan.buffers[plan.inputs["image"]].numel == n * 3 * 16 * 16
    assert kept.templates[(device, consts)] is False


def test_template_guards_keep_buckets_apart(tmp_path):
    """A binding whose guards differ (another power-of-two bucket: other tiles, split-K) is not served
    by the template: a template's checked box lies inside the region its guards hold."""
    _, sess = _cnn_session(tmp_path)
    graph, consts, device = sess.graph, frozenset(sess._const_tensors), target_device(90)
    kept = statics.GraphStatics()
    for n in (8, 6):
        _build(graph, device, consts, kept, n)
    templates = kept.templates[(device, consts)]
    template = next(t for t in templates if t.covers({"N": 8}))
    assert template.holds({"N": 7}) and not template.holds({"N": 64})
    for t in templates:
        assert all(t.holds({"N": n}) for n in range(1, 100) if t.covers({"N": n}))


def test_session_results_with_rebound_plans(tmp_path):
    path, sess = _cnn_session(tmp_path)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for n in (4, 3, 4, 2, 3):
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        x[0, 0, 0, :4] = (np.finfo(np.float32).min, -np.inf, np.nan, 0.0) if n == 3 else x[0, 0, 0, :4]
        got = sess.run(None, {"image": x})[0]
        want = ref.run(None, {"image": x})[0]
        finite = np.isfinite(want)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[finite], want[finite], rtol=2e-2, atol=2e-2)
        rebind.drain()
    held = statics.of_graph(sess.graph).templates
    assert any(isinstance(t, list) and t for t in held.values())


def test_plan_module_uses_symbolic_sizes():
    """The plan's own size arithmetic keeps expressions (a regression here would drop every template)."""
    n = Sym(3, "$N$")
    assert isinstance(plan_module._numel((n, 4)), Sym) and isinstance(plan_module._grid((n,))[0], Sym)


@pytest.mark.gpu
def test_gpu_session_results_with_rebound_plans(tmp_path, lowered):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    path = tmp_path / "cnn.onnx"
    import onnx

    onnx.save(models.resnet_cnn(batch="N", size=32, width=16), path)
    sess = rtxjit.InferenceSession(str(path), device="cuda", specialize="none")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for n in (8, 6, 7):  # traced at 8, checked at 6, re-bound at 7
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        rebind.drain()
        lowered.clear()
        got = sess.run(None, {"image": x})[0]
        np.testing.assert_allclose(got, ref.run(None, {"image": x})[0], rtol=1e-3, atol=1e-3)
    assert lowered == []  # 7 was re-bound from the template


def test_regions_are_checked_and_traced_ahead(tmp_path, monkeypatch, lowered):
    """After one binding, its template is checked at the ends of the region its guards hold and the
    regions next to it are traced ahead: a shape never seen, in such a region, is re-bound at once."""
    _, sess = _cnn_session(tmp_path)
    graph, consts, device = sess.graph, frozenset(sess._const_tensors), target_device(90)
    kept = statics.GraphStatics()
    _build(graph, device, consts, kept, 8)
    templates = kept.templates[(device, consts)]
    assert len(templates) > 1  # traced ahead
    covered = sorted(n for n in range(1, 40) if n != 8 and any(t.covers({"N": n}) for t in templates))
    assert covered and any(n > 8 for n in covered) and any(n < 8 for n in covered)
    plain = statics.GraphStatics()
    for n in (covered[0], covered[-1]):
        lowered.clear()
        got = PlanBuilder(graph, device, consts, kept).build(_types(graph, n), {})
        assert lowered == []  # re-bound
        monkeypatch.setattr(rebind, "ENABLED", False)
        want = PlanBuilder(graph, device, consts, plain).build(_types(graph, n), {})
        monkeypatch.setattr(rebind, "ENABLED", True)
        _same(got, want)
        assert [(s.kernel.key, s.static) for s in got.steps] == [(s.kernel.key, s.static) for s in want.steps]
    rebind.drain()
