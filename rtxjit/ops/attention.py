"""``rtxjit.Attention``: scaled dot-product attention as one op, created by the ``fuse_attention``
pass (it is not an ONNX op) and lowered onto the flash-attention template.

Convention. Attention works on *logical* tensors ``Q [B, H, Sq, Dk]``, ``K [B, H, Sk, Dk]`` (not
transposed), ``V [B, H, Sk, Dv]`` and computes ``O [B, H, Sq, Dv]``::

    O = softmax(scale * Q @ K^T + mask, axis=-1) @ V

The op's inputs are the tensors as they are *stored*, and each perm says how to get the logical
tensor from the stored one, with ONNX Transpose's meaning (``logical = np.transpose(stored, perm)``):

- ``q_perm``, ``k_perm``, ``v_perm``: ``Q = transpose(q, q_perm)`` and so on. A model that reshapes
  a projection to ``[B, S, H, D]`` and transposes it with ``(0, 2, 1, 3)`` gives the op the
  ``[B, S, H, D]`` tensor and ``perm=(0, 2, 1, 3)``: the kernel reads it through strides.
- ``out_perm``: the op's output is ``transpose(O, out_perm)``, so ``(0, 2, 1, 3)`` writes
  ``[B, Sq, H, Dv]``, ready for the Reshape that merges the heads.

``mask`` (optional) is added to the scaled scores and broadcasts (numpy rules) to ``[B, H, Sq, Sk]``;
it may be of any float type. The batch and head dims of Q, K and V broadcast too. Q, K and V share
one float dtype, which is the output's.

``out_dtype`` (an ONNX element type code; 0: Q's type): the output's float type where the graph
computed the product with V in another precision than Q and K (an fp16 model whose export upcasts V
and the probabilities to fp32); the kernel reads V in its stored type.

``kv_group`` (grouped-query attention): K and V have ``H / kv_group`` heads, and query head ``h``
reads K/V head ``h // kv_group`` (what repeating each K/V head ``kv_group`` times would give).

``nan_rows_zero`` (0 or 1): NaN probabilities are replaced by 0 before the product with V, as the
``Where(IsNaN(p), 0, p)`` that torch exports after a masked softmax does: a row whose keys are all
masked by ``-inf`` gives 0 instead of NaN.
"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.templates.attention import attention_choices, attention_config, render_attention
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ir.registry import Kind, op
from rtxjit.ir.types import DType, TensorType, broadcast_shapes

IDENTITY = (0, 1, 2, 3)
KERNEL_TYPES = (DType.FP32, DType.FP16, DType.BF16)


def _perm(perm, name: str) -> tuple:
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != list(IDENTITY):
        raise ShapeError(f"rtxjit.Attention: {name} {perm} is not a permutation of 4 axes")
    return perm


def _logical(x: TensorType, perm, name: str) -> tuple:
    """The logical [B, H, S, D] shape of stored input ``x``."""
    if x.rank != 4:
        raise ShapeError(f"rtxjit.Attention: {name} must have rank 4, got {x}")
    return tuple(x.shape[p] for p in _perm(perm, f"{name}_perm"))


def _same(a, b) -> bool:
    """Whether two dims may be equal: symbols are compared by name, ints by value."""
    return a == b or not (isinstance(a, int) and isinstance(b, int))


def inverse(perm) -> tuple:
    """The perm that undoes ``perm``: ``transpose(transpose(x, p), inverse(p)) == x``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@op("rtxjit.Attention", since=1, kind=Kind.ATTENTION)
def attention(q: TensorType, k: TensorType, v: TensorType, mask: TensorType = None, *, scale: float = 1.0,
              q_perm=IDENTITY, k_perm=IDENTITY, v_perm=IDENTITY, out_perm=IDENTITY,
              nan_rows_zero: int = 0, kv_group: int = 1, out_dtype: int = 0) -> TensorType:
    if len({q.dtype, k.dtype, v.dtype}) != 1 or not q.dtype.is_float:
        raise ModelError(f"rtxjit.Attention needs Q, K and V of one float type, got {q}, {k}, {v}")
    bq, hq, sq, dk = _logical(q, q_perm, "q")
    bk, hk, sk, dk2 = _logical(k, k_perm, "k")
    bv, hv, sv, dv = _logical(v, v_perm, "v")
    if not (_same(dk, dk2) and _same(sk, sv)):
        raise ShapeError(f"rtxjit.Attention: Q [.., {sq}, {dk}], K [.., {sk}, {dk2}] and V [.., {sv}, {dv}] "
                         "do not fit together")
    g = int(kv_group)
    if g < 1:
        raise ShapeError(f"rtxjit.Attention: kv_group {g} must be >= 1")
    if g > 1:
        if not all(isinstance(d, int) for d in (hq, hk, hv)) or hk != hv or hq != hk * g:
            raise ShapeError(f"rtxjit.Attention: {hq} query heads and {hk} / {hv} K / V heads do not fit kv_group {g}")
        hk = hv = hq
    b, h = broadcast_shapes((bq, hq), (bk, hk), (bv, hv))
    if mask is not None:
        scores = (b, h, sq, sk)
        if mask.rank > 4 or broadcast_shapes(mask.shape, scores) != scores:
            raise ShapeError(f"rtxjit.Attention: mask {mask} does not broadcast to [{b},{h},{sq},{sk}]")
        if not mask.dtype.is_float:
            raise ModelError(f"rtxjit.Attention: mask of {mask.dtype.short} (an additive float mask is needed)")
    logical = (b, h, sq, dv)
    dtype = DType.from_onnx(out_dtype) if out_dtype else q.dtype
    if dtype not in KERNEL_TYPES:
        raise ModelError(f"rtxjit.Attention: out_dtype {dtype.short} is not a float type the kernel writes")
    return TensorType(dtype, tuple(logical[p] for p in _perm(out_perm, "out_perm")))


