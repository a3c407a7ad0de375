"""``InferenceSession``: onnxruntime's shape of API over rtxjit's plans and kernels."""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rtxjit import config
from rtxjit.cache.store import open_cache
from rtxjit.errors import InputError
from rtxjit.exec import roofline
from rtxjit.exec.copy import contiguous
from rtxjit.exec.device import Device, detect
from rtxjit.exec.executor import Executable
from rtxjit.frontdoor import optimized_graph
from rtxjit.ir.graph import Graph
from rtxjit.ir.types import DType, TensorType
from rtxjit.jit import specializer as jit, warm
from rtxjit.kernels.store import EngineBinaries, KernelStore
from rtxjit.kernels.tensors import dtype_of_torch, host_tensor
from rtxjit.plan import autotune
from rtxjit.plan.plan import PlanBuilder
from rtxjit.plan.profiles import resolve_profiles, select

ONNX_TYPE_NAMES = {
    DType.FP32: "tensor(float)", DType.FP16: "tensor(float16)", DType.BF16: "tensor(bfloat16)",
    DType.FP64: "tensor(double)", DType.INT64: "tensor(int64)", DType.INT32: "tensor(int32)",
    DType.INT16: "tensor(int16)", DType.UINT16: "tensor(uint16)", DType.UINT32: "tensor(uint32)",
    DType.UINT64: "tensor(uint64)",
    DType.INT8: "tensor(int8)", DType.UINT8: "tensor(uint8)", DType.BOOL: "tensor(bool)",
    DType.FP8E4M3: "tensor(float8e4m3fn)", DType.FP8E5M2: "tensor(float8e5m2)",
    DType.INT4: "tensor(int4)", DType.UINT4: "tensor(uint4)", DType.INT2: "tensor(int2)", DType.UINT2: "tensor(uint2)",
}


@dataclass(frozen=True)
class NodeArg:
    """Name, shape (ints or symbol names) and ONNX type string of a graph input or output."""

    name: str
    shape: list
    type: str
    dtype: DType


def _node_arg(v) -> NodeArg:
    return NodeArg(v.name, list(v.type.shape), ONNX_TYPE_NAMES[v.type.dtype], v.type.dtype)


