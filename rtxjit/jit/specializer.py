"""Just-in-time specialization: shape-generic kernels serve at once, specialized ones replace them.

Each binding of input shapes (an ``Executable``) starts on its *generic* variant: every launch uses
a kernel whose sizes that are static in the model (the same for every binding: weights' dims,
hidden sizes, channels) are compiled in as constexprs (plan/statics.py), while Triton specializes
none of its other run-time arguments (the dynamic sizes: batch, sequence, image), with a tile
configuration chosen without the dynamic sizes (``Launch.generic``), so one binary per launch site
serves every shape and a new shape compiles nothing. The first run of a binding enqueues it here
(mode ``"lazy"``).

The specializer's thread then, off the hot path:
1. compiles the binding's *specialized* kernels (``kernel_keys.specialized_source``): the same source,
   its dynamic sizes specialized as Triton does any integer argument (a multiple of 16, equal to 1)
   and the plan's tile configurations for the binding, every one it offers. Those classes and tiles
   are a *bucket* of shapes: a kernel compiled for one shape of the bucket (in this process, or in
   another over the same runtime cache) serves the others without a compile (kernels/keys.py;
   ``EXACT`` compiles every size in instead, one binary per shape). On a GPU in worker processes
   (exec/compiler.py), so the serving thread never waits on the GIL;
2. on a side stream, over its own arena and a snapshot of the binding's first live inputs: runs the
   generic variant (the reference), times the tile configurations of tuned launches and keeps the
   fastest (plan/autotune.py), runs the specialized variant and compares every output within
   the dtype's tolerance. A mismatch is traced to the launches that cause it (each specialized
   alone among generic ones); those are discarded with a warning and never served;
3. installs it with one reference assignment (``Executable.install``): a run in progress finishes
   on the old variant. Its CUDA graph is captured by the serving thread at the variant's first
   run: while any stream captures, ``torch.cuda.synchronize`` in another thread fails ("operation
   not permitted when stream is capturing", measured on an H100 in thread-local and global
   capture modes alike), so this thread never captures.

The queue is bounded, deduplicated per binding, and ordered by how often the runtime cache's
histogram saw the binding's shapes in earlier processes (most frequent first), then by arrival.
Modes: ``"lazy"`` (default on a GPU; background), ``"eager"`` (a binding is specialized in the
calling thread before its first run returns), ``"none"`` (generic kernels only; the default under
Triton's interpreter, where specializing gains nothing).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import heapq
import itertools
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from rtxjit.errors import RtxjitError
from rtxjit.exec import compiler, executor
from rtxjit.exec.executor import GENERIC, SPECIALIZED, Executable, bind_direct, launch_direct
from rtxjit.jit import warm
from rtxjit.kernels.tensors import TORCH_DTYPES
from rtxjit.plan.plan import Buf
from rtxjit.plan import autotune

MODES = ("lazy", "eager", "none")
QUEUE_LIMIT = 256  # pending bindings; more are dropped (counted) and keep their generic kernels
# relative tolerance (max |diff| over max |reference|) of the check, per output dtype
CHECK_RTOL = {"fp64": 1e-6, "fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2, "fp8e4m3": 1.5e-1, "fp8e5m2": 2.5e-1}
BACKGROUND_SWITCH_S = 0.0001  # Python's thread switch interval while a background job runs (default 5 ms)
COMPILE_DELAY_S = 0.0  # test hook: a deterministic stand-in for compile time, added to each job


_gc_pauses = 0
_gc_lock = threading.Lock()
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """No garbage-collection pauses while the block runs (in any thread: a collection stops every
    thread, and one over a large heap takes milliseconds). Nested and concurrent blocks count;
    the collector is enabled again, if it was, when the last one ends."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


_frozen_lock = threading.Lock()


def freeze_heap() -> None:
    """Collect, then move every object alive now into the collector's permanent generation
    (``gc.freeze``): later full collections scan only objects made after, not the process's heap
    (torch, transformers, the user's model: a million objects). A new binding's first request
    allocates enough to set off such a collection: 100-120 ms measured on this machine's CPU for
    bert-base (a 17 ms request), the pause ``gc_paused`` only moves to the run after the plan.
    Called when a GPU session is created, before it makes its own objects (a dropped session's
    reference cycles stay collectable); objects frozen here that later become cyclic garbage are
    collected when the next GPU session is created (``gc.unfreeze`` first). RTXJIT_GC_FREEZE=0
    turns it off."""
    with _frozen_lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


