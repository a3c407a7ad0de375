"""Execution plans: the graph lowered for one binding of input shapes to a flat list of launches.

Building a plan walks the graph once: host nodes (shape tensors) are evaluated with numpy, every
other node's ``lower`` emits kernel launches over buffer views. Running a plan binds the feeds,
allocates the intermediate buffers and launches the list: no per-node Python decisions remain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from rtxjit.codegen.source import KernelSource, parameters, typed_key
from rtxjit.codegen.templates.pointwise import render_pointwise
from rtxjit.codegen.view import View, collapse, contiguous_strides
from rtxjit.errors import InternalError, ModelError, ShapeError, UnsupportedOpError
from rtxjit.ir import host
from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.registry import Kind, get_op
from rtxjit.ir import symint
from rtxjit.ir.symint import whole
from rtxjit.ir.types import DType, TensorType, is_static
from rtxjit.plan import autotune, rebind, statics

WIDE_LIMIT = 2**31 - 1
POINTWISE_CAP = 1024  # elements per program of a flat kernel on the GPU


def _grid(grid) -> tuple:
    return tuple(whole(g) for g in grid)


def _numel(shape):
    """The element count of ``shape`` (Python integers: no int64 wrap; a dim's expression kept)."""
    return math.prod(whole(d) for d in shape)


def _plain(args) -> tuple:
    """Launch arguments as Python scalars (numpy integers would not specialize as constexprs)."""
    out = []
    for a in args:
        if isinstance(a, (bool, np.bool_)):
            out.append(bool(a))
        elif isinstance(a, (int, np.integer)):
            out.append(whole(a))
        elif isinstance(a, (float, np.floating)):
            out.append(float(a))
        else:
            out.append(a)
    return tuple(out)


@dataclass(frozen=True)
class Buf:
    """A launch argument that is the data pointer of plan buffer ``index``."""

    index: int


@dataclass
class Launch:
    kernel: KernelSource
    grid: tuple
    args: tuple  # Buf | int | float
    constexprs: dict
    node: str
    # autotuning (see plan/autotune.py): alternative (grid, constexprs) pairs, the first being
    # grid/constexprs above, and the key the chosen one is remembered under; empty = fixed launch
    choices: tuple = ()
    tune_key: tuple = ()
    # the shape-generic fallback: (grid, constexprs) of a configuration that does not depend on the
    # binding's dynamic sizes, so one compiled kernel serves every shape (see jit/specializer.py)
    generic: tuple = ()
    # names of the size arguments that are the same for every binding of the model: constexprs of
    # ``kernel``, their values written in it (plan/statics.py)
    static: tuple = ()

    def size_args(self) -> list:
        """``[(position, name)]`` of the integer arguments that are sizes or strides: not buffer
        offsets (the integer right after a buffer pointer; offsets differ between the layers that
        share a kernel), not flags."""
        names = [name for name, _ in parameters(self.kernel)]
        out = []
        for j, a in enumerate(self.args):
            if isinstance(a, int) and not isinstance(a, bool) and not (j > 0 and isinstance(self.args[j - 1], Buf)):
                out.append((j, names[j]))
        return out

    @property
    def generic_grid(self) -> tuple:
        return self.generic[0] if self.generic else self.grid

    @property
    def generic_constexprs(self) -> dict:
        return self.generic[1] if self.generic else self.constexprs


@dataclass
class BufferSpec:
    dtype: DType
    numel: int
    role: str  # "input" | "const" | "temp" | "zeroed" (a temp that is zero before every launch reading it: a
    # kernel that changes it sets it back, as split-K's arrival counters; never shared, zeroed with its arena)
    name: str = ""
    data: Optional[np.ndarray] = None  # host data of a plan constant
    digest: Optional[str] = None  # sha256 of ``data`` where known (LowerCtx.derived_const)
    symbolic: Optional[np.ndarray] = None  # a traced plan's host value behind ``data``, as Syms (plan/rebind.py)


@dataclass
class Plan:
    buffers: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)  # graph output name -> View
    inputs: dict = field(default_factory=dict)  # graph input name -> buffer index
    trace: dict = field(default_factory=dict)  # node name -> list of kernel names / "alias" / "host"
    # what follows from the plan's structure alone (which argument of which launch is which buffer, a
    # size or a flag), not from its numbers: the plans re-bound from one template share it (plan/rebind.py),
    # so a new binding does not work it out again (``size_positions``, ``memory.lifetimes``)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def add_buffer(self, spec: BufferSpec) -> int:
        self.buffers.append(spec)
        return len(self.buffers) - 1

    def buffer_positions(self) -> list:
        """Per step, ``[(argument position, buffer index)]`` of its buffer arguments (structural:
        kept in ``memo``)."""
        out = self.memo.get("buffer_args")
        if out is None or len(out) != len(self.steps):
            out = self.memo["buffer_args"] = [[(j, a.index) for j, a in enumerate(step.args) if isinstance(a, Buf)]
                                              for step in self.steps]
        return out

    def size_positions(self) -> list:
        """``Launch.size_args()`` of every step, in order (structural: kept in ``memo``)."""
        out = self.memo.get("size_args")
        if out is None or len(out) != len(self.steps):
            out = self.memo["size_args"] = [step.size_args() for step in self.steps]
        return out


