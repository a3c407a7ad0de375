"""Row reductions: each row of a tensor reduced to one value, or normalized in place of itself.

The lowering views the input so that kept dims come first and reduced dims last: a *row* is one
index of the kept dims and its *columns* are the elements of the reduced dims. Kept-dim sizes and
strides and reduced-dim sizes and strides are run-time arguments, so one compiled kernel serves
every shape; the mode, the two ranks and the dtypes are part of the source.

Each program handles a ``BLOCK_R x BLOCK_C`` tile (short rows, such as 7x7 pooling windows, pack
many rows per program). When a whole row fits in one block (constexpr ``ONE_BLOCK``) it is loaded
once; otherwise the kernel loops over column blocks: online max/sum for softmax, and Chan's
combination of per-block mean and M2 for layernorm, then a second pass that writes the row.

Modes: ``sum``, ``mean``, ``max``, ``min``, ``prod``, ``l1``, ``l2``, ``sumsquare``, ``logsum``,
``logsumexp`` (max-shifted: a max pass, then a sum pass), ``argmax``/``argmin`` (``_last`` variants
take the last of equal extremes; int64 indices) (one value per row, written at the flat row index),
``softmax``, ``logsoftmax``, ``layernorm`` and ``rmsnorm`` (``x * rsqrt(mean(x^2) + eps) * scale``)
(the output has the input's shape and strides).
Floats accumulate in fp32 (fp64 stays fp64); integers in their own type; bool as int32. The modes
with a float result (``l2``, ``logsum``, ``logsumexp``) accumulate integers in fp64 and truncate the
result toward zero on the store, as onnxruntime does.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL, compute_type
from rtxjit.codegen.source import KernelSource, memoized, render
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType

ROW_MODES = ("sum", "mean", "max", "min", "prod", "l1", "l2", "sumsquare", "logsum", "logsumexp")
ARG_MODES = ("argmax", "argmin", "argmax_last", "argmin_last")  # int64 index of the row's extreme
FLOAT_RESULT_MODES = ("l2", "logsum", "logsumexp")  # computed in a float type even for integer inputs
SAME_SHAPE_MODES = ("softmax", "logsoftmax", "layernorm", "rmsnorm")
EPS_MODES = ("layernorm", "rmsnorm")  # modes that take an ``eps`` argument


def acc_type(dtype: DType) -> DType:
    """The type a reduction accumulates in."""
    return DType.INT32 if dtype is DType.BOOL else compute_type(dtype)


def extreme_literal(dtype: DType, lowest: bool) -> str:
    """The identity of max (``lowest``) or min as a Triton literal of ``dtype``'s accumulator."""
    acc = acc_type(dtype)
    if dtype is DType.BOOL:
        return "0" if lowest else "1"
    if acc.is_float:
        return "float('-inf')" if lowest else "float('inf')"
    bits = acc.itemsize * 8
    if acc.short.startswith("uint"):
        return "0" if lowest else str(2 ** bits - 1)
    return str(-(2 ** (bits - 1))) if lowest else str(2 ** (bits - 1) - 1)


def _index_lines(var: str, idx: str, sizes: str, rank: int, terms: dict) -> list:
    """Code that splits flat index ``var`` into ``{idx}0..`` over dims ``{sizes}0..`` and sums, for
    each name in ``terms``, the indices times that operand's strides (``terms[name]`` prefixes them)."""
    rem = f"{idx}_rem"  # one name per index kind: Triton's loops want a stable type per name
    lines = [f"    {rem} = {var}"]
    for d in reversed(range(rank)):
        if d:
            lines += [f"    {idx}{d} = {rem} % {sizes}{d}", f"    {rem} = {rem} // {sizes}{d}"]
        else:
            lines.append(f"    {idx}{d} = {rem}")
    for name, prefix in terms.items():
        lines.append(f"    {name} = " + " + ".join(f"{idx}{d} * {prefix}{d}" for d in range(rank)))
    return lines


