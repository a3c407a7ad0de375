"""Runs a plan: binds buffers and launches its precomputed list of kernels.

An ``Executable`` is one binding of input shapes made ready to launch. It holds one or two
*variants* of its launch list (see jit/specializer.py): the shape-generic fallback, ready at once, and
later the specialized one, which the background specializer builds, checks and installs with one
reference assignment. The hot path reads ``active`` once per run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from rtxjit.codegen.source import load_kernel, parameters
from rtxjit.errors import KernelError
from rtxjit.kernels import keys as kernel_keys
# the kinds, the specialized source and the dtype table, here too for the executor's readers
from rtxjit.kernels.keys import GENERIC, SPECIALIZED, shape_params, specialized_source  # noqa: F401
from rtxjit.kernels.tensors import TORCH_DTYPES, host_tensor, torch_dtype  # noqa: F401
from rtxjit.plan.memory import launched, plan_arena
from rtxjit.plan.plan import Launch, Plan

PACE_LAUNCHES = 8  # a paced run (background work) lets the GPU drain after this many launches
CAPTURE_PART = 32  # launches captured per run while the GPU time of a run is not known yet
# Captures ride on runs: a run launches its work (the older variant's graphs, or this variant kernel
# by kernel), then records the next part of the new variant's graph while the GPU executes it. A
# part holds as many launches as take CAPTURE_SHARE of the GPU time of the last such run to record
# (both measured), so the capture hides behind that run's GPU work instead of adding to it: a
# FLUX step (411 launches, ~18 ms on the GPU) captured its whole graph in front of its second run
# (+17 ms) and, 32 launches a run, a newly installed specialized variant took 13 runs to serve.
CAPTURE_SHARE = 0.25
CAPTURE_MIN = 8


@dataclass
class Variant:
    """One launch list of a binding, bound to an arena; on a GPU, its CUDA graph once captured.

    ``launches`` holds ``(launcher, args, slots, constexprs, step, grid)``: ``slots`` are the argument
    positions bound per run (inputs and outputs). ``kinds[i]`` says which kernel serves step i.
    ``direct``, once every kernel is loaded (on a GPU), holds the same list as ``Direct`` launches.
    """

    kinds: list
    launches: list
    arena: torch.Tensor
    static: dict
    runs: int = 0
    graph: Optional[tuple] = None  # its CUDA graphs, replayed in order, once all are captured
    graph_bufs: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)  # the graphs captured so far
    captured: int = 0  # launches recorded into ``parts``
    direct: Optional[list] = None

    @property
    def eager_runs(self) -> int:
        """Runs launched kernel by kernel before the CUDA graph is captured: the generic variant's
        first run loads its kernels; a specialized one was run (and loaded) by the specializer."""
        return 0 if self.kind == SPECIALIZED else 1

    @property
    def kind(self) -> str:
        return SPECIALIZED if any(k == SPECIALIZED for k in self.kinds) else GENERIC


class Executable:
    """A plan made ready to launch: constants on the device, intermediates placed in one arena,
    arguments bound once. Per run only the inputs and the (fresh) outputs are bound.

    On a GPU, a variant's launch list is captured as a CUDA graph at its second run (the generic
    variant) or its first (a specialized one, already loaded by the specializer); from then on a
    run copies the inputs into the graph's static buffers and replays it.
    """

    def __init__(self, plan: Plan, device, const_tensors: dict, cuda_graphs: bool = True,
                 plan_consts: dict = None, kernels=None, hooks: Optional["RunHooks"] = None):
        self.plan = plan
        self.device = device
        self.kernels = kernels  # the session's KernelStore (kernels/store.py), if any
        self.hooks = NO_HOOKS if hooks is None else hooks  # the session passes the JIT's (jit/specializer.py)
        self.tdev = torch.device(device.torch_device)
        self.lock = threading.Lock()
        out_bufs = {v.buf for v in plan.outputs.values()}
        used = out_bufs | launched(plan).keys()
        self.arena_plan = plan_arena(plan, exclude=out_bufs)
        self.constants: dict = {}
        self.per_run = []  # (buffer index, numel, torch dtype): graph outputs and unplaced temps
        for i, spec in enumerate(plan.buffers):
            if spec.role == "const":
                if spec.data is not None:
                    self.constants[i] = self._plan_constant(spec, {} if plan_consts is None else plan_consts)
                else:
                    self.constants[i] = const_tensors[spec.name]
            elif spec.role == "temp" and i not in self.arena_plan.offsets and i in used:
                self.per_run.append((i, spec.numel, torch_dtype(spec.dtype)))
        self.inputs = dict(plan.inputs)
        self.use_cuda_graph = cuda_graphs and device.kind == "cuda"
        self.active = self.variant([GENERIC] * len(plan.steps))  # replaced whole by ``install``
        self.served = self.active  # the variant of the last run
        self.key = None  # the session's key of this binding (set by the session)
        self.model_key = None  # the model's key in the runtime cache where its checked variant is recorded
        self.recorded = False  # serving a variant recorded by an earlier process (jit/warm.py)
        self.tune = True  # whether specialization times tile configurations (not for AOT engines)
        self.created_s = time.monotonic()  # when the binding's first request built it
        self.installed_s: list = []  # time.monotonic() of each ``install`` (jit_stats reports them)
        # capture parts (``_capture_part``): the CUDA events around the last run that carried one, its
        # GPU ms once they completed, and the host ms a captured launch took
        self._run_events: Optional[tuple] = None
        self._run_gpu_ms: Optional[float] = None
        self._capture_ms: Optional[float] = None

    def _plan_constant(self, spec, shared: dict) -> torch.Tensor:
        """A constant the lowering made (a pre-transposed conv weight, a fill value) on the device,
        shared with every other binding of the session that made the same bytes: bindings of new
        shapes must not each hold another copy of the weights."""
        data = np.ascontiguousarray(spec.data)
        digest = spec.digest or hashlib.sha256(data.reshape(-1).view(np.uint8)).hexdigest()
        key = (spec.name, data.dtype.str, data.shape, digest)
        tensor = shared.get(key)
        if tensor is None:
            tensor = host_tensor(data.reshape(-1), spec.dtype).to(self.tdev)
            shared[key] = tensor
        return tensor

    # -- variants
    def new_arena(self) -> torch.Tensor:
        arena = torch.empty(self.arena_plan.size, dtype=torch.uint8, device=self.tdev)
        for offset, nbytes in self.arena_plan.zeroed:  # split-K arrival counters (plan.LowerCtx.counters)
            arena[offset:offset + nbytes].zero_()
        return arena

    def variant(self, kinds: list, configs: dict = None, arena: torch.Tensor = None) -> Variant:
        """A launch list over ``arena`` (a new one if None): step i runs its ``kinds[i]`` kernel; a
        specialized step takes ``configs[i]`` (grid, constexprs) if given, else the plan's."""
        arena = self.new_arena() if arena is None else arena
        static = dict(self.constants)
        for i, off in self.arena_plan.offsets.items():
            spec = self.plan.buffers[i]
            static[i] = arena[off:off + spec.numel * spec.dtype.itemsize].view(torch_dtype(spec.dtype))
        launches = []
        for i, (step, kind, buffers) in enumerate(zip(self.plan.steps, kinds, self.plan.buffer_positions())):
            args, slots = list(step.args), []
            for j, b in buffers:
                t = static.get(b)
                if t is None:
                    slots.append(j)  # bound per run
                else:
                    args[j] = t
            slots = tuple(slots)
            grid, constexprs = self.config(step, kind, (configs or {}).get(i))
            launches.append((_Launcher(self, step, kind, grid), args, slots, constexprs, step, grid))
        return Variant(list(kinds), launches, arena, static)

    def preload(self, kernels: list) -> None:
        """The generic variant's kernels, one per step, as compiled or loaded before its first run
        (exec/compiler.prepare_generic): its launches go direct from the first run on, without
        Triton's dispatch or a key lookup per launch. Nothing changes if one is missing (None) or
        can't be launched directly: its first run resolves each launch as before."""
        v = self.active
        if (self.device.kind != "cuda" or v.direct is not None or len(kernels) != len(v.launches)
                or any(k is None for k in kernels) or any(kind != GENERIC for kind in v.kinds)):
            return
        v.direct = bind_direct(v.launches, kernels)

    def kernel(self, step: Launch, kind: str, config: tuple = None) -> tuple:
        """``(kernel, grid, constexprs)`` of ``step``'s ``kind`` kernel."""
        interpret = self.device.interpret
        grid, constexprs = self.config(step, kind, config)
        if kind == GENERIC:
            return load_kernel(step.kernel, interpret, generic=True), grid, constexprs
        return load_kernel(specialized_source(step), interpret), grid, constexprs

    @staticmethod
    def config(step: Launch, kind: str, config: tuple = None) -> tuple:
        """``(grid, constexprs)`` of ``step``'s ``kind`` kernel (``config`` for a specialized one)."""
        if kind == GENERIC:
            return step.generic_grid, step.generic_constexprs
        return config or (step.grid, step.constexprs)

    def install(self, variant: Variant) -> None:
        """Serve ``variant`` from the next run on (one reference assignment under the run lock:
        a run in progress finishes on the old variant)."""
        with self.lock:
            self.active = variant
            self.installed_s.append(time.monotonic())

    @property
    def activation_bytes(self) -> int:
        """Intermediate memory: the arena plus one run's outputs."""
        outputs = sum(n * torch.empty((), dtype=dt).element_size() for _, n, dt in self.per_run)
        return self.arena_plan.size + outputs

    # -- running
    def run(self, feeds: dict) -> dict:
        out = self._run(feeds)
        watch = self.hooks.watch
        if watch is not None:
            watch()
        return out

    def _run(self, feeds: dict) -> dict:
        with self.lock:
            v = self.active
            if v.graph is None and self.use_cuda_graph and v.runs >= v.eager_runs:
                old = self.served
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                if old is not v and old.graph is not None:
                    # a newly installed variant: this run replays the old graphs, and a part of the
                    # new one is captured while the GPU runs them (a capture only records); the new
                    # variant serves once all of it is recorded, a few runs later
                    out = self._replay(old, feeds)
                else:  # this variant's first graph: its kernels run one by one meanwhile
                    self.served = v
                    v.runs += 1
                    out = self.run_eager(v, feeds)
                end.record()
                with self.hooks.hold():
                    self._capture_part(v, feeds)
                self._run_events = (start, end)
                return out
            self.served = v
            v.runs += 1
            if v.graph is not None:
                return self._replay(v, feeds)
            return self.run_eager(v, feeds)

    def run_eager(self, v: Variant, feeds: dict, pace=None) -> dict:
        """``v``'s launches kernel by kernel over fresh outputs: through Triton's JIT dispatch until
        every kernel is loaded, then as ``Direct`` launches. ``pace()``, if given, is called after
        every PACE_LAUNCHES launches (the background specializer waits there for the GPU)."""
        bufs = self.fresh_buffers(feeds)
        if v.direct is not None and _aligned(feeds):
            launch_direct(v.direct, bufs, pace=pace)
        elif self.device.kind == "cuda":
            kernels = launch_all(v.launches, bufs, pace=pace)
            if v.direct is None:
                v.direct = bind_direct(v.launches, kernels)
            self._remember(v, kernels)
        else:
            with interpreter_quiet():
                launch_all(v.launches, bufs, pace=pace)
        return self.outputs(bufs)

    def _remember(self, v: Variant, kernels: list) -> None:
        """Kernels Triton's JIT dispatched in ``v``'s first run, kept in the session's KernelStore
        under their binary keys: a later binding launching the same kernel (a fallback kernel at a
        new shape, a specialized one of the same bucket) takes it from there, without the JIT's
        dispatch (~25 us a launch) on its first request."""
        store = self.kernels
        if store is None:
            return
        for (launcher, _, _, constexprs, step, _), kernel in zip(v.launches, kernels):
            if kernel is not None and isinstance(launcher, _Launcher) and launcher.jitted:
                store.remember(kernel_keys.step_key(self.device, self.plan, step, launcher.kind, constexprs), kernel)
                launcher.jitted = False

    def fresh_buffers(self, feeds: dict) -> dict:
        bufs = {idx: feeds[name] for name, idx in self.inputs.items()}
        for i, numel, dt in self.per_run:
            bufs[i] = torch.empty(numel, dtype=dt, device=self.tdev)
        return bufs

    def outputs(self, bufs: dict) -> dict:
        out = {}
        for name, v in self.plan.outputs.items():
            out[name] = bufs[v.buf][v.offset:v.offset + v.numel].view(v.shape)
        return out

    def capture(self, v: Variant, feeds: dict, limit: Optional[int] = None) -> bool:
        """Record ``v``'s launch list into CUDA graphs over static input and output buffers (in the
        serving thread; the capture is thread-local): the next ``limit`` launches not yet recorded
        (all of them if None) into one more graph. ``v.graph`` is set, the tuple of its graphs
        replayed in order, once every launch is recorded."""
        if not v.graph_bufs:
            bufs = {idx: torch.empty_like(feeds[name]) for name, idx in self.inputs.items()}
            for name, idx in self.inputs.items():
                bufs[idx].copy_(feeds[name])
            for i, numel, dt in self.per_run:
                bufs[i] = torch.empty(numel, dtype=dt, device=self.tdev)
            v.graph_bufs = bufs
        start = v.captured
        end = len(v.launches) if limit is None else min(len(v.launches), start + limit)
        try:  # every kernel was loaded by the variant's first run (or the specializer's check)
            here = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(here)
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than ``torch.cuda.graph``: that context synchronizes the device
            # and empties the allocator's cache first, which would wait for the work in flight
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    if v.direct is not None:
                        launch_direct(v.direct[start:end], v.graph_bufs)
                    else:
                        launch_all(v.launches[start:end], v.graph_bufs)
                finally:
                    graph.capture_end()
            here.wait_stream(side)
        except Exception as exc:  # graphs are an optimization: keep launching kernel by kernel
            warnings.warn(f"rtxjit: CUDA graph capture failed, running without it: {exc}")
            self.use_cuda_graph = False
            return False
        v.parts.append(graph)
        v.captured = end
        if end == len(v.launches):
            v.graph = tuple(v.parts)
        return True

    def _capture_part(self, v: Variant, feeds: dict) -> None:
        """Record the next part of ``v``'s graph, sized to hide behind the GPU work of a run
        (``CAPTURE_SHARE``): launches per part from the last measured run's GPU time and the host
        time a captured launch has taken."""
        if self._run_events is not None and self._run_events[1].query():
            self._run_gpu_ms = self._run_events[0].elapsed_time(self._run_events[1])
        if self._run_gpu_ms is None or self._capture_ms is None:
            part = CAPTURE_PART
        else:
            part = max(CAPTURE_MIN, int(CAPTURE_SHARE * self._run_gpu_ms / max(self._capture_ms, 1e-4)))
        before, t = v.captured, time.perf_counter()
        self.capture(v, feeds, limit=part)
        if v.captured > before:
            self._capture_ms = (time.perf_counter() - t) * 1e3 / (v.captured - before)

    def _replay(self, v: Variant, feeds: dict) -> dict:
        for name, idx in self.inputs.items():
            v.graph_bufs[idx].copy_(feeds[name])
        for graph in v.graph:
            graph.replay()
        return {k: t.clone() for k, t in self.outputs(v.graph_bufs).items()}


