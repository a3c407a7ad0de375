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
    16) is another bucket (the softmax's kept size, which its addresses are split by)."""
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
        self.delay, self.compiled, self.ids, self.cached = delay, [], itertools.count(), set()

    def __call__(self, src, generic, args, grid, constexprs, load=True):
        key = compiler._item_key((src, generic, args, grid, constexprs))
        tally = getattr(compiler._counts, "tally", None)
        if key in self.cached:  # in Triton's cache (compiled before in this process): loaded, not compiled
            if tally is not None:
                tally[1] += 1
        else:
            self.cached.add(key)
            time.sleep(self.delay)
            self.compiled.append((src.name, generic))
            if tally is not None:
                tally[0] += 1
        name = f"{src.name}_{next(self.ids)}"
        meta = SimpleNamespace(_asdict=lambda: {"name": name, "shared": 0, "num_warps": 4})
        fake_src = SimpleNamespace(signature={"x_ptr": "*fp32"}, constants={}, fn=SimpleNamespace(arg_names=["x_ptr"]))
        return SimpleNamespace(src=fake_src, asm={"cubin": f"\x7fELF {name}".encode()}, metadata=meta, name=name)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setenv("RTXJIT_LIGHT_COMPILE", "0")  # generic kernels through the fake too (tests/test_light_compile.py)
    fake = _FakeCompiler()
    monkeypatch.setattr(compiler, "_warm", fake)
    monkeypatch.setattr(compiler, "_warmed", {})  # as in a fresh process
    monkeypatch.setattr(binaries, "load", lambda meta, cubin: ("loaded", meta["name"]))
    return fake


def _on_fake_gpu(cache_dir, n: int, rows: int = 0):
    """An executable of a new session over ``cache_dir`` (a new process as far as its kernel store
    knows), made on the CPU, then given the plan of an H100 (for ``rows`` rows if given: beyond the
    CPU run's profile) and handed to the compiler as an H100's."""
    from tests.test_fallback_specialization import H100, _plan

    sess = rtxjit.InferenceSession(_model(), runtime_cache=cache_dir)
    sess.run(None, _feeds(n))
    exe = sess.last_executable
    exe.device, exe.plan = H100, _plan(sess.graph, H100, N=rows or n)
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


def test_a_new_bucket_first_takes_tiles_compiled_for_another(tmp_path, fake_gpu, monkeypatch):
    """Issue 17: a new bucket of shapes is specialized first with tiles already compiled (the plan's
    heuristic tiles for it are not), preferring the ones timed fastest elsewhere; the tuned pass
    compiles the rest. A bucket whose choice is remembered takes it and compiles nothing else."""
    from rtxjit.plan import autotune

    monkeypatch.setattr(compiler, "_specialized_done", set())
    monkeypatch.setattr(autotune, "_chosen", {})
    monkeypatch.setattr(autotune, "_timings", {})
    monkeypatch.setattr(autotune, "_sinks", {})
    small = _on_fake_gpu(tmp_path / "a", 40)  # M bucket 64: tiles 32 and 64 rows offered
    mm = next(s for s in small.plan.steps if s.kernel.name == "matmul")
    assert [c[1]["BLOCK_M"] for c in mm.choices] == [32, 64]
    assert compiler.prepare_specialized(small, background=False, tuned=True)[0] >= 3  # both tiles + softmax
    autotune._chosen[mm.tune_key] = dict(mm.choices[1][1])  # as if 64 rows timed fastest

    large = _on_fake_gpu(tmp_path / "b", 40, rows=40008)  # same Triton classes of M (40008 % 16 == 40 % 16)
    i, step = next((i, s) for i, s in enumerate(large.plan.steps) if s.kernel.name == "matmul")
    assert step.constexprs["BLOCK_M"] == 128  # the heuristic's tiles here were never compiled
    chosen = compiler.first_configs(large)
    assert chosen[i][1]["BLOCK_M"] == 64 and chosen[i] in step.choices
    before = list(fake_gpu.compiled)
    compiles, hits = compiler.prepare_specialized(large, background=False, tuned=False, chosen=chosen)
    assert [name for name, _ in fake_gpu.compiled[len(before):]] == ["reduce_softmax"] and compiles == 1 and hits == 1
    # the plan's own tiles would have compiled the matmul again
    items = compiler._items(large, kernel_keys.SPECIALIZED, tuned=False)
    assert not compiler._available(large, kernel_keys.specialized_source(step), kernel_keys.step_args(large.plan, step),
                                   (step.grid, step.constexprs))
    assert any(it[0].name == "matmul" and it[4]["BLOCK_M"] == 128 for it in items)

    # this bucket timed: a later binding of it takes the winner at once and times nothing
    autotune._chosen[step.tune_key] = dict(step.choices[2][1])  # 32 rows
    again = _on_fake_gpu(tmp_path / "c", 40, rows=40024)
    i2, step2 = next((i, s) for i, s in enumerate(again.plan.steps) if s.kernel.name == "matmul")
    assert compiler.first_configs(again)[i2][1]["BLOCK_M"] == 32
    tuned = [it for it in compiler._items(again, kernel_keys.SPECIALIZED, tuned=True) if it[0].name == "matmul"]
    assert [it[4]["BLOCK_M"] for it in tuned] == [32]


def test_a_new_bucket_specialized_first_with_compiled_tiles_matches_the_reference(monkeypatch):
    """The first pass's borrowed tiles are a configuration like any other: the session's results
    stay right (run on the interpreter, where the configurations come from ``first_configs``)."""
    monkeypatch.setattr(compiler, "first_configs", lambda exe: {
        i: (s.grid, s.constexprs) for i, s in enumerate(exe.plan.steps)})
    sess = rtxjit.InferenceSession(_model(), specialize="eager")
    _compiles_per_shape(sess, (5, 40))


def test_argument_classes_tell_ints_floats_and_flags_apart_through_their_memo():
    """kernels/keys.arg_classes is memoized by value and type: 1, 1.0 and True are equal keys to a
    plain cache, but Triton specializes them differently."""
    import torch

    classes = [kernel_keys.arg_classes((torch.float16, 0, v, 32), False) for v in (1, 1.0, True, 1)]
    assert classes[0] == classes[3] != classes[1] != classes[2] != classes[0]
    assert classes[0][2] == ("i", False, True) and classes[1][2] == "f" and classes[2][2] == "True"
    assert kernel_keys.arg_classes([torch.float16, 0, 48], True) == ("torch.float16", ("i", True, False), "i")


def test_items_carry_the_key_each_compilation_is_looked_up_by():
    """prepare_generic looks compilations up by the key ``_keyed_items`` worked out with them: it must
    be ``_item_key``'s (a generic kernel compiled before is then not compiled again)."""
    sess = rtxjit.InferenceSession(_model(), specialize="none")
    sess.run(None, _feeds(5))
    exe = sess.last_executable
    for kind in (kernel_keys.GENERIC, kernel_keys.SPECIALIZED):
        keyed = compiler._keyed_items(exe, kind)
        assert keyed and all(key == compiler._item_key(item) for item, key in keyed)


def test_generic_kernels_are_handed_to_the_executable_step_by_step(tmp_path, fake_gpu, monkeypatch):
    """prepare_generic gives the executable each step's generic kernel (compiled now, compiled
    before in this process, or loaded from the store), so its first run launches them directly."""
    cache = tmp_path / "cache"
    for n in (5, 7):  # compiled, then taken from the compiled ones
        exe = _on_fake_gpu(cache, n)
        handed = []
        monkeypatch.setattr(exe, "preload", handed.extend)
        compiler.prepare_generic(exe)
        assert len(handed) == len(exe.plan.steps)
        for step, kernel in zip(exe.plan.steps, handed):
            assert kernel is not None and kernel.name.startswith(step.kernel.name + "_")
    compiler._warmed.clear()  # another process: loaded from its runtime cache
    exe = _on_fake_gpu(cache, 5)
    handed = []
    monkeypatch.setattr(exe, "preload", handed.extend)
    assert compiler.prepare_generic(exe)[0] == 0
    assert len(handed) == len(exe.plan.steps) and all(k is not None for k in handed)


def test_preloaded_kernels_launch_direct_from_the_first_run():
    from rtxjit.codegen.source import parameters
    from tests.test_fallback_specialization import H100

    sess = rtxjit.InferenceSession(_model(), specialize="none")
    sess.run(None, _feeds(5))
    exe = sess.last_executable
    v = exe.active
    v.direct = None
    exe.device = H100
    fakes = [SimpleNamespace(run=object(), function=i, packed_metadata=None) for i in range(len(v.launches))]
    exe.preload(fakes[:-1])  # one missing: nothing changes
    assert v.direct is None
    exe.preload(fakes)
    assert [d.function for d in v.direct] == list(range(len(v.launches)))
    for d, (_, args, slots, constexprs, step, _) in zip(v.direct, v.launches):
        tail = [name for name, _ in parameters(step.kernel)][len(args):]
        assert d.args == list(args) + [constexprs[n] for n in tail] and d.slots == slots


def test_row_counts_are_never_specialized():
    """A product's M (and any kernel's row count, codegen/source.ROW_COUNTS) is a run-time argument
    that Triton does not specialize (no divisibility by 16, no value 1): the matmul of 56 and 64 rows
    (64 a multiple of 16) is one binary, and the key says what Triton compiles."""
    from rtxjit.codegen.source import load_kernel, parameters
    from tests.test_fallback_specialization import H100, _plan

    graph = rtxjit.InferenceSession(_model()).graph
    keys = {}
    for n in (56, 64, 1):
        plan = _plan(graph, H100, N=n)
        step = next(s for s in plan.steps if s.kernel.name == "matmul")
        keys[n] = kernel_keys.step_key(H100, plan, step, kernel_keys.SPECIALIZED, step.constexprs)
        src = kernel_keys.specialized_source(step)
        names = [name for name, _ in parameters(src)]
        classes = kernel_keys.arg_classes(kernel_keys.step_args(plan, step), False, src)
        assert classes[names.index("M")] == "i"
        if n == 64:
            fn = load_kernel(src, False)
            assert [p.name for p in fn.params if p.do_not_specialize] == ["M"]
    assert keys[56] == keys[64]