class _Spec:
    """What one kernel variant needs to know while its source is written."""

    def __init__(self, mode, in_dtype, out_dtype, kept_rank, red_rank, scale, bias, stats, wide):
        self.mode = mode
        self.in_dtype = in_dtype
        self.out_dtype = out_dtype
        self.kept_rank = kept_rank
        self.red_rank = red_rank
        self.scale = scale
        self.bias = bias
        self.stats = stats
        self.wide = wide
        acc = acc_type(in_dtype)
        if mode in FLOAT_RESULT_MODES and not acc.is_float:
            acc = DType.FP64
        self.acc_dtype = acc
        self.acc = TL[acc]

    @property
    def col_operands(self) -> dict:
        """Name of each column offset -> prefix of its stride arguments."""
        terms = {"col_off": "cst"}
        if self.scale:
            terms["w_col"] = "w_cst"
        if self.bias:
            terms["b_col"] = "b_cst"
        return terms

    def params(self) -> list:
        p = ["x_ptr", "x_off", "y_ptr", "y_off"]
        p += ["w_ptr", "w_off"] if self.scale else []
        p += ["b_ptr", "b_off"] if self.bias else []
        p += ["mean_ptr", "mean_off", "rstd_ptr", "rstd_off"] if self.stats else []
        p += ["n_rows", "n_cols"] + (["eps"] if self.mode in EPS_MODES else [])
        p += [f"ksize{d}" for d in range(self.kept_rank)] + [f"kst{d}" for d in range(self.kept_rank)]
        p += [f"csize{d}" for d in range(self.red_rank)]
        for prefix in self.col_operands.values():
            p += [f"{prefix}{d}" for d in range(self.red_rank)]
        return p + ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr", "ONE_BLOCK: tl.constexpr"]

    def other(self) -> str:
        """The value masked-off columns load as: the identity of the mode's first reduction."""
        if self.acc_dtype.is_float and self.mode == "logsumexp":
            return "float('-inf')"
        if self.mode in ("max", "softmax", "logsoftmax", "argmax", "argmax_last"):
            return extreme_literal(self.in_dtype, lowest=True)
        if self.mode in ("min", "argmin", "argmin_last"):
            return extreme_literal(self.in_dtype, lowest=False)
        if self.mode == "prod":
            return "1"
        return "0"


def _load_tile(spec: _Spec, start: str, indent: str, affine: bool = True) -> list:
    """Lines that load the x tile of columns ``start .. start+BLOCK_C`` as ``x`` (with ``mask``,
    the column offsets, and, if ``affine``, the ``scale``/``bias`` tiles the kernel has)."""
    cols = "cols0" if start == "0" else f"{start} + cols0"
    lines = [f"    cols = {cols}", "    mask = row_mask & (cols < n_cols)"]
    lines += _index_lines("cols", "ci", "csize", spec.red_rank, spec.col_operands)
    lines.append(f"    x = tl.load(x_ptr + x_off + row_off + col_off, mask=mask, other={spec.other()})"
                 f".to({spec.acc})")
    if spec.scale and affine:
        lines.append(f"    scale = tl.load(w_ptr + w_off + w_col, mask=mask, other=0).to({spec.acc})")
    if spec.bias and affine:
        lines.append(f"    bias = tl.load(b_ptr + b_off + b_col, mask=mask, other=0).to({spec.acc})")
    return [indent + line[4:] if line.startswith("    ") else line for line in lines]


def _store_tile(spec: _Spec, value: str, indent: str) -> str:
    return f"{indent}tl.store(y_ptr + y_off + row_off + col_off, ({value}).to({TL[spec.out_dtype]}), mask=mask)"


def _store_rows(ptr: str, value: str, dtype: DType) -> str:
    return f"    tl.store({ptr}_ptr + {ptr}_off + rows, ({value}).to({TL[dtype]}), mask=row_mask)"


# ---- one value per row -------------------------------------------------------------------------

_ELEM = {"l1": "tl.abs(x)", "l2": "x * x", "sumsquare": "x * x"}  # what is summed, where not x itself
_COMBINE = {"max": "tl.maximum(acc, {e})", "min": "tl.minimum(acc, {e})", "prod": "acc * {e}"}  # else acc + e
_FINISH = {"max": "tl.max({v}, 1, keep_dims=True)", "min": "tl.min({v}, 1, keep_dims=True)",
           "prod": "tl.reduce({v}, 1, _mul, keep_dims=True)"}
_POST = {"mean": "r / n_cols", "l2": "tl.sqrt(r)", "logsum": "tl.log(r)"}

PROD_HELPER = """@triton.jit
def _mul(a, b):
    return a * b
"""


def _row_body(spec: _Spec) -> list:
    finish = _FINISH.get(spec.mode, "tl.sum({v}, 1, keep_dims=True)")
    elem = _ELEM.get(spec.mode, "x")
    lines = ["    if ONE_BLOCK:"] + _load_tile(spec, "0", "        ")
    lines += ["        r = " + finish.format(v=elem), "    else:"]
    lines.append(f"        acc = tl.full([BLOCK_R, BLOCK_C], {spec.other()}, {spec.acc})")
    lines.append("        for c0 in range(0, n_cols, BLOCK_C):")
    lines += _load_tile(spec, "c0", "            ")
    lines.append("            acc = " + _COMBINE.get(spec.mode, "acc + {e}").format(e=elem))
    lines.append("        r = " + finish.format(v="acc"))
    if spec.mode in _POST:
        lines.append(f"    r = {_POST[spec.mode]}")
    lines.append(_store_rows("y", "r", spec.out_dtype))
    return lines


