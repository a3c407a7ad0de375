"""Plans re-bound without lowering: a new binding of a model's dynamic dims reuses a plan template.

Lowering a graph for a new binding walks every node in Python (bert-base at batch 4: ~300 nodes,
~15 ms on a CI core, ~25 ms of a new shape's ~40 ms first request on an H100's host). But between
two bindings of a profile a plan changes only in numbers: grids, sizes, strides, buffer sizes, all
computed from the dynamic dims by the same code. So a lowered binding is lowered again, in a
background thread, with each symbolic dim as a ``Sym``: an ``int`` holding its value and an
expression over the dims. Arithmetic keeps the expression, a comparison records a *guard* (the expression of the
comparison and its outcome), and every number of the plan that came from the dims holds its
expression: the plan is a template. A later binding evaluates the guards and the numbers in two
generated functions and copies the template with them instead of lowering (bert-base at batch 4: a
new sequence length planned in ~4 ms on a CI core instead of ~15 ms).

Never wrong, at worst no faster. A lowering may lose a dim's expression (``int()`` or numpy on a
size, a float ratio): the number is then fixed in the template where it should move. So a template
serves only the box of dims where it reproduced concretely lowered plans number for number: the
binding it was traced at, statics' probes, the ends of the region its guards hold along each dim
(found by scanning the guards, then lowered and compared), and any later binding outside the box
whose guards it holds (lowered for that request, compared in the background: the same widens the
box). A difference drops every template of the graph for good; a guard that fails lowers that
binding. The regions next to a traced one are traced ahead (``AHEAD``), so a new shape there is
re-bound at its first request. Host shape values keep expressions as object arrays of Syms
(ir/host.evaluate_symbolic); host data whose size follows the dims (a Range over the sequence, a
mask's indices) keeps a ``Recipe`` and is made again per binding. Traces and checks run in one
background thread (``submit``, ``drain``). Host-fed inputs (shape tensors from the feeds) are always
lowered. ``ENABLED = False`` lowers every binding (to compare).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from typing import Optional

import numpy as np

from rtxjit.ir.symint import Sym, plain_int, tracing

ENABLED = True
TEMPLATES = 8  # templates (guard outcomes) kept per graph and device
AHEAD = 4  # regions next to a traced one traced ahead of any binding there
SCAN = 1024  # values of a dim tried, each way, for the end of a template's region

class _Slot:
    """Where a template holds number ``index`` of its generated function's result."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Numbers:
    """The template's numbers: each distinct expression gets one slot."""

    def __init__(self):
        self.exprs: list = []
        self.index: dict = {}

    def of(self, value):
        if isinstance(value, Sym):
            i = self.index.get(value.e)
            if i is None:
                i = self.index[value.e] = len(self.exprs)
                self.exprs.append(value.e)
            return _Slot(i)
        return value


class _Seq:
    """A tuple (or list, dict items) with some entries slots: ``fill`` makes the concrete one."""

    __slots__ = ("items", "where", "kind")

    def __init__(self, values, numbers: _Numbers, kind=tuple):
        items = [_template_of(v, numbers) for v in values]
        self.where = [(j, v) for j, v in enumerate(items) if isinstance(v, (_Slot, _Seq))]
        self.items = items
        self.kind = kind

    def fill(self, vals):
        if not self.where:
            return self.kind(self.items) if self.kind is not dict else dict(self.items)
        items = list(self.items)
        for j, v in self.where:
            items[j] = vals[v.index] if isinstance(v, _Slot) else v.fill(vals)
        return self.kind(items) if self.kind is not dict else dict(items)


def _template_of(value, numbers: _Numbers):
    if isinstance(value, Sym):
        return numbers.of(value)
    if isinstance(value, tuple):
        seq = _Seq(value, numbers)
        return seq if seq.where else value
    if isinstance(value, list):
        return _Seq(value, numbers, list)
    if isinstance(value, dict):
        seq = _Seq(value.items(), numbers, dict)
        return seq if seq.where else dict(value)
    return value


def _fill(t, vals):
    if isinstance(t, _Slot):
        return vals[t.index]
    if isinstance(t, _Seq):
        return t.fill(vals)
    if isinstance(t, dict):
        return dict(t)
    if isinstance(t, list):
        return list(t)
    return t


# the fields of a plan's parts that may hold numbers of the dims
_LAUNCH_FIELDS = ("grid", "args", "constexprs", "choices", "tune_key", "generic")
_VIEW_FIELDS = ("shape", "strides", "offset")