# --- the serving thread first --------------------------------------------------------------------
# The specializer shares the GIL and the GPU with the threads that serve requests. Between pieces
# of its work it waits (``_yield_to_serving``, at most YIELD_LIMIT_S) while a serving thread does
# slow Python work (a new binding's plan and first run, ``serving()``) and until the GPU work of
# the last run is done (an event recorded after each run while a job is in progress).
YIELD_LIMIT_S = 0.05

_held = 0
_held_lock = threading.Lock()
_last_run: list = [None]  # the event recorded after the last run, while a job is in progress


@contextlib.contextmanager
def serving():
    """Marks slow work of a serving thread: the background job pauses at its next checkpoint."""
    global _held
    with _held_lock:
        _held += 1
    try:
        yield
    finally:
        with _held_lock:
            _held -= 1


class _ServingHooks(executor.RunHooks):
    """The hooks a session gives its executables (``executor.RunHooks``): the serving thread's
    CUDA-graph captures count as slow work too; while a background job runs, every run records an
    event (``watch``) that the job waits for."""

    def __init__(self):
        self.watch = None

    def hold(self):
        return serving()


HOOKS = _ServingHooks()


def _note_run() -> None:
    event = torch.cuda.Event()
    event.record()
    _last_run[0] = event


class _Preempted(Exception):
    """A tuned pass gives way to a binding's first pass queued meanwhile (it is queued again)."""


def _between_tuned() -> None:
    """Between the compiles of a tuned pass in the background: yield to serving threads, and give
    way to a new binding's first pass waiting in the queue (a tuned pass compiles every candidate
    tile of every launch, 20-30 s for resnet50 on an H100, and a new batch size waited behind it
    for its first specialized kernels: up to 10 s). The kernels compiled so far stay in Triton's
    cache and the session's kernel store: the tuned pass, queued again, loads them."""
    _yield_to_serving()
    if _specializer is not None and _specializer.first_waiting():
        raise _Preempted()


def _in_background() -> bool:
    return threading.current_thread() is _specializer_thread()


def _yield_to_serving() -> None:
    if not _in_background():
        return  # an eager job runs in the serving thread itself
    deadline = time.monotonic() + YIELD_LIMIT_S
    while time.monotonic() < deadline:
        event = _last_run[0]
        if _held or (event is not None and not event.query()):
            time.sleep(0.0002)
            continue
        return


def yield_to_serving() -> None:
    """In a background job: wait (a little) while the serving thread builds a new binding or its
    last run is still on the GPU."""
    _yield_to_serving()


def resolve_mode(mode: Optional[str], device) -> str:
    if mode is None:
        return "none" if device.interpret else "lazy"
    if mode not in MODES:
        raise RtxjitError(f"specialize='{mode}' is not a mode; use one of {', '.join(MODES)}")
    return mode


@dataclass
class Stats:
    """What the specializer did for one session (``InferenceSession.jit_stats()`` reports it)."""

    compiles: int = 0  # kernels compiled for this session (specialized and generic)
    cache_hits: int = 0  # kernels loaded from a cache instead
    pending: int = 0  # bindings queued or being specialized
    specialized: int = 0  # bindings whose specialized variant was installed
    rejected: int = 0  # specialized kernels that failed the check (never served)
    failed: int = 0  # bindings whose specialization raised (they keep their generic kernels)
    dropped: int = 0  # bindings not queued because the queue was full
    order: list = field(default_factory=list)  # binding keys in the order they were specialized
    errors: list = field(default_factory=list)  # one line per failure
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    idle: threading.Condition = None

    def __post_init__(self):
        self.idle = threading.Condition(self.lock)

    def add(self, **counts) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
            if self.pending == 0:
                self.idle.notify_all()


@dataclass(order=True)
class _Job:
    priority: tuple  # (stage rank, -frequency, sequence): every binding's first pass before any tuned one
    exe: Executable = field(compare=False)
    snapshot: dict = field(compare=False)
    stats: Stats = field(compare=False)
    stage: str = field(default="first", compare=False)  # "first" (heuristic tiles) | "tuned" (see _specialize)
    # | "task": ``task()`` (the fallbacks of other shape buckets, jit/fallbacks.py)
    task: Optional[Callable[[], None]] = field(default=None, compare=False)


