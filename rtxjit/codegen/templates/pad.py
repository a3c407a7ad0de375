"""Pad (ONNX modes constant, reflect, edge, wrap): one program per ``BLOCK`` output elements, each
finding its source element by index arithmetic, one load and one store.

Negative pads (cropping) never reach the kernel: the lowering (rtxjit/ops/pad.py) slices the
input view first, as onnxruntime does, so ``len{d}`` below is the length of the cropped axis and
every pad ``lo{d}`` is >= 0. Per output coordinate ``o`` of a padded dim, ``j = o - lo`` indexes the
cropped axis and is mapped into ``[0, len)``:

* constant: ``j`` itself, and the element is the pad value where ``j`` falls outside (masked load);
* edge: ``j`` clamped;
* wrap: ``(j + sh) % len``, where ``sh`` is a multiple of ``len`` with ``j + sh >= 0`` (the
  remainder of a negative number never enters, so no signed-remainder convention matters);
* reflect: ``m = (j + sh) % per`` with the period ``per = 2 * (len - 1)`` (1 for an axis of one
  element), then ``per - m`` where ``m >= len``: numpy's (and the ONNX reference's) reflection,
  repeated for pads longer than the axis (onnxruntime rejects those; it agrees wherever it runs).

A dim without padding costs one divmod and a multiply. Sizes, strides and pads are run-time
arguments; the rank, which dims are padded, the mode and the dtype are part of the source.
"""

from __future__ import annotations

from rtxjit.codegen.source import KernelSource, render
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType

MODES = ("constant", "reflect", "edge", "wrap")


def _params(mode: str, padded: tuple, has_value: bool) -> list:
    p = ["y_ptr", "y_off", "x_ptr", "x_off"] + (["c_ptr", "c_off"] if has_value else []) + ["n"]
    for d, pd in enumerate(padded):
        p += [f"osize{d}", f"ist{d}"]
        if pd:
            p += [f"lo{d}", f"len{d}"]
            if mode in ("wrap", "reflect"):
                p.append(f"sh{d}")
            if mode == "reflect":
                p.append(f"per{d}")
    return p + ["BLOCK: tl.constexpr"]


def _source_index(mode: str, d: int) -> list:
    """Lines setting ``s{d}``, the source coordinate in the cropped axis, for padded dim ``d``."""
    j = f"(o{d} - lo{d})"
    if mode == "constant":
        return [f"    s{d} = {j}", f"    inside = inside & (s{d} >= 0) & (s{d} < len{d})"]
    if mode == "edge":
        return [f"    s{d} = tl.minimum(tl.maximum({j}, 0), len{d} - 1)"]
    if mode == "wrap":
        return [f"    s{d} = ({j} + sh{d}) % len{d}"]
    return [f"    m{d} = ({j} + sh{d}) % per{d}",
            f"    s{d} = tl.where(m{d} >= len{d}, per{d} - m{d}, m{d})"]


def render_pad(mode: str, dtype: DType, padded: tuple, has_value: bool, wide: bool = False) -> KernelSource:
    """``padded[d]`` says whether dim d has any (positive) pad; ``has_value``: the constant mode's
    value is read from a one-element tensor (else it is 0)."""
    if mode not in MODES:
        raise InternalError(f"unknown pad mode '{mode}'")
    rank = len(padded)
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    lines = [f"def pad_{mode}({', '.join(_params(mode, padded, has_value))}):",
             f"    idx = {pid} * BLOCK + tl.arange(0, BLOCK)",
             "    mask = idx < n",
             "    rem = idx"]
    if mode == "constant":
        lines.append("    inside = mask")
    terms = []
    for d in reversed(range(rank)):
        if d:
            lines += [f"    o{d} = rem % osize{d}", f"    rem = rem // osize{d}"]
        else:
            lines.append("    o0 = rem")
        if padded[d]:
            lines += _source_index(mode, d)
            terms.append(f"s{d} * ist{d}")
        else:
            terms.append(f"o{d} * ist{d}")
    offset = " + ".join(reversed(terms))
    if mode == "constant":
        lines.append(f"    v = tl.load(x_ptr + x_off + {offset}, mask=inside, other=0)")
        if has_value:
            lines += ["    c = tl.load(c_ptr + c_off)", "    v = tl.where(inside, v, c)"]
    else:
        lines.append(f"    v = tl.load(x_ptr + x_off + {offset}, mask=mask, other=0)")
    lines.append("    tl.store(y_ptr + y_off + idx, v, mask=mask)")
    flags = "".join("p" if p else "." for p in padded)
    header = f"pad mode={mode} dtype={dtype.short} dims={flags}{' value' if has_value else ''}{' wide' if wide else ''}"
    return render(f"pad_{mode}", header, "\n".join(lines))