class RunHooks:
    """What an executable's runs tell the rest of the process; the session passes the JIT's
    (jit/specializer.py), so the background specializer makes way for the serving thread. These do
    nothing. ``hold()`` marks slow work of a serving thread (a CUDA-graph capture); ``watch``,
    while not None, is called after every run."""

    watch = None

    def hold(self):
        return contextlib.nullcontext()


NO_HOOKS = RunHooks()


class _Launcher:
    """A step's Triton launcher, made at its first call: a variant served by direct launches of
    loaded binaries (jit/warm.py) never creates its JIT functions."""

    __slots__ = ("exe", "step", "kind", "grid", "fn", "jitted")

    def __init__(self, exe: Executable, step: Launch, kind: str, grid: tuple):
        self.exe, self.step, self.kind, self.grid, self.fn = exe, step, kind, grid, None
        self.jitted = False  # resolved to Triton's JIT dispatch (its kernel not yet remembered)

    def __call__(self, *args, **constexprs):
        if self.fn is None:
            self.fn = self._resolve(constexprs)
        return self.fn(*args, **constexprs)

    def _resolve(self, constexprs: dict):
        kernels = self.exe.kernels
        if self.exe.device.kind == "cuda" and kernels is not None:
            stored = kernels.find(kernel_keys.step_key(self.exe.device, self.exe.plan, self.step, self.kind,
                                                       constexprs))
            if stored is not None:
                names = [name for name, _ in parameters(self.step.kernel)]
                return _Stored(stored, self.grid, names[len(self.step.args):], self._jit)
        self.jitted = self.exe.device.kind == "cuda"
        return self._jit()

    def _jit(self):
        return self.exe.kernel(self.step, self.kind)[0][self.grid]


