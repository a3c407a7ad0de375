"""2-D convolution (NCHW) as an implicit GEMM on ``tl.dot``, per group:

    out[n, g*N + co, oh, ow] = sum_k A[m, k] * B[k, co] (+ bias[g*N + co])

with ``m = (n, oh, ow)`` flattened (``M = batch * OH * OW``), ``N`` the output channels per group
and ``k`` a tap ``(kh, kw, ci)`` (``K = C * KH * KW``, ``C`` the input channels per group).
``A`` is never built: each tile is gathered from the input on the fly, and taps that fall into the
padding are masked to zero. ``B`` is the weight, addressed through its four strides, so it may be
stored in any order: the lowering passes it pre-transposed to ``[KH, KW, C, Cout]`` (output
channels contiguous, 16-byte loads) when it is a constant. ``program_id(1)`` is the group.

Two K loops (``tap_major``):
- tap-major (the default): one loop step covers one tap ``(kh, kw)`` and ``BLOCK_K`` input
  channels. The tap and channel block come from scalar arithmetic on the step number, so the loop
  stays a single loop that Triton pipelines (``num_stages``), and the per-element work is a
  multiply-add: the row's input address and padding test depend on the tap only, not on ``ci``.
- flat: ``k`` runs over ``(ci, kh, kw)`` flattened, split per element with div/mod. Used when a
  group has few input channels (the 3-channel stem, depthwise), where a block of channels per tap
  would be mostly padding.

Every size, stride, pad and dilation is a run-time argument: one compiled kernel per dtype, bias
flag, loop kind and unit-stride set serves every shape. The epilogue is the matmul template's.
"""

from __future__ import annotations

from rtxjit.codegen.source import KernelSource, render
from rtxjit.codegen.templates.matmul import (acc_type, bias_params, epilogue, int64_suffix, k_loop, product,
                                             scaled, signature, tile_indices)
from rtxjit.codegen.dtypes import TL
from rtxjit.ir.types import DType