_RANKS = {"first": 0, "task": 1, "tuned": 2}  # the first passes, then the other buckets' fallbacks, then tuning


class Specializer:
    """One background thread per process, shared by every session; a bounded priority queue."""

    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list = []
        self._queued: set = set()  # id() of executables queued or running
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self.paused = False  # test hook: hold the queue (jobs wait) until ``resume``

    def submit(self, exe: Executable, snapshot: dict, stats: Stats, frequency: int = 0) -> bool:
        """Queue ``exe`` (its first live inputs in ``snapshot``); False if it is already queued or
        the queue is full."""
        with self._cv:
            if id(exe) in self._queued:
                return False
            if len(self._heap) >= QUEUE_LIMIT:
                stats.add(dropped=1)
                return False
            self._queued.add(id(exe))
            stats.add(pending=1)
            heapq.heappush(self._heap, _Job((0, -frequency, next(self._seq)), exe, snapshot, stats))
            self._start()
            self._cv.notify()
        return True

    def submit_task(self, task: Callable[[], None], stats: Stats) -> None:
        """Queue ``task`` behind every binding's first pass and before the tuned passes (pending in
        ``stats`` until it has run; its failure is counted there)."""
        with self._cv:
            stats.add(pending=1)
            heapq.heappush(self._heap, _Job((_RANKS["task"], 0, next(self._seq)), None, {}, stats, "task", task))
            self._start()
            self._cv.notify()

    def first_waiting(self) -> bool:
        """Whether a binding's first pass is queued (a tuned pass running gives way to it)."""
        with self._cv:
            return any(job.stage == "first" for job in self._heap)

    def cancel_pending(self) -> int:
        """Drop every queued job (they keep their generic kernels); returns how many."""
        with self._cv:
            jobs, self._heap = self._heap, []
            for job in jobs:
                if job.stage == "first":
                    self._queued.discard(id(job.exe))
        for job in jobs:
            job.stats.add(pending=-1)
        return len(jobs)

    def pause(self) -> None:
        with self._cv:
            self.paused = True

    def resume(self) -> None:
        with self._cv:
            self.paused = False
            self._cv.notify_all()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="rtxjit-specializer", daemon=True)
            self._thread.start()

    def stop_soon(self) -> None:
        """Drop queued jobs and mark the thread to stop (the interpreter is exiting)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    def shutdown(self) -> None:
        """Stop the thread after its current job (at interpreter exit)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (self.paused or not self._heap):
                    self._cv.wait()
                if self._stop:
                    for job in self._heap:
                        job.stats.add(pending=-1)
                    self._heap.clear()
                    return
                job = heapq.heappop(self._heap)
            exe = job.exe() if job.stage == "tuned" else job.exe
            stats, follow = job.stats, False
            try:
                if job.task is not None:
                    _run_task(job.task, stats)
                elif exe is not None:  # else its session is gone: nothing to tune
                    _, follow = _guarded(exe, job.snapshot, stats, True, job.stage)
            finally:
                with self._cv:
                    if job.stage == "first":
                        self._queued.discard(id(exe))
                    if follow:  # the tuned pass queues behind every binding's first pass, holding
                        # its binding weakly: a session dropped meanwhile is not kept alive by the queue
                        heapq.heappush(self._heap, _Job((_RANKS["tuned"],) + job.priority[1:], weakref.ref(exe),
                                                        job.snapshot, job.stats, "tuned"))
                        self._cv.notify()
                # drop the finished job before waiting for the next one: otherwise this frame keeps
                # the last binding (its arenas, input snapshot, kernels) alive after its session
                # is gone (tests/test_concurrency.py, issue 8); done only then
                job = exe = None
                if not follow:
                    stats.add(pending=-1)


_specializer: Optional[Specializer] = None
_specializer_lock = threading.Lock()


def specializer() -> Specializer:
    global _specializer
    with _specializer_lock:
        if _specializer is None:
            _specializer = Specializer()
            atexit.register(_specializer.shutdown)
            # and before the exit hooks of the process pool and the kernel store's scratch folder:
            # threading's hooks run first (this one is registered after the pool's)
            getattr(threading, "_register_atexit", lambda fn: None)(_specializer.stop_soon)
        return _specializer


