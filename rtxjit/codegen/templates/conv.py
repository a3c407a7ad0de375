"""Convolution (NCHW / NCDHW) and transposed convolution as an implicit GEMM on ``tl.dot``, per group:

    out[n, g*N + co, (od,) oh, ow] = sum_k A[m, k] * B[k, co] (+ bias[g*N + co])

with ``m = (n, (od,) oh, ow)`` flattened (``M = batch * (OD *) OH * OW``), ``N`` the output channels
per group and ``k`` a tap ``(ci, (kd,) kh, kw)`` (``K = C * (KD *) KH * KW``, ``C`` the input channels
per group). ``A`` is never built: each tile is gathered from the input on the fly, and taps that fall
into the padding are masked to zero. ``B`` is the weight ``[Cout, C, (KD,) KH, KW]``, addressed
through its strides, so it may be stored in any order: the lowering passes it pre-transposed to
``[(KD,) KH, KW, C, Cout]`` (output channels contiguous, 16-byte loads) when it is a constant.
``program_id(1)`` is the group.

Three template options, all off for the 2-D convolution (whose source they leave as it was):
- ``depth``: a third spatial axis ``d`` before ``h`` (Conv3d); its sizes, stride, pad, dilation and
  strides are extra arguments after those of ``h``'s kind (``D, OD, KD, ...``, ``x_sd, w_skd, out_sd``).
- ``transposed`` (ConvTranspose), in gather form: output pixel ``o`` sums the input pixels ``i``
  and taps ``k`` with ``o = i * stride - pad + k * dil``, i.e. ``i = (o + pad - k * dil) / stride``
  where that divides exactly and lands inside the input. ``pad_*`` are ConvTranspose's begin pads,
  ``H, W`` the input size, ``OH, OW`` the output size, and the weight is seen in Conv's layout
  ``[Cout, C, ...]`` (the lowering rearranges ConvTranspose's ``[Cin, Cout/group, ...]``). A tap
  that does not divide is masked like a padding tap: with stride s, ``1 - 1/s`` of each axis's taps
  multiply zeros (correct first; a sub-pixel split into s^d ordinary convolutions would skip them).
- ``upsample`` (rtxjit.UpsampleConv: a Conv of a nearest integer-factor upsampling of ``x``, see
  passes/fuse_upsample_conv.py): a factor per spatial axis, written into the source. The geometry
  (``H, W``) is the upsampled input's, so taps, padding tests and output sizes are the Conv's; only
  the address divides: upsampled pixel ``ih`` is input pixel ``ih // f``. The upsampled tensor
  (``f^d`` times the input) is never written or read: a diffusion UNet's Upsample2D reads its
  input once per tap instead. Not combined with ``transposed``.

Two K loops (``tap_major``):
- tap-major (the default): one loop step covers one tap ``((kd,) kh, kw)`` and ``BLOCK_K`` input
  channels. The tap and channel block come from scalar arithmetic on the step number, so the loop
  stays a single loop that Triton pipelines (``num_stages``), and the per-element work is a
  multiply-add: the row's input address and padding test depend on the tap only, not on ``ci``.
- flat: ``k`` runs over ``(ci, (kd,) kh, kw)`` flattened, split per element with div/mod. Used when a
  group has few input channels (the 3-channel stem, depthwise), where a block of channels per tap
  would be mostly padding.

Depthwise (``depthwise``: one input and one output channel per group, MobileNet / EfficientNet /
ConvNeXt): no dot. A GEMM per group would be ``N = 1`` wide, padded to 16 columns, with one program
per group and pixel block. Instead the tile's columns are channels (``N`` is ``Cout``,
``program_id(1)`` is 0): each tap loads a ``[BLOCK_M pixels, BLOCK_N channels]`` tile of the input
and the taps' weights of those channels, and multiply-adds in the accumulator type; the epilogue is
the same (a tile of pixels x output channels).

Every size, stride, pad and dilation is a run-time argument: one compiled kernel per dtype, bias
flag, loop kind, unit-stride set and the two options serves every shape. The epilogue is the
matmul template's.
"""

from __future__ import annotations

from rtxjit.codegen.source import KernelSource, memoized, render
from rtxjit.codegen.templates.matmul import (acc_type, bias_params, epilogue, int64_suffix, k_loop, product,
                                             scaled, signature, split_fixup, split_sum, tile_indices)
