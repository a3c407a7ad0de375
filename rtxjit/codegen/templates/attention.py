"""Fused attention, flash-attention style: ``out = softmax(scale * Q @ K^T + mask) @ V``.

One program computes a ``[BLOCK_M, D_V]`` block of query rows for one (batch, head) pair:
``program_id(0)`` walks the query blocks, ``program_id(1)`` the ``B * H`` pairs. It loops over
``BLOCK_N`` key/value rows at a time with an *online softmax*: a running row maximum ``m_i`` and
row sum ``l_i`` rescale the accumulator whenever the maximum grows, so the ``[Sq, Sk]`` scores never
reach memory. Statistics and the accumulator are fp32. Exponentials are base 2 (``exp2``), with
``log2(e)`` folded into the scale and the mask.

Every operand is a strided view ``(ptr, offset, strides for batch, head, seq, dim)``: a transpose
is swapped strides and a broadcast dim (a ``[B, 1, 1, Sk]`` mask, a shared head) a zero stride.
Sizes are run-time arguments; the head dims are padded to the constexpr power-of-two blocks
``BLOCK_DK`` / ``BLOCK_DV`` with load masks. The source depends only on the dtypes, whether there
is a mask, and 64-bit indexing, so one compiled kernel serves every shape.

fp32 operands multiply with ``input_precision="ieee"`` (the GPU default, tf32, keeps too few
mantissa bits for fp32's tolerance); fp16 / bf16 use the default (tensor cores). The
probabilities are cast to V's dtype before the second product, as an unfused graph would store
them.

Masks and non-finite values, as the unfused graph computes them:
- With a mask, scores stay in natural units (``scale * q.k + mask``) and only the difference to the
  row maximum is multiplied by ``log2(e)``: the most negative finite float, which Hugging Face uses
  for padding, times ``log2(e)`` would overflow to ``-inf`` and turn a fully masked row into 0 / 0.
  A row whose keys are all masked by ``finfo.min`` thus averages V uniformly, as onnxruntime does.
- A row whose scores are all ``-inf`` gives NaN, as the unfused reference does (0 / 0); a row that
  is ``-inf`` only in some key blocks is exact, because the maximum used to shift the exponentials
  is replaced by 0 while it is still ``-inf`` (``exp2(-inf - -inf)`` would be NaN).
- ``nan_rows_zero``: the graph replaced NaN probabilities by 0 (``Where(IsNaN(p), 0, p)``, how
  torch exports scaled_dot_product_attention with a boolean mask); a row whose softmax is NaN (all
  keys masked by ``-inf``, or a NaN score) then gives 0. Its normalizer is 0 or NaN exactly then.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.source import KernelSource, memoized, render
from rtxjit.ir.types import DType

LOG2E = 1.4426950408889634
OPERANDS = ("q", "k", "v", "out")
BLOCKS = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_DK: tl.constexpr",
          "BLOCK_DV: tl.constexpr"]


def _strides(name: str) -> list:
    return [f"{name}_sb", f"{name}_sh", f"{name}_ss", f"{name}_sd"]


def _params(has_mask: bool) -> list:
    """Kernel parameters, in the launch order that ``attention_args`` follows."""
    params = []
    for name in OPERANDS + (("mask",) if has_mask else ()):
        params += [f"{name}_ptr", f"{name}_off"]
    params += ["scale", "H", "KV_GROUP", "SQ", "SK", "DK", "DV"]
    for name in OPERANDS:
        params += _strides(name)
    if has_mask:
        params += ["mask_sb", "mask_sh", "mask_sq", "mask_sk"]
    return params + BLOCKS


def _signature(params: list, width: int = 100) -> str:
    """``def attention(params...):`` wrapped between parameters to a readable width."""
    head = "def attention("
    lines, line = [], head
    for i, p in enumerate(params):
        piece = p + ("):" if i == len(params) - 1 else ",")
        if len(line) + len(piece) + 1 > width and line.strip() != head.strip():
            lines.append(line.rstrip())
            line = " " * len(head)
        line += piece + " "
    return "\n".join(lines + [line.rstrip()])


def _dot(a: str, b: str, dtype: DType, acc: str = "") -> str:
    args = f"{a}, {b}" + (f", {acc}" if acc else "")
    if dtype is DType.FP32:
        return f'tl.dot({args}, input_precision="ieee")'
    return f"tl.dot({args})"


def _cast(name: str, dtype: DType) -> str:
    return name if dtype is DType.FP32 else f"{name}.to({TL[dtype]})"


def _prologue(has_mask: bool, wide: bool) -> list:
    """Index vectors, and each operand's offset moved to this program's (batch, head)."""
    w = ".to(tl.int64)" if wide else ""
    lines = [
        f"    bh = tl.program_id(1){w}",
        "    b = bh // H",
        "    h = bh % H",
        "    hkv = h // KV_GROUP",
        f"    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M){w}",
        f"    rn0 = tl.arange(0, BLOCK_N){w}",
        f"    rdk = tl.arange(0, BLOCK_DK){w}",
        f"    rdv = tl.arange(0, BLOCK_DV){w}",
    ]
    for name in OPERANDS:
        head = "hkv" if name in ("k", "v") else "h"
        lines.append(f"    {name}_off = {name}_off + b * {name}_sb + {head} * {name}_sh")
    if has_mask:
        lines.append("    mask_off = mask_off + b * mask_sb + h * mask_sh")
    return lines


def _key_block(dtype: DType, has_mask: bool) -> list:
    """The loop over key/value blocks: scores, online softmax update, and ``acc += p @ v``."""
    lines = [
        "    for n0 in range(0, SK, BLOCK_N):",
        "        rn = n0 + rn0",
        "        kt_mask = (rdk[:, None] < DK) & (rn[None, :] < SK)",
        "        kt = tl.load(k_ptr + k_off + rdk[:, None] * k_sd + rn[None, :] * k_ss, mask=kt_mask, other=0.0)",
        f"        s = {_dot('q', 'kt', dtype)} * qk_scale",
    ]
    # Without a mask, scores are in base-2 units (log2(e) folded into qk_scale); with one, in
    # natural units until the difference to the row maximum (see the module's docstring).
    to2 = f" * {LOG2E!r}" if has_mask else ""
    if has_mask:
        lines += [
            "        s_mask = (rm[:, None] < SQ) & (rn[None, :] < SK)",
            "        bias = tl.load(mask_ptr + mask_off + rm[:, None] * mask_sq + rn[None, :] * mask_sk,",
            "                       mask=s_mask, other=0.0)",
            "        s = s + bias.to(tl.float32)",
        ]
    lines += [
        "        s = tl.where(rn[None, :] < SK, s, float('-inf'))",
        "        m_new = tl.maximum(m_i, tl.max(s, 1))",
        "        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)",
        f"        p = tl.exp2((s - m_safe[:, None]){to2})",
        f"        alpha = tl.exp2((m_i - m_safe){to2})",
        "        l_i = l_i * alpha + tl.sum(p, 1)",
        "        v_mask = (rn[:, None] < SK) & (rdv[None, :] < DV)",
        "        v = tl.load(v_ptr + v_off + rn[:, None] * v_ss + rdv[None, :] * v_sd, mask=v_mask, other=0.0)",
        f"        acc = {_dot(_cast('p', dtype), 'v', dtype, 'acc * alpha[:, None]')}",
        "        m_i = m_new",
    ]
    return lines


@memoized
def render_attention(dtype: DType, out_dtype: DType, has_mask: bool, wide: bool = False,
                     nan_rows_zero: bool = False) -> KernelSource:
    """The fused attention kernel for Q/K/V of ``dtype`` writing ``out_dtype``.

    Arguments, in order: ``q, k, v, out`` (and ``mask``) as pointer and offset; ``scale``; the head
    count ``H`` (``program_id(1)`` is ``b * H + h``); ``KV_GROUP`` (query heads per K/V head: K and V
    are read at head ``h // KV_GROUP``, grouped-query attention); ``SQ, SK, DK, DV``; the batch, head, sequence
    and dim strides of ``q, k, v, out`` (K's sequence stride first: K is ``[B, H, Sk, DK]``, not
    transposed); then the mask's batch, head, query and key strides. Block sizes are constexprs.
    ``nan_rows_zero``: a row whose softmax is NaN gives 0 (see the module's docstring).
    """
    lines = [
        _signature(_params(has_mask)),
        *_prologue(has_mask, wide),
        "    q_mask = (rm[:, None] < SQ) & (rdk[None, :] < DK)",
        "    q = tl.load(q_ptr + q_off + rm[:, None] * q_ss + rdk[None, :] * q_sd, mask=q_mask, other=0.0)",
        "    qk_scale = scale" + ("" if has_mask else f" * {LOG2E!r}"),
        "    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)",
        "    l_i = tl.zeros([BLOCK_M], tl.float32)",
        "    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)",
        *_key_block(dtype, has_mask),
        "    y = tl.where(l_i[:, None] > 0.0, acc / l_i[:, None], 0.0)" if nan_rows_zero else
        "    y = acc / l_i[:, None]",
        "    out_mask = (rm[:, None] < SQ) & (rdv[None, :] < DV)",
        f"    tl.store(out_ptr + out_off + rm[:, None] * out_ss + rdv[None, :] * out_sd, y.to({TL[out_dtype]}),",
        "             mask=out_mask)",
    ]
    header = (f"attention in={dtype.short} out={out_dtype.short} mask={has_mask} wide={wide}"
              f"{' nan_rows_zero' if nan_rows_zero else ''}")
    return render("attention", header, "\n".join(lines))


def attention_config(sq: int, sk: int, dk: int, dv: int, dtype: DType, interpret: bool) -> dict:
    """Block sizes (and warps): powers of two, at least 16 (the smallest ``tl.dot`` tile).

    The head dims are padded to one block each. On the GPU a 64x64 block of query x key rows is a
    moderate default for every SM (32 key rows for fp32 heads wider than 64, to keep the shared
    memory of the pipelined K/V tiles within bounds); the interpreter pays per program, not per
    element, so it gets blocks of up to 128 rows.
    """
    cap_m, cap_n = (128, 128) if interpret else (64, 64)
    if not interpret and dtype is DType.FP32 and max(dk, dv) > 64:
        cap_n = 32
    return {
        "BLOCK_M": max(16, min(cap_m, _next_pow2(sq))),
        "BLOCK_N": max(16, min(cap_n, _next_pow2(sk))),
        "BLOCK_DK": max(16, _next_pow2(dk)),
        "BLOCK_DV": max(16, _next_pow2(dv)),
        "num_warps": 4 if max(dk, dv) <= 64 else 8,
    }


# Other (query rows, key rows) blocks the background tuner times beside ``attention_config``'s: fewer
# query rows for more programs where sequences are short and the batch small (bert-base at batch 1 and
# 128 tokens is 2 x 12 programs of 64 rows on an H100's 132 SMs), more for long ones.
TUNE_BLOCKS = ((16, 64), (32, 64), (32, 32), (128, 64), (64, 128))
SMEM_LIMIT = {9: 227 * 1024, 8: 163 * 1024}  # per block, by SM major (sm_90, sm_80); 99 KB elsewhere


def attention_choices(sq: int, sk: int, dk: int, dv: int, dtype: DType, sm: int = 90) -> list:
    """``attention_config``'s configuration first, then the other blocks of ``TUNE_BLOCKS`` that
    differ from it once capped to the sequences, keep fp32's 32 key rows for heads wider than 64,
    and whose Q, K and V tiles (K and V double-buffered) fit the SM's shared memory."""
    base = attention_config(sq, sk, dk, dv, dtype, False)
    out = [base]
    limit = SMEM_LIMIT.get(sm // 10, 99 * 1024)
    for bm, bn in TUNE_BLOCKS:
        cfg = dict(base, BLOCK_M=max(16, min(bm, _next_pow2(sq))), BLOCK_N=max(16, min(bn, _next_pow2(sk))))
        if dtype is DType.FP32 and max(dk, dv) > 64 and cfg["BLOCK_N"] > 32:
            continue
        tiles = cfg["BLOCK_M"] * cfg["BLOCK_DK"] + 2 * cfg["BLOCK_N"] * (cfg["BLOCK_DK"] + cfg["BLOCK_DV"])
        if tiles * dtype.itemsize > limit or cfg in out:
            continue
        out.append(cfg)
    return out


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
