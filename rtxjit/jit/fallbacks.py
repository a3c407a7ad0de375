"""The fallback kernels of other shape buckets, compiled in the background after a session's first
binding (issue 17: a new shape's first request should cost its fallback run and little more).

A binding's generic (fallback) kernels serve every shape of the same plan; a shape that plans other
kernel sources -- a product whose M crosses the power of two where split-K turns on or off, a row
count below a GEMV threshold -- compiled them in its first request (H100: bert-base batch 4 at
sequence 128 after a warm-up at 32, 0.65 s; resnet50 batch 8 after batch 1, 1.3 s). After the
session's first binding has had its first specialization pass, the specializer plans the graph at
the powers of two of each symbolic dim around that binding (``SPAN`` times either way, inside the
binding's profile; at most ``LIMIT`` plans), compiles the generic kernels those plans add in its
worker processes, and loads them in this process (``exec.compiler._warmed``), where a later
binding's ``prepare_generic`` finds them. Each probe is planned with a detached copy of the
graph's static-size verdicts (``statics.GraphStatics.detached``): a probe far from the bindings seen
(a dim of 1, a split-K threshold) would otherwise demote sizes judged static and make every later
binding's fallback kernels less specialized, and their sources other than the ones recorded.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Callable

from rtxjit.exec import compiler
from rtxjit.ir.types import TensorType
from rtxjit.plan import statics

SPAN = 16  # probe a dim at the powers of two within [v / SPAN, v * SPAN] of its value v
LIMIT = 12  # plans per session


def probe_types(graph, types: dict, profile) -> list:
    """Input types of the probe bindings: one symbolic dim moved to each power of two within
    ``SPAN`` of its value and inside ``profile`` (nearest first, the dims taking turns), each
    binding once."""
    dims = statics.symbolic_dims(graph)
    by_symbol: dict = {}
    for name, axis, symbol in dims:
        by_symbol.setdefault(symbol, []).append((name, axis))
    ladders = []
    for symbol, places in by_symbol.items():
        name, axis = places[0]
        v = int(types[name].shape[axis])
        lo, hi = 1, v * SPAN
        for n, a in places:
            if profile is not None and n in profile.shapes:
                lo, hi = max(lo, profile.min(n)[a]), min(hi, profile.max(n)[a])
        values = [1 << k for k in range(0, (v * SPAN).bit_length() + 1)]
        values = [p for p in values if p != v and lo <= p <= hi and p * SPAN >= v]
        values.sort(key=lambda p: max(p / v, v / p))
        ladders.append([(places, p) for p in values])
    out, seen = [], set()
    for group in itertools.zip_longest(*ladders):
        for entry in group:
            if entry is None:
                continue
            places, p = entry
            moved = {}
            for name, t in types.items():
                shape = list(t.shape)
                for n, a in places:
                    if n == name:
                        shape[a] = p
                moved[name] = TensorType(t.dtype, tuple(shape))
            key = tuple((n, t.shape) for n, t in sorted(moved.items()))
            if key not in seen:
                seen.add(key)
                out.append(moved)
    return out[:LIMIT]


def prewarm(graph, build: Callable[[dict], object], device, kernels, types: dict, profile, stats,
            between: Callable[[], None] = lambda: None) -> int:
    """Plan each probe binding of ``graph`` (around ``types``) with ``build(types)``, compile the
    generic kernels it adds (worker processes, or this thread where there are none) and load them
    here; returns how many were loaded. ``between()`` runs before each plan and load (the serving
    thread goes first)."""
    seen: set = set()
    done = 0
    for probe in probe_types(graph, types, profile):
        between()
        try:
            plan = build(probe)
        except Exception:  # noqa: BLE001 - a probe the model cannot plan (a shape check) adds nothing
            continue
        owner = SimpleNamespace(plan=plan, device=device, kernels=kernels)
        compiles, hits, loaded = compiler.prepare_generic_background(owner, between, seen)
        stats.add(compiles=compiles, cache_hits=hits)
        done += loaded
    return done
