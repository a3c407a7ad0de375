"""Compiling kernels before their first launch: in parallel, and off the serving thread.

A kernel is compiled by Triton's own JIT path (``JITFunction.warmup``: the same cache key as a
launch, so the launch that follows finds the binary), and its launcher is built and loaded then too.

- ``prepare_generic``: a new session's generic kernels, compiled by a pool of threads in this
  process before the first run (the caller waits anyway; Triton's compiler and ``ptxas`` overlap).
- ``prepare_specialized``: a binding's specialized kernels (every tile configuration offered). In the
  background on a GPU they are compiled by worker processes (``_Workers``), which write Triton's cache
  and send the binary back; this process keeps it in the session's kernel store and only loads it.
  Compiling in threads of this process would hold the GIL for up to ~100 ms at a time (measured on
  an H100 with triton 3.6), stalling the serving thread.

Every kernel compiled for a session is kept in that session's ``KernelStore`` (kernels/store.py,
passed in as ``Executable.kernels``): one binary entry per kernel in its runtime cache, written by
this process only. Workers serve every session of the process and write no runtime cache.

Counting: a Triton compilation listener counts compilations and cache loads per calling thread;
workers return their counts. Under Triton's interpreter nothing is compiled: preparing a kernel
builds its interpreted function, counted as a compile.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Optional

import torch

from rtxjit.codegen.source import load_kernel
from rtxjit.errors import KernelError
from rtxjit.exec import executor, packed
from rtxjit.exec.executor import Executable
from rtxjit.kernels import binaries
from rtxjit.kernels.keys import GENERIC, SPECIALIZED, arg_classes, item_key, step_args
from rtxjit.plan import autotune

THREADS = min(16, os.cpu_count() or 1)


def _workers() -> int:
    from rtxjit import config

    return config.compile_workers() or max(1, min(4, (os.cpu_count() or 2) // 4))


_counts = threading.local()
_listener_lock = threading.Lock()
_listener_installed = False


def _install_listener() -> None:
    """Count Triton's compilations and cache hits in the calling thread (``_counting``)."""
    global _listener_installed
    with _listener_lock:
        if _listener_installed:
            return
        import triton

        compilation = getattr(getattr(triton, "knobs", None), "compilation", None)
        if compilation is None or not hasattr(compilation, "listener"):
            _listener_installed = True
            return
        previous = compilation.listener

        def listener(*args, **kwargs):
            tally = getattr(_counts, "tally", None)
            if tally is not None:
                tally[1 if kwargs.get("cache_hit") else 0] += 1
            if previous is not None:
                previous(*args, **kwargs)

        compilation.listener = listener
        _listener_installed = True


class _counting:
    """``with _counting() as tally``: tally == [compiles, cache hits] of Triton calls in this thread."""

    def __enter__(self):
        _install_listener()
        self.outer = getattr(_counts, "tally", None)
        _counts.tally = [0, 0]
        return _counts.tally

    def __exit__(self, *exc):
        inner = _counts.tally
        _counts.tally = self.outer
        if self.outer is not None:
            self.outer[0] += inner[0]
            self.outer[1] += inner[1]
        return False


# --- what to compile ---------------------------------------------------------------------------

def _items(exe: Executable, kind: str, tuned: bool = True, chosen: Optional[dict] = None) -> list:
    """``(source, generic, args, grid, constexprs)`` per distinct compilation of ``kind`` kernels:
    pointer arguments as torch dtypes (Triton mocks them, 16-byte aligned as our buffers are).
    Specialized ones: with ``tuned`` every tile configuration of a launch whose choice is not
    remembered yet (the remembered one alone where it is), else ``chosen[i]`` or the plan's."""
    return [item for item, _ in _keyed_items(exe, kind, tuned, chosen)]