class InferenceSession:
    """Runs a model with generated Triton kernels.

    ``model`` is a path, serialized bytes, an ``onnx.ModelProto``, an ``rtxjit.ir.Graph`` or an
    ``rtxjit.Engine`` (already optimized: ``optimize`` and ``precision`` do not apply; its profiles
    are the default).
    ``device`` is "cuda", "cpu" (Triton's interpreter) or None (a GPU if torch sees one).
    ``optimize`` runs the pass pipeline (``rtxjit.passes``) once; ``pass_timings`` says how long
    each pass took. ``precision`` ("fp16" or "bf16") converts the model's fp32 values to that type
    (inputs and outputs stay fp32); None runs the model's own types. On a GPU, a type its SM cannot
    run (bf16 below sm_80, fp8 below sm_89) is an UnsupportedOpError naming the node.
    ``profiles`` (a ``Profile``, a dict of input name -> (min, opt, max) shapes, or a list of them;
    see ``rtxjit.plan.profiles``) bounds the input shapes ``run`` accepts; None is the default
    profile from the model's symbolic dims. ``last_profile`` is the index of the profile that served
    the last run.
    ``runtime_cache`` (a ``RuntimeCache`` or a directory; None: RTXJIT_RUNTIME_CACHE, if set) keeps
    compiled kernels (on a GPU) and tile choices across processes, and counts each new binding of
    input shapes (the next process specializes the most frequent first).
    ``specialize`` ("lazy", "eager" or "none"; None: RTXJIT_SPECIALIZE, else "lazy" on a GPU and
    "none" under the interpreter) says when shape-specialized kernels replace the generic ones that
    serve a new binding of input shapes at once (see ``rtxjit.jit.specializer``):
    in the background, before the binding's first run returns, or never.
    ``wait_for_specialization(timeout)`` waits for the background work; ``jit_stats()`` reports it.
    """

    def __init__(self, model, device: Optional[str] = None, providers=None, optimize: bool = True,
                 precision: Optional[str] = None, profiles=None, runtime_cache=None,
                 specialize: Optional[str] = None):
        from rtxjit.engine.engine import Engine

        self.runtime_cache = open_cache(runtime_cache)
        self.device: Device = detect(device)
        if self.device.kind == "cuda" and config.gc_freeze():
            jit.freeze_heap()  # no full-heap collection pause in a later request (a new binding's first)
        targets = () if self.device.sm is None else (self.device.sm,)
        self.engine = model if isinstance(model, Engine) else None
        if self.engine is not None:  # optimized when built; a stripped engine names its missing weights here
            model, optimize, precision = self.engine.graph, False, None
            profiles = self.engine.profiles if profiles is None else profiles
        front = optimized_graph(model, optimize=optimize, precision=precision, cache=self.runtime_cache,
                                targets=targets)
        self.graph, self._model_key, self.pass_timings = front.graph, front.model_key, front.pass_timings
        self.graph_from_cache: bool = front.from_cache  # the optimized graph was read from the runtime cache
        self._graph_writer = front.writer
        self.profiles: list = resolve_profiles(profiles, self.graph)
        self._profile_of: dict = {}  # executable key -> index of the profile serving it
        self.last_profile: Optional[int] = None
        self.specialize = jit.resolve_mode(specialize or config.specialize_mode(), self.device)
        self._jit = jit.Stats()
        self._histogram = self._seen_shapes()
        # this session's compiled kernels: read from and written to its own runtime cache only
        self.kernels = KernelStore(self.runtime_cache)
        self._tune = True
        if self.engine is not None and self.device.kind == "cuda" and self.engine.has_binaries_for(self.device.sm):
            self.kernels.add_source(EngineBinaries(self.engine))
            self._tune = False  # tile timing would compile the tiles the engine does not hold
        self._tdev = torch.device(self.device.torch_device)
        self._lock = threading.Lock()
        self._executables: dict = {}
        self._fallbacks_queued = False  # the other shape buckets' generic kernels (``_queue_fallbacks``)
        self._host_inputs = self._inputs_needed_on_host()
        self._expected = {v.name: v for v in self.graph.inputs}  # per request: the feeds checked against it
        self._index_inputs = index_inputs(self.graph)
        self._const_tensors: dict = {}
        self._plan_consts: dict = {}  # constants made by lowerings, shared across shape bindings
        self._upload_constants()
        self.last_trace: dict = {}
        self.last_executable = None

    # -- onnxruntime-style introspection
    def get_inputs(self) -> list:
        return [_node_arg(v) for v in self.graph.inputs]

    def get_outputs(self) -> list:
        return [_node_arg(v) for v in self.graph.outputs]

    # -- running
    def run(self, output_names, feeds: dict) -> list:
        names = [v.name for v in self.graph.outputs] if output_names is None else list(output_names)
        known_outputs = {v.name for v in self.graph.outputs}
        for n in names:
            if n not in known_outputs:
                raise InputError(f"unknown output '{n}'; the model's outputs are {sorted(known_outputs)}")
        as_numpy = not any(isinstance(x, torch.Tensor) for x in feeds.values())
        tensors, types, host_values = self._bind(feeds)
        key = binding_key(types, host_values)
        exe = self._executables.get(key)
        if exe is None:
            with jit.serving():  # a new binding: the background specializer waits meanwhile
                exe, results = self._first_run(key, types, host_values, tensors)
        else:
            self.last_trace = exe.plan.trace
            self.last_executable = exe
            self.last_profile = self._profile_of[key]
            results = exe.run(tensors)
        out = [results[n] for n in names]
        if as_numpy:
            return [t.cpu().numpy() for t in out]
        return out

    def _first_run(self, key, types: dict, host_values: dict, tensors: dict) -> tuple:
        """``(executable, outputs)`` of a run whose binding has no executable yet (unless another
        thread made it meanwhile): plan, kernels (recorded, or generic), specialization queued."""
        self._profile_of[key] = select(self.profiles, {n: t.shape for n, t in types.items()})
        fresh = False
        with self._lock:
            exe = self._executables.get(key)
            if exe is None:
                exe = self._new_executable(key, types, host_values)
                fresh = True
        queue = fresh and self.specialize != "none" and not exe.recorded
        if queue and self.specialize == "eager":
            self._specialize(exe, tensors, types)
        self.last_trace = exe.plan.trace
        self.last_executable = exe
        self.last_profile = self._profile_of[key]
        results = exe.run(tensors)
        if queue and self.specialize == "lazy":  # after the run: its launches do not share the GIL
            self._specialize(exe, tensors, types)
            self._queue_fallbacks(types, self._profile_of[key])
        return exe, results

    def _queue_fallbacks(self, types: dict, profile: int) -> None:
        """Once per session, after its first binding's specialization: the generic kernels of other
        shape buckets compiled in the background (jit/fallbacks.py), where a GPU compiles them and
        the inputs' shapes alone fix the plan."""
        if (self._fallbacks_queued or self.device.kind != "cuda" or self.device.interpret or self._host_inputs
                or not self._tune or not config.fallback_buckets()):
            return
        self._fallbacks_queued = True
        ref, chosen = weakref.ref(self), self.profiles[profile]

        def task() -> None:
            from rtxjit.jit import fallbacks
            from rtxjit.plan import statics

            session = ref()
            if session is None:
                return

            def build(probe: dict):  # what a binding of ``probe`` would plan now, changing nothing kept
                kept = statics.of_graph(session.graph).detached()
                return PlanBuilder(session.graph, session.device, frozenset(session._const_tensors), kept).build(probe, {})

            fallbacks.prewarm(session.graph, build, session.device, session.kernels, types, chosen, session._jit,
                              jit.yield_to_serving)

        jit.specializer().submit_task(task, self._jit)

    def _new_executable(self, key, types: dict, host_values: dict) -> Executable:
        from rtxjit.exec import compiler

        with jit.gc_paused():  # a new binding allocates many small objects: no collection pauses meanwhile
            plan = self._build_plan(types, host_values)
            exe = Executable(plan, self.device, self._const_tensors, plan_consts=self._plan_consts,
                             kernels=self.kernels, hooks=jit.HOOKS)
        exe.key = key
        exe.tune = self._tune
        recorded = None
        if self.runtime_cache is not None:
            exe.model_key = self._model_key
            recorded = warm.load_variant(self.kernels, self._model_key, exe)
        if recorded is not None:  # kernels checked and tuned by an earlier process: served at once
            exe.install(recorded)
            self._jit.add(cache_hits=len({id(d.kernel) for d in recorded.direct}))
            exe.recorded = True
        else:
            compiles, hits = compiler.prepare_generic(exe)
            self._jit.add(compiles=compiles, cache_hits=hits)
        self._executables[key] = exe
        if self.runtime_cache is not None:
            self._note_binding(plan, types)
        return exe

    def _build_plan(self, types: dict, host_values: dict):
        """A new plan of this binding: the session's constants are on the device already."""
        return PlanBuilder(self.graph, self.device, frozenset(self._const_tensors)).build(types, host_values)

    def _specialize(self, exe: Executable, tensors: dict, types: dict) -> None:
        shapes = {n: t.shape for n, t in types.items()}
        if self.specialize == "eager":
            self._jit.add(pending=1)
            jit.specialize_now(exe, jit.snapshot(exe, tensors), self._jit)
        else:
            jit.specializer().submit(exe, jit.snapshot(exe, tensors), self._jit,
                                     jit.frequency(self._histogram, shapes))

    def _seen_shapes(self) -> dict:
        """The runtime cache's histogram of this model's shape bindings (earlier processes)."""
        if self.runtime_cache is None:
            return {}
        try:
            return jit.histogram_of(self.runtime_cache.most_frequent_shapes(self._model_key, n=64))
        except (OSError, ValueError):
            return {}

    def recorded_shapes(self, n: int = 8) -> list:
        """The runtime cache's ``n`` most frequent bindings of this model's input shapes (earlier
        processes and this one) as ``[({input: dims}, count)]``, most frequent first; ``[]`` without
        a cache. What a server warms up with before it reports ready (``rtxjit.serve``)."""
        if self.runtime_cache is None:
            return []
        try:
            return self.runtime_cache.most_frequent_shapes(self._model_key, n=n)
        except (OSError, ValueError):
            return []

    def flush_runtime_cache(self, timeout: Optional[float] = None) -> bool:
        """Wait until the optimized graph that this session recorded is in its runtime cache (it is
        written on a thread of its own, so the first inference does not wait), e.g. before another
        process is told to read it; False if ``timeout`` seconds pass first."""
        writer = self._graph_writer
        if writer is not None:
            writer.join(timeout)
            return not writer.is_alive()
        return True

    def wait_for_specialization(self, timeout: Optional[float] = None) -> bool:
        """Wait until every binding queued for specialization is done (installed, rejected or
        failed); False if ``timeout`` seconds pass first."""
        return jit.wait(self._jit, timeout)

    def jit_stats(self) -> dict:
        """Counters of the JIT: kernels compiled and loaded from caches, bindings pending and
        specialized, kernels rejected by the check, failures; per node of the last run, which
        kernel served it ("generic" or "specialized"); and per binding (``bindings``: its key, and
        the seconds from its first request to each install of a specialized variant)."""
        s = self._jit
        with s.lock:
            out = {"mode": self.specialize, "compiles": s.compiles, "cache_hits": s.cache_hits,
                   "pending": s.pending, "specialized": s.specialized, "rejected": s.rejected,
                   "failed": s.failed, "dropped": s.dropped, "errors": list(s.errors)}
        served = {}
        exe = self.last_executable
        if exe is not None:
            v = exe.served
            for kind, step in zip(v.kinds, exe.plan.steps):
                served.setdefault(step.node, set()).add(kind)
            out["last_run"] = v.kind
        out["served"] = {node: "specialized" if kinds == {"specialized"} else "generic" if kinds == {"generic"}
                         else "mixed" for node, kinds in served.items()}
        out["bindings"] = [{"key": repr(key), "installed_after_s": [round(t - e.created_s, 4) for t in e.installed_s]}
                           for key, e in list(self._executables.items())]
        return out

    @property
    def launches_per_inference(self) -> int:
        """Kernel launches of the last run's plan (replayed as one CUDA graph on the GPU)."""
        return len(self.last_executable.plan.steps) if self.last_executable else 0

    @property
    def activation_bytes(self) -> int:
        """Intermediate memory of the last run's plan: its arena plus its outputs."""
        return self.last_executable.activation_bytes if self.last_executable else 0

    def plan_for(self, feeds: dict):
        """The execution plan that ``run`` uses for these feeds, after running them once (for
        inspection and tests; ``plan`` builds it without running)."""
        self.run(None, feeds)
        return self.last_executable.plan

    def plan(self, shapes: dict, host_values: Optional[dict] = None):
        """The plan that a run of inputs of these ``shapes`` (input name -> sizes) uses, without
        running it: the plan of the binding's executable where a run made one, else a new plan built
        as a first run builds it (nothing compiled, launched or recorded; nothing kept).
        Inputs that the plan reads on the host (shape tensors, ``host_inputs``) need their values in
        ``host_values`` (input name -> array; other names there are not read), as a run's feeds give
        them. Checked as a run checks its feeds: an unknown or missing input, a wrong rank, a static
        or symbolic dim that does not fit, shapes outside every profile are InputErrors naming it."""
        expected = {v.name: v for v in self.graph.inputs}
        for name in shapes:
            if name not in expected:
                raise InputError(f"unknown input '{name}'; the model's inputs are {sorted(expected)}")
        given = host_values or {}
        types, host, symbols = {}, {}, {}
        for name, v in expected.items():
            if name not in shapes:
                raise InputError(f"missing input '{name}' ({v.type})")
            shape = tuple(int(d) for d in shapes[name])
            check_shape(name, v.type, shape, symbols)
            types[name] = TensorType(v.type.dtype, shape)
            if name in self._host_inputs:
                host[name] = self._host_value(name, given.get(name), types[name])
        exe = self._executables.get(binding_key(types, host))
        if exe is not None:
            return exe.plan
        select(self.profiles, {n: t.shape for n, t in types.items()})  # as a first run: outside every profile is an error naming the input
        return self._build_plan(types, host)

    def time_launches(self, feeds: dict, iterations: int, warmup: int = 1) -> tuple:
        """``(plan, kinds, seconds)`` for the binding of ``feeds`` (run once first if it has not
        run): its plan, which kernel serves each launch now ("generic" or "specialized") and the
        median seconds of each launch timed alone (``runtime.roofline.time_launches``), for
        ``rtxjit profile``."""
        tensors, types, host_values = self._bind(feeds)
        key = binding_key(types, host_values)
        if key not in self._executables:
            self.run(None, feeds)
        exe = self._executables[key]
        return exe.plan, list(exe.active.kinds), roofline.time_launches(exe, tensors, iterations, warmup=warmup)

    @property
    def host_inputs(self) -> list:
        """Names of the inputs whose values a plan reads on the host (``plan`` needs them)."""
        return [v.name for v in self.graph.inputs if v.name in self._host_inputs]

    def _host_value(self, name: str, x, t: TensorType) -> np.ndarray:
        if x is None:
            raise InputError(f"input '{name}': its values fix the plan (they are read on the host); give them in "
                             f"host_values (an array of {t.dtype.short} {list(t.shape)})")
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        try:
            dt = DType.from_numpy(x.dtype)
        except KeyError:
            dt = None
        if dt is not t.dtype or tuple(x.shape) != t.shape:
            raise InputError(f"input '{name}': host_values gives {x.dtype} {list(x.shape)}, expected "
                             f"{t.dtype.short} {list(t.shape)}")
        return x

    def _note_binding(self, plan, types: dict) -> None:
        """Runtime cache: count this binding of input shapes; reuse and keep the plan's tile choices."""
        try:
            self.runtime_cache.record_shapes(self._model_key, {n: t.shape for n, t in types.items()})
        except OSError as exc:
            warnings.warn(f"rtxjit: runtime cache {self.runtime_cache}: cannot record shapes: {exc}", RuntimeWarning)
        autotune.attach(self.runtime_cache, [step.tune_key for step in plan.steps if step.choices])

    def _bind(self, feeds: dict):
        expected = self._expected
        for name in feeds:
            if name not in expected:
                raise InputError(f"unknown input '{name}'; the model's inputs are {sorted(expected)}")
        tensors, types, host_values, symbols = {}, {}, {}, {}
        for name, v in expected.items():
            if name not in feeds:
                raise InputError(f"missing input '{name}' ({v.type})")
            x = feeds[name]
            if isinstance(x, torch.Tensor):
                dt = dtype_of_torch(x.dtype, name)
            else:
                x = np.asarray(x)
                try:
                    dt = DType.from_numpy(x.dtype)
                except KeyError:
                    raise InputError(f"input '{name}': dtype {x.dtype} is not supported") from None
            if dt is not v.type.dtype:
                raise InputError(f"input '{name}': expected dtype {v.type.dtype.short}, got {dt.short}")
            shape = tuple(int(d) for d in x.shape)
            check_shape(name, v.type, shape, symbols)
            if name in self._host_inputs:
                host_values[name] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
            if name in self._index_inputs and not isinstance(x, torch.Tensor):
                check_indices(name, x, self._index_inputs[name], feeds)
            tensors[name] = self._to_device(x, dt)
            types[name] = TensorType(dt, shape)
        return tensors, types, host_values

    def _to_device(self, x, dt: DType):
        if isinstance(x, torch.Tensor):
            t = x.to(self._tdev)
            if not t.is_contiguous():
                t = contiguous(t, self.device)
            return t.reshape(-1)
        return host_tensor(np.ascontiguousarray(x).reshape(-1), dt).to(self._tdev)  # int4 / fp8 feeds too

    def _inputs_needed_on_host(self) -> set:
        from rtxjit.ir.host import host_read_values

        return host_read_values(self.graph) & {v.name for v in self.graph.inputs}

    def _upload_constants(self) -> None:
        for v in self.graph.constants():
            data = np.ascontiguousarray(v.const).reshape(-1)
            t = host_tensor(data, v.type.dtype).to(self._tdev)
            self._const_tensors[v.name] = t


