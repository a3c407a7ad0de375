"""Ahead-of-time kernels: an engine built for sm_90 on a machine with no GPU carries the binaries
a GPU of that SM would otherwise compile."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import rtxjit
from rtxjit.exec.device import Device
from rtxjit.exec.executor import GENERIC, SPECIALIZED
from rtxjit.ir.types import TensorType
from rtxjit.jit import warm
from rtxjit.models import DEMO_MODELS, demo_inputs
from rtxjit.plan.plan import PlanBuilder

PROFILE = {"hidden": [(1, 8, 64), (2, 16, 64), (2, 16, 64)], "mask": [(1, 8), (2, 16), (2, 16)]}


@pytest.fixture(scope="module")
def engine():
    model = DEMO_MODELS["encoder"](dtype=np.float16)
    return rtxjit.build(model, targets=["sm_90"], profiles=PROFILE, kernels=True)


def test_an_engine_built_without_a_gpu_holds_sm90_binaries_for_its_profile(engine, tmp_path):
    assert engine.build_report["per_target"] == {90: len(engine.binaries)} and engine.binaries
    for entry in engine.binaries.values():
        assert entry["meta"]["metadata"]["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
        assert entry["data"][:4] == b"\x7fELF"  # a cubin
    # every kernel a GPU session would launch at the opt shapes is there, under the key it looks up
    from rtxjit.engine.aot import SM_COUNTS

    device = Device("cuda", "sm_90", 90, SM_COUNTS[90])
    graph = engine.graph
    types = {v.name: TensorType(v.type.dtype, engine.profiles[0].opt(v.name)) for v in graph.inputs}
    plan = PlanBuilder(graph, device, frozenset(v.name for v in graph.constants())).build(types, {})
    for step in plan.steps:
        assert warm.step_key(device, plan, step, GENERIC, step.generic_constexprs) in engine.binaries
        assert warm.step_key(device, plan, step, SPECIALIZED, step.constexprs) in engine.binaries
    # and they survive the engine file
    engine.save(tmp_path / "e.rtx")
    loaded = rtxjit.Engine.load(tmp_path / "e.rtx", device="cpu")
    assert loaded.binaries.keys() == engine.binaries.keys()
    assert all(loaded.binaries[k]["data"] == engine.binaries[k]["data"] for k in engine.binaries)


def test_a_stripped_engine_keeps_its_kernels(engine):
    model = DEMO_MODELS["encoder"](dtype=np.float16)
    stripped = rtxjit.build(model, targets=["sm_90"], profiles=PROFILE, kernels=True, strip_weights=True)
    assert stripped.binaries.keys() == engine.binaries.keys() and stripped.missing_weights()


ENGINE_RUN = """
import json, sys, numpy as np, rtxjit
from rtxjit.models import DEMO_MODELS, demo_inputs
engine = rtxjit.Engine.load(sys.argv[1])
sess = rtxjit.InferenceSession(engine, device="cuda")
model = DEMO_MODELS["encoder"](dtype=np.float16)
feeds = demo_inputs(model, batch=2, seq=16)
out = sess.run(None, feeds)[0]
sess.wait_for_specialization(timeout=300)
again = sess.run(None, feeds)[0]
s = sess.jit_stats()
np.save(sys.argv[2], np.stack([out, again]))
print(json.dumps({"compiles": s["compiles"], "cache_hits": s["cache_hits"], "last_run": s["last_run"],
                  "failed": s["failed"], "rejected": s["rejected"]}))
"""


@pytest.mark.gpu
def test_gpu_an_engine_built_on_a_cpu_only_process_runs_with_zero_compiles(tmp_path):
    import os

    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    build = ("import numpy as np, rtxjit; from rtxjit.models import DEMO_MODELS; "
             "e = rtxjit.build(DEMO_MODELS['encoder'](dtype=np.float16), targets=['sm_90'], "
             f"profiles={PROFILE!r}, kernels=True); e.save({str(tmp_path / 'e.rtx')!r})")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", RTXJIT_DEVICE="cpu")  # a machine with no GPU
    proc = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))  # nothing compiled before
    run = subprocess.run([sys.executable, "-c", ENGINE_RUN, str(tmp_path / "e.rtx"), str(tmp_path / "out.npy")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    assert stats["compiles"] == 0 and stats["cache_hits"] > 0, stats
    assert stats["failed"] == 0 and stats["rejected"] == 0 and stats["last_run"] == "specialized", stats
    import onnxruntime as ort

    model = DEMO_MODELS["encoder"](dtype=np.float16)
    feeds = demo_inputs(model, batch=2, seq=16)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for out in np.load(tmp_path / "out.npy"):
        err = np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max()
        assert err <= 1e-2, err
