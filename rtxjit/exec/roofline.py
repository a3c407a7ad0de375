"""Per-launch roofline of an execution plan: what each kernel launch must move and compute, the
floor time the machine allows for that, and each launch's own measured time.

The IR has no cost model of its own (no per-op byte or flop counts), so the counts come from the
plan, whose launches carry concrete buffers and sizes (``step_counts``):

- **bytes**: every distinct plan buffer that a launch takes as an argument (``Buf``), read or
  written once in full: ``numel x itemsize`` of its ``BufferSpec``. A buffer passed twice (Q, K
  and V as views of one merged projection) counts once. A launch that reads only part of a buffer
  (a strided slice, gathered rows) is counted as reading all of it, so the count is an upper bound
  there; re-reads inside a kernel (a conv's overlapping taps, a matmul's tiles) are not counted:
  the floor assumes each byte crosses DRAM once.
- **flops**: for the product kernels, from the launch's own size arguments (the kernel's
  parameters, by name) and its grid: ``matmul`` 2*M*N*K per batch, ``conv2d`` / ``conv3d``
  (implicit GEMM; a 1-D Conv and an rtxjit.UpsampleConv run as these) 2*M*N*K per group,
  ``attention`` 2*SQ*SK*(DK+DV) per (batch, head); the batch / group / head count is grid dim 1 of
  those launches. ``conv_transpose2d`` / ``conv_transpose3d`` count the useful work only: their
  gather form runs 2*M*N*K multiply-adds, of which, with stride s, all but about ``1/s`` per axis
  multiply masked zeros; the useful ones are the scatter form's (input pixel, tap) pairs that land
  inside the output, counted per axis from the launch's sizes, strides, pads and dilations
  (``_transposed_flops``). Every other kernel (pointwise, reductions, pooling, data movement)
  counts 0 flops: a few flops per byte lies far below any GPU's ridge point, so its floor is its
  bytes. Fused epilogue flops (bias, activation) are left out likewise.
- **floor** = ``max(bytes / bandwidth, flops / peak)``, with the peak of the operands' type: the
  fp16 (tensor core) peak for fp16, bf16 and fp8 operands, the fp32 peak (IEEE, tf32 off) for fp32
  operands, since rtxjit's kernels multiply fp32 in IEEE mode. ``% of roofline`` = floor / measured
  time: 100% is a launch running at the floor.

The machine (``measure_machine``, GPU only): bandwidth from a large device-to-device copy
(2 x bytes / time), peaks from large ``torch.matmul`` products (fp16; fp32 with tf32 off), each the
best of a few timed runs (CUDA events).

Timing (``time_launches``): every launch of the binding's active variant alone, in plan order, over
one set of buffers, as the executor launches them (``launch_direct`` once the kernels are loaded,
else ``launch_all``). On a GPU each launch sits between two CUDA events, after a short GPU sleep
that keeps the GPU busy while the CPU enqueues the launch, so the events time the kernel and not
the launch overhead; the median over the iterations is reported. On the CPU (Triton's
interpreter) the times are wall times and there is no roofline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from rtxjit.codegen.source import parameters
from rtxjit.plan.plan import Buf, Launch, Plan


def _gemm_flops(a: dict, n: int) -> int:
    return 2 * a["M"] * a["N"] * a["K"] * n


def _pairs(size: int, out: int, k: int, stride: int, pad: int, dil: int) -> int:
    """How many (input index ``i`` < ``size``, tap ``t`` < ``k``) pairs of one axis land inside the
    output: ``0 <= i * stride - pad + t * dil < out``."""
    total = 0
    for t in range(k):
        shift = t * dil - pad  # i * stride + shift in [0, out)
        lo = max(0, -(shift // stride))  # smallest i with i * stride + shift >= 0
        hi = min(size, -(-(out - shift) // stride))  # one past the largest i with i * stride + shift < out
        total += max(0, hi - lo)
    return total


def _transposed_flops(axes: str):
    """flops of a ``conv_transpose{len(axes)}d`` launch: 2 per (image, (input pixel, tap) pair of
    every axis, input channel of the group, output channel of the group), per group."""
    def flops(a: dict, n: int) -> int:
        pairs, pixels = 1, 1
        for x in axes:
            big = x.upper()
            pairs *= _pairs(a[big], a[f"O{big}"], a[f"K{big}"], a[f"stride_{x}"], a[f"pad_{x}"], a[f"dil_{x}"])
            pixels *= a[f"O{big}"]
        return 2 * (a["M"] // pixels) * pairs * a["C"] * a["N"] * n
    return flops


# kernel name -> (flops from the launch's named size arguments and grid dim 1, the operand parameter)
_PRODUCTS = {
    "matmul": (_gemm_flops, "a_ptr"),
    "conv2d": (_gemm_flops, "x_ptr"),
    "conv3d": (_gemm_flops, "x_ptr"),
    "conv_transpose2d": (_transposed_flops("hw"), "x_ptr"),
    "conv_transpose3d": (_transposed_flops("dhw"), "x_ptr"),
    "attention": (lambda a, n: 2 * a["SQ"] * a["SK"] * (a["DK"] + a["DV"]) * n, "q_ptr"),
}
SLEEP_CYCLES = 400_000  # ~0.2 ms of GPU sleep before each timed launch: more than a launch's CPU cost


@dataclass(frozen=True)
class Counts:
    """What one launch must move and compute; ``operand`` is the IR dtype short name ("fp16") of
    a product kernel's operands (None for other kernels)."""

    bytes: int
    flops: int
    operand: Optional[str] = None


