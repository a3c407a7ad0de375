"""Fallback kernels specialized on the model's static sizes (issue 17, plan/statics.py): the sizes
that are the same for every binding (a weight's N and K, strides of static dims) are constexprs of
the shape-generic kernel, written in its source; the dims the inputs leave symbolic stay run-time
arguments, so one fallback binary per launch site serves every shape."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.codegen.source import parameters
from rtxjit.engine.aot import SM_COUNTS
from rtxjit.exec.device import Device
from rtxjit.ir.types import TensorType
from rtxjit.kernels.keys import GENERIC, arg_classes, step_args, step_key
from rtxjit.plan import statics
from rtxjit.plan.plan import PlanBuilder

RNG = np.random.default_rng(17)
W = RNG.standard_normal((12, 7)).astype(np.float32)
H100 = Device("cuda", "sm_90", 90, SM_COUNTS[90])


def _matmul(rows="M") -> onnx.ModelProto:
    """x[M, 12] @ w[12, 7] (a static weight) -> Relu."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 7])],
                              [numpy_helper.from_array(W, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _constexprs(src) -> set:
    return {name for name, const in parameters(src) if const}


def _run(sess, m: int):
    x = RNG.standard_normal((m, 12)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.maximum(x.astype(np.float64) @ W, 0), rtol=1e-4, atol=1e-5)
    return next(s for s in sess.last_executable.plan.steps if s.kernel.name == "matmul")


def test_the_fallback_matmul_of_a_static_weight_has_n_and_k_compiled_in_and_m_at_run_time():
    sess = rtxjit.InferenceSession(_matmul())
    step = _run(sess, 3)
    src = step.kernel  # the generic (fallback) kernel's source
    assert {"N", "K"} <= _constexprs(src) and "M" not in _constexprs(src)
    assert "N: tl.constexpr" in src.text and "K: tl.constexpr" in src.text
    assert "# static: K=12, N=7," in src.text  # the values are part of the source (and its key)
    assert "M" not in step.static and {"N", "K"} <= set(step.static)
    m_pos = [n for n, _ in parameters(src)].index("M")
    assert step.args[m_pos] == 3  # still passed, at run time


def test_two_shapes_share_every_fallback_kernel_without_a_new_compile():
    sess = rtxjit.InferenceSession(_matmul())
    first = _run(sess, 3)
    compiles = sess.jit_stats()["compiles"]
    second = _run(sess, 9)  # the same tile configuration under the interpreter
    assert sess.jit_stats()["compiles"] == compiles
    assert second.kernel.key == first.kernel.key


def _plan(graph, device, **dims):
    types = {v.name: TensorType(v.type.dtype, tuple(dims.get(d, d) if isinstance(d, str) else d
                                                    for d in v.type.shape)) for v in graph.inputs}
    return PlanBuilder(graph, device, frozenset(v.name for v in graph.constants())).build(types, {})


def test_on_a_gpu_plan_every_launch_of_every_shape_has_one_fallback_binary():
    """Planned for an H100 (nothing compiled here): the generic kernels' binary keys of bindings far
    apart (other tile heuristics, other Triton classes of M) are the same."""
    graph = rtxjit.InferenceSession(_matmul()).graph
    keys = []
    for m in (3, 16, 200):
        plan = _plan(graph, H100, M=m)
        keys.append([step_key(H100, plan, s, GENERIC, s.generic_constexprs) for s in plan.steps])
        mm = next(s for s in plan.steps if s.kernel.name == "matmul")
        assert {"N", "K"} <= _constexprs(mm.kernel) and "M" not in _constexprs(mm.kernel)
    assert keys[0] == keys[1] == keys[2]


def test_a_model_without_symbolic_dims_has_every_size_compiled_in():
    sess = rtxjit.InferenceSession(_matmul(rows=5))
    step = _run(sess, 5)
    assert {"M", "N", "K"} <= _constexprs(step.kernel)


def test_a_size_wrongly_judged_static_is_demoted_never_served_stale(monkeypatch):
    """A probe that moves nothing judges M static: the first binding's kernel has M=3 compiled
    in; the next binding sees M differ, takes it at run time from then on (one more fallback
    compile) and computes right; a third shares the second's kernel."""
    monkeypatch.setattr(statics, "PROBES", (lambda v: v,))
    sess = rtxjit.InferenceSession(_matmul())
    first = _run(sess, 3)
    assert "M" in first.static and "M=3" in first.kernel.text
    second = _run(sess, 9)
    assert "M" not in second.static and "M" not in _constexprs(second.kernel)
    assert {"N", "K"} <= set(second.static)
    compiles = sess.jit_stats()["compiles"]
    third = _run(sess, 5)
    assert third.kernel.key == second.kernel.key and sess.jit_stats()["compiles"] == compiles


def test_fallback_sources_are_deterministic():
    graph = rtxjit.InferenceSession(_matmul()).graph
    a = [s.kernel.text for s in _plan(graph, H100, M=4).steps]
    other = rtxjit.InferenceSession(_matmul()).graph  # another graph object: verdicts of its own
    b = [s.kernel.text for s in _plan(other, H100, M=4).steps]
    assert a == b
    plan = _plan(graph, H100, M=4)
    assert all(arg_classes(step_args(plan, s), True) for s in plan.steps)


def test_static_sizes_can_be_switched_off(monkeypatch):
    """``statics.ENABLED = False``: the fallback before issue 17 (every size at run time)."""
    monkeypatch.setattr(statics, "ENABLED", False)
    step = _run(rtxjit.InferenceSession(_matmul()), 3)
    assert not step.static and not ({"M", "N", "K"} & _constexprs(step.kernel))
