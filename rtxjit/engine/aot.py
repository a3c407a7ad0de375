"""Ahead-of-time kernels: an engine's kernels compiled for named SM targets, with no GPU.

For each target and each optimization profile, the plan is built as a session on that SM would
build it (tile heuristics take the target's SM count from ``SM_COUNTS``) at the profile's min, opt
and max shapes; every *generic* kernel of those plans, and the *specialized* kernels of the opt
shapes (in the plan's heuristic tile configuration: timing needs the GPU), are compiled by
Triton's compiler for ``GPUTarget("cuda", sm, 32)``. The arguments are bound and specialized by
Triton's own binder, exactly as its JIT does on the GPU (buffers 16-byte aligned, as rtxjit's
always are), so each binary is the one the JIT would have built. Binaries go into
``engine.binaries`` under their binary key (kernels/keys.py: source hash, specialization, tile
configuration, target, Triton and codegen versions); a session on a GPU of that SM loads them with
no compile, and compiles only what is missing (another shape's specialized kernels, tuned tiles).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from rtxjit.codegen.source import KernelSource, specialize
from rtxjit.errors import KernelError
from rtxjit.exec import packed
from rtxjit.exec.compiler import from_portable, portable
from rtxjit.exec.device import Device
from rtxjit.ir.types import TensorType
from rtxjit.kernels.keys import item_key, shape_params, step_args
from rtxjit.plan.plan import PlanBuilder

# multiprocessors of a typical GPU of each SM (the tile heuristic's split-K / wave sizing reads it)
SM_COUNTS = {75: 40, 80: 108, 86: 84, 87: 16, 89: 128, 90: 132, 100: 148, 103: 148, 120: 170, 121: 48}


def compile_kernels(engine, targets=None, progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Compile the kernels of ``engine`` for ``targets`` (SM numbers; default: the engine's) into
    ``engine.binaries``; returns ``{"kernels": n, "seconds": s, "per_target": {sm: n}}``.
    ``progress(done, total, what)`` is called after each kernel."""
    graph = engine.graph
    targets = list(engine.targets if targets is None else targets)
    work = []  # (sm, key, source, generic, args, grid, constexprs)
    for sm in targets:
        device = target_device(sm)
        seen = set()
        for plan, specialized in _plans(graph, engine.profiles, device):
            for item in _items(plan, specialized):
                key = item_key(device, item[0], item[1], item[2], item[4])
                if key not in seen and key not in engine.binaries:
                    seen.add(key)
                    work.append((sm, key) + item)
    start = time.perf_counter()
    per_target: dict = {}
    done = 0
    for (sm, key, src, *_), (meta, cubin) in zip(work, _compile_all(work)):
        engine.binaries[key] = {"meta": meta, "data": cubin}
        per_target[sm] = per_target.get(sm, 0) + 1
        done += 1
        if progress is not None:
            progress(done, len(work), f"sm_{sm} {src.name}")
    return {"kernels": len(work), "seconds": time.perf_counter() - start, "per_target": per_target}


WORKERS = max(1, min(8, (os.cpu_count() or 2)))


def _compile_all(work: list):
    """``(meta, cubin)`` per work item, in order. Where Triton's interpreter is on (a machine with
    no GPU), Triton's language library was made for it at import, so the compiling happens in
    worker processes started without it; elsewhere in threads."""
    from rtxjit import config

    if not work:
        return
    if not config.interpreter_enabled():
        with ThreadPoolExecutor(min(WORKERS, len(work))) as pool:
            yield from pool.map(lambda w: compile_one(w[2], w[3], w[4], w[6], w[0]), work)
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RTXJIT_DEVICE"] = "cuda"  # only for choosing no interpreter: nothing runs on a device
    n = min(WORKERS, len(work))
    shares = [work[i::n] for i in range(n)]
    procs = []
    for share in shares:
        request = [{"name": w[2].name, "text": w[2].text, "generic": w[3], "args": portable(w[4]),
                    "constexprs": w[6], "sm": w[0]} for w in share]
        proc = subprocess.Popen([sys.executable, "-c", "from rtxjit.engine.aot import serve; serve()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append((proc, json.dumps(request).encode()))
    results = []
    for proc, request in procs:
        out, err = proc.communicate(request)
        if proc.returncode != 0:
            raise KernelError(f"an ahead-of-time compile worker failed: {err.decode(errors='replace')[-2000:]}")
        results.append(json.loads(out))
    for i in range(len(work)):
        r = results[i % n][i // n]
        yield r["meta"], base64.b64decode(r["cubin"])


def serve() -> None:
    """A compile worker: reads the JSON list of kernels on stdin (their generated text, sent by
    the process that generated it), writes ``[{meta, cubin (base64)}]`` on stdout."""
    request = json.loads(sys.stdin.buffer.read())
    out = []
    for r in request:
        meta, cubin = compile_one(KernelSource(r["name"], r["text"]), r["generic"], from_portable(r["args"]),
                                  r["constexprs"], r["sm"])
        out.append({"meta": meta, "cubin": base64.b64encode(cubin).decode()})
    sys.stdout.write(json.dumps(out))


def _plans(graph, profiles: list, device: Device):
    """``(plan, specialized?)`` at each profile's min, opt and max shapes (opt: specialized too)."""
    consts = frozenset(v.name for v in graph.constants())
    for profile in profiles:
        for which in ("opt", "min", "max"):
            types = {}
            for v in graph.inputs:
                shape = getattr(profile, which)(v.name)
                types[v.name] = TensorType(v.type.dtype, tuple(shape))
            yield PlanBuilder(graph, device, consts).build(types, {}), which == "opt"


def _items(plan, specialized: bool) -> list:
    """``(source, generic, args, grid, constexprs)`` per compilation a run of ``plan`` needs."""
    out = []
    for step in plan.steps:
        args = step_args(plan, step)
        out.append((step.kernel, True, args, step.generic_grid, dict(step.generic_constexprs)))
        if specialized:
            src = specialize(step.kernel, shape_params(step))
            out.append((src, False, args, step.grid, dict(step.constexprs)))
    return out


def compile_one(src, generic: bool, args: tuple, constexprs: dict, sm: int) -> tuple:
    """``(meta, cubin)`` of one kernel compiled for ``sm`` without a GPU: Triton's binder
    specializes the arguments (pointers as 16-byte aligned buffers of their dtype) as its JIT would,
    then its compiler builds for the explicit target (exec/packed.py, which light workers use too)."""
    return packed.compile_packed(src.name, src.text, generic, packed.pack(src, generic, args, constexprs, sm), sm)


def target_device(sm: int) -> Device:
    """The device an engine's kernels are planned for: a GPU of ``sm`` with the multiprocessors of
    a typical one (``SM_COUNTS``), which its plans size their tiles for."""
    return Device("cuda", f"sm_{sm}", sm, SM_COUNTS.get(sm, 132))