def _keyed_items(exe: Executable, kind: str, tuned: bool = True, chosen: Optional[dict] = None,
                 per_step: Optional[list] = None) -> list:
    """``[(item, _item_key(item))]`` of ``_items``; ``per_step``, if given, receives each step's
    keys in order (one per step for generic kernels)."""
    items, seen = [], set()
    for i, step in enumerate(exe.plan.steps):
        args = step_args(exe.plan, step)
        if kind == GENERIC:
            configs = [(step.generic_grid, step.generic_constexprs)]
            src = step.kernel
        else:
            if tuned and step.choices and autotune.enabled():
                hit = autotune.remembered(step.tune_key, step.choices)
                configs = list(step.choices) if hit is None else [step.choices[hit]]
            else:
                configs = [(chosen or {}).get(i, (step.grid, step.constexprs))]
            src = executor.specialized_source(step)  # looked up per call: tests may replace it
        generic = kind == GENERIC
        for grid, constexprs in configs:
            key = (src.key, generic, arg_classes(args, generic, src), tuple(sorted(constexprs.items())))  # as _item_key
            if per_step is not None:
                per_step.append(key)
            if key not in seen:
                seen.add(key)
                items.append(((src, generic, args, grid, dict(constexprs)), key))
    return items


def _warm(src, generic: bool, args: tuple, grid: tuple, constexprs: dict, load: bool = True):
    """Compile one kernel and build its launcher; ``load`` also loads it onto the GPU (this process
    will launch it). Without ``load`` no CUDA context is needed: compile workers stay off the GPU.
    Returns Triton's compiled kernel (None where Triton gives none)."""
    fn = load_kernel(src, False, generic=generic)
    kernel = fn.warmup(*args, grid=grid, **constexprs)
    if kernel is None:
        return None
    if load and hasattr(kernel, "_init_handles"):
        kernel._init_handles()  # the launcher (a C module Triton builds and caches) and the module load
        return kernel
    try:  # only the launcher module, cached in Triton's folder for the process that loads the kernel
        from triton.runtime import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 - the loading process builds it then
        pass
    return kernel


# --- generic kernels, before the first run -------------------------------------------------------

def prepare_generic(exe: Executable) -> tuple:
    """Compile ``exe``'s generic kernels with a pool of threads; ``(compiles, cache hits)``. Each
    is kept in the session's kernel store (``exe.kernels``), compiled now or earlier in this process."""
    if exe.device.interpret:
        return _prepare_interpreted(exe, GENERIC)
    per_step: list = []
    every = _keyed_items(exe, GENERIC, per_step=per_step)  # each with its _item_key, worked out once
    with _warmed_lock:
        known = {k: _warmed[k] for _, k in every if k in _warmed}
    _keep(exe, [(it, known[k]) for it, k in every if k in known])
    items = [(it, k) for it, k in every if k not in known]
    found = _stored(exe, [it for it, _ in items])
    known.update((k, kernel) for (_, k), kernel in zip(items, found) if kernel is not None)
    left = [(it, k) for (it, k), kernel in zip(items, found) if kernel is None]
    compiles = hits = 0
    if left:
        todo = [it for it, _ in left]
        with _counting() as tally:
            compiled = _light(exe, todo) if len(todo) >= LIGHT_MIN and exe.device.sm else None
            if compiled is None:
                compiled = _parallel(todo, exe)
        with _warmed_lock:
            _warmed.update((k, kernel) for (_, k), kernel in zip(left, compiled))
        known.update((k, kernel) for (_, k), kernel in zip(left, compiled) if kernel is not None)
        compiles, hits = tally
    exe.preload([known.get(k) for k in per_step])
    return compiles, hits + len(items) - len(left)


def prepare_generic_background(owner, between=None, skip: Optional[set] = None) -> tuple:
    """The generic kernels of ``owner``'s plan (``owner``: ``plan``, ``device``, ``kernels``, as an
    Executable has them) that this process has not compiled and its kernel store does not hold:
    compiled in the worker processes (this thread where there are none), then loaded here, where a
    later binding's ``prepare_generic`` finds them (jit/fallbacks.py). ``skip``: keys already handed
    out (added to); ``(compiles, cache hits, kernels loaded)``."""
    skip = set() if skip is None else skip
    with _warmed_lock:
        items = [(it, k) for it, k in _keyed_items(owner, GENERIC) if k not in _warmed and k not in skip]
    skip.update(k for _, k in items)
    todo = [(it, k) for (it, k), kernel in zip(items, _stored(owner, [it for it, _ in items])) if kernel is None]
    if not todo:
        return 0, 0, 0
    compiles, hits = _compile_specialized(owner, [it for it, _ in todo], True, between)
    loaded = 0
    for item, key in todo:  # a hit in Triton's cache the workers filled
        if between is not None:
            between()
        kernel = _warm(*item)
        if kernel is not None:
            with _warmed_lock:
                _warmed[key] = kernel
            loaded += 1
    return compiles, hits, loaded