def check_shape(name: str, declared: TensorType, shape: tuple, symbols: dict) -> None:
    """An InputError naming input ``name`` when ``shape`` does not fit its declared type: the rank,
    a static dim, or a symbolic dim bound to another size by an earlier input (``symbols``: symbol
    -> (size, input name), filled as inputs are checked)."""
    if len(shape) != declared.rank:
        raise InputError(f"input '{name}': expected rank {declared.rank} {declared.shape}, got shape {shape}")
    for i, (want, got) in enumerate(zip(declared.shape, shape)):
        if isinstance(want, int) and want != got:
            raise InputError(f"input '{name}': dim {i} must be {want}, got {got} (shape {shape})")
        if isinstance(want, str) and want != "?":
            if symbols.setdefault(want, (got, name))[0] != got:
                first = symbols[want]
                raise InputError(f"input '{name}': dim {i} ('{want}') is {got} but input '{first[1]}' "
                                 f"binds '{want}' to {first[0]}")


def binding_key(types: dict, host_values: dict) -> tuple:
    """The key of a binding (one executable each): input names, shapes and dtypes, and the bytes of
    the inputs read on the host."""
    return tuple((n, t.shape, t.dtype) for n, t in types.items()) + tuple(
        (n, v.tobytes()) for n, v in sorted(host_values.items()))


