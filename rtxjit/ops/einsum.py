"""Einsum, lowered onto views and existing kernels.

The equation is parsed into one label per axis of each operand (``...`` becomes labels ``...0``,
``...1``, right-aligned and broadcast across operands, as numpy does) and the output's labels (the
implicit form: the ellipsis labels, then the letters used once, sorted). Every operand is then seen
as a *letter view*: one dim per letter, with its strides (the sum of the axes' strides where a
letter repeats in a term, a diagonal; 0 where the operand lacks the letter or broadcasts it).

* one operand, nothing summed (``ij->ji``, ``...ii->...i``): the output is that view, no kernel;
* two float operands with summed letters (``bhid,bhjd->bhij``, ``...ij,...jk->...ik``,
  ``bij,bjk->bik``): letters shared by both operands and the output are the batch dims, the others
  merge into M, N and K, and the tiled matmul template runs through ``emit_matmul`` (as MatMul does);
  an operand whose letters cannot merge without a copy is copied once, an output likewise;
* everything else (``bi,j->bij`` rotary frequencies as a pointwise product, sums, traces, three or
  more operands, integers): the generic product-and-sum kernel of ``codegen/templates/einsum.py``.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from dataclasses import replace

import numpy as np

from rtxjit.codegen.templates.einsum import render_einsum
from rtxjit.codegen.view import View, collapse
from rtxjit.errors import ModelError, ShapeError
from rtxjit.ops.matmul import DOT_TYPES, emit_matmul
from rtxjit.ir.registry import Kind, Rand, Sample, op
from rtxjit.ir.types import DType, TensorType

WIDE_LIMIT = 2**31 - 1


def parse_equation(equation: str, ranks: list) -> tuple:
    """``(labels per operand, output labels)`` of ``equation`` for operands of ``ranks``."""
    eq = equation.replace(" ", "")
    if eq.count("->") > 1:
        raise ModelError(f"Einsum equation '{equation}' has more than one '->'")
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ModelError(f"Einsum equation '{equation}' has {len(terms)} operand terms for {len(ranks)} inputs")
    parts, n_ell = [], 0
    for term, rank in zip(terms, ranks):
        head, ell, tail = _split_term(equation, term)
        if ell:
            e = rank - len(head) - len(tail)
            if e < 0:
                raise ShapeError(f"Einsum term '{term}' has more letters than its operand's rank {rank}")
            n_ell = max(n_ell, e)
        else:
            e = None
            if len(head) != rank:
                raise ShapeError(f"Einsum term '{term}' has {len(head)} letters for an operand of rank {rank}")
        parts.append((head, e, tail))
    ell = [f"...{i}" for i in range(n_ell)]
    labels = [head + (ell[n_ell - e:] if e is not None else []) + tail for head, e, tail in parts]
    if rhs is None:
        counts = Counter(ch for head, _, tail in parts for ch in head + tail)
        out = ell + sorted(ch for ch, c in counts.items() if c == 1)
    else:
        head, has_ell, tail = _split_term(equation, rhs)
        out = head + (ell if has_ell else []) + tail
        if len(set(out)) != len(out):
            raise ModelError(f"Einsum output '{rhs}' repeats a letter")
        missing = set(out) - {lab for lab_list in labels for lab in lab_list}
        if missing:
            raise ModelError(f"Einsum output letters {sorted(missing)} appear in no operand of '{equation}'")
    return labels, out


def _split_term(equation: str, term: str) -> tuple:
    if term.count("...") > 1:
        raise ModelError(f"Einsum equation '{equation}': term '{term}' has more than one '...'")
    head, ell, tail = term.partition("...")
    for ch in head + tail:
        if not ch.isascii() or not ch.isalpha():
            raise ModelError(f"Einsum equation '{equation}': '{ch}' is not a letter")
    return list(head), bool(ell), list(tail)


def letter_sizes(labels: list, shapes: list) -> dict:
    """Each label's size: the dims it labels must agree, where 1 broadcasts (and a known size
    stands for a symbol it meets)."""
    sizes: dict = {}
    for labs, shape in zip(labels, shapes):
        for lab, d in zip(labs, shape):
            cur = sizes.get(lab)
            if cur is None or cur == 1:
                sizes[lab] = d
            elif d == 1 or d == cur:
                continue
            elif isinstance(cur, int) and isinstance(d, int):
                raise ShapeError(f"Einsum letter '{lab}' labels dims of sizes {cur} and {d}")
            elif isinstance(d, int):
                sizes[lab] = d
    return sizes


@op("Einsum", since=12, kind=Kind.MATMUL,
    samples=[Sample([Rand((2, 3, 4, 5)), Rand((2, 3, 6, 5))], {"equation": "bhid,bhjd->bhij"}),
             Sample([Rand((2, 3, 4, 6)), Rand((2, 3, 6, 5))], {"equation": "bhqk,bhkd->bhqd"}),
             Sample([Rand((3, 4)), Rand((5,))], {"equation": "bi,j->bij"}),
             Sample([Rand((7,)), Rand((4,))], {"equation": "i,j->ij"}),
             Sample([Rand((2, 1, 3, 4)), Rand((3, 4, 5))], {"equation": "...ij,...jk->...ik"}),
             Sample([Rand((3, 4))], {"equation": "ij->ji"}),
             Sample([Rand((2, 4, 4))], {"equation": "...ii->...i"}),
             Sample([Rand((3, 5))], {"equation": "ij->"}),
             Sample([Rand((4, 4))], {"equation": "ii"}),
             Sample([Rand((6,)), Rand((6,))], {"equation": "i,i"}),
             Sample([Rand((3, 4)), Rand((4, 5))], {"equation": "ij,jk"}),
             Sample([Rand((2, 3, 4)), Rand((3, 4, 5))], {"equation": "ijk,jkl->il"}),
             Sample([Rand((2, 3, 4)), Rand((4, 5))], {"equation": "xyk,kz->xzy"}),
             Sample([Rand((2, 3, 4)), Rand((2, 4, 5)), Rand((2, 5, 3))], {"equation": "bij,bjk,bkl->bil"}),
             Sample([Rand((3, 4)), Rand((4, 2))], {"equation": "ab,bc->"}),
             Sample([Rand((3, 4), "int64", -5, 5), Rand((4, 2), "int64", -5, 5)], {"equation": "ij,jk->ik"},
                    float_types=("fp32",))])
def einsum(*xs: TensorType, equation: str) -> TensorType:
    if not xs:
        raise ModelError("Einsum needs at least one input")
    dtypes = {x.dtype for x in xs}
    if len(dtypes) != 1:
        raise ModelError(f"Einsum inputs have different dtypes {sorted(d.short for d in dtypes)}")
    if xs[0].dtype is DType.BOOL:
        raise ModelError("Einsum of bool tensors is not defined by ONNX")
    labels, out = parse_equation(equation, [x.rank for x in xs])
    sizes = letter_sizes(labels, [x.shape for x in xs])
    return TensorType(xs[0].dtype, tuple(sizes[lab] for lab in out))


@einsum.reference
def _(*xs, equation):
    labels, out = parse_equation(equation, [x.ndim for x in xs])
    sizes = letter_sizes(labels, [x.shape for x in xs])
    all_labels = list(dict.fromkeys(lab for labs in labels for lab in labs))
    spare = iter(ch for ch in string.ascii_letters if ch not in all_labels)
    names = {lab: next(spare) if lab.startswith("...") else lab for lab in all_labels}
    eq = ",".join("".join(names[lab] for lab in labs) for labs in labels) + "->" + "".join(names[lab] for lab in out)
    full = [np.broadcast_to(x, [sizes[lab] for lab in labs]) for x, labs in zip(xs, labels)]
    return np.asarray(np.einsum(eq, *full))


def letter_view(x: View, labels: list, letters: list, sizes: dict) -> View:
    """``x`` seen with one dim per letter of ``letters`` (see the module's docstring)."""
    strides = []
    for lab in letters:
        st = 0
        for ax, xl in enumerate(labels):
            if xl == lab and x.shape[ax] != 1:
                st += x.strides[ax]
        strides.append(st)
    return replace(x, shape=tuple(sizes[lab] for lab in letters), strides=tuple(strides))


def _merged(ctx, v: View, n_batch: int, groups: list) -> View:
    """``v`` with its dims after ``n_batch`` merged by ``groups`` (lists of dim counts); a copy
    where the strides do not allow a view."""
    shape, d = list(v.shape[:n_batch]), n_batch
    for g in groups:
        shape.append(math.prod(v.shape[d:d + g]))
        d += g
    try:
        return v.reshape(shape)
    except ValueError:
        return ctx.contiguous(v).reshape(shape)


@einsum.lower
def _(ctx, *xs, equation):
    out = ctx.outputs[0]
    labels, out_letters = parse_equation(equation, [x.rank for x in xs])
    sizes = letter_sizes(labels, [x.shape for x in xs])
    summed = [lab for lab in dict.fromkeys(lab for labs in labels for lab in labs) if lab not in out_letters]
    if len(xs) == 1 and not summed:
        ctx.alias(0, letter_view(xs[0], labels[0], out_letters, sizes))
        return
    n_sum = math.prod(sizes[lab] for lab in summed)
    if len(xs) == 2 and summed and n_sum > 0 and out.dtype in DOT_TYPES:
        _lower_matmul(ctx, xs, labels, out_letters, summed, sizes)
        return
    _lower_generic(ctx, xs, labels, out_letters, summed, sizes)


def _lower_matmul(ctx, xs, labels, out_letters, summed, sizes) -> None:
    out = ctx.outputs[0]
    (a, b), (la, lb) = xs, labels
    batch = [lab for lab in out_letters if lab in la and lab in lb]
    left = [lab for lab in out_letters if lab in la and lab not in lb]
    right = [lab for lab in out_letters if lab in lb and lab not in la]
    nb = len(batch)
    a_mm = _merged(ctx, letter_view(a, la, batch + left + summed, sizes), nb, [len(left), len(summed)])
    b_mm = _merged(ctx, letter_view(b, lb, batch + summed + right, sizes), nb, [len(summed), len(right)])
    o_full = letter_view(out, out_letters, batch + left + right, sizes)
    target = o_full.shape[:nb] + (math.prod(sizes[lab] for lab in left), math.prod(sizes[lab] for lab in right))
    try:
        o_mm, tmp = o_full.reshape(target), None
    except ValueError:
        tmp = ctx.temp(out.dtype, target)
        o_mm = tmp
    emit_matmul(ctx, a_mm, b_mm, o_mm)
    if tmp is not None:
        ctx.copy(tmp.reshape(o_full.shape), o_full)


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _lower_generic(ctx, xs, labels, out_letters, summed, sizes) -> None:
    out = ctx.outputs[0]  # contiguous, offset 0
    letters = out_letters + summed
    views = [letter_view(x, labs, letters, sizes) for x, labs in zip(xs, labels)]
    ro = len(out_letters)
    n_out = out.numel
    oshape, ostrides = collapse(out.shape, out.strides, *[v.strides[:ro] for v in views])
    ostrides = ostrides[1:]
    if summed:
        rshape, rstrides = collapse(tuple(sizes[lab] for lab in summed), *[v.strides[ro:] for v in views])
    else:
        rshape, rstrides = (), [() for _ in views]
    n_red = math.prod(rshape) if summed else 1
    wide = n_out > WIDE_LIMIT or ctx.needs_wide(out, *views)
    src = render_einsum(out.dtype, len(views), len(oshape), len(rshape), wide=wide)
    args = [ctx.ptr(out), out.offset]
    for v in views:
        args += [ctx.ptr(v), v.offset]
    args += [n_out, n_red, *oshape, *rshape]
    for ost, rst in zip(ostrides, rstrides):
        args += [*ost, *rst]
    if not summed:
        block_o, block_r, generic = 1024, 1, (1024, 1)
    else:
        tile = 32768 if ctx.interpret else 4096
        block_r = min(_pow2(max(n_red, 1)), 1024 if ctx.interpret else 128)
        block_o = max(1, min(_pow2(n_out), tile // block_r))
        generic = (32, 64)
    ctx.launch(src, (-(-n_out // block_o),), args,
               generic=((-(-n_out // generic[0]),), {"BLOCK_O": generic[0], "BLOCK_R": generic[1]}),
               BLOCK_O=block_o, BLOCK_R=block_r)