def _specializer_thread():
    return _specializer._thread if _specializer is not None else None


def snapshot(exe: Executable, feeds: dict) -> dict:
    """Device copies of a run's inputs, kept for the check (a caller may reuse its tensors)."""
    return {name: _copy(feeds[name]) for name in exe.inputs}


# --- one job --------------------------------------------------------------------------------------

def _run_task(task: Callable[[], None], stats: Stats) -> None:
    """A queued task in the background (the serving thread's GIL share as for a specialization);
    its failure is counted and warned about, nothing else changes."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, BACKGROUND_SWITCH_S))
    try:
        with gc_paused():
            task()
    except Exception as exc:  # noqa: BLE001 - a background task is an optimization
        if _specializer is None or not _specializer._stop:
            _failed(stats, "a background task failed", exc)
    finally:
        sys.setswitchinterval(switch)


def _failed(stats: Stats, what: str, exc: Exception) -> None:
    """A background job's failure: warned about, counted, its message kept for ``jit_stats``."""
    warnings.warn(f"rtxjit: {what}: {type(exc).__name__}: {exc}", RuntimeWarning)
    with stats.lock:
        stats.failed += 1
        stats.errors.append(f"{type(exc).__name__}: {exc}")


def specialize_now(exe: Executable, feeds: dict, stats: Stats, background: bool = False) -> bool:
    """Compile, tune, check and install ``exe``'s specialized variant; returns whether it was
    installed. Failures are counted and warned about; the generic variant keeps serving."""
    try:
        return _guarded(exe, feeds, stats, background, "all")[0]
    finally:
        stats.add(pending=-1)


def _guarded(exe: Executable, feeds: dict, stats: Stats, background: bool, stage: str) -> tuple:
    """``(installed, more)`` of one stage of ``exe``'s specialization (``_specialize``), failures
    counted and warned about; ``more``: a tuned pass is still to come. The caller counts the job
    done (``pending``) once it holds no reference to the binding: a session dropped after
    ``wait_for_specialization`` is collectable at once."""
    switch = sys.getswitchinterval()
    if background:  # the serving thread waits at most this long for the GIL while a job runs
        sys.setswitchinterval(min(switch, BACKGROUND_SWITCH_S))
    if background and exe.device.kind == "cuda":
        HOOKS.watch = _note_run
    try:
        with gc_paused():  # the job's garbage must not stop the serving thread for a collection
            return _specialize(exe, feeds, stats, background, stage)
    except _Preempted:
        return False, True  # queued again, behind the first passes
    except Exception as exc:  # noqa: BLE001 - a failed specialization leaves the fallback serving
        if _specializer is not None and _specializer._stop:  # the interpreter is exiting under the job
            stats.add(dropped=1)
            return False, False
        _failed(stats, "specialization of a binding failed; its generic kernels keep serving", exc)
        return False, False
    finally:
        HOOKS.watch = None
        _last_run[0] = None
        sys.setswitchinterval(switch)


def _specialize(exe: Executable, feeds: dict, stats: Stats, background: bool, stage: str = "all") -> tuple:
    """The job itself (``_guarded`` counts its failure): ``(installed, more)``. In the background, a
    binding whose launches offer several tile configurations is specialized in two passes: first
    with the plan's heuristic configuration (one kernel per launch: swapped in soon), then with
    every configuration compiled and timed (the fastest checked and swapped in when ready). The
    specializer runs them as two stages (``stage`` "first", then "tuned"), queueing every binding's
    first pass before any tuned one: a new shape is not kept on its fallback while an older shape's
    candidates compile (resnet50 on an H100: 16-30 s to a new batch's first specialized kernels
    behind the queue); ``more`` says the tuned stage is still to run. "all": both passes now."""
    if stage != "tuned":
        _record(exe, exe.active, binaries_only=True)  # the generic kernels too: a new shape in a later process
    tunable = exe.tune and autotune.enabled() and any(
        len(step.choices or ()) > 1 and autotune.remembered(step.tune_key, step.choices) is None
        for step in exe.plan.steps)  # a choice remembered for the bucket is not timed again
    if stage == "first":
        passes = (False,)
    elif stage == "tuned":
        passes = (True,)
    else:
        passes = (False, True) if background and tunable else (tunable,)
    installed = None
    for tuned in passes:
        variant = _specialized_pass(exe, feeds, stats, background, tuned)
        if variant is None:
            break
        first = not exe.installed_s
        exe.install(variant)
        if first:
            with stats.lock:
                stats.specialized += 1
                stats.order.append(exe.key)
        installed = variant
    if installed is None:
        return False, False
    _record(exe, installed)
    return True, stage == "first" and tunable


