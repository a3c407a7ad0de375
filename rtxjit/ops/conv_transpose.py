"""ConvTranspose over 1, 2 and 3 spatial dims, on the conv template's gather form.

ConvTranspose scatters each input pixel ``i`` through each tap ``k`` to the output pixel
``o = i * stride - pad_begin + k * dilation``. Run as a gather instead, each output pixel sums the
(input pixel, tap) pairs that hit it: ``i = (o + pad_begin - k * dilation) / stride`` where that
divides exactly and lands in the input. That is an implicit GEMM like Conv's, with a different
input address and validity test per tap, so it runs on the same template (``transposed=True`` in
``render_conv2d``) with its tiles, both K loops, channels-last inputs, bias and epilogue, and every
attribute comes down to the begin pads and the output size.

Why the gather form and not "zero-inserted input, then a Conv with the flipped weight": the gather
form works for any weight (constant or computed), needs no zero-inserted copy of the input
(``stride^d`` times its size), and has no write conflicts (each output element is one program's).
Its cost is the taps that do not divide: with stride s a tile multiplies ``1 - 1/s`` of each axis's
taps by masked zeros (s^d times the useful MACs). A sub-pixel split (s^d ordinary convolutions, one
per output phase, each with its own sub-kernel) would skip them; that is the next step where
ConvTranspose is hot (decoders, U-Nets).

The weight ``[Cin, Cout/group, *kernel]`` is rearranged to Conv's ``[Cout, Cin/group, *kernel]``:
on the host for a constant weight (uploaded in the kernel's preferred order, as Conv's is), as a view
for one group, and with a device copy otherwise.
"""

from __future__ import annotations

import itertools

import numpy as np

from rtxjit.errors import ModelError, ShapeError
from rtxjit.ir.registry import Kind, Rand, Sample, op
from rtxjit.ir.types import TensorType
from rtxjit.ops.conv import (WindowGeometry, channels_last_output, check_operands, dense_weight, emit_conv,
                             pointwise_gemm, window_attrs)
from rtxjit.ops.matmul import check_dot_type


def _axis(size, k, s: int, d: int, out_pad: int, pb: int, pe: int, want, auto_pad: str) -> tuple:
    """(output size, pad before, pad after) of one spatial axis, as ONNX's ConvTranspose defines them:
    ``out = s * (size - 1) + out_pad + (k - 1) * d + 1 - pb - pe``; where the output size is given
    (``output_shape``, or ``size * s`` for SAME_*), the pads are generated from it, the larger half
    at the end for SAME_UPPER and at the beginning otherwise."""
    if want is None and auto_pad.startswith("SAME"):
        want = size * s if isinstance(size, int) else f"({size}*{s})"
    if auto_pad == "VALID":
        pb = pe = 0
    if not (isinstance(size, int) and isinstance(k, int)):
        eff = f"(({k}-1)*{d}+1)"
        if want is not None:
            return want, 0, 0  # pads are computed at lowering, where the sizes are known
        return f"({s}*({size}-1)+{out_pad}+{eff}-{pb + pe})", pb, pe
    natural = s * (size - 1) + out_pad + (k - 1) * d + 1
    if want is not None:
        total = natural - int(want)
        pb = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        pe = total - pb
    out = natural - pb - pe
    if out < 1:
        raise ShapeError(f"ConvTranspose: output size {out} along an axis of input size {size} "
                         f"(kernel {k}, stride {s}, pads {pb}, {pe})")
    return out, pb, pe