def _logsumexp_body(spec: _Spec) -> list:
    """Max-shifted: ``log(sum(exp(x - m))) + m`` with ``m`` the row's max, or 0 where that max is
    infinite (as onnxruntime: a row holding +inf gives +inf, a row of -inf gives -inf)."""
    lines = ["    if ONE_BLOCK:"] + _load_tile(spec, "0", "        ")
    lines += ["        m = tl.max(x, 1, keep_dims=True)",
              "        m = tl.where(tl.abs(m) == float('inf'), 0.0, m)",
              "        s = tl.sum(tl.exp(x - m), 1, keep_dims=True)",
              "    else:",
              f"        acc = tl.full([BLOCK_R, BLOCK_C], float('-inf'), {spec.acc})",
              "        for c0 in range(0, n_cols, BLOCK_C):"]
    lines += _load_tile(spec, "c0", "            ")
    lines += ["            acc = tl.maximum(acc, x)",
              "        m = tl.max(acc, 1, keep_dims=True)",
              "        m = tl.where(tl.abs(m) == float('inf'), 0.0, m)",
              f"        s = tl.zeros([BLOCK_R, 1], {spec.acc})",
              "        for c0 in range(0, n_cols, BLOCK_C):"]
    lines += _load_tile(spec, "c0", "            ")
    lines += ["            s = s + tl.sum(tl.exp(x - m), 1, keep_dims=True)",
              "    r = tl.log(s) + m",
              _store_rows("y", "r", spec.out_dtype)]
    return lines


def _arg_body(spec: _Spec) -> list:
    """onnxruntime's sequential scan: the first element is the running best, a later one replaces it
    when strictly greater (``_last``: greater or equal). So NaN never wins after the first element,
    and a row whose first element is NaN gives 0. Per block: the extreme of the non-NaN elements and
    its first (last) index; blocks combine in order."""
    is_max = spec.mode.startswith("argmax")
    last = spec.mode.endswith("_last")
    red = "tl.max" if is_max else "tl.min"
    better = ">" if is_max else "<"
    pick = ("tl.max(tl.where(hit, cols, -1), 1, keep_dims=True)" if last
            else "tl.min(tl.where(hit, cols, n_cols), 1, keep_dims=True)")
    block = [f"xs = tl.where(x != x, {spec.other()}, x)",
             f"b = {red}(xs, 1, keep_dims=True)",
             "hit = mask & (x == b)",
             f"bi = {pick}"]
    lines = ["    if ONE_BLOCK:"] + _load_tile(spec, "0", "        ")
    lines += [f"        {line}" for line in block] + ["        idx = bi.to(tl.int64)", "    else:"]
    lines += [f"        best = tl.full([BLOCK_R, 1], {spec.other()}, {spec.acc})",
              "        idx = tl.zeros([BLOCK_R, 1], tl.int64)",
              "        for c0 in range(0, n_cols, BLOCK_C):"]
    lines += _load_tile(spec, "c0", "            ")
    lines += [f"            {line}" for line in block]
    if last:
        lines.append(f"            take = (bi >= 0) & (b {better}= best)")
    else:
        lines.append(f"            take = (bi < n_cols) & (b {better} best)")
    lines += ["            best = tl.where(take, b, best)",
              "            idx = tl.where(take, bi.to(tl.int64), idx)",
              f"    first = tl.load(x_ptr + x_off + row_off, mask=row_mask, other=0).to({spec.acc})",
              "    idx = tl.where(first != first, 0, idx)",
              _store_rows("y", "idx", spec.out_dtype)]
    return lines


# ---- softmax / logsoftmax ----------------------------------------------------------------------

def _softmax_value(spec: _Spec) -> str:
    if spec.mode == "softmax":
        return "tl.exp(x - m) / s"
    return "x - m - tl.log(s)"


def _two_pass(spec: _Spec, one_block: list, init: list, accumulate: list, finish: list, value: str) -> list:
    """Row statistics, then the output ``value`` from them. With ``ONE_BLOCK`` a row fits one tile:
    ``one_block`` computes the statistics from it. Otherwise the row's column blocks are walked
    twice: ``init`` then ``accumulate`` per block (the affine parameters not loaded) and ``finish``
    give the statistics; the second walk stores."""
    lines = ["    if ONE_BLOCK:"] + _load_tile(spec, "0", "        ")
    lines += [f"        {line}" for line in one_block]
    lines += [_store_tile(spec, value, "        "), "    else:"]
    lines += [f"        {line}" for line in init] + ["        for c0 in range(0, n_cols, BLOCK_C):"]
    lines += _load_tile(spec, "c0", "            ", affine=False)
    lines += [f"            {line}" for line in accumulate] + [f"        {line}" for line in finish]
    lines += ["        for c0 in range(0, n_cols, BLOCK_C):"] + _load_tile(spec, "c0", "            ")
    lines.append(_store_tile(spec, value, "            "))
    return lines