from rtxjit.codegen.templates.quant_gemm import QuantConv, int8_operand
from rtxjit.codegen.dtypes import TL
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType


def _geometry(axes: str) -> list:
    """``C``, then per spatial axis its input size, output size, kernel size, stride, begin pad and
    dilation, each group in axis order (``H, W, OH, OW, KH, KW, stride_h, ...`` for 2-D)."""
    big = [a.upper() for a in axes]
    return (["C", *big, *(f"O{a}" for a in big), *(f"K{a}" for a in big)]
            + [f"{kind}_{a}" for kind in ("stride", "pad", "dil") for a in axes])


def _strides(axes: str) -> list:
    """The strides of ``x``, of ``w`` (along output channels, input channels, then the kernel axes)
    and of ``out``, each in dim order."""
    return ([f"x_s{a}" for a in "nc" + axes] + ["w_sco", "w_sci"] + [f"w_sk{a}" for a in axes]
            + [f"out_s{a}" for a in "nc" + axes])


def _split(index: str, axes: str, prefix: str, size: str, rest: str) -> list:
    """Lines that split a flat ``index`` (row-major over ``rest`` then ``axes``) into
    ``{prefix}{a}`` per axis (innermost first) and ``rest``: ``kw = rk % KW``, ``kh = (rk // KW) % KH``,
    ``ci = rk // (KW * KH)``."""
    lines, inner = [], []
    for a in reversed(axes):
        if not inner:
            div = index
        elif len(inner) == 1:
            div = f"({index} // {inner[0]})"
        else:
            div = f"({index} // ({' * '.join(inner)}))"
        lines.append(f"{prefix}{a} = {div} % {size}{a.upper()}")
        inner.append(f"{size}{a.upper()}")
    tail = inner[0] if len(inner) == 1 else f"({' * '.join(inner)})"
    return lines, f"{index} // {tail}"


def _tap_rows(axes: str, transposed: bool, base: str, tap: str) -> tuple:
    """Lines giving the input position ``i{a}`` of each axis for tap ``k{a}`` from the per-row base
    ``i{a}0`` (``t{a}0`` when transposed), ``[:, None]``/``[None, :]`` per ``base``/``tap``, and the
    position's validity test."""
    lines, tests = [], []
    for a in axes:
        if transposed:
            lines += [f"t{a} = t{a}0{base} - k{a}{tap} * dil_{a}", f"i{a} = t{a} // stride_{a}"]
            tests.append(f"(t{a} >= 0) & (i{a} * stride_{a} == t{a}) & (i{a} < {a.upper()})")
        else:
            lines.append(f"i{a} = i{a}0{base} + k{a}{tap} * dil_{a}")
            tests.append(f"(i{a} >= 0) & (i{a} < {a.upper()})")
    return lines, " & ".join(tests)


def _input_offset(axes: str, unit: frozenset, upsample: tuple = None) -> str:
    """``id * x_sd + ih * x_sh + iw * x_sw`` (the last scaled by its stride unless it is 1); with
    ``upsample``, each index is the upsampled input's, divided by its axis's factor
    (``(ih // 2) * x_sh``)."""
    index = {a: f"i{a}" for a in axes}
    for a, f in zip(axes, upsample or ()):
        if f != 1:
            index[a] = f"(i{a} // {f})"
    terms = [f"{index[a]} * x_s{a}" for a in axes[:-1]] + [scaled(index[axes[-1]], f"x_s{axes[-1]}", unit)]
    return " + ".join(terms)


def _flat_gather(axes: str, transposed: bool, unit: frozenset, upsample: tuple = None, pad: str = "0.0") -> list:
    split, ci = _split("rk", axes, "k", "K", "ci")
    rows, valid = _tap_rows(axes, transposed, "[:, None]", "[None, :]")
    w_tap = " + ".join(["ci * w_sci"] + [f"k{a} * w_sk{a}" for a in axes])
    return [
        # k -> (ci, kh, kw); the tap of output pixel m at k is x[n, g*C + ci, ih, iw]
        *(f"        {line}" for line in split),
        f"        ci = {ci}",
        *(f"        {line}" for line in rows),
        f"        a_mask = (rm[:, None] < M) & (rk[None, :] < K) & {valid}",
        f"        a_addr = x_ptr + x_base[:, None] + ci[None, :] * x_sc + {_input_offset(axes, unit, upsample)}",
        f"        a = tl.load(a_addr, mask=a_mask, other={pad})",
        "        b_mask = (rk[:, None] < K) & (rn[None, :] < N)",
        f"        w_tap = {w_tap}",
        f"        b = tl.load(w_ptr + w_off + {scaled('co[None, :]', 'w_sco', unit)} + w_tap[:, None], mask=b_mask,"
        " other=0.0)",
    ]


