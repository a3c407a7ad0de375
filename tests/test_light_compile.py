"""A new session's generic kernels compiled in light worker processes (exec/packed.py): Triton's
binder here, its compiler in workers that load neither torch nor rtxjit's package. Their binaries are
the ones the ahead-of-time compiler makes of the same kernels (itself Triton's own JIT path), a
failing kernel fails alone, and the compiler keeps what they give in the session's kernel store
and runtime cache (the GPU's loading is faked here: nothing runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rtxjit.cache.store import RuntimeCache
from rtxjit.engine import aot
from rtxjit.errors import KernelError
from rtxjit.exec import compiler, packed
from rtxjit.kernels import binaries
from rtxjit.kernels.keys import GENERIC
from tests.test_buckets import _on_fake_gpu


def _items(exe) -> list:
    return compiler._items(exe, GENERIC)


def test_light_workers_make_the_binaries_the_ahead_of_time_compiler_makes(tmp_path, monkeypatch):
    exe = _on_fake_gpu(tmp_path / "cache", 5)
    items = _items(exe)
    assert items
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-light"))  # each its own Triton cache
    light = packed.Light(2)
    futures = [light.submit([src.name, src.text, generic, packed.pack(src, generic, args, cx, 90), 90])
               for src, generic, args, _, cx in items]
    futures.append(light.submit(["broken", "def broken(:\n", True, "((), {}, {}, {})", 90]))
    light.close()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-aot"))
    want = list(aot._compile_all([(90, None, src, generic, args, None, cx) for src, generic, args, _, cx in items]))
    for f, (meta, cubin) in zip(futures, want):
        got_meta, got_cubin = f.result()
        assert got_cubin == cubin and got_meta["name"] == meta["name"]
        assert got_meta["metadata"]["target"]["arch"] == 90
    with pytest.raises(KernelError, match="broken"):  # the bad one fails alone
        futures[-1].result()


def test_light_compile_is_off_unless_asked(monkeypatch):
    from rtxjit import config

    monkeypatch.delenv("RTXJIT_LIGHT_COMPILE", raising=False)
    assert not config.light_compile()
    monkeypatch.setenv("RTXJIT_LIGHT_COMPILE", "1")
    assert config.light_compile()


def test_light_worker_loads_neither_torch_nor_rtxjits_package():
    boot = packed._BOOT.format(path=str(packed.__file__).rsplit("/exec/", 1)[0])
    probe = boot.replace("serve()", "print(sorted(m for m in ('torch', 'rtxjit.ops', 'rtxjit.session') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={"RTXJIT_DEVICE": "cuda", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_prepare_generic_keeps_light_binaries_in_the_store_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTXJIT_LIGHT_COMPILE", "1")
    monkeypatch.setattr(compiler, "LIGHT_MIN", 1)
    monkeypatch.setattr(compiler, "_warmed", {})
    monkeypatch.setattr(binaries, "load", lambda meta, cubin: ("loaded", meta["name"], len(cubin)))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))

    def no_thread_compile(*item, **kw):
        raise AssertionError("compiled in this process")

    monkeypatch.setattr(compiler, "_warm", no_thread_compile)
    cache = tmp_path / "cache"
    exe = _on_fake_gpu(cache, 5)
    items = _items(exe)
    compiles, hits = compiler.prepare_generic(exe)
    assert (compiles, hits) == (len(items), 0)
    for item in items:
        found = exe.kernels.find(compiler._binary_key(exe, item))
        assert found[0] == "loaded" and found[1] == item[0].name
    assert len(RuntimeCache(cache).entries()) >= len(items)
    # another process over the same runtime cache compiles nothing
    monkeypatch.setattr(compiler, "_warmed", {})
    assert compiler.prepare_generic(_on_fake_gpu(cache, 7)) == (0, len(items))


def test_a_kernel_the_workers_fail_on_is_compiled_here(tmp_path, monkeypatch):
    monkeypatch.setenv("RTXJIT_LIGHT_COMPILE", "1")
    monkeypatch.setattr(compiler, "LIGHT_MIN", 1)
    monkeypatch.setattr(compiler, "_warmed", {})
    monkeypatch.setattr(binaries, "load", lambda meta, cubin: ("loaded", meta["name"]))
    here = []

    def thread_compile(*item, **kw):
        here.append(item[0].name)
        return None

    def failing_pack(src, *a):
        raise KernelError("no binder today")

    monkeypatch.setattr(compiler, "_warm", thread_compile)
    monkeypatch.setattr(packed, "pack", failing_pack)
    exe = _on_fake_gpu(tmp_path / "cache", 5)
    items = _items(exe)
    compiler.prepare_generic(exe)
    assert sorted(here) == sorted(src.name for src, *_ in items)


@pytest.mark.gpu
def test_gpu_cold_session_compiles_in_light_workers(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import rtxjit
    from rtxjit.models import resnet_cnn

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # cold: nothing compiled before
    monkeypatch.setenv("RTXJIT_LIGHT_COMPILE", "1")
    monkeypatch.setattr(compiler, "_warmed", {})
    started = []

    class Counted(packed.Light):
        def __init__(self, n):
            started.append(n)
            super().__init__(n)

    monkeypatch.setattr(packed, "Light", Counted)
    model = resnet_cnn(batch="N")
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    sess = rtxjit.InferenceSession(str(path), device="cuda", specialize="none", runtime_cache=tmp_path / "cache")
    x = np.random.default_rng(5).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = sess.run(None, {"image": x})[0]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert started and sess.jit_stats()["compiles"] >= compiler.LIGHT_MIN
    # a new process over the runtime cache loads them (the light workers' binaries were stored)
    monkeypatch.setattr(compiler, "_warmed", {})
    warm = rtxjit.InferenceSession(str(path), device="cuda", specialize="none", runtime_cache=tmp_path / "cache")
    np.testing.assert_allclose(warm.run(None, {"image": x})[0], want, rtol=1e-3, atol=1e-3)
    assert warm.jit_stats()["compiles"] == 0
