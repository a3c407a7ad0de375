"""Runs a plan: binds buffers and launches its precomputed list of kernels."""

from __future__ import annotations

import torch

from rtxjit.codegen.source import load_kernel
from rtxjit.errors import KernelError
from rtxjit.runtime.plan import Buf, Plan

TORCH_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2,
}


def torch_dtype(dtype) -> torch.dtype:
    return TORCH_DTYPES[dtype.short]


class Executable:
    """A plan made ready to launch: kernels loaded, constants on the device, arguments templated."""

    def __init__(self, plan: Plan, device, const_tensors: dict):
        self.plan = plan
        self.device = device
        self.tdev = torch.device(device.torch_device)
        self.buffers: list = [None] * len(plan.buffers)
        self.temps = []
        for i, spec in enumerate(plan.buffers):
            if spec.role == "const":
                if spec.data is not None:
                    self.buffers[i] = torch.from_numpy(spec.data.reshape(-1).copy()).to(self.tdev)
                else:
                    self.buffers[i] = const_tensors[spec.name]
            elif spec.role == "temp":
                self.temps.append((i, spec.numel, torch_dtype(spec.dtype)))
        self.launches = []
        for step in plan.steps:
            fn = load_kernel(step.kernel, device.interpret)
            slots = tuple(j for j, a in enumerate(step.args) if isinstance(a, Buf))
            self.launches.append((fn[step.grid], list(step.args), slots, step.constexprs, step))

    def run(self, feeds: dict) -> dict:
        bufs = list(self.buffers)
        for name, idx in self.plan.inputs.items():
            bufs[idx] = feeds[name]
        for i, numel, dt in self.temps:
            bufs[i] = torch.empty(numel, dtype=dt, device=self.tdev)
        for launcher, args, slots, constexprs, step in self.launches:
            args = list(args)
            for j in slots:
                args[j] = bufs[args[j].index]
            try:
                launcher(*args, **constexprs)
            except Exception as exc:  # a compile or launch failure names the node and kernel
                raise KernelError(f"kernel {step.kernel.name}:{step.kernel.short_key} of node '{step.node}' "
                                  f"failed: {type(exc).__name__}: {exc}") from exc
        out = {}
        for name, v in self.plan.outputs.items():
            flat = bufs[v.buf]
            out[name] = flat[v.offset:v.offset + v.numel].view(v.shape)
        return out