def _softmax_body(spec: _Spec) -> list:
    return _two_pass(
        spec,
        one_block=["m = tl.max(x, 1, keep_dims=True)", "s = tl.sum(tl.exp(x - m), 1, keep_dims=True)"],
        init=[f"m = tl.full([BLOCK_R, 1], float('-inf'), {spec.acc})", f"s = tl.zeros([BLOCK_R, 1], {spec.acc})"],
        accumulate=["m_new = tl.maximum(m, tl.max(x, 1, keep_dims=True))",
                    "s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 1, keep_dims=True)",
                    "m = m_new"],
        finish=[], value=_softmax_value(spec))

# ---- layernorm / rmsnorm -----------------------------------------------------------------------

def _norm_value(spec: _Spec) -> str:
    value = "(x - mean) * rstd" if spec.mode == "layernorm" else "x * rstd"
    if spec.scale:
        value += " * scale"
    if spec.bias:
        value += " + bias"
    return value


def _layernorm_body(spec: _Spec) -> list:
    return _two_pass(
        spec,
        one_block=["mean = tl.sum(x, 1, keep_dims=True) / n_cols",
                   "d = tl.where(mask, x - mean, 0.0)",
                   "rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1, keep_dims=True) / n_cols + eps)"],
        init=[f"mean = tl.zeros([BLOCK_R, 1], {spec.acc})", f"m2 = tl.zeros([BLOCK_R, 1], {spec.acc})"],
        accumulate=[f"n_b = tl.minimum(n_cols - c0, BLOCK_C).to({spec.acc})",  # Chan's parallel variance
                    "b_mean = tl.sum(x, 1, keep_dims=True) / n_b",
                    "d = tl.where(mask, x - b_mean, 0.0)",
                    "total = c0 + n_b",
                    "delta = b_mean - mean",
                    "mean = mean + delta * (n_b / total)",
                    "m2 = m2 + tl.sum(d * d, 1, keep_dims=True) + delta * delta * (c0 * n_b / total)"],
        finish=["rstd = 1.0 / tl.sqrt(m2 / n_cols + eps)"], value=_norm_value(spec))


def _rmsnorm_body(spec: _Spec) -> list:
    return _two_pass(
        spec,
        one_block=["rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1, keep_dims=True) / n_cols + eps)"],
        init=[f"ss = tl.zeros([BLOCK_R, 1], {spec.acc})"],
        accumulate=["ss = ss + tl.sum(x * x, 1, keep_dims=True)"],
        finish=["rstd = 1.0 / tl.sqrt(ss / n_cols + eps)"], value=_norm_value(spec))

_BODIES = {**{m: _row_body for m in ROW_MODES}, **{m: _arg_body for m in ARG_MODES},
           "logsumexp": _logsumexp_body, "softmax": _softmax_body, "logsoftmax": _softmax_body,
           "layernorm": _layernorm_body, "rmsnorm": _rmsnorm_body}


@memoized
def render_reduce(mode: str, in_dtype: DType, out_dtype: DType, kept_rank: int, red_rank: int, *,
                  scale: bool = False, bias: bool = False, stats_dtype: DType = None,
                  wide: bool = False) -> KernelSource:
    """A row-reduction kernel. ``scale``/``bias``/``stats_dtype`` apply to layernorm (rmsnorm: scale)
    only: the optional scale and bias operands and the dtype of the optional Mean/InvStdDev outputs."""
    if mode not in _BODIES:
        raise InternalError(f"unknown row-reduction mode '{mode}'")
    spec = _Spec(mode, in_dtype, out_dtype, kept_rank, red_rank, scale, bias, stats_dtype is not None, wide)
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    cols0 = "tl.arange(0, BLOCK_C).to(tl.int64)" if wide else "tl.arange(0, BLOCK_C)"
    lines = [f"def reduce_{mode}({', '.join(spec.params())}):",
             f"    rows = {pid} * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
             "    row_mask = rows < n_rows",
             f"    cols0 = {cols0}[None, :]"]
    lines += _index_lines("rows", "ri", "ksize", kept_rank, {"row_off": "kst"})
    lines += _BODIES[mode](spec)
    if spec.stats:
        lines += [_store_rows("mean", "mean", stats_dtype), _store_rows("rstd", "rstd", stats_dtype)]
    header = (f"reduce mode={mode} in={in_dtype.short} out={out_dtype.short} kept_rank={kept_rank} "
              f"red_rank={red_rank} scale={scale} bias={bias} "
              f"stats={stats_dtype.short if stats_dtype else None} wide={wide}")
    helpers = PROD_HELPER + "\n\n" if mode == "prod" else ""
    return render(f"reduce_{mode}", header, helpers + "\n".join(lines))