class Template:
    """A raw plan (before plan/statics.py compiles static sizes into its kernels) whose numbers are
    slots of one generated function of the dims' values."""

    def __init__(self, plan, symbols: list, guards: dict):
        self._plan_type = type(plan)  # plan.Plan and plan.Launch (plan.py imports this module)
        numbers = _Numbers()
        self.symbols = symbols  # [(input name, axis, symbol)]
        self.names = sorted({s for _, _, s in symbols})
        self.launches = []
        for st in plan.steps:
            fields = {f: _template_of(getattr(st, f), numbers) for f in _LAUNCH_FIELDS}
            self.launches.append((st, fields))
        self.buffers = [(b, numbers.of(b.numel), _data_template(b.symbolic, numbers)) for b in plan.buffers]
        self.outputs = {name: (v, {f: _template_of(getattr(v, f), numbers) for f in _VIEW_FIELDS})
                        for name, v in plan.outputs.items()}
        self.inputs = dict(plan.inputs)
        self.trace = dict(plan.trace)
        self.guard, self.fn = _compile(self.names, guards, numbers.exprs)
        self.lo = {}
        self.hi = {}
        self.sizes = None  # (lowest, highest) product of the dims' values where checked
        self.memo: dict = {}  # Plan.memo of every plan re-bound from here: one structure

    def values_of(self, input_types: dict) -> Optional[dict]:
        out = {}
        for name, axis, symbol in self.symbols:
            t = input_types.get(name)
            if t is None or axis >= len(t.shape):
                return None
            v = int(t.shape[axis])
            if out.setdefault(symbol, v) != v:
                return None
        return out

    def holds(self, values: dict) -> bool:
        """Whether every guard has its traced outcome at ``values``."""
        return self.guard(*[values[n] for n in self.names])

    def covers(self, values: dict) -> bool:
        if self.sizes is None:
            return False
        size = math.prod(values.values())
        return (all(self.lo[s] <= v <= self.hi[s] for s, v in values.items())
                and self.sizes[0] <= size <= self.sizes[1])

    def widen(self, values: dict) -> None:
        for s, v in values.items():
            self.lo[s] = min(self.lo.get(s, v), v)
            self.hi[s] = max(self.hi.get(s, v), v)
        size = math.prod(values.values())
        self.sizes = (size, size) if self.sizes is None else (min(self.sizes[0], size), max(self.sizes[1], size))

    def instantiate(self, values: dict):
        """The raw plan at ``values`` (symbol -> int; ``holds`` them)."""
        vals = self.fn(*[values[n] for n in self.names])
        plan = self._plan_type()
        plan.memo = self.memo
        plan.buffers = [b if isinstance(n, int) and data is None else _buffer(b, n, data, vals)
                        for b, n, data in self.buffers]
        steps = plan.steps
        for st, fields in self.launches:
            steps.append(type(st)(st.kernel, _fill(fields["grid"], vals), _fill(fields["args"], vals),
                                  _fill(fields["constexprs"], vals), st.node, _fill(fields["choices"], vals),
                                  _fill(fields["tune_key"], vals), _fill(fields["generic"], vals), st.static))
        plan.outputs = {name: dataclasses.replace(v, **{f: _fill(t, vals) for f, t in fields.items()})
                        for name, (v, fields) in self.outputs.items()}
        plan.inputs = dict(self.inputs)
        plan.trace = {k: list(v) for k, v in self.trace.items()}
        return plan


class Recipe:
    """Host data a trace computed from values that follow the dims (a Range over the sequence, the
    indices a mask is gathered with): output ``index`` of ``opdef`` over ``sources`` (each a host
    array, an object array of Syms or another Recipe), remade at every re-binding."""

    def __init__(self, opdef, attrs: dict, sources: list, index: int, dtype):
        self.opdef, self.attrs, self.sources, self.index, self.dtype = opdef, attrs, sources, index, dtype


class _RecipeT:
    """A Recipe with its Syms as slots of the template's numbers."""

    def __init__(self, recipe: Recipe, numbers: _Numbers):
        self.recipe = recipe
        self.sources = [_data_template(x, numbers) if isinstance(x, Recipe) or (
            isinstance(x, np.ndarray) and x.dtype == object) else x for x in recipe.sources]

    def make(self, vals) -> np.ndarray:
        args = [x.make(vals) if isinstance(x, (_RecipeT, _ArrayT)) else x for x in self.sources]
        r = self.recipe
        return np.asarray(r.opdef.run_reference(args, r.attrs, r.index + 1)[r.index]).astype(r.dtype, copy=False)


class _ArrayT:
    """An object array of Syms (a shape value) as slots: ``make`` gives its int64 array."""

    def __init__(self, arr: np.ndarray, numbers: _Numbers):
        self.shape = arr.shape
        self.seq = _Seq(arr.reshape(-1).tolist(), numbers, list)

    def make(self, vals) -> np.ndarray:
        return np.array(self.seq.fill(vals), dtype=np.int64).reshape(self.shape)


def _data_template(symbolic, numbers: _Numbers):
    if symbolic is None:
        return None
    if isinstance(symbolic, Recipe):
        return _RecipeT(symbolic, numbers)
    return _ArrayT(symbolic, numbers)


def _buffer(spec, numel, data, vals):
    """A template's buffer at ``vals``: its size, and the data of a host value it uploads (a new
    BufferSpec made directly: ``dataclasses.replace`` costs ~4 us, ~100 buffers a binding)."""
    if data is None:
        return type(spec)(spec.dtype, _fill(numel, vals), spec.role, spec.name, spec.data, spec.digest,
                          spec.symbolic)
    return type(spec)(spec.dtype, _fill(numel, vals), spec.role, spec.name,
                      np.ascontiguousarray(data.make(vals), dtype=spec.data.dtype))


