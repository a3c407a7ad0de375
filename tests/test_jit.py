"""The JIT runtime on the CPU: generic kernels serve a new binding at once, specialized ones are
compiled in the background (a deterministic fake compile delay stands in for Triton), checked
against the generic output and swapped in; modes, counters, the histogram order, the kernel store."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.cache.keys import model_key
from rtxjit.cache.store import RuntimeCache
from rtxjit.codegen.source import KernelSource, specialize
from rtxjit.exec import executor
from rtxjit.jit import specializer as jit

RNG = np.random.default_rng(5)


def _mlp() -> onnx.ModelProto:
    """x[N, 8] -> MatMul + bias -> Relu -> Mul by a constant -> Softmax -> Sqrt: a matmul with a
    fused epilogue, a row reduction and a pointwise kernel."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "s"], ["m"], name="scale"),
             helper.make_node("Softmax", ["m"], ["p"], name="softmax", axis=-1),
             helper.make_node("Sqrt", ["p"], ["y"], name="sqrt")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], [w, b, s])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _pointwise() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "x"], ["a"], name="add"),
             helper.make_node("Tanh", ["a"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _x(n: int, cols: int = 8) -> dict:
    return {"x": RNG.standard_normal((n, cols)).astype(np.float32)}


def _reference(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture
def slow_compiler(monkeypatch):
    """Every specialization job takes 0.2 s more: a deterministic stand-in for Triton's compile."""
    monkeypatch.setattr(jit, "COMPILE_DELAY_S", 0.2)


@pytest.fixture
def paused():
    """The shared specializer holds its queue until the test resumes it."""
    spec = jit.specializer()
    spec.pause()
    yield spec
    spec.cancel_pending()
    spec.resume()


def test_modes_are_checked_and_default_to_none_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("RTXJIT_SPECIALIZE", raising=False)
    sess = rtxjit.InferenceSession(_pointwise())
    assert sess.specialize == "none"
    with pytest.raises(rtxjit.RtxjitError, match="specialize='sometimes' is not a mode"):
        rtxjit.InferenceSession(_pointwise(), specialize="sometimes")


def test_none_mode_serves_generic_kernels_only():
    sess = rtxjit.InferenceSession(_mlp(), specialize="none")
    feeds = _x(3)
    np.testing.assert_allclose(sess.run(None, feeds)[0], _reference(_mlp(), feeds), rtol=1e-5, atol=1e-6)
    stats = sess.jit_stats()
    assert stats["pending"] == 0 and stats["specialized"] == 0
    assert set(stats["served"].values()) == {"generic"} and stats["last_run"] == "generic"


def test_lazy_state_machine_generic_then_specialized(slow_compiler, paused):
    sess = rtxjit.InferenceSession(_mlp(), specialize="lazy")
    feeds = _x(4)
    ref = _reference(_mlp(), feeds)
    first = sess.run(None, feeds)[0]  # served at once: the job waits in the paused queue
    stats = sess.jit_stats()
    assert stats["last_run"] == "generic" and stats["pending"] == 1 and stats["specialized"] == 0
    assert sess.wait_for_specialization(timeout=0.05) is False  # still pending
    paused.resume()
    assert sess.wait_for_specialization(timeout=60)
    second = sess.run(None, feeds)[0]
    stats = sess.jit_stats()
    assert stats["last_run"] == "specialized" and stats["pending"] == 0 and stats["specialized"] == 1
    assert set(stats["served"].values()) == {"specialized"}
    assert stats["compiles"] > 0 and stats["rejected"] == 0 and stats["failed"] == 0
    # the binding's time from its first request to the install (the paused queue and the 0.2 s compile)
    [binding] = stats["bindings"]
    assert len(binding["installed_after_s"]) == 1 and binding["installed_after_s"][0] >= 0.2
    np.testing.assert_allclose(first, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-6)


def test_outputs_identical_before_and_after_the_swap(slow_compiler):
    sess = rtxjit.InferenceSession(_pointwise(), specialize="lazy")
    feeds = {"x": RNG.standard_normal((7, 5)).astype(np.float32)}
    before = sess.run(None, feeds)[0]
    assert sess.wait_for_specialization(timeout=60)
    after = sess.run(None, feeds)[0]
    assert sess.jit_stats()["last_run"] == "specialized"
    assert np.array_equal(before, after)
    np.testing.assert_allclose(after, np.tanh(2 * feeds["x"].astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_a_new_shape_is_served_at_once_by_generic_kernels(paused):
    sess = rtxjit.InferenceSession(_mlp(), specialize="lazy")
    for n in (2, 3, 5):
        feeds = _x(n)
        np.testing.assert_allclose(sess.run(None, feeds)[0], _reference(_mlp(), feeds), rtol=1e-5, atol=1e-6)
        assert sess.jit_stats()["last_run"] == "generic"
    assert sess.jit_stats()["pending"] == 3  # all three wait; none blocked its run


def test_eager_mode_specializes_before_the_first_run_returns():
    sess = rtxjit.InferenceSession(_mlp(), specialize="eager")
    feeds = _x(3)
    out = sess.run(None, feeds)[0]
    stats = sess.jit_stats()
    assert stats["last_run"] == "specialized" and stats["specialized"] == 1 and stats["pending"] == 0
    np.testing.assert_allclose(out, _reference(_mlp(), feeds), rtol=1e-5, atol=1e-6)


def _wrong_pointwise(step):
    """Test hook: the specialized kernel of every pointwise launch adds 1 to its result."""
    src = specialize(step.kernel, executor.shape_params(step))
    if step.kernel.name != "pointwise":
        return src
    assert "    y = " in src.text
    return KernelSource(src.name, src.text.replace("    y = ", "    y = 1.0 + ", 1))


def test_a_wrong_specialized_kernel_is_rejected_and_never_served(monkeypatch):
    monkeypatch.setattr(executor, "specialized_source", _wrong_pointwise)
    sess = rtxjit.InferenceSession(_mlp(), specialize="eager")
    feeds = _x(3)
    with pytest.warns(RuntimeWarning, match="disagrees with its generic kernel"):
        out = sess.run(None, feeds)[0]
    np.testing.assert_allclose(out, _reference(_mlp(), feeds), rtol=1e-5, atol=1e-6)
    stats = sess.jit_stats()
    assert stats["rejected"] >= 1 and stats["specialized"] == 1
    exe = sess.last_executable
    for kind, step in zip(exe.active.kinds, exe.plan.steps):
        assert kind == ("generic" if step.kernel.name == "pointwise" else "specialized"), step.node
    np.testing.assert_allclose(sess.run(None, feeds)[0], out, rtol=1e-6)  # still right after the swap


def test_a_failed_specialization_keeps_the_fallback_serving(monkeypatch):
    def broken(step):
        raise RuntimeError("forced compile failure")

    monkeypatch.setattr(executor, "specialized_source", broken)
    sess = rtxjit.InferenceSession(_mlp(), specialize="lazy")
    feeds = _x(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sess.run(None, feeds)[0]
        assert sess.wait_for_specialization(timeout=60)
    assert any("forced compile failure" in str(w.message) for w in caught)
    stats = sess.jit_stats()
    assert stats["failed"] == 1 and stats["specialized"] == 0 and "forced compile failure" in stats["errors"][0]
    np.testing.assert_allclose(sess.run(None, feeds)[0], out)
    assert sess.jit_stats()["last_run"] == "generic"


def test_histogram_survives_a_restart_and_orders_the_queue(tmp_path, paused):
    model = _mlp()
    first = rtxjit.InferenceSession(model, runtime_cache=tmp_path, specialize="none")
    for _ in range(3):
        first.run(None, _x(5))  # one binding, counted once: record more bindings below
    cache = RuntimeCache(tmp_path)
    key = model_key(first.graph)
    for _ in range(4):
        cache.record_shapes(key, {"x": (5, 8)})
    cache.record_shapes(key, {"x": (2, 8)})
    # a "new process": a new session over the same cache directory
    sess = rtxjit.InferenceSession(model, runtime_cache=str(tmp_path), specialize="lazy")
    sess.run(None, _x(2))  # seen once before
    sess.run(None, _x(5))  # seen five times: specialized first
    paused.resume()
    assert sess.wait_for_specialization(timeout=60)
    order = [dict((n, s) for n, s, _ in k)["x"] for k in jit_order(sess)]
    assert order == [(5, 8), (2, 8)]


def jit_order(sess) -> list:
    return list(sess._jit.order)


def test_wait_for_specialization_without_work_returns_at_once():
    sess = rtxjit.InferenceSession(_pointwise(), specialize="lazy")
    assert sess.wait_for_specialization(timeout=0)


def test_specialize_makes_shape_parameters_constexpr_deterministically():
    src = KernelSource("k", "# h\nimport triton\n\n\ndef k(a_ptr, a_off, n, s0, BLOCK: tl.constexpr):\n    pass\n")
    spec = specialize(src, ["n", "s0"])
    assert "def k(a_ptr, a_off, n: tl.constexpr, s0: tl.constexpr, BLOCK: tl.constexpr):" in spec.text
    assert spec.key == specialize(src, ["s0", "n"]).key != src.key
    assert specialize(src, []) is src


def test_check_tolerance_is_per_dtype():
    import torch

    ref = {"y": torch.tensor([1.0, 2.0, float("nan"), float("inf")], dtype=torch.float32)}
    close = {"y": torch.tensor([1.0, 2.0 + 1e-5, float("nan"), float("inf")], dtype=torch.float32)}
    far = {"y": torch.tensor([1.0, 2.01, float("nan"), float("inf")], dtype=torch.float32)}
    nan_moved = {"y": torch.tensor([float("nan"), 2.0, 1.0, float("inf")], dtype=torch.float32)}
    assert jit._mismatch(ref, close) is None
    assert "max |diff|" in jit._mismatch(ref, far)
    assert "NaN" in jit._mismatch(ref, nan_moved)
    half = {k: v.half() for k, v in ref.items()}
    assert jit._mismatch(half, {"y": far["y"].half()}) is None  # within fp16's 1e-2
    ints = {"i": torch.tensor([1, 2, 3])}
    assert "differ" in jit._mismatch(ints, {"i": torch.tensor([1, 2, 4])})


def test_a_plan_with_fp8_products_is_checked_at_least_to_their_accumulation():
    """fp8 tensor-core dots accumulate with fewer bits than fp32 on Hopper (8e-4 off the exact sum):
    an fp32 output of such a plan is checked to FP8_DOT_RTOL, not fp32's 1e-4; a wrong kernel still fails."""
    import torch
    from types import SimpleNamespace

    from rtxjit.ir.types import DType
    from rtxjit.plan.plan import BufferSpec

    def exe(*dtypes):
        return SimpleNamespace(plan=SimpleNamespace(buffers=[BufferSpec(d, 4, "temp") for d in dtypes]))

    assert jit._rtol_floor(exe(DType.FP32, DType.FP16)) == 0.0
    floor = jit._rtol_floor(exe(DType.FP32, DType.FP8E4M3))
    assert floor == jit.FP8_DOT_RTOL
    ref = {"y": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)}
    rounded = {"y": ref["y"] * (1 + 8e-4)}
    assert jit._mismatch(ref, rounded) is not None and jit._mismatch(ref, rounded, floor) is None
    assert jit._mismatch(ref, {"y": ref["y"] * 1.01}, floor) is not None


# --- the kernel store (a session's compiled kernels in its runtime cache) ------------------------

def _fake_kernel(name: str, cubin: bytes):
    """What ``binaries.entry_of`` reads of a Triton ``CompiledKernel`` (no GPU here)."""
    from collections import namedtuple
    from types import SimpleNamespace

    meta = namedtuple("KernelMetadata", ["name", "shared", "num_warps"])(name, 0, 4)
    src = SimpleNamespace(signature={"x_ptr": "*fp32", "n": "i32"}, constants={},
                          fn=SimpleNamespace(arg_names=["x_ptr", "n"]))
    return SimpleNamespace(src=src, asm={"cubin": cubin}, metadata=meta, name=name)


def _binary_entries(cache: RuntimeCache) -> dict:
    """key -> (kernel name, cubin) of every binary entry in ``cache``."""
    out = {}
    for key in cache.entries():
        hit = cache.get(key)
        if hit is not None and "cubin" in hit[1]:
            out[key] = (hit[0]["name"], hit[1]["cubin"])
    return out


def test_kernel_store_keeps_each_kernel_once_in_its_own_cache(tmp_path, monkeypatch):
    from rtxjit.kernels import binaries
    from rtxjit.kernels.store import KernelStore

    loaded = []
    monkeypatch.setattr(binaries, "load", lambda meta, cubin: loaded.append(meta["name"]) or ("loaded", cubin))
    a, b = KernelStore(RuntimeCache(tmp_path / "a")), KernelStore(RuntimeCache(tmp_path / "b"))
    ka, kb = _fake_kernel("ka", b"\x7fELF a"), _fake_kernel("kb", b"\x7fELF b")
    assert a.find("KA") is None  # a miss: the kernel is compiled
    assert a.put("KA", ka) and a.put("KA", ka) and b.put("KB", kb)
    a.put_entry("KA", *binaries.entry_of(ka))  # as from a compile worker: already held, not written again
    assert _binary_entries(a.cache) == {"KA": ("ka", b"\x7fELF a")}  # one copy, and only a's kernel
    assert _binary_entries(b.cache) == {"KB": ("kb", b"\x7fELF b")}
    assert len(list(a.cache.path.glob("*.bin"))) == 1
    fresh = KernelStore(RuntimeCache(tmp_path / "a"))  # another process over a's cache
    assert fresh.find("KA") == ("loaded", b"\x7fELF a") and loaded == ["ka"]
    assert fresh.find("KB") is None


def test_kernel_store_rewrites_a_damaged_entry(tmp_path, monkeypatch):
    from rtxjit.kernels import binaries
    from rtxjit.kernels.store import KernelStore

    monkeypatch.setattr(binaries, "load", lambda meta, cubin: ("loaded", cubin))
    cache = RuntimeCache(tmp_path / "c")
    KernelStore(cache).put("K", _fake_kernel("k", b"\x7fELF" + bytes(range(100))))
    (blob,) = cache.path.glob("*.bin")
    blob.write_bytes(blob.read_bytes()[:50])  # truncated
    store = KernelStore(cache)
    with pytest.warns(RuntimeWarning, match="rebuilt"):
        assert store.find("K") is None  # compiled again ...
    store.put("K", _fake_kernel("k", b"\x7fELF" + bytes(range(100))))  # ... and stored over the bad entry
    assert KernelStore(cache).find("K") == ("loaded", b"\x7fELF" + bytes(range(100)))


def test_two_sessions_write_their_kernels_only_into_their_own_runtime_caches(tmp_path):
    """Issue 16: the kernel store belonged to the session created last. Each session builds its own
    and hands it to its executables; what the compiler keeps for one lands in that one's cache."""
    import triton

    from rtxjit.exec import compiler

    manager = triton.knobs.cache.manager_class
    first = rtxjit.InferenceSession(_mlp(), device="cpu", runtime_cache=tmp_path / "a")
    second = rtxjit.InferenceSession(_mlp(), device="cpu", runtime_cache=tmp_path / "b")
    assert triton.knobs.cache.manager_class is manager  # Triton's own cache is left as it is
    assert first.kernels is not second.kernels and first.kernels.cache.path == tmp_path / "a"
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    first.run(None, {"x": x})  # the session created first runs after the second was created
    second.run(None, {"x": x[:2]})
    written = {}
    for name, sess in (("a", first), ("b", second)):
        exe = sess.last_executable
        assert exe.kernels is sess.kernels
        items = compiler._items(exe, "generic")
        compiler._keep(exe, [(it, _fake_kernel(f"{name}{i}", f"{name}{i}".encode())) for i, it in enumerate(items)])
        written[name] = {compiler._binary_key(exe, it) for it in items}
    entries_a, entries_b = _binary_entries(first.runtime_cache), _binary_entries(second.runtime_cache)
    assert set(entries_a) == written["a"] and all(n.startswith("a") for n, _ in entries_a.values())
    assert set(entries_b) == written["b"] and all(n.startswith("b") for n, _ in entries_b.values())


# --- on a GPU ------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
def test_gpu_lazy_specialization_swaps_in_checked_kernels(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from rtxjit.models import bert_encoder, demo_inputs

    model = bert_encoder()
    sess = rtxjit.InferenceSession(model, device="cuda", specialize="lazy", runtime_cache=tmp_path)
    for seq in (16, 24):
        feeds = demo_inputs(model, batch=2, seq=seq)
        first = sess.run(None, feeds)[0]
        assert sess.jit_stats()["last_run"] == "generic"
        assert sess.wait_for_specialization(timeout=300)
        stats = sess.jit_stats()
        assert stats["failed"] == 0 and stats["rejected"] == 0, stats["errors"]
        for _ in range(3):  # the third run replays the specialized variant's CUDA graph
            again = sess.run(None, feeds)[0]
        assert sess.jit_stats()["last_run"] == "specialized"
        np.testing.assert_allclose(again, first, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(first, _reference(model, feeds), rtol=1e-3, atol=1e-4)
    assert sess.jit_stats()["specialized"] == 2
    # a new session over the warm cache compiles nothing
    warm = rtxjit.InferenceSession(model, device="cuda", specialize="eager", runtime_cache=tmp_path)
    warm.run(None, demo_inputs(model, batch=2, seq=16))
    assert warm.jit_stats()["compiles"] == 0, warm.jit_stats()
    # ... and serves the recorded, checked specialized kernels from its first run (loaded binaries)
    feeds = demo_inputs(model, batch=2, seq=24)
    out = warm.run(None, feeds)[0]
    assert warm.jit_stats()["last_run"] == "specialized" and warm.jit_stats()["compiles"] == 0
    assert warm.jit_stats()["pending"] == 0  # nothing left to specialize for a recorded binding
    np.testing.assert_allclose(out, _reference(model, feeds), rtol=1e-3, atol=1e-4)
    for _ in range(2):  # captured at its first run, replayed after
        np.testing.assert_allclose(warm.run(None, feeds)[0], out, rtol=1e-3, atol=1e-4)


@gpu
def test_gpu_two_sessions_with_different_runtime_caches_each_keep_only_their_own_kernels(tmp_path):
    """Issue 16: both sessions are created before either runs (the process-wide store of old
    belonged to the one created last); each cache then holds its own session's kernels, each once."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from rtxjit.exec.executor import GENERIC
    from rtxjit.jit import warm as warm_start
    from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn

    encoder, cnn = bert_encoder(), resnet_cnn()
    a = rtxjit.InferenceSession(encoder, device="cuda", specialize="eager", runtime_cache=tmp_path / "a")
    b = rtxjit.InferenceSession(cnn, device="cuda", specialize="eager", runtime_cache=tmp_path / "b")
    a.run(None, demo_inputs(encoder, batch=2, seq=16))
    b.run(None, demo_inputs(cnn, batch=2))
    for sess in (a, b):
        stats = sess.jit_stats()
        assert stats["failed"] == 0 and stats["specialized"] == 1, stats["errors"]

    def generic_keys(sess) -> set:
        exe = sess.last_executable
        return {warm_start.step_key(exe.device, exe.plan, step, GENERIC, step.generic_constexprs)
                for step in exe.plan.steps}

    keys = {"a": generic_keys(a), "b": generic_keys(b)}
    for name, sess, other in (("a", a, "b"), ("b", b, "a")):
        entries = _binary_entries(sess.runtime_cache)
        assert keys[name] <= set(entries), name  # every generic kernel it compiled is in its own cache
        assert not (keys[other] - keys[name]) & set(entries), name  # none of the other session's
        for key in sess.runtime_cache.entries():  # each kernel once: no second copy as Triton's cache files
            hit = sess.runtime_cache.get(key)
            assert not (hit and isinstance(hit[0], dict) and "files" in hit[0]), key


WARM_CHILD = """
import json, sys, numpy as np, onnx, rtxjit
from rtxjit.models import bert_encoder, demo_inputs
model = bert_encoder()
sess = rtxjit.InferenceSession(model, device="cuda", specialize="lazy", runtime_cache=sys.argv[1])
feeds = demo_inputs(model, batch=2, seq=16)
out = sess.run(None, feeds)[0]
sess.wait_for_specialization(timeout=300)
s = sess.jit_stats()
np.save(sys.argv[2], out)
print(json.dumps({"compiles": s["compiles"], "last_run": s["last_run"], "specialized": s["specialized"]}))
"""


@gpu
def test_gpu_a_new_process_with_a_warm_cache_serves_specialized_binaries_without_compiling(tmp_path):
    import subprocess
    import sys

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from rtxjit.models import bert_encoder, demo_inputs

    runs = []
    for i in range(2):
        # each child with an empty Triton cache of its own: the first must compile (Triton's default
        # cache, shared with the GPU tests before this one, served its kernels: compiles 0), the
        # second must get every kernel from rtxjit's runtime cache alone
        env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / f"triton{i}")}
        proc = subprocess.run([sys.executable, "-c", WARM_CHILD, str(tmp_path / "cache"), str(tmp_path / f"{i}.npy")],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["specialized"] == 1 and runs[0]["compiles"] > 0
    assert runs[1] == {"compiles": 0, "last_run": "specialized", "specialized": 0}, runs
    model = bert_encoder()
    ref = _reference(model, demo_inputs(model, batch=2, seq=16))
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"{i}.npy"), ref, rtol=1e-3, atol=1e-4)


def test_direct_launches_pass_every_parameter_in_order_with_per_run_buffers_bound():
    """The direct path calls Triton's launcher as its JIT does: grid, stream, function, metadata,
    no hooks, then every parameter (constexprs included) in the kernel's order."""
    model = _mlp()
    sess = rtxjit.InferenceSession(model, device="cpu")
    sess.run(None, _x(3))
    exe = sess.last_executable
    calls = []

    class FakeKernel:
        function, packed_metadata = "fn", ("meta",)

        def run(self, *args):
            calls.append(args)

    launches = exe.active.launches
    direct = executor.bind_direct(launches, [FakeKernel() for _ in launches])
    assert direct is not None and len(direct) == len(launches)
    bufs = exe.fresh_buffers({n: np.zeros(1) for n in exe.inputs})
    executor.launch_direct(direct, bufs, stream=7)
    from rtxjit.codegen.source import parameters

    for (launcher, args, slots, constexprs, step, grid), call in zip(launches, calls):
        g = tuple(grid) + (1,) * (3 - len(grid))
        assert call[:9] == g + (7, "fn", ("meta",), None, None, None)
        names = [n for n, _ in parameters(step.kernel)]
        assert len(call) - 9 == len(names)
        for j, (name, value) in enumerate(zip(names, call[9:])):
            if j in slots:
                assert value is bufs[args[j].index]
            elif name in constexprs:
                assert value == constexprs[name]
            else:
                assert value is args[j] or value == args[j]
    # a kernel object without the launcher's attributes: no direct launches
    assert executor.bind_direct(launches, [None] * len(launches)) is None


def test_a_binary_entry_keeps_the_parameter_order_through_the_runtime_cache(tmp_path):
    """The launcher of a stored kernel is rebuilt from its signature: the order of parameters
    must survive the cache's JSON (which sorts object keys)."""
    from types import SimpleNamespace

    from rtxjit.kernels import binaries

    class Meta(SimpleNamespace):
        def _asdict(self):
            return dict(vars(self))

    target = SimpleNamespace(backend="cuda", arch=90, warp_size=32)
    signature = {"z_ptr": "*fp16", "a_n": "i32", "m_BLOCK": "constexpr"}
    kernel = SimpleNamespace(name="k", asm={"cubin": b"\x7fELF-bytes"},
                             metadata=Meta(target=target, num_warps=4, shared=0, name="k"),
                             src=SimpleNamespace(signature=signature, constants={(2,): 64},
                                                 fn=SimpleNamespace(arg_names=list(signature))))
    meta, cubin = binaries.entry_of(kernel)
    cache = RuntimeCache(tmp_path)
    cache.put("k1", meta, {"cubin": cubin})
    back, blobs = cache.get("k1")
    assert [k for k, _ in back["signature"]] == ["z_ptr", "a_n", "m_BLOCK"]
    assert back["constants"] == [[[2], 64]] and blobs["cubin"] == cubin
    assert back["metadata"]["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}


def test_freeze_heap_moves_the_heap_out_of_later_collections(monkeypatch):
    """A GPU session freezes the collector's heap when created (a full collection over torch's heap
    paused a new binding's first request for ~100 ms): everything alive is frozen, garbage made
    before is collected first, and RTXJIT_GC_FREEZE=0 turns it off."""
    import gc

    from rtxjit import config
    from rtxjit.jit import specializer

    class Cycle:
        def __init__(self):
            self.me = self

    gc.unfreeze()
    try:
        import weakref

        garbage = Cycle()
        probe = weakref.ref(garbage)
        del garbage
        specializer.freeze_heap()
        assert probe() is None  # collected before the freeze
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
    monkeypatch.setenv("RTXJIT_GC_FREEZE", "0")
    assert not config.gc_freeze()
    monkeypatch.delenv("RTXJIT_GC_FREEZE")
    assert config.gc_freeze()


def test_every_bindings_first_pass_runs_before_any_tuned_pass(monkeypatch):
    """The background specializer queues a binding's tuned pass (every tile candidate compiled and
    timed) behind the first pass (heuristic tiles) of every binding queued: a new shape gets its
    first specialized kernels without waiting for an older shape's candidates. The tuned stage
    holds its binding weakly: one dropped meanwhile is skipped (and no longer pending)."""
    import threading

    from rtxjit.jit import specializer as sp

    order, done = [], threading.Event()

    def fake(exe, feeds, stats, background, stage):
        order.append((exe.name, stage))
        if len(order) == 3:
            queue.pause()  # the first passes are done: hold the tuned ones while c is dropped
        if len(order) == 5:
            done.set()
        return True, stage == "first"

    class Binding:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(sp, "_guarded", fake)
    queue = sp.Specializer()
    stats = sp.Stats()
    queue.pause()
    a, b, c = Binding("a"), Binding("b"), Binding("c")
    for binding in (a, b, c):
        assert queue.submit(binding, {}, stats)
    del binding
    queue.resume()
    import gc
    import time

    deadline = time.time() + 10
    while (len(order) < 3 or not queue.paused) and time.time() < deadline:
        time.sleep(0.01)
    del c  # dropped while its tuned pass waits
    gc.collect()
    queue.resume()
    assert done.wait(10)
    deadline = time.time() + 10
    while stats.pending and time.time() < deadline:
        time.sleep(0.01)
    assert stats.pending == 0
    queue.shutdown()
    assert order[:3] == [("a", "first"), ("b", "first"), ("c", "first")]
    assert order[3:] == [("a", "tuned"), ("b", "tuned")], order


def test_a_tuned_pass_gives_way_to_a_new_bindings_first_pass(monkeypatch):
    """A tuned pass (every tile candidate compiled: 20-30 s for resnet50 on an H100) checks between
    its compiles for a first pass queued meanwhile, gives way to it and is queued again; neither
    counts as a failure."""
    import time
    from types import SimpleNamespace

    from rtxjit.jit import specializer as sp

    order = []
    queue = sp.Specializer()
    stats = sp.Stats()

    def fake(exe, feeds, stats_, background, stage):
        order.append((exe.name, stage))
        if exe.name == "a" and stage == "tuned" and order.count(("a", "tuned")) == 1:
            queue.submit(b, {}, stats)  # a new shape arrives while a's candidates compile
            sp._between_tuned()  # what the compile loop calls between kernels
        return True, exe.name == "a" and stage == "first"

    class Binding:  # held weakly by a queued tuned pass
        def __init__(self, name):
            self.name, self.device = name, SimpleNamespace(kind="cpu")

    monkeypatch.setattr(sp, "_specialize", fake)
    monkeypatch.setattr(sp, "_specializer", queue)
    a, b = Binding("a"), Binding("b")
    assert queue.submit(a, {}, stats)
    deadline = time.time() + 10
    while (stats.pending or len(order) < 4) and time.time() < deadline:
        time.sleep(0.01)
    queue.shutdown()
    assert order == [("a", "first"), ("a", "tuned"), ("b", "first"), ("a", "tuned")], order
    assert stats.pending == 0 and stats.failed == 0 and not stats.errors


def test_a_tunable_binding_is_specialized_in_a_first_and_a_tuned_stage(monkeypatch):
    """_specialize's stages on a binding with tile candidates: "first" runs the heuristic pass and
    says a tuned stage follows; "tuned" runs the timed pass; the binding counts as specialized once;
    "all" (eager mode) runs both passes at once as before."""
    sess = rtxjit.InferenceSession(_mlp(), device="cpu", specialize="none")
    feeds = _x(4)
    sess.run(None, feeds)
    exe = sess.last_executable
    exe.plan.steps[0].choices = ((exe.plan.steps[0].grid, exe.plan.steps[0].constexprs),) * 2  # two candidates
    passes = []
    monkeypatch.setattr(jit, "_specialized_pass", lambda exe, feeds, stats, background, tuned: passes.append(tuned)
                        or exe.active)
    monkeypatch.setattr(jit.autotune, "enabled", lambda: True)
    stats = jit.Stats()
    assert jit._specialize(exe, feeds, stats, True, "first") == (True, True) and passes == [False]
    assert jit._specialize(exe, feeds, stats, True, "tuned") == (True, False) and passes == [False, True]
    assert stats.specialized == 1
    passes.clear()
    assert jit._specialize(exe, feeds, jit.Stats(), True, "all") == (True, False) and passes == [False, True]


def _ln_then_quantize() -> onnx.ModelProto:
    """x[N, 64] -> LayerNormalization -> QuantizeLinear (uint8, scale 0.02) -> DequantizeLinear -> Mul:
    a quantization after a kernel turns its last-bit differences into whole steps."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((1 + 0.2 * rng.standard_normal(64)).astype(np.float32), "g"),
             numpy_helper.from_array((0.1 * rng.standard_normal(64)).astype(np.float32), "b"),
             numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z"),
             numpy_helper.from_array(np.float32(3.0), "k")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             helper.make_node("QuantizeLinear", ["n", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Mul", ["d", "k"], ["y"])]
    graph = helper.make_graph(nodes, "lnq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=8)


def _scaled_layernorm(factor: float):
    """Test hook: the specialized LayerNorm kernel stores its result times ``factor``."""
    def hook(step):
        src = specialize(step.kernel, executor.shape_params(step))
        if "layernorm" not in src.text.splitlines()[0]:
            return src
        marker = "tl.store(y_ptr + y_off + row_off + col_off, ("
        assert marker in src.text
        return KernelSource(src.name, src.text.replace(marker, marker + f"{factor!r} * ", 1))
    return hook


@pytest.mark.parametrize("factor,kept", [(1 + 5e-5, True), (1 + 1e-2, False)], ids=["last-bits", "wrong"])
def test_a_specialized_kernel_right_on_its_own_but_magnified_by_a_quantization_is_kept(monkeypatch, factor, kept):
    """The check compares the model's outputs; a QuantizeLinear after a kernel moves a value a whole
    step where a last-bit difference crosses a rounding boundary. A kernel whose own outputs (on the
    generic kernels' inputs) match within the tolerance, nothing else written, keeps its specialized
    kernel (a 5e-5 relative change: the check's fp32 tolerance is 1e-4); one beyond it (1e-2) is rejected."""
    model = _ln_then_quantize()
    feeds = {"x": (RNG.standard_normal((64, 64)) * 3).astype(np.float32)}
    monkeypatch.setattr(executor, "specialized_source", _scaled_layernorm(1.0))
    exact = rtxjit.InferenceSession(model, specialize="none").run(None, feeds)[0]
    monkeypatch.setattr(executor, "specialized_source", _scaled_layernorm(factor))
    sess = rtxjit.InferenceSession(model, specialize="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sess.run(None, feeds)
    exe = sess.last_executable
    served = [kind for kind, step in zip(exe.active.kinds, exe.plan.steps)
              if "layernorm" in step.kernel.text.split("\n")[0]]
    assert served == (["specialized"] if kept else ["generic"])
    assert (sess.jit_stats()["rejected"] == 0) == kept
    out = sess.run(None, feeds)[0]
    step = 0.02 * 3.0
    assert np.abs(out - exact).max() <= (step + 1e-5 if kept else 0)  # at most one quantization step apart
