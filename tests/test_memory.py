"""Memory plan: intermediates share an arena by liveness; outputs stay independent across runs."""

import numpy as np

import rtxjit
from rtxjit.models import demo_inputs, resnet_cnn
from rtxjit.plan.memory import lifetimes, plan_arena


def _executable(sess):
    return next(iter(sess._executables.values()))


def test_arena_shares_bytes_between_buffers_that_are_not_live_together():
    model = resnet_cnn()
    sess = rtxjit.InferenceSession(model)
    sess.run(None, demo_inputs(model))
    exe = _executable(sess)
    arena = exe.arena_plan
    assert 0 < arena.size < 0.75 * arena.unshared
    spans = lifetimes(exe.plan, set(arena.offsets))
    nbytes = {i: exe.plan.buffers[i].numel * exe.plan.buffers[i].dtype.itemsize for i in arena.offsets}
    items = sorted(arena.offsets)
    for a in items:
        for b in items:
            if a < b and spans[a][0] <= spans[b][1] and spans[b][0] <= spans[a][1]:
                lo_a, lo_b = arena.offsets[a], arena.offsets[b]
                assert lo_a + nbytes[a] <= lo_b or lo_b + nbytes[b] <= lo_a, f"buffers {a} and {b} overlap"


def test_results_of_one_run_survive_the_next():
    model = resnet_cnn()
    sess = rtxjit.InferenceSession(model)
    f1, f2 = demo_inputs(model, seed=1), demo_inputs(model, seed=2)
    first = sess.run(None, f1)[0].copy()
    kept = sess.run(None, f1)[0]
    sess.run(None, f2)
    np.testing.assert_array_equal(kept, first)


def test_plan_arena_excludes_outputs():
    model = resnet_cnn()
    sess = rtxjit.InferenceSession(model)
    sess.run(None, demo_inputs(model))
    plan = _executable(sess).plan
    outs = {v.buf for v in plan.outputs.values()}
    assert not outs & set(plan_arena(plan, outs).offsets)


def test_constants_made_by_lowerings_are_shared_across_shape_bindings():
    model = resnet_cnn()
    sess = rtxjit.InferenceSession(model)
    first = sess.plan_for(demo_inputs(model, batch=1))
    exe_first = sess.last_executable
    sess.plan_for(demo_inputs(model, batch=3))
    exe_second = sess.last_executable
    assert exe_first is not exe_second and first is not exe_second.plan

    def plan_consts(exe):
        return {exe.plan.buffers[i].name: t.data_ptr() for i, t in exe.constants.items()
                if exe.plan.buffers[i].data is not None}

    a, b = plan_consts(exe_first), plan_consts(exe_second)
    shared = set(a) & set(b)
    assert shared and all(a[n] == b[n] for n in shared)