LIGHT_MIN = 4  # generic compiles from which a new session compiles them in light worker processes
LIGHT_TIMEOUT = 300  # seconds a light worker may take for one kernel before it is compiled here


def _light(exe: Executable, items: list) -> Optional[list]:
    """Compile ``items`` (generic kernels) in light worker processes (exec/packed.py: Triton's
    binder here, its compiler there), load them and keep them in the session's kernel store; the
    loaded kernels in order, or None where no worker starts (threads compile them then). An item a
    worker fails on is compiled here."""
    from rtxjit import config

    if not config.light_compile():
        return None
    try:
        light = packed.Light(min(len(items), os.cpu_count() or 1, 16))
    except OSError:
        return None
    try:
        futures = []
        for src, generic, args, _, constexprs in items:
            try:
                futures.append(light.submit([src.name, src.text, generic,
                                             packed.pack(src, generic, args, constexprs, exe.device.sm),
                                             exe.device.sm]))
            except Exception as exc:  # noqa: BLE001 - compiled here instead (below)
                f: Future = Future()
                f.set_exception(exc)
                futures.append(f)
    finally:
        light.close()

    def load(pair):
        item, f = pair
        try:
            meta, cubin = f.result(timeout=LIGHT_TIMEOUT)
            kernel = binaries.load(meta, cubin)
        except Exception:  # noqa: BLE001 - a worker's failure (or a binary that does not load): compiled here
            with _counting() as tally:
                kernel = _warm(*item)
            return kernel, tally[0]
        if exe.kernels is not None:
            key = _binary_key(exe, item)
            exe.kernels.remember(key, kernel)
            exe.kernels.put_entry(key, meta, cubin)
        return kernel, 1

    with ThreadPoolExecutor(min(THREADS, len(items)), thread_name_prefix="rtxjit-load") as pool:
        done = list(pool.map(load, zip(items, futures)))
    outer = getattr(_counts, "tally", None)
    if outer is not None:
        outer[0] += sum(n for _, n in done)
    return [kernel for kernel, _ in done]


def _binary_key(exe: Executable, item) -> str:
    src, generic, args, _, constexprs = item
    return item_key(exe.device, src, generic, args, constexprs)


def _keep(exe: Executable, compiled: list) -> None:
    """Write ``[(item, kernel)]`` compiled in this process into the session's kernel store (each
    binary once: a kernel it holds is not written again)."""
    kernels = exe.kernels
    if kernels is None or kernels.cache is None:
        return
    for item, kernel in compiled:
        if kernel is not None:
            kernels.put(_binary_key(exe, item), kernel)


def _without_stored(exe: Executable, items: list) -> tuple:
    """``(items, n)``: the compilations that the session's kernel store (its engine, its runtime
    cache) holds no binary for, and how many it holds (they are loaded now, not compiled)."""
    found = _stored(exe, items)
    left = [it for it, kernel in zip(items, found) if kernel is None]
    return left, len(items) - len(left)


def _stored(exe: Executable, items: list) -> list:
    """Per item, its kernel loaded from the session's kernel store (its engine, its runtime cache),
    or None."""
    kernels = exe.kernels
    if kernels is None or not kernels.has_sources():
        return [None] * len(items)
    return [kernels.find(_binary_key(exe, it)) for it in items]


_warmed: dict = {}  # generic compilations done in this process -> the compiled kernel (a new shape needs none)
_warmed_lock = threading.Lock()


