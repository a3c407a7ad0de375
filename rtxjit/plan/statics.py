"""Which launch arguments are the same for every binding of a model: its static sizes, compiled into
the shape-generic (fallback) kernels.

A launch's integer arguments are sizes and strides. Some come only from the model's static dims (a
weight's N and K, hidden sizes, heads, channels, kernel sizes), the others from the dims its inputs
leave symbolic (batch, sequence, image size). The fallback kernel must serve every binding with one
binary per launch site, so only the former may be compiled in: they become ``tl.constexpr`` in the
launch's kernel source, their values written in it (``codegen.source.with_static``), and the
dynamic ones stay run-time arguments (issue 17: the fully generic fallback ran 2.3-7.8x slower than
the specialized kernels on an H100).

How the plan knows: the first binding's plan is built again with every symbolic input dim moved
(``PROBES``: to v + 1 and to 2v + 3; never 1, where broadcasting and ``collapse`` change a kernel's
shape), and an argument that keeps its value in every plan is static. Launch sites are matched by
node, position among the node's launches and kernel source; a site whose kernel differs in a probe
(another code path for another size) is judged by the probes that agree, and by none: nothing
static there. The verdict is kept per graph (``GraphStatics``): later bindings cost one comparison
per argument, no probe. A binding with a source variant not seen before (a dim of 1, a GEMV below
a size threshold) is probed once more, up to ``PROBE_LIMIT`` times per graph.

Never wrong, at worst slower: an argument judged static (a size rounded to a block in the probed
range, a value read from a host feed) whose value differs in a later binding is *demoted* there for
good (that site's later kernels take it at run time), so its source changes once: one more fallback
compile, never a kernel launched with another binding's size. A model whose inputs are all static
has every size compiled in without a probe.

Sizes are told from buffer offsets by position (``Launch.size_args``): an integer right after a
buffer pointer is that buffer's offset; offsets differ between the layers that share a kernel, so
they stay run-time arguments.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

from rtxjit.codegen.source import with_static
from rtxjit.ir.types import TensorType

PROBES = (lambda v: v + 1, lambda v: 2 * v + 3)  # another value of a symbolic dim, never 1
PROBE_LIMIT = 4  # probes (of PROBES each) per graph: one per source variant of the model's launch sites
# False: fallback kernels take every size at run time (before issue 17), to compare on a GPU. Static
# sizes make more distinct fallback sources (planned for an sm_90: resnet50 b8 27 generic compiles
# instead of 9, a 1-layer bert-base encoder 6 instead of 5): a cold start compiles more.
ENABLED = True


def _sizes(step, positions: list) -> dict:
    args = step.args
    return {name: args[j] for j, name in positions}


def _sites(plan) -> dict:
    """(node, position among the node's launches, kernel source key) -> (launch, its size positions)."""
    out, seen = {}, {}
    for step, positions in zip(plan.steps, plan.size_positions()):
        n = seen.get(step.node, 0)
        seen[step.node] = n + 1
        out[(step.node, n, step.kernel.key)] = (step, positions)
    return out


def symbolic_dims(graph) -> list:
    """``[(input name, axis, symbol)]`` of the graph inputs' dims that are not fixed (a symbol; an
    anonymous ``"?"`` is its own)."""
    out = []
    for v in graph.inputs:
        for axis, d in enumerate(v.type.shape):
            if not isinstance(d, int):
                out.append((v.name, axis, f"{v.name}:{axis}" if d in ("?", None, "") else str(d)))
    return out


class GraphStatics:
    """The static size arguments of one graph's launch sites: (site) -> {name: value}, kept across
    the bindings it plans (thread-safe: sessions plan in several threads)."""

    def __init__(self):
        self.sites: dict = {}
        self.probes = 0
        # (device, session constants) -> [rebind.Template], or False where one failed; None: none kept (``detached``)
        self.templates: Optional[dict] = {}
        self.tracing: set = set()  # keys of templates being traced
        self.lock = threading.Lock()
        # site -> (its verdict, the raw kernel, [(argument position, value)], kernel with the values,
        # names): a later binding of the same site checks its arguments against these and takes the
        # kernel made before (no dicts, no sorting, no source lookup per launch)
        self._made: dict = {}

    def detached(self) -> "GraphStatics":
        """A copy of the verdicts that later plans may change without changing these (a demotion
        there stays there), and that keeps no re-binding templates: for plans made ahead of any
        binding (jit/fallbacks.py), which must not make the real bindings' kernels less static."""
        other = GraphStatics()
        with self.lock:
            other.sites = {s: dict(v) for s, v in self.sites.items()}
            other.probes = self.probes
        other.templates = None
        return other

    def apply(self, graph, plan, input_types: dict, build: Callable[[dict], object]) -> None:
        """Make the static size arguments of ``plan``'s launches constexprs of their kernels
        (``Launch.kernel`` and ``Launch.static`` rewritten in place). ``build(types)`` plans the
        graph for other input types (the probes)."""
        if not ENABLED:
            return
        dims = symbolic_dims(graph)
        sites = _sites(plan)
        with self.lock:
            missing = [s for s in sites if s not in self.sites]
            if missing and dims and self.probes < PROBE_LIMIT:
                self.probes += 1
                self._probe(missing, sites, dims, input_types, build)
            elif missing and not dims:  # nothing is symbolic: every size is static
                for s in missing:
                    self.sites[s] = _sizes(*sites[s])
            chosen = []
            for s, (step, positions) in sites.items():
                entry = self.sites.get(s)
                if not entry:
                    continue
                made = self._made.get(s)
                if made is not None and made[0] is entry and made[1] is step.kernel:
                    args = step.args
                    if all(args[j] == v for j, v in made[2]):
                        chosen.append((step, made))
                        continue
                sizes = _sizes(step, positions)
                keep = {n: v for n, v in entry.items() if sizes.get(n) == v}
                if len(keep) < len(entry):  # a size judged static differs here: dynamic from now on
                    self.sites[s] = keep
                at = {name: j for j, name in positions}
                made = self._made[s] = (self.sites[s], step.kernel, [(at[n], v) for n, v in keep.items()],
                                        with_static(step.kernel, keep), tuple(sorted(keep)))
                chosen.append((step, made))
        for step, made in chosen:
            step.kernel, step.static = made[3], made[4]

    def _probe(self, missing: list, sites: dict, dims: list, input_types: dict, build) -> None:
        values = {}
        for name, axis, symbol in dims:
            values.setdefault(symbol, int(input_types[name].shape[axis]))
        agreed = {s: _sizes(*sites[s]) for s in missing}
        judged = {s: False for s in missing}
        for move in PROBES:
            types = {}
            for name, t in input_types.items():
                shape = list(t.shape)
                for n, axis, symbol in dims:
                    if n == name:
                        shape[axis] = move(values[symbol])
                types[name] = TensorType(t.dtype, tuple(shape))
            try:
                other = _sites(build(types))
            except Exception:  # noqa: BLE001 - a probe that cannot be planned (a shape check, memory) judges nothing
                continue
            for s in missing:
                step = other.get(s)
                if step is None:
                    continue
                judged[s] = True
                sizes = _sizes(*step)
                agreed[s] = {n: v for n, v in agreed[s].items() if sizes.get(n) == v}
        for s in missing:
            self.sites[s] = agreed[s] if judged[s] else {}


_by_graph: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_by_graph_lock = threading.Lock()


def of_graph(graph) -> GraphStatics:
    """The verdicts kept for ``graph`` (they depend on the graph alone; dropped with it)."""
    with _by_graph_lock:
        statics: Optional[GraphStatics] = _by_graph.get(graph)
        if statics is None:
            statics = _by_graph[graph] = GraphStatics()
        return statics