def _tap_split(axes: str) -> list:
    """Loop-body lines that split ``tap`` into ``k{a}`` per axis with scalar arithmetic."""
    if axes == "hw":
        return ["        kh = tap // KW", "        kw = tap - kh * KW"]
    return ["        kd = tap // (KH * KW)", "        khw = tap - kd * (KH * KW)",
            "        kh = khw // KW", "        kw = khw - kh * KW"]


def _tap_major_loop(dtype: DType, wide: bool, unit: frozenset, axes: str, transposed: bool,
                    upsample: tuple = None, quant: QuantConv = None, split: bool = False) -> list:
    w = int64_suffix(wide)
    acc, pad, to_operands, step = _arithmetic(dtype, quant)
    a_cols = scaled("ci[None, :]", "x_sc", unit)  # channels-last input: 16-byte loads, pipelined
    taps = " * ".join(f"K{a.upper()}" for a in axes)
    rows, valid = _tap_rows(axes, transposed, "", "")
    b_rows = " + ".join(["w_cols"] + [f"k{a} * w_sk{a}" for a in axes])
    return [
        f"    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc})",
        "    m_ok = rm < M",
        "    n_ok = rn < N",
        f"    w_cols = w_ptr + w_off + {scaled('co', 'w_sco', unit)}",
        f"    rc = tl.arange(0, BLOCK_K){w}",
        "    c_steps = tl.cdiv(C, BLOCK_K)",
        *([f"    step_lo = split * split_taps * c_steps",  # split-K: this program's taps, all their channels
           f"    step_hi = tl.minimum({taps} * c_steps, step_lo + split_taps * c_steps)",
           "    for step in range(step_lo, step_hi):"] if split else
          [f"    for step in range(0, {taps} * c_steps):"]),
        "        tap = step // c_steps",
        "        c0 = (step - tap * c_steps) * BLOCK_K",
        *_tap_split(axes),
        *(f"        {line}" for line in rows),
        f"        row_ok = m_ok & {valid}",
        f"        a_rows = x_ptr + x_base + {_input_offset(axes, unit, upsample)}",
        "        ci = c0 + rc",
        f"        b_rows = {b_rows}",
        "        if EVEN_K:",
        f"            a = tl.load(a_rows[:, None] + {a_cols}, mask=row_ok[:, None], other={pad})",
        "            b = tl.load(b_rows[None, :] + ci[:, None] * w_sci, mask=n_ok[None, :], other=0.0)",
        "        else:",
        f"            a = tl.load(a_rows[:, None] + {a_cols}, mask=row_ok[:, None] & (ci[None, :] < C),"
        f" other={pad})",
        "            b = tl.load(b_rows[None, :] + ci[:, None] * w_sci, mask=n_ok[None, :] & (ci[:, None] < C),"
        " other=0.0)",
        *to_operands,
        f"        acc = {step}",
    ]


def _depthwise_loop(dtype: DType, unit: frozenset, axes: str, upsample: tuple = None) -> list:
    """The tap loop of a depthwise conv: per tap a ``[BLOCK_M, BLOCK_N]`` input tile (pixels x
    channels, ``x_base`` per pixel) times the tap's weight per channel (``[BLOCK_N]``)."""
    acc = TL[acc_type(dtype)]
    taps = " * ".join(f"K{a.upper()}" for a in axes)
    rows, valid = _tap_rows(axes, False, "", "")
    w_tap = " + ".join(f"k{a} * w_sk{a}" for a in axes)
    return [
        f"    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc})",
        "    m_ok = rm < M",
        "    n_ok = rn < N",
        f"    x_cols = {scaled('co', 'x_sc', unit)}",
        f"    w_cols = w_ptr + w_off + {scaled('co', 'w_sco', unit)}",
        f"    for tap in range(0, {taps}):",
        *_tap_split(axes),
        *(f"        {line}" for line in rows),
        f"        row_ok = m_ok & {valid}",
        f"        a_rows = x_ptr + x_base + {_input_offset(axes, unit, upsample)}",
        "        a = tl.load(a_rows[:, None] + x_cols[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)",
        f"        b = tl.load(w_cols + {w_tap}, mask=n_ok, other=0.0)",
        f"        acc += a.to({acc}) * b.to({acc})[None, :]",
    ]


