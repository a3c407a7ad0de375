"""Specialized kernels per bucket of shapes (issue 17, kernels/keys.py): a launch's dynamic sizes
stay run-time arguments of its specialized kernel, classed as Triton's specialization classes them
(32/64 bits, a multiple of 16, equal to 1), so shapes in one bucket share one compile; and a kernel
compiled before, in this or another session or process over the same runtime cache, is never
compiled again. Counted on the CPU as a GPU would compile (exec/compiler.py), and through the
GPU's compile path with a fake compiler standing in for Triton."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.cache.store import RuntimeCache
from rtxjit.exec import compiler
from rtxjit.kernels import binaries
from rtxjit.kernels import keys as kernel_keys
from rtxjit.jit import specializer as jit

RNG = np.random.default_rng(170)
W = RNG.standard_normal((10, 6)).astype(np.float32)


def _model() -> onnx.ModelProto:
    """x[N, 10] @ w[10, 6] -> Softmax: a matmul, a row reduction over the static 6."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "b", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              [numpy_helper.from_array(W, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(n: int) -> dict:
    return {"x": RNG.standard_normal((n, 10)).astype(np.float32)}


def _expected(x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64) @ W
    e = np.exp(h - h.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def fresh_compiles(monkeypatch):
    """Nothing counted as compiled in this process yet (the interpreter's tally of compilations)."""
    monkeypatch.setattr(compiler, "_interpreted", set())
    monkeypatch.setattr(jit, "COMPILE_DELAY_S", 0.05)  # a fixed stand-in for Triton's compile time


def _compiles_per_shape(sess, sizes) -> list:
    out, before = [], 0
    for n in sizes:
        feeds = _feeds(n)
        y = sess.run(None, feeds)[0]
        np.testing.assert_allclose(y, _expected(feeds["x"]), rtol=1e-4, atol=1e-6)
        stats = sess.jit_stats()
        assert stats["last_run"] == "specialized" and stats["failed"] == 0 and stats["rejected"] == 0
        out.append(stats["compiles"] - before)
        before = stats["compiles"]
    return out


def test_shapes_in_one_bucket_cause_one_specialized_compile(fresh_compiles):
    sess = rtxjit.InferenceSession(_model(), specialize="eager")
    # 5 and 7 rows: one bucket (not a multiple of 16, not 1; the same tiles, rows per program of
    # the softmax rounded up to 8); 16: another
    first, same, other = _compiles_per_shape(sess, (5, 7, 16))
    assert first > 0 and same == 0 and other > 0
    assert sess.jit_stats()["specialized"] == 3  # each binding still served by specialized kernels


def test_exact_specialization_compiles_every_shape(fresh_compiles, monkeypatch):
    """The behaviour before buckets, kept behind ``EXACT`` to compare on a GPU."""
    monkeypatch.setattr(kernel_keys, "EXACT", True)
    sess = rtxjit.InferenceSession(_model(), specialize="eager")
    first, second = _compiles_per_shape(sess, (5, 7))
    assert first > 0 and second > 0


def test_on_a_gpu_plan_nearby_shapes_share_specialized_binaries():
    """Planned for an H100 (nothing compiled): 40 and 56 rows share every specialized binary key of
    the plan's heuristic tiles; the dynamic M is not in the kernel's source; 64 rows (a multiple of
    16) is another bucket."""
    from tests.test_fallback_specialization import H100, _plan

    graph = rtxjit.InferenceSession(_model()).graph

    def specialized_keys(n: int) -> set:
        plan = _plan(graph, H100, N=n)
        return {kernel_keys.step_key(H100, plan, s, kernel_keys.SPECIALIZED, s.constexprs) for s in plan.steps}

    assert specialized_keys(40) == specialized_keys(56)
    assert specialized_keys(64) != specialized_keys(56)


# --- through the GPU's compile path, Triton replaced by a counting fake ----------------------------

class _FakeCompiler:
    """Stands in for ``compiler._warm``: counts each compile as Triton's listener would (in the
    calling thread's tally), takes ``delay`` seconds, returns what ``binaries.entry_of`` reads."""

    def __init__(self, delay: float = 0.01):
        self.delay, self.compiled, self.ids = delay, [], itertools.count()

    def __call__(self, src, generic, args, grid, constexprs, load=True):
        time.sleep(self.delay)
        self.compiled.append((src.name, generic))
        tally = getattr(compiler._counts, "tally", None)
        if tally is not None:
            tally[0] += 1
        name = f"{src.name}_{next(self.ids)}"
        meta = SimpleNamespace(_asdict=lambda: {"name": name, "shared": 0, "num_warps": 4})
        fake_src = SimpleNamespace(signature={"x_ptr": "*fp32"}, constants={}, fn=SimpleNamespace(arg_names=["x_ptr"]))
        return SimpleNamespace(src=fake_src, asm={"cubin": f"\x7fELF {name}".encode()}, metadata=meta, name=name)


@pytest.fixture
def fake_gpu(monkeypatch):
    fake = _FakeCompiler()
    monkeypatch.setattr(compiler, "_warm", fake)
    monkeypatch.setattr(compiler, "_warmed", {})  # as in a fresh process
    monkeypatch.setattr(binaries, "load", lambda meta, cubin: ("loaded", meta["name"]))
    return fake


def _on_fake_gpu(cache_dir, n: int):
    """An executable of a new session over ``cache_dir`` (a new process as far as its kernel store
    knows), made on the CPU, then given the plan of an H100 and handed to the compiler as an H100's."""
    from tests.test_fallback_specialization import H100, _plan

    sess = rtxjit.InferenceSession(_model(), runtime_cache=cache_dir)
    sess.run(None, _feeds(n))
    exe = sess.last_executable
    exe.device, exe.plan = H100, _plan(sess.graph, H100, N=n)
    return exe


def test_kernels_compiled_by_another_process_with_the_runtime_cache_are_not_compiled_again(tmp_path, fake_gpu):
    cache = tmp_path / "cache"
    exe = _on_fake_gpu(cache, 5)
    generic = compiler.prepare_generic(exe)
    specialized = compiler.prepare_specialized(exe, background=False, tuned=False)
    assert generic[0] > 0 and specialized[0] > 0 and len(fake_gpu.compiled) == generic[0] + specialized[0]
    stored = len(RuntimeCache(cache).entries())
    assert stored >= len(fake_gpu.compiled)  # each binary in the runtime cache
    # another process over the same cache: the same shape, and a shape of the same bucket
    for n in (5, 7):
        compiler._warmed.clear()
        exe = _on_fake_gpu(cache, n)
        before = len(fake_gpu.compiled)
        assert compiler.prepare_generic(exe) == (0, generic[0])
        assert compiler.prepare_specialized(exe, background=False, tuned=False) == (0, specialized[0])
        assert len(fake_gpu.compiled) == before
    # a shape of another bucket compiles its specialized kernels only, and keeps them
    exe = _on_fake_gpu(cache, 16)
    assert compiler.prepare_generic(exe)[0] == 0
    assert compiler.prepare_specialized(exe, background=False, tuned=False)[0] > 0
    assert len(RuntimeCache(cache).entries()) > stored