def _item_key(item) -> tuple:
    src, generic, args, grid, constexprs = item
    return src.key, generic, arg_classes(args, generic, src), tuple(sorted(constexprs.items()))


def _parallel(items: list, exe: Optional[Executable] = None) -> list:
    """Compile ``items`` with a pool of threads; their compiled kernels, in order. With ``exe``,
    each is written into its session's kernel store by the thread that compiled it."""
    lock = threading.Lock()
    totals = [0, 0]

    def one(item):
        with _counting() as tally:
            kernel = _warm(*item)
        if exe is not None:
            _keep(exe, [(item, kernel)])
        with lock:
            totals[0] += tally[0]
            totals[1] += tally[1]
        return kernel

    if len(items) <= 1:
        out = [_warm(*item) for item in items]
        if exe is not None:
            _keep(exe, list(zip(items, out)))
        return out
    with ThreadPoolExecutor(min(THREADS, len(items)), thread_name_prefix="rtxjit-compile") as pool:
        futures = [pool.submit(one, item) for item in items]
        out = [f.result() for f in futures]  # a compile error surfaces here, naming the kernel through Triton
    outer = getattr(_counts, "tally", None)
    if outer is not None:
        outer[0] += totals[0]
        outer[1] += totals[1]
    return out


_interpreted: set = set()  # item keys "compiled" under the interpreter in this process
_interpreted_lock = threading.Lock()


def _prepare_interpreted(exe: Executable, kind: str) -> tuple:
    """Under the interpreter nothing is compiled: each kernel source is loaded once. Counted as a GPU
    would compile: each distinct compilation (``_item_key``: source, kind, Triton's classes of
    the arguments, constexprs) once per process, so tests on the CPU count what a GPU compiles. A
    generic kernel's tiles are the binding's here (``LowerCtx.launch``), a GPU's are the same for
    every binding: they are left out of its count."""
    built = 0
    for item in _items(exe, kind):
        src, generic = item[0], item[1]
        load_kernel(src, True, generic=generic)
        key = _item_key(item)[:3] if generic else _item_key(item)
        with _interpreted_lock:
            if key not in _interpreted:
                _interpreted.add(key)
                built += 1
    return built, 0


# --- specialized kernels -------------------------------------------------------------------------

def prepare_specialized(exe: Executable, background: bool, tuned: bool = True, between=None,
                        chosen: Optional[dict] = None) -> tuple:
    """Compile ``exe``'s specialized kernels (with ``tuned``, in every tile configuration offered,
    else in ``chosen``'s or the plan's, see ``first_configs``); ``(compiles, cache hits)``. In the
    background on a GPU, worker processes compile and this thread only waits; it hands them a few
    kernels at a time (the pool's own threads encode and decode in this process, under the GIL),
    calling ``between()`` before each."""
    if exe.device.interpret:
        return _prepare_interpreted(exe, SPECIALIZED)
    items, stored = _without_stored(exe, _items(exe, SPECIALIZED, tuned, chosen))
    compiles, hits = _compile_specialized(exe, items, background, between)
    with _done_lock:
        _specialized_done.update(_item_key(it) for it in items)
    return compiles, hits + stored


_specialized_done: set = set()  # specialized compilations made in this process (binaries in Triton's cache)
_done_lock = threading.Lock()


def first_configs(exe: Executable) -> dict:
    """Step index -> ``(grid, constexprs)`` for the first (untimed) specialization pass of a new
    binding, where it differs from the plan's heuristic tiles: a launch whose tile choice is
    remembered for its bucket (plan/autotune.py: timed before, in this process or one that shares
    its runtime cache) takes it; otherwise, where the heuristic's kernel is not compiled yet but
    another of the launch's configurations is (for another bucket of the same sizes' classes),
    that one, preferring one timed fastest for another bucket: a new shape bucket reaches
    specialized kernels without waiting for compiles (resnet50 on an H100: ~57 per new batch
    bucket, 16-30 s on 4 workers), and the tuned pass times the rest later. Choices are all
    correct configurations of one kernel; the first pass is checked like any other."""
    out = {}
    if not autotune.enabled():
        return out
    winners = autotune.chosen_configs()
    for i, step in enumerate(exe.plan.steps):
        choices = step.choices
        if not choices or len(choices) < 2:
            continue
        hit = autotune.remembered(step.tune_key, choices)
        if hit is not None:
            if hit:
                out[i] = choices[hit]
            continue
        src, args = executor.specialized_source(step), step_args(exe.plan, step)
        if _available(exe, src, args, choices[0]):
            continue
        won = winners.get(tuple(step.tune_key[:2]), ())
        ranked = sorted(choices[1:], key=lambda c: c[1] not in won)  # stable: the heuristic's order otherwise
        ready = next((c for c in ranked if _available(exe, src, args, c)), None)
        if ready is not None:
            out[i] = ready
    return out


