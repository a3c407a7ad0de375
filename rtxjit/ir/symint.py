"""Integers that remember how they were computed from a model's dynamic dims (plan/rebind.py).

A ``Sym`` is an ``int`` (every size check and ``isinstance(d, int)`` takes it as one) with an
expression over the dims; arithmetic with plain integers keeps the expression, a comparison made
while a trace is on (``tracing``) records a guard: the comparison's text and its outcome. Code that
turns one into a plain int (``int()``, numpy) loses the expression; ``whole`` keeps it where a
size is made an int on purpose.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

GUARD_LIMIT = 20000  # distinct guards a trace may hold (one that records more is given up)

_tracing = threading.local()


class _Trace:
    def __init__(self):
        self.guards: dict = {}  # expression -> outcome
        self.overflow = False

    def guard(self, text: str, outcome: bool) -> None:
        if len(self.guards) >= GUARD_LIMIT:
            self.overflow = True
            return
        self.guards[text] = outcome


def _expr(x) -> str:
    return x.e if isinstance(x, Sym) else repr(int(x))


def plain_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class Sym(int):
    """An integer computed from the dynamic dims: its value and its expression over them."""

    def __new__(cls, value: int, expr: str):
        obj = int.__new__(cls, value)
        obj.e = expr
        return obj

    __repr__ = __str__ = int.__repr__  # its digits, as an int prints (generated sources format sizes)

    __hash__ = int.__hash__

    def _op(self, other, fn, sym: str, swap: bool = False):
        if not plain_int(other):
            return NotImplemented
        a, b = (other, self) if swap else (self, other)
        value = fn(int(a), int(b))
        return Sym(value, f"({_expr(a)}{sym}{_expr(b)})")

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b, "+")

    def __radd__(self, o):
        return self._op(o, lambda a, b: a + b, "+", True)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b, "-")

    def __rsub__(self, o):
        return self._op(o, lambda a, b: a - b, "-", True)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b, "*")

    def __rmul__(self, o):
        return self._op(o, lambda a, b: a * b, "*", True)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b, "//")

    def __rfloordiv__(self, o):
        return self._op(o, lambda a, b: a // b, "//", True)

    def __mod__(self, o):
        return self._op(o, lambda a, b: a % b, "%")

    def __rmod__(self, o):
        return self._op(o, lambda a, b: a % b, "%", True)

    def __lshift__(self, o):
        return self._op(o, lambda a, b: a << b, "<<")

    def __rlshift__(self, o):
        return self._op(o, lambda a, b: a << b, "<<", True)

    def __rshift__(self, o):
        return self._op(o, lambda a, b: a >> b, ">>")

    def __rrshift__(self, o):
        return self._op(o, lambda a, b: a >> b, ">>", True)

    def __divmod__(self, o):
        return self // o, self % o

    def __neg__(self):
        return Sym(-int(self), f"(-{self.e})")

    def __pos__(self):
        return self

    def __abs__(self):
        return Sym(abs(int(self)), f"abs({self.e})")

    def _cmp(self, other, fn, sym: str) -> bool:
        if not plain_int(other):
            return fn(int(self), other)
        outcome = bool(fn(int(self), int(other)))
        a, b = self.e, _expr(other)
        if a != b:
            trace = getattr(_tracing, "trace", None)
            if trace is not None:
                trace.guard(f"({a}{sym}{b})", outcome)
        return outcome

    def __eq__(self, o):
        return self._cmp(o, lambda a, b: a == b, "==")

    def __ne__(self, o):
        return self._cmp(o, lambda a, b: a != b, "!=")

    def __lt__(self, o):
        return self._cmp(o, lambda a, b: a < b, "<")

    def __le__(self, o):
        return self._cmp(o, lambda a, b: a <= b, "<=")

    def __gt__(self, o):
        return self._cmp(o, lambda a, b: a > b, ">")

    def __ge__(self, o):
        return self._cmp(o, lambda a, b: a >= b, ">=")

    def __bool__(self):
        return self._cmp(0, lambda a, b: a != b, "!=")


def pow2(v) -> int:
    """The least power of two >= ``v`` (1 for ``v`` <= 1); a Sym's comparisons are guards, so a
    template records the bucket it was traced in."""
    p = 1
    while v > p:
        p *= 2
    return p


def prod(dims):
    """The product of ``dims`` as a Python integer (no int64 wrap-around), keeping a Sym's expression."""
    out = 1
    for d in dims:
        out = out * whole(d)
    return out


def whole(x):
    """``int(x)``, keeping a Sym's expression."""
    return x if isinstance(x, Sym) else int(x)


def active() -> bool:
    """Whether this thread is tracing (``tracing``)."""
    return getattr(_tracing, "trace", None) is not None


@contextlib.contextmanager
def tracing():
    """Record the guards of the Syms compared in this thread meanwhile."""
    _tracing.trace = t = _Trace()
    try:
        yield t
    finally:
        _tracing.trace = None
