"""Strided views of run-time buffers, as kernels address them.

A ``View`` is metadata only: which buffer, an element offset, a shape and element strides. The
lowering of data-movement ops (Transpose, Slice, Expand, Concat, Split) is a view on one side and a
strided copy kernel; no bytes move until a kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rtxjit.errors import ShapeError
from rtxjit.ir.symint import whole
from rtxjit.ir.types import DType


def contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


@dataclass(frozen=True)
class View:
    buf: int  # index of the buffer in the execution plan
    dtype: DType
    shape: tuple
    strides: tuple
    offset: int = 0

    @staticmethod
    def of(buf: int, dtype: DType, shape, offset: int = 0) -> "View":
        shape = tuple(whole(d) for d in shape)
        return View(buf, dtype, shape, contiguous_strides(shape), offset)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def contiguous(self) -> bool:
        return all(st == c for d, st, c in zip(self.shape, self.strides, contiguous_strides(self.shape)) if d != 1)

    def reshape(self, shape) -> "View":
        """The same elements under ``shape``, without moving data (torch's ``view``): splitting or
        merging dims works where the merged dims are laid out contiguously among themselves;
        otherwise ValueError (the caller copies)."""
        shape = tuple(whole(d) for d in shape)
        if self.contiguous:
            return View.of(self.buf, self.dtype, shape, self.offset)
        strides = view_strides(self.shape, self.strides, shape)
        if strides is None:
            raise ShapeError(f"a view of shape {self.shape} and strides {self.strides} cannot be seen as {shape}")
        return replace(self, shape=shape, strides=strides)

    def permute(self, perm) -> "View":
        return replace(self, shape=tuple(self.shape[p] for p in perm), strides=tuple(self.strides[p] for p in perm))

    def broadcast_to(self, shape) -> "View":
        """Numpy broadcasting: missing leading dims and dims of size 1 get stride 0."""
        shape = tuple(shape)
        lead = len(shape) - self.rank
        if lead < 0:
            raise ShapeError(f"cannot broadcast {self.shape} to {shape}")
        strides = [0] * lead
        for d_in, st, d_out in zip(self.shape, self.strides, shape[lead:]):
            if d_in == d_out:
                strides.append(st)
            elif d_in == 1:
                strides.append(0)
            else:
                raise ShapeError(f"cannot broadcast {self.shape} to {shape}")
        return replace(self, shape=shape, strides=tuple(strides))

    def slice(self, axis: int, start: int, length: int, step: int = 1) -> "View":
        shape = list(self.shape)
        strides = list(self.strides)
        offset = self.offset + start * strides[axis]
        shape[axis] = length
        strides[axis] = strides[axis] * step
        return replace(self, shape=tuple(shape), strides=tuple(strides), offset=offset)

    def with_dtype(self, dtype: DType) -> "View":
        return replace(self, dtype=dtype)


def view_strides(shape, strides, new_shape):
    """Strides that address the elements of (shape, strides) in row-major order under
    ``new_shape``, or None where no such strides exist (numpy's no-copy reshape rule)."""
    old = [(d, s) for d, s in zip(shape, strides) if d != 1]
    new = [d for d in new_shape if d != 1]
    out: list = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i >= len(old) or j >= len(new):
            return None
        # take the fewest old dims and new dims that cover the same number of elements
        oi, nj, op, np_ = i + 1, j + 1, old[i][0], new[j]
        while op != np_:
            if op < np_:
                if oi >= len(old):
                    return None
                op *= old[oi][0]
                oi += 1
            else:
                if nj >= len(new):
                    return None
                np_ *= new[nj]
                nj += 1
        for k in range(i, oi - 1):  # the old dims of the group must be contiguous among themselves
            if old[k][1] != old[k + 1][0] * old[k + 1][1]:
                return None
        group = [old[oi - 1][1]]
        for d in reversed(new[j + 1:nj]):
            group.insert(0, group[0] * d)
        out.extend(group)
        i, j = oi, nj
    it = iter(out)
    return tuple(1 if d == 1 else next(it) for d in new_shape)


def collapse(shape, *stride_sets) -> tuple:
    """Merge adjacent dims that every operand walks contiguously, and drop dims of size 1.

    Returns ``(shape, [strides, ...])`` of the smallest rank (at least 1) that addresses the same
    elements, so a kernel's index arithmetic is as short as the data allows.
    """
    dims = [i for i, d in enumerate(shape) if d != 1]
    new_shape = [shape[i] for i in dims]
    new_strides = [[s[i] for i in dims] for s in stride_sets]
    i = len(new_shape) - 2
    while i >= 0:
        if all(st[i] == st[i + 1] * new_shape[i + 1] for st in new_strides):
            new_shape[i] *= new_shape.pop(i + 1)
            for st in new_strides:
                st[i] = st.pop(i + 1)
        i -= 1
    if not new_shape:
        return (1,), [[1] for _ in stride_sets]
    return tuple(new_shape), [tuple(st) for st in new_strides]