def _available(exe: Executable, src, args: tuple, config: tuple) -> bool:
    """Whether the specialized kernel ``src`` over ``args`` in tile configuration ``config`` needs no
    compile: made in this process, or held by the session's kernel store."""
    grid, constexprs = config
    item = (src, False, args, grid, dict(constexprs))
    with _done_lock:
        if _item_key(item) in _specialized_done:
            return True
    kernels = exe.kernels
    return kernels is not None and kernels.has_sources() and kernels.find(_binary_key(exe, item)) is not None


def _compile_specialized(exe: Executable, items: list, background: bool, between) -> tuple:
    """Compile ``items`` (specialized kernels, or generic ones for ``prepare_generic_background``),
    each kept in the session's kernel store; ``(compiles, cache hits)``."""
    if not background:
        with _counting() as tally:
            _parallel(items, exe)
        return tally[0], tally[1]
    pool = _worker_pool()
    if pool is None:  # no worker processes here: compile in this thread
        with _counting() as tally:
            for item in items:
                _keep(exe, [(item, _warm(*item))])
        return tally[0], tally[1]
    compiles = hits = 0
    pending = {}

    def collect(f) -> None:
        nonlocal compiles, hits
        c, h, entry = f.result()
        compiles, hits = compiles + c, hits + h
        _keep_entry(exe, pending.pop(f), entry)

    for item in items:
        src, generic, args, grid, constexprs = item
        if len(pending) >= 2 * _workers():  # each worker busy, one more queued
            done, _ = wait(set(pending), return_when=FIRST_COMPLETED)
            for f in done:
                collect(f)
        if between is not None:
            between()
        pending[pool.submit(src.name, src.text, generic, portable(args), grid, constexprs)] = item
    for f in list(pending):
        collect(f)
    return compiles, hits


def _keep_entry(exe: Executable, item, entry) -> None:
    """A worker's compiled kernel (``[meta, cubin as base64]``, or None) into the session's kernel
    store: the worker compiles, this process alone writes its session's runtime cache."""
    kernels = exe.kernels
    if entry is None or kernels is None or kernels.cache is None:
        return
    meta, cubin = entry
    kernels.put_entry(_binary_key(exe, item), meta, base64.b64decode(cubin))


def portable(args: tuple) -> list:
    """Kernel arguments for a worker process, as JSON: torch dtypes by name (``from_portable``
    reverses it; also the ahead-of-time workers' format, engine/aot.py)."""
    return [["dtype", str(a).replace("torch.", "")] if isinstance(a, torch.dtype) else a for a in args]


def from_portable(args: list) -> tuple:
    return tuple(getattr(torch, a[1]) if isinstance(a, list) and a and a[0] == "dtype" else a for a in args)


def _worker_warm(name: str, text: str, generic: bool, args: tuple, grid: tuple, constexprs: dict) -> tuple:
    """In a worker process: compile one kernel from its generated text (sent by the parent, which
    generated it) into Triton's cache; ``(compiles, cache hits, entry)``, the entry being the binary
    (``binaries.entry_of``: ``[meta, cubin as base64]``, or None) that the parent keeps in its
    session's kernel store (a worker serves every session of the process: it writes no runtime cache)."""
    from rtxjit.codegen.source import KernelSource

    with _counting() as tally:
        kernel = _warm(KernelSource(name, text), generic, from_portable(args), tuple(grid), constexprs, load=False)
    entry = None if kernel is None else binaries.entry_of(kernel)
    if entry is not None:
        entry = [entry[0], base64.b64encode(entry[1]).decode()]
    return tally[0], tally[1], entry