class _Stored:
    """A step launched through a kernel loaded from a store (an engine, the runtime cache): no
    compile. An argument that is not 16-byte aligned (what the stored kernel assumes of its
    buffers, as every buffer rtxjit allocates is) goes through Triton's JIT instead."""

    __slots__ = ("kernel", "grid", "tail", "make_jit", "jit")

    def __init__(self, kernel, grid: tuple, tail: list, make_jit):
        self.kernel, self.grid = kernel, tuple(grid) + (1,) * (3 - len(grid))
        self.tail, self.make_jit, self.jit = tail, make_jit, None

    def __call__(self, *args, **constexprs):
        if any(a.data_ptr() % 16 for a in args if isinstance(a, torch.Tensor)):
            if self.jit is None:
                self.jit = self.make_jit()
            return self.jit(*args, **constexprs)
        k, g = self.kernel, self.grid
        k.run(g[0], g[1], g[2], torch.cuda.current_stream().cuda_stream, k.function, k.packed_metadata,
              None, None, None, *args, *[constexprs[n] for n in self.tail])
        return k


_QUIET = threading.RLock()


@contextlib.contextmanager
def interpreter_quiet():
    """Around kernels run by Triton's interpreter. It computes every lane of a block with numpy,
    masked-off ones too (padding past a tensor's end, -inf lanes of a masked softmax), and numpy
    warns about those (overflow, invalid value, All-NaN slice) though they are never stored. The
    warnings are silenced here, inside rtxjit's own launches, and nowhere else: np.errstate is
    per thread; warnings.catch_warnings changes process-wide state, hence the lock."""
    with _QUIET, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def launch_all(launches: list, bufs: dict, pace=None) -> list:
    """Launch through Triton's JIT dispatch (which compiles or loads on first use); returns what
    each launch returned (on a GPU, Triton's compiled kernel)."""
    kernels = []
    for i, (launcher, args, slots, constexprs, step, _) in enumerate(launches):
        if pace is not None and i and i % PACE_LAUNCHES == 0:
            pace()
        if slots:
            args = list(args)
            for j in slots:
                args[j] = bufs[args[j].index]
        try:
            kernels.append(launcher(*args, **constexprs))
        except Exception as exc:  # a compile or launch failure names the node and kernel
            raise KernelError(f"kernel {step.kernel.name}:{step.kernel.short_key} of node '{step.node}' "
                              f"failed: {type(exc).__name__}: {exc}") from exc
    return kernels


