"""The one way from a model to the optimized graph that sessions, engine builds and the CLI run.

``optimized_graph(model, optimize=..., precision=..., cache=..., targets=...)`` does, in order:

1. with a runtime cache that recorded this model file (or these bytes) under the same options,
   the recorded graph (``jit/warm.py``: no import, no passes);
2. otherwise the import (a path, serialized bytes or an ``onnx.ModelProto``; an ``rtxjit.ir.Graph``
   is taken as it is) and the pass pipeline (``rtxjit.passes.optimize``: ``optimize`` runs the
   whole pipeline, ``precision`` "fp16"/"bf16" adds the conversion; RTXJIT_VERIFY_PASSES and
   RTXJIT_DUMP_PASSES apply), recorded in the cache for the next process;
3. precision legality on every SM of ``targets`` (``passes.precision_legality.check_precision``,
   which also looks inside fused programs): an UnsupportedOpError naming the target, the node, its
   op and the dtype, never a silent change.

Why one module: before it, ``InferenceSession``, ``rtxjit.build`` and ``rtxjit inspect`` each did
import + passes, with two different legality checks (sessions missed an fp8 Cast fused into an fp32
kernel) and only sessions used the cache's record. It sits below the session and the engine (both
call it, it imports neither) and above the importer, the passes and the runtime cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from rtxjit import config, passes
from rtxjit.cache.keys import model_key
from rtxjit.errors import UnsupportedOpError
from rtxjit.ir.graph import Graph
from rtxjit.jit import warm
from rtxjit.passes.precision_legality import check_precision


@dataclass
class Optimized:
    """What ``optimized_graph`` gives: the graph; its model key (``runtime.cache.model_key`` of the
    imported graph, before passes: what the runtime cache files kernels and shapes under; None
    without a cache); how long each pass took (``[]`` when none ran or the graph came from the
    cache); whether the graph is the cache's record; the thread writing a new record into the
    cache (None when nothing is written), which a caller that hands the cache on joins first."""

    graph: Graph
    model_key: Optional[str] = None
    pass_timings: list = field(default_factory=list)
    from_cache: bool = False
    writer: Optional[threading.Thread] = None


def optimized_graph(model, *, optimize: bool = True, precision: Optional[str] = None, cache=None,
                    targets=()) -> Optimized:
    """``model`` (path, bytes, ModelProto or Graph) imported, optimized and checked for every SM of
    ``targets`` (ints); see the module docstring. ``cache`` is an open ``RuntimeCache`` or None.
    A Graph comes back as the same object when no pass runs (``optimize=False``, no precision);
    the passes otherwise work on a copy."""
    result = _graph(model, optimize, precision, cache)
    for sm in targets:
        try:
            check_precision(result.graph, sm)
        except UnsupportedOpError as exc:
            raise UnsupportedOpError(f"cannot build for target sm_{sm}: {exc}") from None
    return result


def _graph(model, optimize: bool, precision: Optional[str], cache) -> Optimized:
    identity = warm.model_identity(model) if cache is not None else None
    options = {"optimize": bool(optimize), "precision": precision}
    skip = config.skip_passes() if optimize else frozenset()
    if skip:  # a graph optimized without some passes is cached apart
        options["skip_passes"] = sorted(skip)
    if identity is not None:
        hit = warm.load_graph(cache, identity, options)
        if hit is not None:
            return Optimized(hit[0], hit[1], [], True)
    graph = model if isinstance(model, Graph) else import_graph(model)
    key = model_key(graph) if cache is not None else None
    timings: list = []
    if optimize or precision is not None:
        graph, timings = passes.optimize(graph, verify=config.verify_passes(), dump=config.dump_passes(),
                                         precision=precision, steps=None if optimize else [], skip=skip)
    writer = warm.save_graph_later(cache, identity, options, graph, key) if identity is not None else None
    return Optimized(graph, key, timings, False, writer)


def import_graph(model) -> Graph:
    """``model`` (path, bytes or ModelProto) as an rtxjit Graph, nothing else done. The importer is
    imported here, on first use, not for a cycle: ``import onnx`` costs about a second, and a session
    of a Graph, an Engine or a cache-recorded graph never needs it."""
    from rtxjit.onnx.importer import import_model

    return import_model(model)
