"""The launch-argument convention the JIT relies on (plan.Launch.size_args): the integer right after
a buffer pointer is that buffer's offset, and only those are named ``*_off``; every other integer is
a size, stride or flag. Checked on the plans of every registry sample (fp32) and of the demo
models, so a template that breaks it fails here rather than when the JIT rejects a kernel."""

from __future__ import annotations

import numpy as np

import rtxjit
from rtxjit.codegen.source import parameters
from rtxjit.ir.registry import all_ops
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn
from rtxjit.plan.plan import Buf
from tests.oprunner import make_inputs, single_node_model


def _check_plan(plan, what: str) -> int:
    count = 0
    for step in plan.steps:
        names = [name for name, _ in parameters(step.kernel)]
        assert len(names) >= len(step.args), (what, step.kernel.name)
        for j, a in enumerate(step.args):
            offset = j > 0 and isinstance(step.args[j - 1], Buf) and isinstance(a, int)
            if isinstance(a, bool) or not isinstance(a, int):
                continue
            assert offset == names[j].endswith("_off"), (what, step.kernel.name, j, names[j])
            count += 1
    return count


def test_offsets_follow_their_buffers_and_only_they_are_named_off():
    rng = np.random.default_rng(0)
    checked = 0
    for name, opdef in sorted(all_ops().items()):
        if name.startswith("rtxjit."):
            continue
        for sample in opdef.samples:
            if "fp32" not in sample.float_types and "-" not in sample.float_types:
                continue
            ft = "fp32" if "fp32" in sample.float_types else "-"
            arrays = make_inputs(sample, ft, rng)
            proto, feeds = single_node_model(opdef, sample, arrays)
            sess = rtxjit.InferenceSession(proto)
            try:
                plan = sess.plan({k: np.shape(v) for k, v in feeds.items()}, feeds)
            except Exception:  # a sample whose plan needs a run (data-dependent shapes): run it
                sess.run(None, feeds)
                plan = sess.last_executable.plan
            checked += _check_plan(plan, name)
    for build in (resnet_cnn, bert_encoder):
        model = build()
        feeds = demo_inputs(model, batch=2)
        sess = rtxjit.InferenceSession(model)
        checked += _check_plan(sess.plan({k: v.shape for k, v in feeds.items()}, feeds), build.__name__)
    assert checked > 1000