@attention.reference
def _(q, k, v, mask=None, *, scale=1.0, q_perm=IDENTITY, k_perm=IDENTITY, v_perm=IDENTITY, out_perm=IDENTITY,
      nan_rows_zero=0, kv_group=1, out_dtype=0):
    ql, kl, vl = (np.transpose(x, p).astype(np.float64) for x, p in ((q, q_perm), (k, k_perm), (v, v_perm)))
    kl, vl = np.repeat(kl, kv_group, axis=1), np.repeat(vl, kv_group, axis=1)
    s = scale * (ql @ np.swapaxes(kl, -1, -2))
    if mask is not None:
        s = s + mask.astype(np.float64)
    with np.errstate(invalid="ignore"):  # a row of -inf is NaN, as in the unfused graph
        e = np.exp(s - s.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
    if nan_rows_zero:
        p = np.where(np.isnan(p), 0.0, p)
    return np.transpose(p @ vl, out_perm)


@attention.lower
def _(ctx, q, k, v, mask=None, *, scale=1.0, q_perm=IDENTITY, k_perm=IDENTITY, v_perm=IDENTITY,
      out_perm=IDENTITY, nan_rows_zero=0, kv_group=1, out_dtype=0):
    if q.dtype not in KERNEL_TYPES:
        raise UnsupportedOpError(f"{ctx.where}: attention of {q.dtype.short} is not supported "
                                 f"(rtxjit runs it for {', '.join(d.short for d in KERNEL_TYPES)})")
    out = ctx.outputs[0].permute(inverse(_perm(out_perm, "out_perm")))  # the logical [B, H, Sq, Dv] view
    b, h, sq, dv = out.shape
    ql, kl, vl = (x.permute(_perm(p, "perm")) for x, p in ((q, q_perm), (k, k_perm), (v, v_perm)))
    hkv = h // int(kv_group)
    views = [ql.broadcast_to((b, h) + ql.shape[2:]), kl.broadcast_to((b, hkv) + kl.shape[2:]),
             vl.broadcast_to((b, hkv) + vl.shape[2:]), out]
    if mask is not None:
        views.append(mask.broadcast_to((b, h, sq, kl.shape[2])))
    _launch(ctx, views, float(scale), bool(nan_rows_zero), int(kv_group))


GENERIC_ROWS = 1 << 20  # sequence length the fallback's blocks are chosen for: any (its blocks are the caps)


def _launch(ctx, views: list, scale: float, nan_rows_zero: bool = False, kv_group: int = 1) -> None:
    """Launch the kernel on ``views`` = [Q, K, V, O] (+ mask), each a logical 4-D view."""
    q, k, v, out = views[:4]
    sq, dk = q.shape[2:]
    sk, dv = v.shape[2:]
    has_mask = len(views) == 5
    src = render_attention(q.dtype, out.dtype, has_mask, wide=ctx.needs_wide(*views), nan_rows_zero=nan_rows_zero)
    args = []
    for x in views:
        args += [ctx.ptr(x), x.offset]
    args += [scale, out.shape[1], kv_group, sq, sk, dk, dv]
    for x in views:
        args += list(x.strides)
    rows = out.shape[0] * out.shape[1]
    gen = attention_config(GENERIC_ROWS, GENERIC_ROWS, dk, dv, q.dtype, ctx.interpret)  # head dims are the model's
    generic = (-(-sq // gen["BLOCK_M"]), rows), gen
    if ctx.interpret:
        cfg = attention_config(sq, sk, dk, dv, q.dtype, True)
        ctx.launch(src, (-(-sq // cfg["BLOCK_M"]), rows), args, generic=generic, **cfg)
        return
    # on a GPU the background tuner times other blocks too (the heuristic's first: it serves until then)
    choices = [((-(-sq // c["BLOCK_M"]), rows), c) for c in attention_choices(sq, sk, dk, dv, q.dtype, ctx.sm or 90)]
    ctx.launch_tuned(src, choices, args, ctx.tune_key(src, sq, sk, dk, dv, rows), generic=generic)