def _specialized_pass(exe: Executable, feeds: dict, stats: Stats, background: bool, tuned: bool):
    """Compile, check (and with ``tuned``, time) the specialized variant; None if none passes."""
    stream = torch.cuda.Stream() if exe.device.kind == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else _nothing():
        if COMPILE_DELAY_S:
            time.sleep(COMPILE_DELAY_S)
        chosen = {} if tuned else compiler.first_configs(exe)  # tiles compiled before, where the plan's are not
        between = _between_tuned if tuned and background and _in_background() else _yield_to_serving
        compiles, hits = compiler.prepare_specialized(exe, background=background, tuned=tuned,
                                                      between=between, chosen=chosen)
        stats.add(compiles=compiles, cache_hits=hits)
        variant, rejected = _checked_variant(exe, feeds, tuned, chosen)
        stats.add(rejected=len(rejected))
        if stream is not None:
            stream.synchronize()
    return variant


def _record(exe: Executable, variant, binaries_only: bool = False) -> None:
    """Keep the installed variant (or only its kernels) in the session's runtime cache for the
    next process (jit/warm.py), through its kernel store."""
    kernels = exe.kernels
    if kernels is None or kernels.cache is None or variant.direct is None:
        return
    try:
        if binaries_only:
            warm.save_binaries(kernels, exe, variant)
        elif exe.model_key is not None:
            warm.save_variant(kernels, exe.model_key, exe, variant)
    except (OSError, ValueError, TypeError) as exc:
        warnings.warn(f"rtxjit: runtime cache: cannot record a specialized binding: {exc}", RuntimeWarning)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run(exe: Executable, variant, feeds: dict) -> dict:
    """One run of ``variant`` (its first loads its kernels and binds its direct launches); in the
    background, paced: a request arriving meanwhile queues behind a few of its kernels, not a run."""
    _yield_to_serving()
    pace = _pace if _in_background() and exe.device.kind == "cuda" else None
    return {k: _copy(v) for k, v in exe.run_eager(variant, feeds, pace=pace).items()}


def _pace() -> None:
    event = torch.cuda.Event()
    event.record()
    event.synchronize()
    _yield_to_serving()


def _checked_variant(exe: Executable, feeds: dict, tuned: bool = True, chosen: Optional[dict] = None) -> tuple:
    """The specialized variant (tiles timed with ``tuned``, else ``chosen``'s or the plan's), with
    every launch whose specialized kernel disagrees with the generic one put back on the generic
    kernel; and the indices of those launches. Every trial run here shares one arena, the one the
    returned variant keeps."""
    n = len(exe.plan.steps)
    arena = exe.new_arena()
    reference = _run(exe, exe.variant([GENERIC] * n, arena=arena), feeds)
    configs = _tune(exe, feeds, arena) if tuned else dict(chosen or {})
    kinds = [SPECIALIZED] * n
    variant = exe.variant(kinds, configs, arena)
    floor = _rtol_floor(exe)
    if not _mismatch(reference, _run(exe, variant, feeds), floor):
        return variant, []
    rejected, amplified, why = [], [], {}
    for i in range(n):
        alone = [GENERIC] * n
        alone[i] = SPECIALIZED
        why[i] = _mismatch(reference, _run(exe, exe.variant(alone, configs, arena), feeds), floor)
        if why[i]:
            if _step_is_close(exe, feeds, alone, configs, arena, i):
                amplified.append(i)  # right on its own inputs: later steps (a quantization) magnify its rounding
            else:
                rejected.append(i)
                kinds[i] = GENERIC
    for i in rejected:
        step = exe.plan.steps[i]
        warnings.warn(f"rtxjit: the specialized kernel {step.kernel.name} of node '{step.node}' disagrees with "
                      f"its generic kernel on the live inputs ({why[i]}); it is discarded and the generic one "
                      f"keeps serving", RuntimeWarning)
    variant = exe.variant(kinds, configs, arena)
    if _mismatch(reference, _run(exe, variant, feeds), floor) and not amplified:  # only combinations disagree: serve none
        warnings.warn("rtxjit: specialized kernels disagree with the generic ones only in combination; "
                      "the binding keeps its generic kernels", RuntimeWarning)
        return None, list(range(n))
    return variant, rejected