def _compile(names: list, guards: dict, exprs: list):
    """Two functions of the dims' values: whether every guard has its outcome, and the numbers.
    Their text is generated here from the trace's own expressions (Python integer arithmetic over
    the parameters and integer literals), never read from anywhere."""
    params = [f"d{i}" for i in range(len(names))]
    rename = {n: p for n, p in zip(names, params)}

    def text(e: str) -> str:
        for n in sorted(rename, key=len, reverse=True):
            e = e.replace(f"${n}$", rename[n])
        return e

    checks = [f"{'' if outcome else 'not '}{text(g)}" for g, outcome in guards.items()] or ["True"]
    lines = [f"def holds({', '.join(params)}):", f"    return ({' and '.join(checks)})",
             f"def numbers({', '.join(params)}):", f"    return ({''.join(text(e) + ', ' for e in exprs)})"]
    scope: dict = {}
    exec(compile("\n".join(lines), "<rtxjit rebind>", "exec"), {"abs": abs}, scope)  # noqa: S102 - generated above
    return scope["holds"], scope["numbers"]


def sym_types(input_types: dict, symbols: list):
    """``input_types`` with each symbolic dim a ``Sym`` of its value (one per symbol)."""
    values = {}
    for name, axis, symbol in symbols:
        values.setdefault(symbol, Sym(int(input_types[name].shape[axis]), f"${symbol}$"))
    return types_at(input_types, symbols, values)


_jobs: "queue.Queue" = queue.Queue()
_thread = None
_thread_lock = threading.Lock()


def submit(job) -> None:
    """Run ``job()`` in the tracing thread (one per process, started on first use): a trace costs a
    few lowerings of Python work that the binding that asked for it does not wait for."""
    global _thread
    with _thread_lock:
        if _thread is None:
            _thread = threading.Thread(target=_work, daemon=True, name="rtxjit-rebind")
            _thread.start()
    _jobs.put(job)


def _work() -> None:
    while True:
        job = _jobs.get()
        try:
            job()
        except Exception:  # noqa: BLE001 - a failed trace leaves the graph lowered for every binding
            pass
        finally:
            _jobs.task_done()


def drain() -> None:
    """Wait for the traces submitted so far (tests; a benchmark's warm-up)."""
    _jobs.join()


def types_at(input_types: dict, symbols: list, values: dict) -> dict:
    """``input_types`` with each symbolic dim at ``values[symbol]``."""
    from rtxjit.ir.types import TensorType

    out = dict(input_types)
    for name, axis, symbol in symbols:
        shape = list(out[name].shape)
        shape[axis] = values[symbol]
        out[name] = TensorType(out[name].dtype, tuple(shape))
    return out


def trace(lower, input_types: dict, symbols: list):
    """``(plan, guards)``: ``lower(types)`` with the symbolic dims as Syms; None where it fails or
    records too many guards."""
    try:
        with tracing() as t:
            plan = lower(sym_types(input_types, symbols))
    except Exception:  # noqa: BLE001 - a lowering that cannot run on Syms is lowered concretely
        return None
    if t.overflow:
        return None
    return plan, t.guards


def same_plan(a, b) -> bool:
    """Whether two raw plans are the same, number for number (constants by value)."""
    if len(a.steps) != len(b.steps) or len(a.buffers) != len(b.buffers) or a.inputs != b.inputs:
        return False
    if a.trace != b.trace or a.outputs.keys() != b.outputs.keys():
        return False
    for x, y in zip(a.steps, b.steps):
        if x.kernel.key != y.kernel.key or x.node != y.node or x.static != y.static:
            return False
        for f in _LAUNCH_FIELDS:
            if not _equal(getattr(x, f), getattr(y, f)):
                return False
    for x, y in zip(a.buffers, b.buffers):
        if (x.dtype, int(x.numel), x.role, x.name, x.digest) != (y.dtype, int(y.numel), y.role, y.name, y.digest):
            return False
        if (x.data is None) != (y.data is None):
            return False
        if x.data is not None and x.data is not y.data and not (
                x.data.shape == y.data.shape and x.data.dtype == y.data.dtype
                and np.array_equal(x.data, y.data, equal_nan=x.data.dtype.kind in "fc")):
            return False
    for name in a.outputs:
        x, y = a.outputs[name], b.outputs[name]
        if x.buf != y.buf or x.dtype != y.dtype or any(not _equal(getattr(x, f), getattr(y, f)) for f in _VIEW_FIELDS):
            return False
    return True


def _equal(x, y) -> bool:
    if x == y:  # the same numbers (an int and a bool of one value pass: both come from the same lowering code)
        return True
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return type(x) is type(y) and len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, float) or isinstance(y, float):
        return type(x) is type(y) and (x == y or (x != x and y != y))
    if isinstance(x, (bool, np.bool_)) or isinstance(y, (bool, np.bool_)):
        return type(x) is type(y) and x == y
    if plain_int(x) and plain_int(y):
        return int(x) == int(y)
    return type(x) is type(y) and x == y
