"""Runs a plan: binds buffers and launches its precomputed list of kernels.

An ``Executable`` is one binding of input shapes made ready to launch. It holds one or two
*variants* of its launch list (see runtime/jit.py): the shape-generic fallback, ready at once, and
later the specialized one, which the background specializer builds, checks and installs with one
reference assignment. The hot path reads ``active`` once per run.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from rtxjit.codegen.source import load_kernel, specialize
from rtxjit.errors import KernelError
from rtxjit.runtime.memory import plan_arena
from rtxjit.runtime.plan import Buf, Launch, Plan

TORCH_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2,
}

GENERIC, SPECIALIZED = "generic", "specialized"


def torch_dtype(dtype) -> torch.dtype:
    return TORCH_DTYPES[dtype.short]


def shape_params(step: Launch) -> list:
    """Names of the kernel parameters that a specialized kernel takes as constants: the integer
    arguments that are not buffer offsets (an offset is the integer right after a buffer pointer;
    offsets differ between the layers that share a kernel, so they stay runtime arguments)."""
    from rtxjit.codegen.source import parameters

    names = [name for name, _ in parameters(step.kernel)]
    out = []
    for j, a in enumerate(step.args):
        if isinstance(a, int) and not isinstance(a, bool) and not (j > 0 and isinstance(step.args[j - 1], Buf)):
            out.append(names[j])
    return out


def specialized_source(step: Launch):
    """The source of ``step``'s specialized kernel (tests may replace this function)."""
    return specialize(step.kernel, shape_params(step))


@dataclass
class Variant:
    """One launch list of a binding, bound to an arena; on a GPU, its CUDA graph once captured.

    ``launches`` holds ``(launcher, args, slots, constexprs, step)``: ``slots`` are the argument
    positions bound per run (inputs and outputs). ``kinds[i]`` says which kernel serves step i.
    """

    kinds: list
    launches: list
    arena: torch.Tensor
    static: dict
    runs: int = 0
    graph: Optional[object] = None
    graph_bufs: dict = field(default_factory=dict)

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
                 plan_consts: dict = None):
        self.plan = plan
        self.device = device
        self.tdev = torch.device(device.torch_device)
        self.lock = threading.Lock()
        out_bufs = {v.buf for v in plan.outputs.values()}
        used = out_bufs | {a.index for step in plan.steps for a in step.args if isinstance(a, Buf)}
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

    def _plan_constant(self, spec, shared: dict) -> torch.Tensor:
        """A constant the lowering made (a pre-transposed conv weight, a fill value) on the device,
        shared with every other binding of the session that made the same bytes: bindings of new
        shapes must not each hold another copy of the weights."""
        data = np.ascontiguousarray(spec.data)
        key = (spec.name, data.dtype.str, data.shape, hashlib.sha256(data.view(np.uint8)).hexdigest())
        tensor = shared.get(key)
        if tensor is None:
            tensor = torch.from_numpy(data.reshape(-1).copy()).to(self.tdev)
            shared[key] = tensor
        return tensor

    # -- variants
    def new_arena(self) -> torch.Tensor:
        return torch.empty(self.arena_plan.size, dtype=torch.uint8, device=self.tdev)

    def variant(self, kinds: list, configs: dict = None, arena: torch.Tensor = None) -> Variant:
        """A launch list over ``arena`` (a new one if None): step i runs its ``kinds[i]`` kernel; a
        specialized step takes ``configs[i]`` (grid, constexprs) if given, else the plan's."""
        arena = self.new_arena() if arena is None else arena
        static = dict(self.constants)
        for i, off in self.arena_plan.offsets.items():
            spec = self.plan.buffers[i]
            static[i] = arena[off:off + spec.numel * spec.dtype.itemsize].view(torch_dtype(spec.dtype))
        launches = []
        for i, (step, kind) in enumerate(zip(self.plan.steps, kinds)):
            args = [static.get(a.index, a) if isinstance(a, Buf) else a for a in step.args]
            slots = tuple(j for j, a in enumerate(args) if isinstance(a, Buf))
            fn, grid, constexprs = self.kernel(step, kind, (configs or {}).get(i))
            launches.append((fn[grid], args, slots, constexprs, step))
        return Variant(list(kinds), launches, arena, static)

    def kernel(self, step: Launch, kind: str, config: tuple = None) -> tuple:
        """``(kernel, grid, constexprs)`` of ``step``'s ``kind`` kernel."""
        interpret = self.device.interpret
        if kind == GENERIC:
            return load_kernel(step.kernel, interpret, generic=True), step.generic_grid, step.generic_constexprs
        grid, constexprs = config or (step.grid, step.constexprs)
        return load_kernel(specialized_source(step), interpret), grid, constexprs

    def install(self, variant: Variant) -> None:
        """Serve ``variant`` from the next run on (one reference assignment under the run lock:
        a run in progress finishes on the old variant)."""
        with self.lock:
            self.active = variant

    @property
    def activation_bytes(self) -> int:
        """Intermediate memory: the arena plus one run's outputs."""
        outputs = sum(n * torch.empty((), dtype=dt).element_size() for _, n, dt in self.per_run)
        return self.arena_plan.size + outputs

    # -- running
    def run(self, feeds: dict) -> dict:
        with self.lock:
            v = self.served = self.active
            if v.graph is None and self.use_cuda_graph and v.runs >= v.eager_runs:
                self.capture(v, feeds)  # instead of launching: the replay below runs it
            v.runs += 1
            if v.graph is not None:
                return self._replay(v, feeds)
            bufs = self.fresh_buffers(feeds)
            launch_all(v.launches, bufs)
            return self.outputs(bufs)

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

    def capture(self, v: Variant, feeds: dict) -> bool:
        """Record ``v``'s launch list into a CUDA graph over static input and output buffers (in the
        serving thread; the capture is thread-local)."""
        bufs = {idx: torch.empty_like(feeds[name]) for name, idx in self.inputs.items()}
        for name, idx in self.inputs.items():
            bufs[idx].copy_(feeds[name])
        for i, numel, dt in self.per_run:
            bufs[i] = torch.empty(numel, dtype=dt, device=self.tdev)
        try:  # every kernel was loaded by the variant's first run (or the specializer's check)
            here = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(here)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                launch_all(v.launches, bufs)
            here.wait_stream(side)
        except Exception as exc:  # graphs are an optimization: keep launching kernel by kernel
            warnings.warn(f"rtxjit: CUDA graph capture failed, running without it: {exc}")
            self.use_cuda_graph = False
            return False
        v.graph, v.graph_bufs = graph, bufs
        return True

    def _replay(self, v: Variant, feeds: dict) -> dict:
        for name, idx in self.inputs.items():
            v.graph_bufs[idx].copy_(feeds[name])
        v.graph.replay()
        return {k: t.clone() for k, t in self.outputs(v.graph_bufs).items()}


def launch_all(launches: list, bufs: dict) -> None:
    for launcher, args, slots, constexprs, step in launches:
        if slots:
            args = list(args)
            for j in slots:
                args[j] = bufs[args[j].index]
        try:
            launcher(*args, **constexprs)
        except Exception as exc:  # a compile or launch failure names the node and kernel
            raise KernelError(f"kernel {step.kernel.name}:{step.kernel.short_key} of node '{step.node}' "
                              f"failed: {type(exc).__name__}: {exc}") from exc