# -- direct launches

class Direct:
    """One launch of a loaded Triton kernel without the JIT's dispatch (argument binding, key
    lookup: ~25 us a launch measured): the launcher is called with the arguments in the kernel's
    parameter order, constexpr values included, as Triton's own ``run`` does.

    Valid while the per-run arguments keep the 16-byte alignment the kernel was specialized for
    (``_aligned``); the arena and the buffers allocated per run always do."""

    __slots__ = ("kernel", "run", "function", "packed", "grid", "args", "slots")

    def __init__(self, kernel, grid: tuple, args: list, slots: tuple):
        self.kernel = kernel
        self.run, self.function, self.packed = kernel.run, kernel.function, kernel.packed_metadata
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.args, self.slots = args, slots


def bind_direct(launches: list, kernels: list) -> Optional[list]:
    """``Direct`` launches for ``launches``, given the compiled kernels their JIT launches returned;
    None where that is not possible (a Triton without these attributes, a profiler's launch hooks
    set, parameters that are neither passed nor constexpr)."""
    try:
        from triton import knobs

        if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            return None
    except (ImportError, AttributeError):
        return None
    out = []
    for (launcher, args, slots, constexprs, step, grid), kernel in zip(launches, kernels):
        if kernel is None or not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            return None
        tail = _constexpr_tail(step.kernel, len(args), tuple(constexprs))
        if tail is None:
            return None
        out.append(Direct(kernel, grid, list(args) + [constexprs[n] for n in tail], slots))
    return out


