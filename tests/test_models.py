"""Whole models built in code match onnxruntime, and every node runs in a generated kernel."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rtxjit
from rtxjit.ir.registry import Kind, get_op
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn
from tests.oprunner import rel_error

TOL = {np.float32: 1e-4, np.float16: 1e-2}
MODELS = {"cnn": resnet_cnn, "encoder": bert_encoder}

# aten ops that only allocate, view or move bytes (also those Triton's interpreter uses to copy
# kernel arguments); anything else would be torch computing part of the model.
MEMORY_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "slice", "as_strided", "detach",
              "alias", "lift_fresh", "set_", "copy_", "_to_copy", "_copy_from"}


def _reference(name, feeds):
    model = MODELS[name](dtype=np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})[0]


def _check_model(name, dtype, device, batch=2):
    model = MODELS[name](dtype=dtype)
    feeds = demo_inputs(model, batch=batch)
    got = rtxjit.InferenceSession(model, device=device).run(None, feeds)[0]
    want = _reference(name, feeds)
    assert np.isfinite(got).all() and np.abs(want).max() > 0.1
    err = rel_error(got, want)
    assert err <= TOL[dtype], f"{name} {np.dtype(dtype).name}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    return err


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_onnxruntime(name, dtype):
    _check_model(name, dtype, None)  # the GPU where there is one, else the CPU interpreter


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_onnxruntime_gpu(name, dtype):
    err = _check_model(name, dtype, "cuda", batch=4)
    print(f"GPU {torch.cuda.get_device_name()} {name} {np.dtype(dtype).name}: relative error {err:.3e}")


def test_symbolic_batch_serves_new_shapes_with_the_same_kernels():
    model = resnet_cnn()
    sess = rtxjit.InferenceSession(model)
    first = sess.plan_for(demo_inputs(model, batch=2))  # size-1 dims collapse away, so not 1
    second = sess.plan_for(demo_inputs(model, batch=3))
    assert [s.kernel.key for s in first.steps] == [s.kernel.key for s in second.steps]
    assert rel_error(sess.run(None, demo_inputs(model, batch=3))[0],
                     _reference("cnn", demo_inputs(model, batch=3))) <= 1e-4


class _RecordAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_node_runs_in_a_generated_kernel(name):
    model = MODELS[name]()
    sess = rtxjit.InferenceSession(model)
    feeds = demo_inputs(model)
    with _RecordAten() as rec:
        sess.run(None, feeds)
    assert rec.ops <= MEMORY_OPS, f"torch computed something: {sorted(rec.ops - MEMORY_OPS)}"
    trace = sess.last_trace
    assert set(trace) == {n.name for n in sess.graph.nodes}
    for node in sess.graph.nodes:
        kind = get_op(node.op).kind
        ran = trace[node.name]
        if kind is Kind.ALIAS or (kind is Kind.MOVEMENT and ran == ["alias"]):
            assert ran == ["alias"], f"{node.name}: {ran}"  # a view: nothing to compute
        elif kind is Kind.SHAPE:
            assert ran == ["host"], f"{node.name}: {ran}"
        else:
            assert ran and all(k not in ("alias", "host") for k in ran), f"{node.name} ({node.op}) ran {ran}"