def conv_transpose_geometry(spatial: tuple, w_spatial: tuple, *, auto_pad: str = "NOTSET", dilations=None,
                            kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                            strides=None) -> WindowGeometry:
    """The geometry of a ConvTranspose over input dims ``spatial``: ``out`` its output size and
    ``pads_begin`` the begin pads (what the kernel needs); strides and dilations as given."""
    rank = len(spatial)
    kernel, strides, dilations, pads = window_attrs("ConvTranspose", spatial, w_spatial, auto_pad, kernel_shape,
                                                    strides, dilations, pads)
    out_pad = tuple(output_padding) if output_padding is not None else (0,) * rank
    if len(out_pad) != rank:
        raise ShapeError(f"ConvTranspose output_padding {list(out_pad)} does not match {rank} spatial dims")
    want = (None,) * rank
    if output_shape is not None:
        if len(output_shape) not in (rank, rank + 2):
            raise ShapeError(f"ConvTranspose output_shape {list(output_shape)} does not match {rank} spatial dims")
        want = tuple(output_shape)[-rank:]
    if any(s < 1 for s in strides) or any(d < 1 for d in dilations):
        raise ModelError(f"ConvTranspose strides {list(strides)} and dilations {list(dilations)} must be >= 1")
    per_axis = zip(spatial, kernel, strides, dilations, out_pad, pads[:rank], pads[rank:], want)
    axes = [_axis(*args, auto_pad) for args in per_axis]
    out, pads_begin, pads_end = (tuple(a[i] for a in axes) for i in range(3))
    return WindowGeometry(kernel, strides, dilations, pads_begin, pads_end, out)


def _out_channels(w: TensorType, group: int):
    return w.shape[1] * group if isinstance(w.shape[1], int) else f"({w.shape[1]}*{group})"


def _check_channels(x: TensorType, w: TensorType, b, group: int) -> None:
    c_in, c_out = x.shape[1], _out_channels(w, group)
    if isinstance(c_in, int) and isinstance(w.shape[0], int) and c_in != w.shape[0]:
        raise ShapeError(f"ConvTranspose: input has {c_in} channels, weight {w} expects {w.shape[0]}")
    if isinstance(w.shape[0], int) and w.shape[0] % group:
        raise ShapeError(f"ConvTranspose: {w.shape[0]} input channels do not split into {group} groups")
    if b is not None and (b.rank != 1 or (isinstance(c_out, int) and b.shape[0] != c_out)):
        raise ShapeError(f"ConvTranspose: bias {b} must be 1-D of {c_out} output channels")