def _step_is_close(exe: Executable, feeds: dict, alone: list, configs: dict, arena, i: int) -> bool:
    """Whether step ``i``'s specialized kernel, run on the inputs the generic kernels give it, writes
    what its generic kernel writes, within the check's tolerance, and nothing else: the launches up
    to ``i`` run once with ``i`` generic and once specialized, and the arena after them must match
    byte for byte outside ``i``'s buffers, ``i``'s own buffers within tolerance.

    Where a step passes this but its specialized kernel alone moves the model's outputs beyond the
    tolerance, later steps magnify rounding differences: a quantized model's QuantizeLinear moves a
    value a whole fp8 / int8 step when a last-bit difference crosses a rounding boundary (the fp8
    bert-base encoder rejected its 24 specialized LayerNorm kernels so). Such a step keeps its
    specialized kernel; one that writes another buffer or its own beyond the tolerance does not."""
    n = len(exe.plan.steps)
    step = exe.plan.steps[i]
    mine = {a.index for a in step.args if isinstance(a, Buf)}
    runs = []
    for kinds in ([GENERIC] * n, alone):
        v = exe.variant(kinds, configs, arena)
        bufs = exe.fresh_buffers(feeds)
        _yield_to_serving()
        if exe.device.kind == "cuda":
            executor.launch_all(v.launches[:i + 1], bufs)
            torch.cuda.current_stream().synchronize()
        else:
            with executor.interpreter_quiet():
                executor.launch_all(v.launches[:i + 1], bufs)
        runs.append((_copy(arena), {b: _copy(t) for b, t in bufs.items() if b in mine}))
    (arena0, own0), (arena1, own1) = runs
    offsets = exe.arena_plan.offsets
    regions = []
    for b in sorted(mine):
        spec = exe.plan.buffers[b]
        if b in offsets:
            lo = offsets[b]
            hi = lo + spec.numel * spec.dtype.itemsize
            regions.append((lo, hi))
            own0[b] = arena0[lo:hi].view(TORCH_DTYPES[spec.dtype.short])
            own1[b] = arena1[lo:hi].view(TORCH_DTYPES[spec.dtype.short])
    outside = np.ones(arena0.numel(), dtype=bool)
    for lo, hi in regions:
        outside[lo:hi] = False
    if not np.array_equal(_host(arena0)[outside], _host(arena1)[outside]):
        return False
    return not _mismatch({str(b): t for b, t in own0.items()}, {str(b): own1[b] for b in own0}, _rtol_floor(exe))


def _tune(exe: Executable, feeds: dict, arena) -> dict:
    """Step index -> (grid, constexprs) of the fastest tile configuration, for launches that offer
    several; timed on the GPU with the live data each launch sees in a run of the specialized
    variant. Empty where autotuning is off or nothing is tuned."""
    steps = exe.plan.steps
    if not autotune.enabled() or not any(s.choices for s in steps):
        return {}
    variant = exe.variant([SPECIALIZED] * len(steps), arena=arena)
    bufs = exe.fresh_buffers(feeds)
    configs = {}
    for i, (launcher, args, slots, constexprs, step, _) in enumerate(variant.launches):
        args = list(args)
        for j in slots:
            args[j] = bufs[args[j].index]
        if step.choices:
            fn = exe.kernel(step, SPECIALIZED)[0]
            trials = [_Trial(fn, grid, args, cfg, step) for grid, cfg in step.choices]
            _yield_to_serving()
            best = autotune.choose(step.tune_key, list(step.choices), lambda c: trials[c](),
                                   between=_yield_to_serving)
            configs[i] = step.choices[best]
            launcher, constexprs = fn[configs[i][0]], configs[i][1]
        launcher(*args, **constexprs)
    return configs