@dataclass
class _Entry:
    type: TensorType
    host: Optional[np.ndarray] = None
    view: Optional[View] = None
    recipe: Optional["rebind.Recipe"] = None  # a trace's host data of the dims' sizes: how to make it again


# Replay: a node whose lowering is a pure function of what ``_signature`` holds (its op, attributes,
# input views, host values, output types and readers), after an earlier node of the same binding with
# the same signature (a transformer's 12 layers), gets that lowering's buffers and launches again,
# renumbered, instead of lowering anew: the same plan (tests/test_plan_replay.py compares them
# launch by launch), a third faster to make (bert-base b4: ~25 -> ~17 ms on a CI core). Only ops
# whose lowerings read no constant values from the graph (VALUE_BLIND, pointwise and view ops) take
# part; False lowers every node.
REPLAY = True
VALUE_BLIND = frozenset({"MatMul", "Gemm", "LayerNormalization", "rtxjit.Attention", "rtxjit.Pointwise",
                         "Transpose", "Slice", "Concat", "Expand"})  # and every POINTWISE / ALIAS op
VALUE_BLIND_ANCHORS = frozenset({"MatMul", "Gemm"})  # rtxjit.Epilogue nodes over these

LAYOUT_FOLLOWS_INPUTS = True  # False: pointwise outputs are always row-major (as before 2026-12-07), to compare
STRIDED_READERS = ("Transpose", "Conv", "ConvTranspose")  # read any strides (convs: their data input)


def _uses_flat_index(expr: str, prologue) -> bool:
    return any(re.search(r"\bidx\b", text) for text in (expr, *prologue))


def _takes_strided(reader: Node, value) -> bool:
    """Whether ``reader`` reads ``value`` as a strided view without a copy first."""
    if reader.op == "Transpose" or get_op(reader.op, version=reader.version).kind is Kind.POINTWISE:
        return True
    anchor = reader.attrs.get("anchor", reader.op) if reader.op == "rtxjit.Epilogue" else reader.op
    return anchor in STRIDED_READERS[1:] and reader.inputs[0] is value and all(
        x is not value for x in reader.inputs[1:])


_ATTRS_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # node -> (attrs object, typed key)
_HOST_MEMOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # graph -> {host key: (types, values)}
_DERIVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # node -> {tag: (sources, array, sha256)}
HOST_MEMO_LIMIT = 8192  # host evaluations kept per graph (cleared when full)
HOST_MEMO_BYTES = 1 << 16  # inputs larger than this are evaluated afresh


_MEMO_LOCK = threading.Lock()  # sessions plan in several threads: the weak dictionaries change under it


def _host_memo_of(graph: Graph) -> dict:
    with _MEMO_LOCK:
        memo = _HOST_MEMOS.get(graph)
        if memo is None:
            memo = _HOST_MEMOS[graph] = {}
        return memo


def _attrs_key(node: Node):
    """The typed key of ``node``'s attributes (fused programs are deep tuples), made once per node
    (while its attrs dict is the same object)."""
    with _MEMO_LOCK:
        hit = _ATTRS_KEYS.get(node)
    if hit is None or hit[0] is not node.attrs:
        hit = (node.attrs, typed_key(tuple(sorted(node.attrs.items()))))
        with _MEMO_LOCK:
            _ATTRS_KEYS[node] = hit
    return hit[1]


