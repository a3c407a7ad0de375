"""Fused epilogues: pointwise programs spliced between a product tile and its store.

The matmul and conv templates call ``epilogue_lines`` inside their EPILOGUE hook. The product tile
``y`` (after any bias) is the program's input 0; each extra input ``k`` (a residual, a bias of the
consumer, a scale...) is loaded as ``e{k}`` at the tile's positions through strides that the
template names (``rows`` / ``cols`` for a matrix, the NCHW strides for a conv). Scalars of the
program are the kernel arguments ``es0, es1, ...``.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

from rtxjit.codegen.compose import compose
from rtxjit.codegen.source import typed_key
from rtxjit.codegen.dtypes import load_cast
from rtxjit.ir.types import DType


# graph node -> {(product dtype, extra dtypes): FusedEpilogue} (FusedEpilogue.of); weak: a dropped
# session's nodes take their epilogues with them
_INSTANCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INSTANCES_LOCK = threading.Lock()


@dataclass(frozen=True)
class FusedEpilogue:
    program: tuple
    product_dtype: DType
    extra_dtypes: tuple
    # extras read at one address by every position (all strides 0: a constant of one element, as
    # GELU's 0.5 and 0.044715): one scalar load a program instead of a broadcast tile load (each
    # such tile was 32 scalar 2-byte loads a thread on sm_90 in GPT-2's fc1 epilogue)
    uniform: tuple = ()

    @functools.cached_property  # on the frozen instance's __dict__: composed once per epilogue
    def _composed(self) -> tuple:
        names = ["y"] + [f"e{k}" for k in range(len(self.extra_dtypes))]
        return compose(self.program, names, [self.product_dtype, *self.extra_dtypes], scalar_prefix="es")

    @functools.cached_property
    def memo_key(self) -> tuple:
        """The key memoized render functions file this epilogue under (codegen/source.py): computed once
        per instance (``of`` hands out one instance per node), not walked on every render."""
        return ("FusedEpilogue", typed_key((self.program, self.product_dtype, self.extra_dtypes, self.uniform)))

    @staticmethod
    def of(program: tuple, product_dtype: DType, extra_dtypes: tuple, owner=None,
           uniform: tuple = ()) -> "FusedEpilogue":
        """The epilogue of ``program``; with ``owner`` (the graph node whose attribute ``program`` is:
        the same tuple for every binding planned) one instance per program and types, kept while the
        node lives, so its composition and key are made once per node, not per launch."""
        extra_dtypes, uniform = tuple(extra_dtypes), tuple(uniform)
        if owner is None:
            return FusedEpilogue(program, product_dtype, extra_dtypes, uniform)
        with _INSTANCES_LOCK:
            mine = _INSTANCES.get(owner)
            if mine is None:
                mine = _INSTANCES[owner] = {}
            hit = mine.get((product_dtype, extra_dtypes, uniform))
            if hit is None or hit.program is not program:
                hit = mine[(product_dtype, extra_dtypes, uniform)] = FusedEpilogue(program, product_dtype,
                                                                                   extra_dtypes, uniform)
        return hit

    @property
    def scalars(self) -> tuple:
        return self._composed[2]

    def params(self, strides: list) -> list:
        """Per extra input: pointer, offset and one stride per name in ``strides``; then scalars."""
        out = []
        for k in range(len(self.extra_dtypes)):
            out += [f"e{k}_ptr", f"e{k}_off"] + [f"e{k}_{s}" for s in strides]
        return out + [f"es{i}" for i in range(len(self.scalars))]

    def lines(self, address: Callable[[int], str]) -> list:
        """Statements turning ``y`` into the program's result; ``address(k)`` is extra ``k``'s tile."""
        out = [f"    e{k} = tl.load(e{k}_ptr + e{k}_off){load_cast(dt)}" if k in self.uniform else
               f"    e{k} = tl.load({address(k)}, mask=mask, other=0){load_cast(dt)}"
               for k, dt in enumerate(self.extra_dtypes)]
        stmts, result, _ = self._composed
        return out + [f"    {s}" for s in stmts] + [f"    y = {result}"]

    def header(self) -> str:
        return " epilogue=" + "+".join(step[0] for step in self.program)
