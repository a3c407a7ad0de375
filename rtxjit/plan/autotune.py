"""Autotuning: a launch with several tile configurations is timed once, on the GPU, with its live
arguments, and the fastest configuration is remembered for the rest of the process.

A plan's ``Launch`` may carry ``choices`` — ``(grid, constexprs)`` pairs, the heuristic's guess
first — and a ``tune_key``: the kernel source's key, the SM and the problem's sizes rounded up to
powers of two (``bucket``). At the first run of a plan the executor calls ``choose`` there; a key
seen before (an earlier plan, another binding of the same bucket) reuses the remembered choice
without timing. Timing needs a GPU: under Triton's interpreter the executor never calls this, and
the first choice (the heuristic's) runs. Each trial writes the launch's outputs, which is harmless:
a launch's outputs never share memory with its inputs, and the chosen configuration runs last.

With a runtime cache (cache/store.py), decisions outlive the process: ``attach(cache, keys)``
reads the choices remembered there for ``keys`` (its entry key: the tune key, the SM's target and,
through ``cache_key``, the Triton and codegen versions), and has ``choose`` write the decisions it
makes later for the others. A stored choice is a hint, not trusted: one that matches none of the
launch's choices is ignored and the launch is timed.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional

from rtxjit import config

from rtxjit.ir.symint import pow2

_lock = threading.Lock()
_chosen: dict = {}  # tune key -> constexprs of the fastest choice
_timings: dict = {}  # tune key -> [(constexprs, median ms | inf)], for reports and benchmarks
_sm_counts: dict = {}
_sinks: dict = {}  # tune key -> RuntimeCache that the decision, once made, is written to


def enabled() -> bool:
    return config.autotune_enabled()


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two: shapes in one bucket share a tuning result."""
    return pow2(n)


def tune_key(src_key: str, sm: Optional[int], *sizes: int) -> tuple:
    return (src_key, sm, *(bucket(s) for s in sizes))