class LowerCtx:
    """What an op's ``lower`` sees: its output views, and methods that emit launches."""

    def __init__(self, builder: "PlanBuilder", node: Node, outputs: list, out_types: list):
        self._b = builder
        self.node = node
        self.outputs = outputs  # list[View | None]: None for an omitted optional output
        self.out_types = out_types
        self.kernels: list = []
        self.aliased: set = set()
        self.epilogue = None  # (program, extra input views) for a fused MatMul/Gemm/Conv (ops/fused.py)

    @property
    def interpret(self) -> bool:
        return self._b.interpret

    @property
    def where(self) -> str:
        return f"node '{self.node.name}' ({self.node.op})"

    def launch(self, src: KernelSource, grid: tuple, args: list, generic: tuple = (), **constexprs) -> None:
        """Launch ``src`` over ``grid`` with ``constexprs`` (the configuration for this binding's
        sizes). ``generic`` is ``(grid, constexprs)`` of a configuration chosen without the dynamic
        sizes, for the shape-generic fallback kernel; leave it out where ``constexprs`` never depend
        on them. On the interpreter the fallback takes the binding's configuration (nothing is
        compiled there, and the interpreter's cost is per program)."""
        if any(g == 0 for g in grid):
            return
        self._b.plan.steps.append(Launch(src, _grid(grid), _plain(args), constexprs, self.node.name,
                                         generic=self._generic(generic)))
        self.kernels.append(f"{src.name}:{src.short_key}")

    def launch_tuned(self, src: KernelSource, choices: list, args: list, tune_key: tuple, generic: tuple = ()) -> None:
        """Like ``launch``, with several ``(grid, constexprs)`` configurations: the first runs until
        the executor has timed them all on the GPU (once per ``tune_key``, see plan/autotune.py)."""
        choices = [(_grid(grid), cx) for grid, cx in choices]
        grid, constexprs = choices[0]
        if any(g == 0 for g in grid):
            return
        tuned = tuple(choices) if len(choices) > 1 and not self.interpret else ()
        self._b.plan.steps.append(Launch(src, grid, _plain(args), constexprs, self.node.name, tuned, tune_key,
                                         generic=self._generic(generic)))
        self.kernels.append(f"{src.name}:{src.short_key}")

    def _generic(self, generic: tuple) -> tuple:
        if not generic or self.interpret:
            return ()
        grid, constexprs = generic
        return _grid(grid), dict(constexprs)

    def generic_block(self, n: int) -> tuple:
        """``(grid, {"BLOCK": b})`` of a flat kernel over ``n`` elements in blocks of the cap."""
        return (-(-n // POINTWISE_CAP),), {"BLOCK": POINTWISE_CAP}

    def pointwise_block(self, n: int) -> int:
        """The block of a flat kernel over ``n`` elements on this target (as ``pointwise`` takes)."""
        return self._b.pointwise_block(n)

    @property
    def sm(self):
        """The compute capability of the target GPU as an int (90 for an H100), None on the CPU."""
        return self._b.device.sm

    @property
    def sm_count(self) -> int:
        """Multiprocessors of the target GPU (132 on an H100 SXM, or the count an AOT build for an
        absent GPU assumes), for tile heuristics; 1 on the interpreter."""
        if self.interpret:
            return 1
        return self._b.device.sm_count or autotune.sm_count()

    def tune_key(self, src: KernelSource, *sizes: int) -> tuple:
        """The autotuner's key for a launch of ``src`` over a problem of ``sizes`` on this target
        (sizes rounded up to powers of two: one timing serves a bucket of shapes)."""
        return autotune.tune_key(src.key, self.sm, *sizes)

    def readers(self, index: int = 0) -> list:
        """The graph nodes that read output ``index`` of this node (empty for a graph output)."""
        value = self.node.outputs[index]
        if value is None or any(v is value for v in self._b.graph.outputs):
            return []
        return [n for n, _ in self._b.consumers().get(value.name, [])]

    def ptr(self, view: View) -> Buf:
        """The launch argument for the data pointer of ``view``'s buffer (pass ``view.offset`` too)."""
        return Buf(view.buf)

    def needs_wide(self, *views: View) -> bool:
        """Whether addressing ``views`` needs 64-bit index arithmetic in a kernel."""
        return self._b.wide(*views)

    def alias(self, index: int, view: View) -> None:
        """Output ``index`` is ``view`` (a view of an input, possibly strided): nothing is computed.
        Readers take strided views as they come; one that needs contiguous data asks
        ``contiguous`` (a copy is made then)."""
        self._b.plan.buffers[self.outputs[index].buf].numel = 0  # the output's own buffer is not needed
        self.outputs[index] = view
        self.aliased.add(index)

    def contiguous(self, view: View) -> View:
        """``view`` itself if contiguous, else a contiguous copy of it in a new buffer."""
        if view.contiguous:
            return view
        dense = self.temp(view.dtype, view.shape)
        self.copy(view, dense)
        return dense

    def const(self, value: np.ndarray) -> View:
        return self._b.upload(np.ascontiguousarray(value), f"{self.node.name}/const")

    def derived_const(self, tag, sources: tuple, make) -> View:
        """``const(make())`` for a constant derived from the node's host constants ``sources`` alone
        (a weight re-laid out for its kernel): made and hashed once per node and kept while the
        node lives and ``sources`` are the same objects (a refit gives new ones), so a new binding
        neither redoes the layout (resnet50: 34 of its 50 ms of planning) nor the executor its
        checksum, and all bindings share one host copy."""
        with _MEMO_LOCK:
            hit = _DERIVED.get(self.node, {}).get(tag)
        if hit is None or len(hit[0]) != len(sources) or any(a is not b for a, b in zip(hit[0], sources)):
            data = np.ascontiguousarray(make())
            hit = (tuple(sources), data, hashlib.sha256(data.reshape(-1).view(np.uint8)).hexdigest())
            with _MEMO_LOCK:
                _DERIVED.setdefault(self.node, {})[tag] = hit
        return self._b.upload(hit[1], f"{self.node.name}/const", digest=hit[2])

    def is_constant(self, view: View) -> bool:
        """Whether ``view`` reads a constant on the device (a weight: the same in every binding)."""
        return self._b.plan.buffers[view.buf].role == "const"

    def temp(self, dtype: DType, shape) -> View:
        idx = self._b.plan.add_buffer(BufferSpec(dtype, _numel(shape), "temp"))
        return View.of(idx, dtype, shape)

    def counters(self, n: int) -> View:
        """``n`` int32 counters that are zero before each launch that uses them: zeroed once when
        an arena is made, set back to zero by the kernel that moves them (a split-K fix-up's
        arrival counters, templates/matmul.split_fixup)."""
        n = max(1, whole(n))
        idx = self._b.plan.add_buffer(BufferSpec(DType.INT32, n, "zeroed"))
        return View.of(idx, DType.INT32, (n,))

    def pointwise_output(self, inputs: list) -> View:
        """Output 0 of a pointwise node, laid out as its full-size inputs are where they share one
        dense layout other than row-major (channels-last activations: ConvNeXt's residual stream
        after its channels-last convs and matmuls), so the kernel reads and writes along one
        order, coalesced, instead of transposing through strided reads. Only where every reader
        takes a strided view as it comes (pointwise ops, Transpose, convolutions' data input);
        otherwise, and for a graph output, the planned row-major output. The caller aliases
        output 0 to the returned view where it is not the planned one."""
        out = self.outputs[0]
        full = [v for v in inputs if tuple(v.shape) == tuple(out.shape)]
        if not LAYOUT_FOLLOWS_INPUTS or out.rank < 2 or not full or full[0].contiguous:
            return out
        strides = full[0].strides
        if any(v.strides != strides for v in full[1:]):
            return out
        order = sorted(range(out.rank), key=lambda d: (-strides[d], d))
        phys = [out.shape[d] for d in order]
        dense = contiguous_strides(phys)
        if any(out.shape[d] != 1 and strides[d] != dense[j] for j, d in enumerate(order)):
            return out
        value = self.node.outputs[0]
        readers = self.readers()
        if not readers or not all(_takes_strided(r, value) for r in readers):
            return out
        return self.temp(out.dtype, phys).permute([order.index(d) for d in range(out.rank)])

    def pointwise(self, expr: str, inputs: list, out: View, scalars: tuple = (), prologue: tuple = ()) -> None:
        """``out = expr(inputs...)`` with numpy broadcasting of the inputs to ``out.shape``;
        ``prologue`` statements run first (a fused chain of ops)."""
        views = [v.broadcast_to(out.shape) for v in inputs]
        if not out.contiguous and not _uses_flat_index(expr, prologue):
            # iterate in the output's memory order (elementwise: any order is right; an expression that
            # reads ``idx``, the flat row-major index, keeps the logical order)
            order = sorted(range(out.rank), key=lambda d: (-out.strides[d], d))
            out, views = out.permute(order), [v.permute(order) for v in views]
        shape, strides = collapse(out.shape, out.strides, *[v.strides for v in views])
        n = out.numel
        src = render_pointwise(expr, tuple(v.dtype for v in views), out.dtype, len(shape), len(scalars),
                               wide=n > WIDE_LIMIT or self._b.wide(out, *views), prologue=tuple(prologue),
                               uniform=tuple(k for k, st in enumerate(strides[1:]) if not any(st)))
        block = self._b.pointwise_block(n)
        args: list = [Buf(out.buf), out.offset]
        for v in views:
            args += [Buf(v.buf), v.offset]
        args += list(scalars)
        args += [n, *shape, *strides[0]]
        for st in strides[1:]:
            args += list(st)
        self.launch(src, (-(-n // block),), args, generic=self.generic_block(n), BLOCK=block)

    def copy(self, src: View, dst: View) -> None:
        self.pointwise("x0", [src], dst)


class PlanBuilder:
    """Lowers ``graph`` for one binding. ``statics`` keeps which launch arguments are the same for
    every binding (plan/statics.py; by default the graph's own, shared by every builder of it)."""

    def __init__(self, graph: Graph, device, session_consts: frozenset = frozenset(),
                 statics: Optional["statics.GraphStatics"] = None):
        self.graph = graph
        self.statics = statics
        self.device = device
        self.interpret = device.interpret
        self.plan = Plan()
        self.session_consts = session_consts  # constants already on the device, by value name
        self._consumers = None
        self._recorded: dict = {}  # signature -> a lowering to replay (REPLAY)
        self._host_memo = _host_memo_of(graph)  # host evaluations (shape computations), kept per graph

    def consumers(self) -> dict:
        if self._consumers is None:
            self._consumers = self.graph.consumers()
        return self._consumers

    def wide(self, *views: View) -> bool:
        """Whether an element of ``views`` lies beyond 32-bit offsets (each compared on its own: a
        template's guards then say that, not which view reaches farthest)."""
        return any(v.offset + sum((d - 1) * abs(s) for d, s in zip(v.shape, v.strides)) > WIDE_LIMIT for v in views)

    def pointwise_block(self, n: int) -> int:
        cap = 4096 if self.interpret else POINTWISE_CAP
        block = 128
        while block < n and block < cap:
            block *= 2
        return block

    def upload(self, value: np.ndarray, name: str, digest: Optional[str] = None, shape=None) -> View:
        """A plan constant of ``value``; ``shape``: its type's (a trace's, whose dims keep expressions)."""
        dtype = DType.from_numpy(value.dtype)
        shape = value.shape if shape is None else shape
        idx = self.plan.add_buffer(BufferSpec(dtype, _numel(shape), "const", name, value, digest))
        return View.of(idx, dtype, shape)

    def build(self, input_types: dict, host_feeds: dict) -> Plan:
        """The plan of this binding; the launches' static sizes compiled into their kernels. A
        binding inside the box a checked template covers is re-bound from it (plan/rebind.py)."""
        kept = statics.of_graph(self.graph) if self.statics is None else self.statics
        dims = statics.symbolic_dims(self.graph) if rebind.ENABLED and not host_feeds else []
        key = (self.device, self.session_consts)
        templates = kept.templates.get(key, []) if dims and kept.templates is not None else False
        plan = template = values = None
        for template in templates or ():
            values = template.values_of(input_types)
            if values is not None and template.holds(values):
                if template.covers(values):
                    plan = template.instantiate(values)
                break
        else:
            template = None
        lowered = plan is None
        if lowered:
            plan = self._lower(input_types, host_feeds)
        probes: dict = {}

        def probe(types: dict) -> Plan:
            k = tuple(sorted((n, t.dtype, tuple(t.shape)) for n, t in types.items()))
            if k not in probes:
                probes[k] = PlanBuilder(self.graph, self.device, self.session_consts, kept)._lower(types, host_feeds)
            return probes[k]

        if lowered and template is not None:  # its guards hold but it was not checked this far out: compared
            types = dict(input_types)  # with this binding lowered again, off the serving thread

            def check():
                lowered_again = PlanBuilder(self.graph, self.device, self.session_consts, kept)._lower(types, {})
                self._check(kept, key, template, values, lowered_again)

            rebind.submit(check)
        elif lowered and templates is not False and dims and len(templates) < rebind.TEMPLATES:
            with kept.lock:  # one trace at a time per graph and device, off the serving thread
                start = key not in kept.tracing
                kept.tracing.add(key)
            if start:
                rebind.submit(lambda: self._template(kept, key, dict(input_types), dims, probes))
        kept.apply(self.graph, plan, input_types, probe)
        launched: dict = {}  # the trace names the kernels that run: their sources with static sizes
        for step in plan.steps:
            if step.node in plan.trace:
                launched.setdefault(step.node, []).append(f"{step.kernel.name}:{step.kernel.short_key}")
        plan.trace.update(launched)
        return plan

    def _template(self, kept, key, input_types: dict, dims: list, probes: dict) -> None:
        """Trace this binding's lowering with the dims as Syms (plan/rebind.py, in its background
        thread): a template kept where it gives the binding's plan, lowered again here, number for
        number, checked also at the probes of plan/statics.py that were planned for it (``probes``)
        where it holds their guards, and at the ends of the region its guards hold along each dim;
        then the regions next to it are traced ahead (``rebind.AHEAD``), so a new shape there is
        re-bound at its first request too."""
        try:
            outside = self._trace_at(kept, key, input_types, dims, probes)
            for point in outside[:rebind.AHEAD]:
                with kept.lock:
                    held = kept.templates.get(key, [])
                    if held is False or len(held) >= rebind.TEMPLATES:
                        break
                    if any(t.holds(point) for t in held):
                        continue
                self._trace_at(kept, key, rebind.types_at(input_types, dims, point), dims, {})
        finally:
            with kept.lock:
                kept.tracing.discard(key)

    def _trace_at(self, kept, key, input_types: dict, dims: list, probes: dict) -> list:
        """One template traced at ``input_types`` and checked (see ``_template``); the dims' values
        just outside the region it serves, or [] where it failed."""
        def lower(types):
            return PlanBuilder(self.graph, self.device, self.session_consts, kept)._lower(types, {})

        traced = rebind.trace(lower, input_types, dims)
        if traced is None:
            with kept.lock:
                kept.templates[key] = False
            return []
        template = rebind.Template(traced[0], dims, traced[1])
        values = template.values_of(input_types)
        if not self._check(kept, key, template, values, lower(input_types), new=True):
            return []
        for move in statics.PROBES:
            moved = {s: move(v) for s, v in values.items()}
            types = rebind.types_at(input_types, dims, moved)
            plan = probes.get(tuple(sorted((n, t.dtype, tuple(t.shape)) for n, t in types.items())))
            if plan is not None and template.holds(moved) and not self._check(kept, key, template, moved, plan):
                return []
        outside = []
        for symbol in template.names:  # the region's ends along each dim, the others as traced
            for step in (-1, 1):
                v, n = values[symbol], 0
                while n < rebind.SCAN and v + step >= 1 and template.holds({**values, symbol: v + step}):
                    v, n = v + step, n + 1
                end = {**values, symbol: v}
                if v != values[symbol] and not template.covers(end) and not self._check(
                        kept, key, template, end, lower(rebind.types_at(input_types, dims, end))):
                    return []
                if n < rebind.SCAN and v + step >= 1:
                    outside.append({**values, symbol: v + step})
        # its launch sites' static sizes judged now (plan/statics.py probes a source variant it has not
        # seen): a binding re-bound from it later does not probe on the serving thread
        kept.apply(self.graph, template.instantiate(values), input_types, lower)
        return outside

    @staticmethod
    def _check(kept, key, template, values: dict, plan: Plan, new: bool = False) -> bool:
        """Compare ``template`` at ``values`` with ``plan``, lowered there: the same widens the box
        it serves (adding it where ``new``), a difference drops every template of the graph."""
        same = rebind.same_plan(template.instantiate(values), plan)
        with kept.lock:
            held = kept.templates.get(key, [])
            if held is False:
                return False
            if not same:
                kept.templates[key] = False
                return False
            template.widen(values)
            if new:
                kept.templates[key] = [*held, template]
        return True

    def _lower(self, input_types: dict, host_feeds: dict) -> Plan:
        env: dict = {}
        for v in self.graph.inputs:
            t = input_types[v.name]
            idx = self.plan.add_buffer(BufferSpec(t.dtype, _numel(t.shape), "input", v.name))
            self.plan.inputs[v.name] = idx
            env[v.name] = _Entry(t, host_feeds.get(v.name), View.of(idx, t.dtype, t.shape))
        for v in self.graph.constants():
            env[v.name] = _Entry(v.type, v.const, None)
        for node in self.graph.nodes:
            self._node(node, env)
        for v in self.graph.outputs:
            e = env[v.name]
            view = self._device_view(v.name, e)
            if (view.buf in self.plan.inputs.values() or self.plan.buffers[view.buf].role == "const"
                    or not view.contiguous):
                copy = View.of(self.plan.add_buffer(BufferSpec(view.dtype, view.numel, "temp")), view.dtype, view.shape)
                LowerCtx(self, Node("Identity", f"output:{v.name}", [], []), [], []).copy(view, copy)
                view = copy
            self.plan.outputs[v.name] = view
        return self.plan

    def _device_view(self, name: str, e: _Entry) -> View:
        if e.view is None:
            if name in self.session_consts:
                idx = self.plan.add_buffer(BufferSpec(e.type.dtype, int(e.host.size), "const", name))
                e.view = View.of(idx, e.type.dtype, e.type.shape)
            else:
                traced = e.host.dtype == object or e.recipe is not None  # a trace's host value read on the device:
                data = e.host.astype(e.type.dtype.to_numpy()) if e.host.dtype == object else e.host
                e.view = self.upload(np.ascontiguousarray(data), name, shape=e.type.shape if traced else None)
                if traced:  # made again when re-bound
                    self.plan.buffers[e.view.buf].symbolic = e.recipe or e.host
        return e.view

    def _node(self, node: Node, env: dict) -> None:
        where = f"node '{node.name}' ({node.op})"
        opdef = get_op(node.op, where, node.version)
        infer_args, types, host_args = [], [], []
        for i, v in enumerate(node.inputs):
            if v is None:
                infer_args.append(None)
                types.append(None)
                host_args.append(None)
                continue
            e = env[v.name]
            types.append(e.type)
            host_args.append(e.host)
            if i in opdef.host_inputs:
                if e.host is None:
                    raise UnsupportedOpError(
                        f"{where}: input {i} ('{v.name}') must be known before the run (a shape tensor), "
                        "but it is computed from data on the device")
                infer_args.append(e.host)
            else:
                infer_args.append(e.type)
        inputs_known = all(a is not None for a, v in zip(host_args, node.inputs) if v is not None)
        memo = self._host_key(node, types, host_args) if REPLAY and inputs_known else None
        hit = None if memo is None else self._host_memo.get(memo)
        if hit is not None:  # this shape computation, with these values, was evaluated before
            for v, t, val in zip(node.outputs, *hit):
                if v is not None:
                    env[v.name] = _Entry(t, None if val is None else val.copy())
            self.plan.trace[node.name] = ["host"]
            return
        try:
            out_types = opdef.infer(infer_args, node.attrs, len(node.outputs))
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            raise ShapeError(f"{where}: {exc}") from exc
        for t in out_types:
            if not is_static(t.shape):
                raise ShapeError(f"{where}: output shape {t.shape} is not concrete after binding the inputs")
            size = math.prod(t.shape) * t.dtype.itemsize  # Python ints: no int64 wrap-around
            if size > self.device.memory_bytes:
                raise ShapeError(f"{where}: an output of shape {list(t.shape)} ({t.dtype.short}) needs {size:.3g} "
                                 f"bytes, more than the device's memory ({self.device.memory_bytes:.3g} bytes)")
        if host.runs_on_host(opdef, inputs_known, out_types):
            values = host.evaluate(opdef, host_args, types, node.attrs, out_types)
            recipes = [None] * len(values)
            if symint.active():  # a template's trace: shape arithmetic keeps the dims' expressions, other
                # host data that follows them (a Range over the sequence) keeps how to make it again
                symbolic = [None if v is None or any(isinstance(d, symint.Sym) for d in t.shape) else v  # sized by
                            for v, t in zip(host.evaluate_symbolic(opdef, host_args, types, node.attrs, values),
                                            out_types)]  # the dims: data, not a shape value (a Recipe below)
                sources = [None if v is None else (env[v.name].recipe or env[v.name].host) for v in node.inputs]
                if any(isinstance(x, rebind.Recipe) or (isinstance(x, np.ndarray) and x.dtype == object)
                       for x in sources):
                    recipes = [rebind.Recipe(opdef, dict(node.attrs), sources, i, values[i].dtype)
                               if sym is None else None for i, sym in enumerate(symbolic)]
                values = [c if v is None else v for c, v in zip(values, symbolic)]
            for v, t, val, recipe in zip(node.outputs, out_types, values, recipes):
                if v is not None:
                    env[v.name] = _Entry(t, val, recipe=recipe)
            self.plan.trace[node.name] = ["host"]
            if memo is not None:
                if len(self._host_memo) >= HOST_MEMO_LIMIT:
                    self._host_memo.clear()
                self._host_memo[memo] = (tuple(out_types),
                                         tuple(None if val is None else np.array(val, copy=True) for val in values))
            return
        if opdef.lower_fn is None:
            raise UnsupportedOpError(f"{where}: op {node.op} has no kernel lowering")
        signature = self._signature(node, opdef, env, out_types) if REPLAY else None
        if signature is not None and self._replay(node, signature, env, out_types):
            return
        first_buffer, first_step = len(self.plan.buffers), len(self.plan.steps)
        outs = []
        for v, t in zip(node.outputs, out_types):
            if v is None or v.name == "":
                outs.append(None)
                continue
            numel = _numel(t.shape)
            outs.append(View.of(self.plan.add_buffer(BufferSpec(t.dtype, numel, "temp", v.name)), t.dtype, t.shape))
        ctx = LowerCtx(self, node, outs, list(out_types))
        lower_args = self._lower_args(node, opdef, env)
        first_internal = len(self.plan.buffers)  # after the outputs and any constant inputs put on the device
        opdef.lower_fn(ctx, *lower_args, **node.attrs)
        for i, (v, t) in enumerate(zip(node.outputs, out_types)):
            if v is not None and v.name:
                env[v.name] = _Entry(t, None, ctx.outputs[i])
        if ctx.aliased and not ctx.kernels:
            self.plan.trace[node.name] = ["alias"]
        else:
            self.plan.trace[node.name] = list(ctx.kernels)
        if not ctx.kernels and any(o is not None and o.numel and i not in ctx.aliased for i, o in enumerate(outs)):
            raise ModelError(f"{where}: lowering emitted no kernel")
        if signature is not None:
            self._record(signature, node, env, (first_buffer, first_internal, first_step), outs, ctx)

    def _lower_args(self, node: Node, opdef, env: dict) -> list:
        """The lowering's arguments: host values, and device views (constants put on the device now,
        in input order)."""
        args = []
        for i, v in enumerate(node.inputs):
            if v is None:
                args.append(None)
            elif i in opdef.host_inputs:
                args.append(env[v.name].host)
            else:
                args.append(self._device_view(v.name, env[v.name]))
        return args

    def _host_key(self, node: Node, types: list, host_args: list):
        """The memo key of a node evaluated on the host (a shape computation): its op, attributes and
        input types and values; None where the values are large (a constant folded at plan time)."""
        if symint.active():  # a trace's values keep expressions that a memo of numbers would drop
            return None
        parts, size = [], 0
        for t, h in zip(types, host_args):
            if t is None:
                parts.append(None)
                continue
            arr = np.asarray(h)
            size += arr.nbytes
            if size > HOST_MEMO_BYTES:
                return None
            parts.append((t, arr.dtype.str, arr.shape, arr.tobytes()))
        try:
            key = (node.op, node.version, _attrs_key(node), len(node.outputs), tuple(parts))
            hash(key)
        except TypeError:
            return None
        return key

    # -- replay of a lowering within one binding (REPLAY)
    def _signature(self, node: Node, opdef, env: dict, out_types: list):
        """What the lowering of ``node`` may depend on, or None where it may read more (a constant's
        values, an unhashable attribute)."""
        anchor = node.attrs.get("anchor") if node.op == "rtxjit.Epilogue" else None
        if not (node.op in VALUE_BLIND or anchor in VALUE_BLIND_ANCHORS or opdef.kind in (Kind.POINTWISE, Kind.ALIAS)):
            return None
        inputs, bufs = [], []
        for i, v in enumerate(node.inputs):
            if v is None:
                inputs.append(None)
                continue
            e = env[v.name]
            if i in opdef.host_inputs:
                data = (tuple(str(getattr(v, "e", v)) for v in e.host.reshape(-1).tolist())
                        if e.host.dtype == object else e.host.tobytes())
                inputs.append(("host", str(e.host.dtype), e.host.shape, data))
                continue
            if e.view is None:  # a constant not on the device yet: it will be a new contiguous buffer
                inputs.append(("const", e.type.dtype, tuple(e.type.shape)))
                bufs.append(("const", v.name))
            else:
                inputs.append(("view", e.view.dtype, e.view.shape, e.view.strides, e.view.offset))
                bufs.append(e.view.buf)
        uses = self.consumers()
        readers = []
        for v in node.outputs:
            if v is None:
                readers.append(None)
                continue
            graph_output = any(o is v for o in self.graph.outputs)
            readers.append((graph_output, tuple(sorted((r.op, str(r.attrs.get("anchor")), slot)
                                                      for r, slot in uses.get(v.name, [])))))
        try:
            attrs = _attrs_key(node)
            key = (node.op, node.version, attrs, tuple(inputs), tuple(bufs.index(b) for b in bufs),
                   tuple(out_types), tuple(readers))
            hash(key)
        except TypeError:
            return None
        return key

    def _input_bufs(self, node: Node, env: dict) -> list:
        opdef = get_op(node.op, version=node.version)
        return [env[v.name].view.buf for i, v in enumerate(node.inputs)
                if v is not None and i not in opdef.host_inputs]

    def _record(self, signature, node: Node, env: dict, marks: tuple, outs: list, ctx: "LowerCtx") -> None:
        """Keep the lowering just made of ``node`` for replay: its output buffers, its own buffers
        (after the inputs were put on the device) and launches, its output views."""
        if signature in self._recorded:
            return
        first_buffer, first_internal, first_step = marks
        inputs = self._input_bufs(node, env)
        n_out = sum(o is not None for o in outs)
        if first_internal - first_buffer != n_out + sum(first_buffer <= b < first_internal for b in set(inputs)):
            return  # buffers made before the lowering that are neither outputs nor inputs
        steps = self.plan.steps[first_step:]
        views = [o for o in ctx.outputs if o is not None]
        used = {a.index for st in steps for a in st.args if isinstance(a, Buf)} | {v.buf for v in views}
        if any(b < first_buffer and b not in inputs for b in used):
            return  # a buffer neither made here nor an input: not replayable
        self._recorded[signature] = (inputs, first_buffer, n_out, first_internal,
                                     self.plan.buffers[first_buffer:first_buffer + n_out],
                                     self.plan.buffers[first_internal:], steps, list(ctx.outputs),
                                     self.plan.trace[node.name], node.name)

    def _replay(self, node: Node, signature, env: dict, out_types: list) -> bool:
        """Lower ``node`` as the recorded node of the same signature was: the same buffers made in the
        same order (outputs, the inputs put on the device, the lowering's own), its launches with
        their buffers renumbered and this node's name."""
        hit = self._recorded.get(signature)
        if hit is None:
            return False
        old_inputs, old_first, n_out, old_internal, out_specs, own_specs, steps, outputs, trace, old_name = hit
        first = len(self.plan.buffers)
        names = [v.name for v in node.outputs if v is not None and v.name]
        if len(names) != len(out_specs):
            return False
        for spec, name in zip(out_specs, names):
            self.plan.buffers.append(dataclasses.replace(spec, name=name))
        self._lower_args(node, get_op(node.op, version=node.version), env)
        new_inputs = self._input_bufs(node, env)
        internal = len(self.plan.buffers)
        for spec in own_specs:  # a constant the lowering made is named after its node
            name = node.name + spec.name[len(old_name):] if spec.name.startswith(old_name + "/") else spec.name
            self.plan.buffers.append(dataclasses.replace(spec, name=name))

        def buf(b: int) -> int:
            if b in old_inputs:
                return new_inputs[old_inputs.index(b)]
            if b >= old_internal:
                return internal + (b - old_internal)
            if old_first <= b < old_first + n_out:
                return first + (b - old_first)
            raise InternalError(f"replay of node '{node.name}': buffer {b} has no counterpart")

        for st in steps:
            args = tuple(Buf(buf(a.index)) if isinstance(a, Buf) else a for a in st.args)
            self.plan.steps.append(dataclasses.replace(st, args=args, node=node.name))
        for i, (v, t) in enumerate(zip(node.outputs, out_types)):
            if v is not None and v.name:
                out = outputs[i]
                env[v.name] = _Entry(t, None, dataclasses.replace(out, buf=buf(out.buf)))
        self.plan.trace[node.name] = list(trace)
        return True