@functools.lru_cache(maxsize=8192)
def _constexpr_tail(src, n_args: int, given: tuple) -> Optional[tuple]:
    """The parameters of ``src`` after its ``n_args`` passed arguments (its constexprs, in order; a
    specialized kernel keeps the parameter list), or None unless ``given`` (the launch's constexpr
    names; the others, num_warps and such, are launch options) holds each of them and none before.
    Memoized: a new binding binds every launch (~4 us each worked out)."""
    names = [name for name, _ in parameters(src)]
    tail = tuple(names[n_args:])
    if any(n not in given for n in tail) or any(n in given for n in names[:n_args]):
        return None
    return tail


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set (Triton 3.6+ keeps an empty ``HookChain`` there)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch_direct(direct: list, bufs: dict, stream: Optional[int] = None, pace=None) -> None:
    """Launch ``direct`` on ``stream`` (a CUDA stream handle; default: the current stream)."""
    stream = torch.cuda.current_stream().cuda_stream if stream is None else stream
    for i, d in enumerate(direct):
        if pace is not None and i and i % PACE_LAUNCHES == 0:
            pace()
        args = d.args
        if d.slots:
            args = list(args)
            for j in d.slots:
                args[j] = bufs[args[j].index]
        g = d.grid
        d.run(g[0], g[1], g[2], stream, d.function, d.packed, None, None, None, *args)


def _aligned(feeds: dict) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in feeds.values())