def sm_count() -> int:
    """Multiprocessors of the current CUDA device (132 on an H100 SXM), for the tile heuristic.
    Lowerings read it from their context (``LowerCtx.sm_count``, plan/plan.py), never from here:
    rtxjit/ops imports nothing from the runtime. A plan for a GPU that is not here (engine/aot.py)
    names its count in its ``Device`` instead."""
    import torch

    dev = torch.cuda.current_device()
    if dev not in _sm_counts:
        _sm_counts[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _sm_counts[dev]


def remembered(key: tuple, choices: list) -> Optional[int]:
    """The index in ``choices`` of the configuration remembered under ``key``, if any."""
    cfg = _chosen.get(key)
    if cfg is None:
        return None
    for i, (_, constexprs) in enumerate(choices):
        if constexprs == cfg:
            return i
    return None


def chosen_configs() -> dict:
    """``{(source key, sm): [constexprs chosen for any of its buckets]}``: what timing found fastest
    for a kernel so far, a first guess for a bucket not timed yet (exec/compiler.first_configs)."""
    out: dict = {}
    with _lock:
        for key, cfg in _chosen.items():
            out.setdefault(tuple(key[:2]), []).append(cfg)
    return out


def choose(key: tuple, choices: list, run: Callable[[int], None],
           between: Optional[Callable[[], None]] = None) -> int:
    """The index of the fastest of ``choices``; ``run(i)`` launches choice ``i`` once.

    A choice that fails to compile or launch (for example too much shared memory on this SM) counts
    as infinitely slow; if every choice fails, the first one's error is raised. With ``between``
    (the specializer's yield to serving threads) the timing is paced: see ``time_ms``; a choice
    whose first timed call is over GIVE_UP times the best so far is not timed further.
    """
    if len(choices) == 1:
        return 0
    with _lock:
        hit = remembered(key, choices)
        if hit is not None:
            return hit
        times, first_error = [], None
        for i in range(len(choices)):
            try:
                best_ms = min(times, default=math.inf)
                times.append(time_ms(lambda: run(i), between=between, give_up_ms=GIVE_UP * best_ms))
            except Exception as exc:  # noqa: BLE001 - a failing configuration is only a slow one
                first_error = first_error or exc
                times.append(math.inf)
        if all(math.isinf(t) for t in times):
            raise first_error
        best = min(range(len(times)), key=lambda i: (round(times[i], 4), i))
        _chosen[key] = dict(choices[best][1])
        _timings[key] = [(dict(c), t) for (_, c), t in zip(choices, times)]
        sink = _sinks.pop(key, None)
        if sink is not None:
            _store(sink, key)
        return best


GIVE_UP = 3.0  # a choice this many times slower than the best so far, in one call, is not timed on
ROUND_MS = 1.0  # paced timing: GPU work queued at once, so a request waits about this long at most


def time_ms(fn: Callable[[], None], reps: int = 10, rounds: int = 5,
            between: Optional[Callable[[], None]] = None, give_up_ms: float = math.inf) -> float:
    """Median time of one call of ``fn`` in ms: one warm-up call (it compiles), then ``rounds`` of
    ``reps`` calls launched back to back between CUDA events on the current stream.

    Paced (``between`` given: the background specializer, beside requests on the same GPU): one
    call is timed alone first; if it takes over ``give_up_ms`` that is the result, else a round
    has as many calls as fit in ROUND_MS (at least one) and ``between()`` runs before each round,
    so a request arriving meanwhile queues behind about ROUND_MS of timing work, not
    ``reps`` calls of a slow configuration (a FLUX step at 4096 tokens ran 1.72x its time so).

    No CUDA graph is captured here: timing runs on the specializer's thread, and a capture there
    would make a device-wide synchronize in any other thread of the process fail while it lasts.
    For kernels shorter than Python's launch overhead the times are that overhead, and the
    heuristic's first choice wins ties."""
    import torch

    stream = torch.cuda.current_stream()
    fn()
    stream.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if between is not None:
        between()
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = start.elapsed_time(end)
        if one > give_up_ms:
            return one
        reps = max(1, min(reps, int(ROUND_MS / max(one, 1e-3))))
    samples = []
    for _ in range(rounds):
        if between is not None:
            between()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / reps)
    samples.sort()
    return samples[len(samples) // 2]


def timings(key: tuple) -> list:
    """``[(constexprs, ms)]`` of every choice timed under ``key`` (empty if it was never timed)."""
    return list(_timings.get(key, []))


def forget() -> None:
    """Drop every remembered choice (tests, benchmarks)."""
    with _lock:
        _chosen.clear()
        _timings.clear()
        _sinks.clear()


# --- persistence in a runtime cache ---------------------------------------------------------------

def cache_entry_key(key: tuple) -> str:
    """The runtime cache key of tune key ``key`` (``(src_key, sm, *buckets)``)."""
    from rtxjit.cache.keys import cache_key

    sm = key[1] if len(key) > 1 else None
    return cache_key(target=f"cuda:{sm}" if sm is not None else "interpreter", kind="autotune",
                     tune_key=list(key))


def attach(cache, keys) -> int:
    """Remember the choices stored in ``cache`` for ``keys``; a decision ``choose`` makes later for
    one of them (none stored, or a stored one that matches none of the launch's choices) is written
    there, as is one this process made before. Returns how many choices were read."""
    import warnings

    found = 0
    with _lock:
        for key in keys:
            key = tuple(key)
            try:
                record = cache.get_json(cache_entry_key(key))
            except (OSError, ValueError, TypeError) as exc:
                warnings.warn(f"rtxjit: runtime cache {cache}: cannot read a tile choice: {exc}", RuntimeWarning)
                record = None
            cfg = _stored_choice(record, key)
            if key in _chosen:
                if cfg != _chosen[key]:
                    _store(cache, key)  # decided in this process before the cache was attached
                continue
            if cfg is not None:
                _chosen[key] = cfg
                found += 1
            _sinks[key] = cache
    return found


def _stored_choice(record, key: tuple) -> Optional[dict]:
    if not isinstance(record, dict) or record.get("tune_key") != list(key):
        return None
    cfg = record.get("chosen")
    if not isinstance(cfg, dict) or not all(isinstance(v, (int, float, str, bool)) for v in cfg.values()):
        return None
    return cfg


def _store(cache, key: tuple) -> None:
    """Write the decision for ``key`` (caller holds ``_lock``); a failing write only warns."""
    import warnings

    record = {"tune_key": list(key), "chosen": _chosen[key],
              "timings": [[c, None if math.isinf(t) else t] for c, t in _timings.get(key, [])]}
    try:
        cache.put_json(cache_entry_key(key), record)
    except (OSError, ValueError, TypeError) as exc:
        warnings.warn(f"rtxjit: runtime cache {cache}: cannot store a tile choice: {exc}", RuntimeWarning)