def _arithmetic(dtype: DType, quant: QuantConv = None) -> tuple:
    """``(accumulator type, the value of an activation tap in the padding, loop-body lines making
    the loaded tiles the dot's operands, the K step)``: fp32 (fp64) accumulation of ``dtype``
    operands padded with 0, or with ``quant`` an int8 dot into int32, padded with the activation's
    zero point (see templates/quant_gemm.QuantConv)."""
    if quant is None:
        return TL[acc_type(dtype)], "0.0", [], product(dtype)
    # out_dtype: triton 3.6 asserts the accumulator is out_dtype (default fp32) for int8 operands too
    return "tl.int32", "a_pad", int8_operand(quant.a_dtype), "tl.dot(a, b, acc, out_dtype=tl.int32)"


def _flat_loop(dtype: DType, wide: bool, unit: frozenset, axes: str, transposed: bool, upsample: tuple = None,
               quant: QuantConv = None) -> list:
    """The flat K loop: the matmul template's, with Conv's gather as its tile loads."""
    acc, pad, to_operands, step = _arithmetic(dtype, quant)
    loop = k_loop(_flat_gather(axes, transposed, unit, upsample, pad) + to_operands, dtype, wide)
    if quant is not None:  # the accumulator and the step of the int8 dot
        loop[0] = f"    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc})"
        loop[-1] = f"        acc = {step}"
    return loop


def _pixel(axes: str, stride: str, unit: frozenset = frozenset(), last: str = None) -> str:
    """``nb * {stride}n + od * {stride}d + oh * {stride}h + ow * {stride}w``."""
    terms = [f"nb * {stride}n"] + [f"o{a} * {stride}{a}" for a in axes[:-1]]
    a = axes[-1]
    terms.append(scaled(f"o{a}", f"{stride}{a}", unit) if last is None else f"o{a} * {stride}{a}")
    return " + ".join(terms)