@dataclass(frozen=True)
class Machine:
    """Measured bandwidth (bytes/s) and peaks (flop/s) of a GPU."""

    name: str
    bandwidth: float
    peak_fp16: float
    peak_fp32: float

    def peak(self, operand: Optional[str]) -> float:
        return self.peak_fp32 if operand in (None, "fp32", "fp64") else self.peak_fp16

    def floor(self, counts: Counts) -> float:
        """Seconds: ``max(bytes / bandwidth, flops / peak)``."""
        return max(counts.bytes / self.bandwidth, counts.flops / self.peak(counts.operand))


def step_counts(plan: Plan, step: Launch) -> Counts:
    """Bytes and flops of one launch of ``plan`` (see the module docstring)."""
    seen = {a.index for a in step.args if isinstance(a, Buf)}
    nbytes = sum(plan.buffers[i].numel * plan.buffers[i].dtype.itemsize for i in seen)
    product = _PRODUCTS.get(step.kernel.name)
    if product is None:
        return Counts(int(nbytes), 0)
    flops_of, operand = product
    names = [name for name, _ in parameters(step.kernel)]
    named = dict(zip(names, step.args))
    try:
        per = int(step.grid[1]) if len(step.grid) > 1 else 1
        flops = int(flops_of(named, per))
        buf = named[operand]
        dtype = plan.buffers[buf.index].dtype.short if isinstance(buf, Buf) else None
    except (KeyError, TypeError, IndexError):  # a template whose parameters changed: bytes only
        return Counts(int(nbytes), 0)
    return Counts(int(nbytes), flops, dtype)


def plan_counts(plan: Plan) -> list:
    return [step_counts(plan, step) for step in plan.steps]


# --- the machine --------------------------------------------------------------------------------

def _best_seconds(fn, runs: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _copy_bandwidth(nbytes: int, runs: int) -> float:
    import torch

    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n * 4 / _best_seconds(lambda: dst.copy_(src), runs)


def _matmul_peak(size: int, dtype, runs: int) -> float:
    import torch

    a = torch.randn(size, size, dtype=dtype, device="cuda")
    b = torch.randn(size, size, dtype=dtype, device="cuda")
    return 2 * size ** 3 / _best_seconds(lambda: torch.matmul(a, b), runs)


def measure_machine(copy_bytes: int = 1 << 30, matmul_size: int = 8192, runs: int = 10) -> Machine:
    """Bandwidth and peaks of the current CUDA device (see the module docstring)."""
    import torch

    bandwidth = _copy_bandwidth(copy_bytes, runs)
    peak16 = _matmul_peak(matmul_size, torch.float16, runs)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: rtxjit multiplies fp32 in IEEE mode
    try:
        peak32 = _matmul_peak(matmul_size // 2, torch.float32, max(3, runs // 3))
    finally:
        torch.set_float32_matmul_precision(precision)
    torch.cuda.empty_cache()
    return Machine(torch.cuda.get_device_name(), bandwidth, peak16, peak32)


# --- timing -------------------------------------------------------------------------------------

def time_launches(exe, feeds: dict, iterations: int, warmup: int = 1) -> list:
    """Median seconds of each launch of ``exe``'s active variant, launched alone in plan order
    (see the module docstring). ``feeds``: input name -> flat tensor on the executable's device."""
    import torch

    from rtxjit.exec.executor import launch_all, launch_direct

    v = exe.active
    bufs = exe.fresh_buffers(feeds)
    aligned = all(t.data_ptr() % 16 == 0 for t in feeds.values())  # as the executor requires of direct launches
    direct = v.direct if v.direct is not None and aligned else None
    cuda = exe.device.kind == "cuda"
    samples = [[] for _ in v.launches]

    def launch(i: int) -> None:
        if direct is not None:
            launch_direct([direct[i]], bufs)
        else:
            launch_all([v.launches[i]], bufs)

    for it in range(warmup + iterations):
        if cuda:
            events = []
            for i in range(len(v.launches)):
                torch.cuda._sleep(SLEEP_CYCLES)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(i)
                end.record()
                events.append((start, end))
            torch.cuda.synchronize()
            if it >= warmup:
                for i, (start, end) in enumerate(events):
                    samples[i].append(start.elapsed_time(end) / 1e3)
        else:
            for i in range(len(v.launches)):
                t0 = time.perf_counter()
                launch(i)
                if it >= warmup:
                    samples[i].append(time.perf_counter() - t0)
    return [float(np.median(s)) for s in samples]