@dataclass(frozen=True)
class IndexUse:
    """A graph input read as the indices of a Gather: valid values lie in [-n, n) where n is
    ``dim`` (an int), or dim ``axis`` of graph input ``data`` (bound at run time)."""

    node: str
    axis: int
    dim: Optional[int]
    data: Optional[str]


def index_inputs(graph: Graph) -> dict:
    """Graph inputs that are Gather indices as they are: input name -> [IndexUse]. Found once per
    session; the check on each run is a min and a max over host feeds."""
    inputs = {v.name for v in graph.inputs}
    found: dict = {}
    for node in graph.nodes:
        if node.op != "Gather" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        data, idx = node.inputs[0], node.inputs[1]
        if idx.name not in inputs:
            continue
        axis = int(node.attrs.get("axis", 0)) % max(data.type.rank, 1)
        dim = data.type.shape[axis]
        if isinstance(dim, int):
            found.setdefault(idx.name, []).append(IndexUse(node.name, axis, dim, None))
        elif data.name in inputs:
            found.setdefault(idx.name, []).append(IndexUse(node.name, axis, None, data.name))
    return found


def check_indices(name: str, x: np.ndarray, uses: list, feeds: dict) -> None:
    """An InputError naming the input, the bad value and the node when a host feed holds an index
    out of [-n, n), as onnxruntime raises. (Feeds already on the GPU are not read back: the kernels
    mask out-of-range indices and never read outside the table.)"""
    if x.size == 0:
        return
    lo, hi = int(x.min()), int(x.max())
    for use in uses:
        n = use.dim if use.dim is not None else int(np.shape(feeds[use.data])[use.axis])
        if lo < -n or hi >= n:
            bad = hi if hi >= n else lo
            raise InputError(f"input '{name}': index {bad} is out of range [{-n}, {n - 1}] of axis {use.axis} "
                             f"of node '{use.node}' (Gather)")

