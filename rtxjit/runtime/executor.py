"""Runs a plan: binds buffers and launches its precomputed list of kernels."""

from __future__ import annotations

import hashlib
import threading
import warnings

import numpy as np
import torch

from rtxjit.codegen.source import load_kernel
from rtxjit.errors import KernelError
from rtxjit.runtime import autotune
from rtxjit.runtime.memory import plan_arena
from rtxjit.runtime.plan import Buf, Plan

TORCH_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2,
}


def torch_dtype(dtype) -> torch.dtype:
    return TORCH_DTYPES[dtype.short]


class Executable:
    """A plan made ready to launch: kernels loaded, constants on the device, intermediates placed in
    one arena, arguments bound once. Per run only the inputs and the (fresh) outputs are bound.

    On a GPU, the second run of a binding captures the whole launch list as a CUDA graph; later
    runs copy the inputs into the graph's static buffers and replay it.
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
        self.arena = torch.empty(self.arena_plan.size, dtype=torch.uint8, device=self.tdev)
        static: dict = {}
        self.per_run = []  # (buffer index, numel, torch dtype): graph outputs and unplaced temps
        for i, spec in enumerate(plan.buffers):
            if spec.role == "const":
                if spec.data is not None:
                    static[i] = self._plan_constant(spec, {} if plan_consts is None else plan_consts)
                else:
                    static[i] = const_tensors[spec.name]
            elif spec.role == "temp" and i in self.arena_plan.offsets:
                off = self.arena_plan.offsets[i]
                nbytes = spec.numel * spec.dtype.itemsize
                static[i] = self.arena[off:off + nbytes].view(torch_dtype(spec.dtype))
            elif spec.role == "temp" and i in used:
                self.per_run.append((i, spec.numel, torch_dtype(spec.dtype)))
        self.constants = {i: t for i, t in static.items() if plan.buffers[i].role == "const"}
        self.inputs = dict(plan.inputs)
        self.launches = []
        for step in plan.steps:
            fn = load_kernel(step.kernel, device.interpret)
            args = [static.get(a.index, a) if isinstance(a, Buf) else a for a in step.args]
            slots = tuple(j for j, a in enumerate(args) if isinstance(a, Buf))
            self.launches.append((fn[step.grid], args, slots, step.constexprs, step))
        # launches with several tile configurations, timed at the first run (before any capture)
        self.untuned = {j for j, step in enumerate(plan.steps) if step.choices} if autotune.enabled() else set()
        self.runs = 0
        self.graph = None
        self.use_cuda_graph = cuda_graphs and device.kind == "cuda"

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

    @property
    def activation_bytes(self) -> int:
        """Intermediate memory: the arena plus one run's outputs."""
        outputs = sum(n * torch.empty((), dtype=dt).element_size() for _, n, dt in self.per_run)
        return self.arena_plan.size + outputs

    def run(self, feeds: dict) -> dict:
        with self.lock:
            if self.graph is not None:
                return self._replay(feeds)
            bufs = {idx: feeds[name] for name, idx in self.inputs.items()}
            for i, numel, dt in self.per_run:
                bufs[i] = torch.empty(numel, dtype=dt, device=self.tdev)
            self._launch_all(bufs)
            self.runs += 1
            out = self._outputs(bufs)
            if self.use_cuda_graph and self.runs == 2:
                self._capture(feeds)
            return out

    def _launch_all(self, bufs: dict) -> None:
        for i, (launcher, args, slots, constexprs, step) in enumerate(self.launches):
            if slots:
                args = list(args)
                for j in slots:
                    args[j] = bufs[args[j].index]
            try:
                if i in self.untuned:
                    launcher, constexprs = self._tune(i, args)
                launcher(*args, **constexprs)
            except Exception as exc:  # a compile or launch failure names the node and kernel
                raise KernelError(f"kernel {step.kernel.name}:{step.kernel.short_key} of node '{step.node}' "
                                  f"failed: {type(exc).__name__}: {exc}") from exc

    def _tune(self, i: int, args: list) -> tuple:
        """Time launch ``i``'s configurations on its live arguments; keep the fastest from now on."""
        launcher, unbound, slots, _, step = self.launches[i]
        fn = load_kernel(step.kernel, self.device.interpret)
        best = autotune.choose(step.tune_key, list(step.choices),
                               lambda c: fn[step.choices[c][0]](*args, **step.choices[c][1]))
        grid, constexprs = step.choices[best]
        self.launches[i] = (fn[grid], unbound, slots, constexprs, step)
        self.untuned.discard(i)
        return fn[grid], constexprs

    def _outputs(self, bufs: dict) -> dict:
        out = {}
        for name, v in self.plan.outputs.items():
            out[name] = bufs[v.buf][v.offset:v.offset + v.numel].view(v.shape)
        return out

    def _capture(self, feeds: dict) -> None:
        """Record the launch list into a CUDA graph over static input and output buffers."""
        bufs = {idx: torch.empty_like(feeds[name]) for name, idx in self.inputs.items()}
        for name, idx in self.inputs.items():
            bufs[idx].copy_(feeds[name])
        for i, numel, dt in self.per_run:
            bufs[i] = torch.empty(numel, dtype=dt, device=self.tdev)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._launch_all(bufs)  # warm: every kernel compiled and loaded before capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._launch_all(bufs)
        except Exception as exc:  # graphs are an optimization: keep launching kernel by kernel
            warnings.warn(f"rtxjit: CUDA graph capture failed, running without it: {exc}")
            self.use_cuda_graph = False
            return
        self.graph, self.graph_bufs = graph, bufs

    def _replay(self, feeds: dict) -> dict:
        for name, idx in self.inputs.items():
            self.graph_bufs[idx].copy_(feeds[name])
        self.graph.replay()
        return {k: v.clone() for k, v in self._outputs(self.graph_bufs).items()}