class _Workers:
    """Compile worker processes, each ``python -c "from rtxjit.exec.compiler import serve;
    serve()"`` fed one JSON line per kernel (its generated text) and answering one line. Not
    ``multiprocessing``: a spawned child re-imports the user's ``__main__``, which runs a script
    without an ``if __name__ == "__main__"`` guard a second time. A worker that dies fails its task
    (the specialization falls back and is counted) and is restarted for the next one."""

    def __init__(self, n: int, env: dict):
        self.env = {**os.environ, **env}
        self.tasks: queue.Queue = queue.Queue()
        self.procs: list = [None] * n
        self.threads = [threading.Thread(target=self._feed, args=(i,), daemon=True, name=f"rtxjit-compile-{i}")
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def submit(self, *task) -> Future:
        f: Future = Future()
        self.tasks.put((f, task))
        return f

    def _start(self, i: int):
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            log = tempfile.TemporaryFile()
            proc = subprocess.Popen([sys.executable, "-c", "from rtxjit.exec.compiler import serve; serve()"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env)
            proc.log = log
            self.procs[i] = proc
        return proc

    def _feed(self, i: int) -> None:
        while True:
            item = self.tasks.get()
            if item is None:
                return
            f, task = item
            if not f.set_running_or_notify_cancel():
                continue
            try:
                proc = self._start(i)
                try:
                    proc.stdin.write(json.dumps(task, default=_plain).encode() + b"\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                except BrokenPipeError:  # it died before reading the task
                    line = b""
                if not line:
                    proc.wait(timeout=10)
                    proc.log.seek(0)
                    raise KernelError(f"compile worker {i} exited with status {proc.returncode} while compiling "
                                      f"kernel {task[0]}: {proc.log.read().decode(errors='replace')[-2000:]}")
                answer = json.loads(line)
                if "error" in answer:
                    raise KernelError(f"kernel {task[0]}: {answer['error']}")
                f.set_result(tuple(answer["result"]))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                f.set_exception(exc)

    def shutdown(self) -> None:
        while True:  # queued tasks are cancelled
            try:
                item = self.tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self.threads:
            self.tasks.put(None)
        for t in self.threads:
            t.join(timeout=30)
        for proc in self.procs:
            if proc is not None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                proc.log.close()


def _plain(value):
    """JSON for numpy scalars in a task (shape parameters may be numpy ints)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def serve() -> None:
    """A compile worker (see ``_Workers``): one JSON task per line on stdin, one answer per line."""
    import rtxjit  # noqa: F401 - configures triton for the device first

    for line in sys.stdin.buffer:
        try:
            answer = {"result": _worker_warm(*json.loads(line))}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises KernelError
            answer = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


_pool = None
_pool_lock = threading.Lock()
_exited = False


def _worker_pool():
    """The worker processes (started on first use, shut down at exit); None where they cannot start."""
    global _pool
    with _pool_lock:
        if _exited:  # a job still running while the interpreter exits: the specializer drops it
            raise KernelError("the interpreter is exiting: rtxjit's compile workers are shut down")
        if _pool is None:
            try:
                _pool = _Workers(_workers(), _worker_env())
                atexit.register(_exit)
            except (OSError, RuntimeError):
                _pool = False
        return _pool or None


def _exit() -> None:
    global _exited
    _exited = True  # first: no job starts a new pool while this one shuts down
    shutdown()


def _worker_env() -> dict:
    env = {"RTXJIT_DEVICE": "cuda"}
    for name in ("TRITON_CACHE_DIR",):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def shutdown() -> None:
    global _pool
    with _pool_lock:
        if _pool:
            _pool.shutdown()
        _pool = None


def pool_started() -> Optional[bool]:
    return None if _pool is None else bool(_pool)