@op("ConvTranspose", since=1, kind=Kind.CONV,
    samples=[Sample([Rand((2, 4, 5, 5)), Rand((4, 3, 3, 3)), Rand((3,))]),
             Sample([Rand((1, 4, 4, 5)), Rand((4, 2, 3, 3))],
                    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
             Sample([Rand((2, 4, 4, 4)), Rand((4, 3, 3, 2)), Rand((6,))],
                    {"group": 2, "dilations": [2, 1], "strides": [2, 3], "pads": [0, 1, 2, 0]}),
             Sample([Rand((1, 2, 3, 4)), Rand((2, 2, 3, 3))], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
             Sample([Rand((1, 3, 4, 4)), Rand((3, 2, 2, 3))],
                    {"auto_pad": "SAME_LOWER", "strides": [2, 2], "dilations": [2, 1], "output_padding": [1, 0]}),
             Sample([Rand((1, 2, 3, 4)), Rand((2, 1, 3, 3))],
                    {"strides": [3, 2], "output_shape": [10, 9], "kernel_shape": [3, 3]}),
             # 1-D
             Sample([Rand((2, 3, 6)), Rand((3, 4, 4)), Rand((4,))], {"strides": [2], "pads": [1, 2]}),
             Sample([Rand((1, 6, 5)), Rand((6, 1, 3))], {"group": 3, "strides": [3], "output_padding": [2]}),
             # 3-D
             Sample([Rand((1, 2, 3, 4, 3)), Rand((2, 3, 2, 3, 2)), Rand((3,))],
                    {"strides": [2, 1, 2], "pads": [0, 1, 1, 1, 0, 0]}),
             # tap-major K loop (>= 16 input channels per group), 2-D and 3-D
             Sample([Rand((1, 20, 4, 3)), Rand((20, 8, 3, 3)), Rand((8,))],
                    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
             Sample([Rand((1, 32, 2, 3, 3)), Rand((32, 4, 2, 2, 2))], {"group": 2, "strides": [2, 2, 2]}),
             # 1x1, stride 1: a batched GEMM
             Sample([Rand((2, 6, 3, 4)), Rand((6, 5, 1, 1)), Rand((5,))])])
def conv_transpose(x: TensorType, w: TensorType, b: TensorType = None, *, auto_pad: str = "NOTSET",
                   dilations=None, group: int = 1, kernel_shape=None, output_padding=None, output_shape=None,
                   pads=None, strides=None) -> TensorType:
    check_operands("ConvTranspose", x, w, b)
    _check_channels(x, w, b, group)
    geo = conv_transpose_geometry(x.shape[2:], w.shape[2:], auto_pad=auto_pad, dilations=dilations,
                                  kernel_shape=kernel_shape, output_padding=output_padding,
                                  output_shape=output_shape, pads=pads, strides=strides)
    return x.with_shape(x.shape[:1] + (_out_channels(w, group),) + geo.out)


@conv_transpose.reference
def _(x, w, b=None, *, group=1, **attrs):
    geo = conv_transpose_geometry(x.shape[2:], w.shape[2:], **attrs)
    n, c_in = x.shape[:2]
    c, n_out = c_in // group, w.shape[1]
    xg = x.reshape(n, group, c, *x.shape[2:])
    wg = w.reshape(group, c, n_out, *w.shape[2:])
    y = np.zeros((n, group, n_out) + geo.out)
    for taps in itertools.product(*(range(k) for k in geo.kernel)):
        src, dst = [], []  # per axis: the input pixels this tap sends inside the output, and where
        for size, s, pb, k, d, o in zip(x.shape[2:], geo.strides, geo.pads_begin, taps, geo.dilations, geo.out):
            pos = np.arange(size) * s - pb + k * d
            keep = (pos >= 0) & (pos < o)
            src.append(np.nonzero(keep)[0])
            dst.append(pos[keep])
        part = np.einsum("ngc...,gco->ngo...", xg[(Ellipsis,) + np.ix_(*src)], wg[(slice(None),) * 3 + taps])
        y[(Ellipsis,) + np.ix_(*dst)] += part
    y = y.reshape(n, group * n_out, *geo.out)
    return y if b is None else y + b.reshape((1, -1) + (1,) * len(geo.out))


def _conv_weight(ctx, w, group: int):
    """The weight ``[Cin, Cout/group, *k]`` as Conv's ``[Cout, Cin/group, *k]``: host-rearranged and
    uploaded once for a constant, a view for one group, a device copy otherwise."""
    c_in, n_out, kernel = w.shape[0], w.shape[1], w.shape[2:]
    c = c_in // group
    grouped = (group, c, n_out) + kernel
    swap = [0, 2, 1] + list(range(3, w.rank + 1))  # [g, c, n, *k] -> [g, n, c, *k]
    value = ctx.node.inputs[1]
    if value is not None and value.const is not None and tuple(value.const.shape) == w.shape:
        const = value.const

        def conv_layout() -> np.ndarray:
            return np.transpose(const.reshape(grouped), swap).reshape((group * n_out, c) + kernel)
        return dense_weight(ctx, conv_layout, sources=(const,))
    if group == 1:
        return w.permute([1, 0] + list(range(2, w.rank)))
    dense = ctx.temp(w.dtype, (group, n_out, c) + kernel)
    ctx.copy(ctx.contiguous(w).reshape(grouped).permute(swap), dense)
    return dense.reshape((group * n_out, c) + kernel)


@conv_transpose.lower
def _(ctx, x, w, b=None, *, group=1, **attrs):
    check_dot_type(ctx, x.dtype)
    geo = conv_transpose_geometry(x.shape[2:], w.shape[2:], **attrs)
    out = channels_last_output(ctx)
    wc = _conv_weight(ctx, w, group)
    pointwise = (group == 1 and all(k == 1 for k in geo.kernel) and all(s == 1 for s in geo.strides)
                 and not any(geo.pads_begin) and geo.out == x.shape[2:] and x.contiguous)
    if pointwise:  # out[n] ([Cout, P]) = W^T ([Cout, Cin]) @ x[n] ([Cin, P])
        pointwise_gemm(ctx, x, wc, b, out)
    else:
        emit_conv(ctx, x, wc, b, out, geo, group, transposed=True)
    if out is not ctx.outputs[0]:
        ctx.alias(0, out)