@memoized
def render_conv2d(dtype: DType, has_bias: bool, wide: bool = False, tap_major: bool = True,
                  unit: frozenset = frozenset(), fused=None, depth: bool = False,
                  transposed: bool = False, upsample: tuple = None, quant: QuantConv = None,
                  depthwise: bool = False, split: bool = False, fixup: bool = False) -> KernelSource:
    """The kernel for ``Conv`` over 2-D NCHW views (3-D NCDHW ones with ``depth``; ConvTranspose's
    gather form with ``transposed``; the Conv of ``x`` upsampled by ``upsample``, a factor per
    spatial axis, nearest: ``None`` or all 1 for none).

    Arguments, in order: ``out, x, w`` (and ``bias``) as pointer and offset; ``M, N, K``; the
    geometry (``C`` input channels per group, ``H, W, OH, OW, KH, KW``, strides, begin pads,
    dilations: ``D``, ``OD``, ... first in each group with ``depth``); the strides of ``x``, of
    ``w`` (along output channels, input channels, (kd,) kh, kw) and of ``out`` (and ``bias_sm,
    bias_sn``, the bias viewed as ``[M, Cout]``). Block sizes, ``GROUP_M`` and ``EVEN_K`` (``C`` a
    multiple of ``BLOCK_K``, tap-major loop only) are constexprs. ``unit`` names strides that are 1
    for this launch (``x_sc`` for a channels-last input, ``x_sw``, ``w_sco``, ``out_sw``).

    ``quant`` (a ``QuantConv``): int8 / uint8 ``x`` and int8 ``w`` multiply into an int32
    accumulator, padding taps read the activation's zero point, and the epilogue scales per output
    channel, adds the bias and requantizes (``scaled_epilogue``); its arguments (``QuantConv.params``)
    follow the bias strides. Not combined with ``transposed``, ``upsample`` or ``fused``.

    ``depthwise``: ``C`` and the output channels per group are 1; ``N`` is then all output channels
    (the module docstring), ``K`` the taps, and the launch has one program along ``program_id(1)``.
    Not combined with ``transposed`` or ``quant``.

    ``split`` (split-K, one group, tap-major loop, no bias or fused epilogue): program
    ``(tile, 0, s)`` sums taps ``[s * split_taps, (s + 1) * split_taps)`` (all their channels) and
    stores the fp32 tile into ``out`` as a contiguous ``[splits, M, N]`` workspace; the second
    kernel (``render_conv_split_sum``) adds the splits and runs the epilogue. One extra argument,
    ``split_taps``, after the strides. A conv with few output tiles (a 3x3 conv at 14 x 14 pixels:
    16 tiles of 64 x 64 on 132 SMs) then fills the GPU.

    ``fixup`` (with ``split``; bias and fused epilogue allowed, ``out`` the conv's output): the
    workspace and the tiles' arrival counters are two more operands, ``ws_ptr, ws_off, sem_ptr,
    sem_off`` after the bias's; the last split of a tile to arrive adds the partials and runs the
    epilogue (templates/matmul.split_fixup): one launch.
    """
    axes = "dhw" if depth else "hw"
    if upsample is not None and all(f == 1 for f in upsample):
        upsample = None
    if upsample is not None and (transposed or len(upsample) != len(axes)
                                 or not all(isinstance(f, int) and f >= 1 for f in upsample)):
        raise InternalError(f"conv template: upsample {upsample} needs a positive integer per spatial axis "
                            f"({len(axes)}) and no transposed form")
    if quant is not None and (transposed or upsample is not None or fused is not None):
        raise InternalError("conv template: quant is not combined with transposed, upsample or a fused epilogue")
    name = f"conv{'_transpose' if transposed else ''}{len(axes)}d"
    params = ["out_ptr", "out_off", "x_ptr", "x_off", "w_ptr", "w_off", *bias_params(has_bias)]
    params += ["ws_ptr", "ws_off", "sem_ptr", "sem_off"] if fixup else []
    params += ["M", "N", "K", *_geometry(axes), *_strides(axes)]
    params += ["bias_sm", "bias_sn"] if has_bias else []
    params += quant.params(axes) if quant else []
    params += fused.params([f"s{a}" for a in "nc" + axes]) if fused else []  # extras as NC(D)HW views
    params += ["split_taps"] if split else []
    if depthwise and (transposed or quant is not None):
        raise InternalError("conv template: depthwise is not combined with transposed or quant")
    if split and (not tap_major or depthwise or transposed or quant is not None
                  or (not fixup and (fused is not None or has_bias))):
        raise InternalError("conv template: split-K runs the tap-major loop, with a bias or fused epilogue only "
                            "with the fix-up")
    if fixup and not split:
        raise InternalError("conv template: the fix-up is split-K's")
    if depthwise:
        loop = _depthwise_loop(dtype, unit, axes, upsample)
    elif tap_major:
        loop = _tap_major_loop(dtype, wide, unit, axes, transposed, upsample, quant, split)
    else:
        loop = _flat_loop(dtype, wide, unit, axes, transposed, upsample, quant)
    pixel_lines, nb = _split("rm", axes, "o", "O", "nb")
    if transposed:  # i = (o + pad - k * dil) / stride
        bases = [f"    t{a}0 = o{a} + pad_{a}" for a in axes]
    else:
        bases = [f"    i{a}0 = o{a} * stride_{a} - pad_{a}" for a in axes]
    # a depthwise launch has one program along program_id(1): without it in the addresses, Triton
    # knows the input rows are 16-byte aligned (channels-last: C is 1, and an unknown group id made
    # every tap's tile 16 scalar 2-byte loads a thread on sm_90 instead of 16-byte vector loads)
    group = [] if depthwise else [f"    g = tl.program_id(1){int64_suffix(wide)}"]
    lines = [
        signature(name, params),
        *tile_indices(wide),
        *group,
        *([f"    split = tl.program_id(2){int64_suffix(wide)}"] if split else []),
        "    co = rn" if depthwise else "    co = g * N + rn",
        *(f"    {line}" for line in pixel_lines),
        f"    nb = {nb}",
        *bases,
        "    x_base = x_off + nb * x_sn" if depthwise else "    x_base = x_off + nb * x_sn + g * C * x_sc",
        *loop,
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        f"    out_pixel = {_pixel(axes, 'out_s', unit)}",
    ]
    out_addr = "out_ptr + out_off + out_pixel[:, None] + co[None, :] * out_sc"
    if split and fixup:
        lines += split_fixup(2, epilogue(out_addr, dtype, has_bias, scaled=False, cols="co", fused=fused,
                                         fused_addr=lambda k: _extra_addr(k, axes)))
    elif split:  # fp32 partials to the [splits, M, N] workspace
        lines.append("    tl.store(out_ptr + out_off + (split * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)")
    elif quant is None:
        lines += epilogue(out_addr, dtype, has_bias, scaled=False, cols="co", fused=fused,
                          fused_addr=lambda k: _extra_addr(k, axes))
    else:
        lines += quant.epilogue(out_addr, has_bias, _tile_addr("res", axes))
    kind = "implicit gemm (gather)" if transposed else "direct" if depthwise else "implicit gemm"
    loop_kind = "depthwise" if depthwise else "tap" if tap_major else "flat"
    header = f"{name} {kind} in={dtype.short} bias={has_bias} loop={loop_kind}"
    header += fused.header() if fused else ""
    header += quant.header() if quant else ""
    if upsample is not None:
        header += f" upsample={'x'.join(str(f) for f in upsample)}"
    if split:
        header += " split_k fixup" if fixup else " split_k"
    if unit:
        header += f" unit_strides={','.join(sorted(unit))}"
    return render(name, header, "\n".join(lines))