GEOMETRY = ["C", "H", "W", "OH", "OW", "KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
STRIDES = ["x_sn", "x_sc", "x_sh", "x_sw", "w_sco", "w_sci", "w_skh", "w_skw", "out_sn", "out_sc", "out_sh",
           "out_sw"]


def _flat_gather(unit: frozenset) -> list:
    return [
        # k -> (ci, kh, kw); the tap of output pixel m at k is x[n, g*C + ci, ih, iw]
        "        kw = rk % KW",
        "        kh = (rk // KW) % KH",
        "        ci = rk // (KW * KH)",
        "        ih = ih0[:, None] + kh[None, :] * dil_h",
        "        iw = iw0[:, None] + kw[None, :] * dil_w",
        "        a_mask = (rm[:, None] < M) & (rk[None, :] < K) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)",
        f"        a_addr = x_ptr + x_base[:, None] + ci[None, :] * x_sc + ih * x_sh + {scaled('iw', 'x_sw', unit)}",
        "        a = tl.load(a_addr, mask=a_mask, other=0.0)",
        "        b_mask = (rk[:, None] < K) & (rn[None, :] < N)",
        "        w_tap = ci * w_sci + kh * w_skh + kw * w_skw",
        f"        b = tl.load(w_ptr + w_off + {scaled('co[None, :]', 'w_sco', unit)} + w_tap[:, None], mask=b_mask,"
        " other=0.0)",
    ]


def _tap_major_loop(dtype: DType, wide: bool, unit: frozenset) -> list:
    w = int64_suffix(wide)
    a_cols = scaled("ci[None, :]", "x_sc", unit)  # channels-last input: 16-byte loads, pipelined
    return [
        f"    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={TL[acc_type(dtype)]})",
        "    m_ok = rm < M",
        "    n_ok = rn < N",
        f"    w_cols = w_ptr + w_off + {scaled('co', 'w_sco', unit)}",
        f"    rc = tl.arange(0, BLOCK_K){w}",
        "    c_steps = tl.cdiv(C, BLOCK_K)",
        "    for step in range(0, KH * KW * c_steps):",
        "        tap = step // c_steps",
        "        c0 = (step - tap * c_steps) * BLOCK_K",
        "        kh = tap // KW",
        "        kw = tap - kh * KW",
        "        ih = ih0 + kh * dil_h",
        "        iw = iw0 + kw * dil_w",
        "        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)",
        f"        a_rows = x_ptr + x_base + ih * x_sh + {scaled('iw', 'x_sw', unit)}",
        "        ci = c0 + rc",
        "        b_rows = w_cols + kh * w_skh + kw * w_skw",
        "        if EVEN_K:",
        f"            a = tl.load(a_rows[:, None] + {a_cols}, mask=row_ok[:, None], other=0.0)",
        "            b = tl.load(b_rows[None, :] + ci[:, None] * w_sci, mask=n_ok[None, :], other=0.0)",
        "        else:",
        f"            a = tl.load(a_rows[:, None] + {a_cols}, mask=row_ok[:, None] & (ci[None, :] < C),"
        " other=0.0)",
        "            b = tl.load(b_rows[None, :] + ci[:, None] * w_sci, mask=n_ok[None, :] & (ci[:, None] < C),"
        " other=0.0)",
        f"        acc = {product(dtype)}",
    ]


def _extra_addr(k: int) -> str:
    """Extra epilogue input ``k`` (an NCHW view) at the tile's pixels and output channels."""
    return f"e{k}_ptr + e{k}_off + (nb * e{k}_sn + oh * e{k}_sh + ow * e{k}_sw)[:, None] + co[None, :] * e{k}_sc"


def render_conv2d(dtype: DType, has_bias: bool, wide: bool = False, tap_major: bool = True,
                  unit: frozenset = frozenset(), fused=None) -> KernelSource:
    """The kernel for ``Conv`` over 2-D NCHW views.

    Arguments, in order: ``out, x, w`` (and ``bias``) as pointer and offset; ``M, N, K``; the
    geometry (``C`` input channels per group, ``H, W, OH, OW, KH, KW``, strides, begin pads,
    dilations); the strides of ``x``, of ``w`` (along output channels, input channels, kh, kw) and
    of ``out`` (and ``bias_sm, bias_sn``, the bias viewed as ``[M, Cout]``). Block sizes,
    ``GROUP_M`` and ``EVEN_K`` (``C`` a multiple of ``BLOCK_K``, tap-major loop only) are
    constexprs. ``unit`` names strides that are 1 for this launch (``x_sc`` for a channels-last
    input, ``x_sw``, ``w_sco``, ``out_sw``).
    """
    params = ["out_ptr", "out_off", "x_ptr", "x_off", "w_ptr", "w_off", *bias_params(has_bias)]
    params += ["M", "N", "K", *GEOMETRY, *STRIDES]
    params += ["bias_sm", "bias_sn"] if has_bias else []
    params += fused.params(["sn", "sc", "sh", "sw"]) if fused else []  # extras as NCHW views
    loop = _tap_major_loop(dtype, wide, unit) if tap_major else k_loop(_flat_gather(unit), dtype, wide)
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
        *loop,
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        f"    out_pixel = nb * out_sn + oh * out_sh + {scaled('ow', 'out_sw', unit)}",
        *epilogue("out_ptr + out_off + out_pixel[:, None] + co[None, :] * out_sc", dtype, has_bias,
                  scaled=False, cols="co", fused=fused, fused_addr=_extra_addr),
    ]
    header = f"conv2d implicit gemm in={dtype.short} bias={has_bias} loop={'tap' if tap_major else 'flat'}"
    header += fused.header() if fused else ""
    if unit:
        header += f" unit_strides={','.join(sorted(unit))}"
    return render("conv2d", header, "\n".join(lines))


def render_nchw_to_nhwc() -> KernelSource:
    """Copy a contiguous ``[N, C, H*W]`` tensor to ``[N, H*W, C]``: per image a tiled transpose of a
    ``[BLOCK_C, BLOCK_P]`` tile, read along pixels and written along channels (Triton moves the
    tile through shared memory between the two layouts, so both sides are coalesced). Arguments:
    ``y, x`` as pointer and offset, ``C, P`` (pixels) and ``x_sn``; ``program_id(1)`` is the image."""
    body = "\n".join([
        "def nchw_to_nhwc(y_ptr, y_off, x_ptr, x_off, C, P, x_sn, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):",
        "    pid = tl.program_id(0)",
        "    nb = tl.program_id(1).to(tl.int64)",
        "    grid_p = tl.cdiv(P, BLOCK_P)",
        "    rc = (pid // grid_p) * BLOCK_C + tl.arange(0, BLOCK_C)",
        "    rp = (pid % grid_p) * BLOCK_P + tl.arange(0, BLOCK_P)",
        "    mask = (rc[:, None] < C) & (rp[None, :] < P)",
        "    t = tl.load(x_ptr + x_off + nb * x_sn + rc[:, None] * P + rp[None, :], mask=mask)",
        "    tl.store(y_ptr + y_off + nb * P * C + rp[None, :] * C + rc[:, None], t, mask=mask)",
    ])
    return render("nchw_to_nhwc", "NCHW -> NHWC tiled transpose", body)
