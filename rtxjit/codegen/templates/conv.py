"""2-D convolution (NCHW) as an implicit GEMM on ``tl.dot``, per group:

    out[n, g*N + co, oh, ow] = sum_k A[m, k] * B[k, co] (+ bias[g*N + co])

with ``m = (n, oh, ow)`` flattened (``M = batch * OH * OW``), ``N`` the output channels per group
and ``k = (ci, kh, kw)`` flattened (``K = C * KH * KW``, ``C`` the input channels per group). ``B``
is the weight ``[Cout, C, KH, KW]`` read in place: it is contiguous over ``(ci, kh, kw)``, so its
K index is linear. ``A`` is never built: each tile is gathered from the input on the fly, and
taps that fall into the padding are masked to zero. ``program_id(1)`` is the group.

Every size, stride, pad and dilation is a run-time argument: one compiled kernel per dtype and
bias flag serves every shape. The K loop and the epilogue are the matmul template's.
"""

from __future__ import annotations

from rtxjit.codegen.source import KernelSource, render
from rtxjit.codegen.templates.matmul import (bias_params, epilogue, int64_suffix, k_loop, signature,
                                             tile_indices)
from rtxjit.ir.types import DType

GEOMETRY = ["C", "H", "W", "OH", "OW", "KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
STRIDES = ["x_sn", "x_sc", "x_sh", "x_sw", "w_sco", "out_sn", "out_sc", "out_sh", "out_sw"]

_GATHER = [
    # k -> (ci, kh, kw); the tap of output pixel m at k is x[n, g*C + ci, ih, iw]
    "        kw = rk % KW",
    "        kh = (rk // KW) % KH",
    "        ci = rk // (KW * KH)",
    "        ih = ih0[:, None] + kh[None, :] * dil_h",
    "        iw = iw0[:, None] + kw[None, :] * dil_w",
    "        a_mask = (rm[:, None] < M) & (rk[None, :] < K) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)",
    "        a_addr = x_ptr + x_base[:, None] + ci[None, :] * x_sc + ih * x_sh + iw * x_sw",
    "        a = tl.load(a_addr, mask=a_mask, other=0.0)",
    "        b_mask = (rk[:, None] < K) & (rn[None, :] < N)",
    "        b = tl.load(w_ptr + w_off + co[None, :] * w_sco + rk[:, None], mask=b_mask, other=0.0)",
]


def render_conv2d(dtype: DType, has_bias: bool, wide: bool = False) -> KernelSource:
    """The kernel for ``Conv`` over 2-D NCHW views.

    Arguments, in order: ``out, x, w`` (and ``bias``) as pointer and offset; ``M, N, K``; the
    geometry (``C`` input channels per group, ``H, W, OH, OW, KH, KW``, strides, begin pads,
    dilations); the strides of ``x``, of ``w`` along output channels and of ``out`` (and
    ``bias_sm, bias_sn``, the bias viewed as ``[M, Cout]``). Block sizes are constexprs.
    """
    params = ["out_ptr", "out_off", "x_ptr", "x_off", "w_ptr", "w_off", *bias_params(has_bias)]
    params += ["M", "N", "K", *GEOMETRY, *STRIDES]
    params += ["bias_sm", "bias_sn"] if has_bias else []
    lines = [
        signature("conv2d", params),
        *tile_indices(wide),
        f"    g = tl.program_id(1){int64_suffix(wide)}",
        "    co = g * N + rn",
        "    ow = rm % OW",
        "    oh = (rm // OW) % OH",
        "    nb = rm // (OW * OH)",
        "    ih0 = oh * stride_h - pad_h",
        "    iw0 = ow * stride_w - pad_w",
        "    x_base = x_off + nb * x_sn + g * C * x_sc",
        *k_loop(_GATHER, dtype, wide),
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        "    out_pixel = nb * out_sn + oh * out_sh + ow * out_sw",
        *epilogue("out_ptr + out_off + out_pixel[:, None] + co[None, :] * out_sc", dtype, has_bias,
                  scaled=False, cols="co"),
    ]
    return render("conv2d", f"conv2d implicit gemm in={dtype.short} bias={has_bias}", "\n".join(lines))