class _Trial:
    """One tile configuration's launch while it is timed: through the JIT once (it compiles or
    loads), then direct, so short kernels are not timed as Python's dispatch overhead."""

    def __init__(self, fn, grid, args: list, constexprs: dict, step):
        self.fn, self.grid, self.args, self.constexprs, self.step = fn, grid, args, constexprs, step
        self.direct = None

    def __call__(self) -> None:
        if self.direct:
            launch_direct(self.direct, {})
            return
        kernel = self.fn[self.grid](*self.args, **self.constexprs)
        if self.direct is None:
            self.direct = bind_direct([(None, self.args, (), self.constexprs, self.step, self.grid)], [kernel]) or False


def _rtol_floor(exe: Executable) -> float:
    """The least relative tolerance of ``exe``'s check whatever its outputs' dtype: FP8_DOT_RTOL
    where the plan holds fp8 data (its products are fp8 tensor-core dots: Hopper accumulates them
    with fewer bits than fp32, 8e-4 off the exact sum measured on an H100, so two tile
    configurations of one fp8 product differ by more than an fp32 output's 1e-4 and a right
    specialized kernel was discarded); else 0."""
    fp8 = {"fp8e4m3", "fp8e5m2"}
    return FP8_DOT_RTOL if any(b.dtype.short in fp8 for b in exe.plan.buffers) else 0.0


FP8_DOT_RTOL = 2e-3


def _mismatch(reference: dict, outputs: dict, floor: float = 0.0) -> Optional[str]:
    """Why ``outputs`` differ from ``reference`` beyond the dtype's tolerance (at least ``floor``),
    or None (compared on the host in float64: the check computes nothing with torch on the device)."""
    _yield_to_serving()
    for name, ref in reference.items():
        dtype = _short(ref.dtype)
        r, o = _host(ref), _host(outputs[name])
        if r.dtype.kind == "f":
            if not np.array_equal(np.isnan(r), np.isnan(o)):
                return f"output '{name}': NaN at different positions"
            inf = np.isinf(r)
            if not np.array_equal(r[inf], o[inf]):
                return f"output '{name}': infinities differ"
            finite = np.isfinite(r)
            if finite.any():
                scale = float(np.abs(r[finite]).max())
                err = float(np.abs(r[finite] - o[finite]).max())
                rtol = max(CHECK_RTOL.get(dtype, 1e-2), floor)
                if not err <= rtol * max(scale, 1e-30):
                    return f"output '{name}': max |diff| {err:.3g} > {rtol} x max |reference| {scale:.3g}"
        elif not np.array_equal(r, o):
            return f"output '{name}': values differ"
    return None


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as numpy, floats widened to float64 (a copy, no device compute)."""
    if t.dtype.is_floating_point:
        host = torch.empty(t.shape, dtype=t.dtype)
        host.copy_(t)
        if t.dtype in (torch.float16, torch.float32, torch.float64):
            return host.numpy().astype(np.float64)
        return host.view(torch.uint8).numpy() if t.element_size() == 1 else _widen(host)
    host = torch.empty(t.shape, dtype=t.dtype)
    host.copy_(t)
    return host.numpy()


def _widen(host: torch.Tensor) -> np.ndarray:
    """bf16 on the host as float64: its bits are the high half of a float32."""
    bits = host.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64)


def _copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    out.copy_(t)
    return out


def wait(stats: Stats, timeout: Optional[float]) -> bool:
    """Block until no binding of ``stats`` is pending; False if ``timeout`` seconds pass first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with stats.lock:
        while stats.pending > 0:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            stats.idle.wait(left)
    return True


def frequency(histogram: dict, shapes: dict) -> int:
    return int(histogram.get(_shape_key(shapes), 0))


def _shape_key(shapes: dict) -> tuple:
    return tuple(sorted((n, tuple(int(d) for d in s)) for n, s in shapes.items()))


def histogram_of(entries: list) -> dict:
    """``most_frequent_shapes`` entries ([(shapes, count)]) as a lookup by shapes."""
    return {_shape_key(shapes): count for shapes, count in entries}



def _short(dtype: torch.dtype) -> str:
    return next((k for k, v in TORCH_DTYPES.items() if v == dtype), "")
