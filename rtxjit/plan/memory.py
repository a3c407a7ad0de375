"""Memory plan: the intermediate buffers of a plan share one arena, placed by liveness.

A temporary buffer is live from the first launch that touches it to the last. Buffers whose
lifetimes do not overlap may share bytes; placement is greedy, largest first, at the lowest
offset that does not collide with an already placed buffer live at the same time (the classic
offline heuristic TensorRT and TVM use). Graph outputs are not in the arena: each run returns
fresh tensors, so a caller may keep results across runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtxjit.plan.plan import Buf, Plan

ALIGN = 256  # bytes; every buffer starts on a 256-byte boundary (vector loads, TMA)


@dataclass(frozen=True)
class ArenaPlan:
    offsets: dict  # buffer index -> byte offset in the arena
    size: int  # arena bytes
    unshared: int  # bytes the same buffers would take without sharing
    zeroed: tuple = ()  # (byte offset, bytes) of the "zeroed" buffers: zeroed when an arena is made, never shared


def launched(plan: Plan) -> dict:
    """Buffer index -> (first step, last step) of the launches that use it, for every buffer a
    launch takes (structural: the plans re-bound from one template share it, ``Plan.memo``)."""
    every = plan.memo.get("lifetimes")
    if every is None:
        every = {}
        for i, step in enumerate(plan.steps):
            for a in step.args:
                if isinstance(a, Buf):
                    every[a.index] = (every.get(a.index, (i, i))[0], i)
        plan.memo["lifetimes"] = every
    return every


def lifetimes(plan: Plan, buffers: set) -> dict:
    """Buffer index -> (first step, last step) of the launches that use it."""
    return {b: span for b, span in launched(plan).items() if b in buffers}


def plan_arena(plan: Plan, exclude: set) -> ArenaPlan:
    temps = {i for i, b in enumerate(plan.buffers) if b.role in ("temp", "zeroed") and b.numel > 0 and i not in exclude}
    spans = lifetimes(plan, temps)
    zeroed = {i for i in spans if plan.buffers[i].role == "zeroed"}
    for i in zeroed:  # live from the first launch to the last: their zeros must outlast every run
        spans[i] = (0, len(plan.steps))
    sizes = {i: _aligned(plan.buffers[i].numel * plan.buffers[i].dtype.itemsize) for i in spans}
    placed: list = []  # (offset, size, first, last)
    offsets = {}
    for i in sorted(sizes, key=lambda i: (-sizes[i], i)):
        first, last = spans[i]
        overlapping = sorted((o, s) for o, s, f, l in placed if f <= last and first <= l)
        offset = 0
        for o, s in overlapping:
            if offset + sizes[i] <= o:
                break
            offset = max(offset, o + s)
        offsets[i] = offset
        placed.append((offset, sizes[i], first, last))
    size = max((o + s for o, s, _, _ in placed), default=0)
    return ArenaPlan(offsets, size, sum(sizes.values()), tuple(sorted((offsets[i], sizes[i]) for i in zeroed)))


def _aligned(n: int) -> int:
    return -(-max(n, 1) // ALIGN) * ALIGN