@memoized
def render_conv_split_sum(dtype: DType, has_bias: bool, wide: bool = False, unit: frozenset = frozenset(),
                          fused=None, depth: bool = False) -> KernelSource:
    """The second kernel of a split-K convolution: ``out = sum over s of ws[s]`` (in split order,
    the same bits on every run), then the conv's epilogue (bias, fused program) at the conv's
    output addresses. Arguments: ``out, ws`` (and ``bias``) as pointer and offset; ``M, N,
    splits``; the output sizes ``(OD,) OH, OW``; the strides of ``out`` (and ``bias_sm, bias_sn``);
    the fused epilogue's. Tiles as the conv's (``BLOCK_M`` pixels x ``BLOCK_N`` channels)."""
    axes = "dhw" if depth else "hw"
    name = f"conv{len(axes)}d_split_sum"
    params = ["out_ptr", "out_off", "ws_ptr", "ws_off", *bias_params(has_bias), "M", "N", "splits"]
    params += [f"O{a.upper()}" for a in axes] + [f"out_s{a}" for a in "nc" + axes]
    params += ["bias_sm", "bias_sn"] if has_bias else []
    params += fused.params([f"s{a}" for a in "nc" + axes]) if fused else []
    pixel_lines, nb = _split("rm", axes, "o", "O", "nb")
    lines = [
        signature(name, params),
        *tile_indices(wide),
        "    co = rn",
        *(f"    {line}" for line in pixel_lines),
        f"    nb = {nb}",
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        *split_sum(),
        f"    out_pixel = {_pixel(axes, 'out_s', unit)}",
        *epilogue("out_ptr + out_off + out_pixel[:, None] + co[None, :] * out_sc", dtype, has_bias, scaled=False,
                  cols="co", fused=fused, fused_addr=lambda k: _extra_addr(k, axes)),
    ]
    header = f"{name} out={dtype.short} bias={has_bias}" + (fused.header() if fused else "")
    if unit:
        header += f" unit_strides={','.join(sorted(unit))}"
    return render(name, header, "\n".join(lines))


def _extra_addr(k: int, axes: str) -> str:
    """Extra epilogue input ``k`` (an NC(D)HW view) at the tile's pixels and output channels."""
    return _tile_addr(f"e{k}", axes)


def _tile_addr(name: str, axes: str) -> str:
    """The NC(D)HW view ``name`` (``{name}_ptr``, ``_off``, ``_sn``, ...) at the tile's pixels and
    output channels."""
    return f"{name}_ptr + {name}_off + ({_pixel(axes, f'{name}_s', last='plain')})[:, None] + co[None, :] * {name}_sc"


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
