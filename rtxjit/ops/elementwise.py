"""Elementwise ops: one table row each, all lowered onto the pointwise kernel template.

In an expression, ``x0, x1, ...`` are the inputs in their compute type (fp32 for fp16/bf16/fp32)
and ``s0, s1, ...`` run-time scalars taken from attributes, so one kernel serves every value.
"""

from __future__ import annotations

import math

import numpy as np

from rtxjit.codegen.templates.quant import INT_RANGES, decode_fp8, encode_fp8
from rtxjit.errors import ModelError, UnsupportedOpError
from rtxjit.ir.registry import Kind, Rand, Sample, op
from rtxjit.ir.types import SUB_BYTE_INTS, DType, TensorType, broadcast_shapes

# tanh as Cephes' tanhf: a polynomial near 0 (full relative precision), exp far from it.
_TANH = ("tl.where(tl.abs({x}) < 0.625, "
         "{x} + {x} * ({x} * {x}) * ((((-5.70498872745e-3 * ({x} * {x}) + 2.06390887954e-2) * ({x} * {x}) "
         "- 5.37397155531e-2) * ({x} * {x}) + 1.33314422036e-1) * ({x} * {x}) - 3.33332819422e-1), "
         "tl.where({x} >= 0, 1.0, -1.0) * (1.0 - 2.0 / (tl.exp(2.0 * tl.abs({x})) + 1.0)))")


def tanh_expr(x: str) -> str:
    return _TANH.format(x=f"({x})")


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(np.asarray(x).dtype)


UNARY = {
    # name: (expression, float64 reference, sample input range)
    "Relu": ("tl.where(x0 < 0, 0, x0)", lambda x: np.maximum(x, 0), (-2, 2)),  # NaN stays NaN
    "Neg": ("-x0", np.negative, (-2, 2)),
    "Abs": ("tl.abs(x0)", np.abs, (-2, 2)),
    "Sqrt": ("tl.sqrt(x0)", np.sqrt, (0.1, 4)),
    "Exp": ("tl.exp(x0)", np.exp, (-3, 3)),
    "Log": ("tl.log(x0)", np.log, (0.1, 4)),
    "Tanh": (tanh_expr("x0"), np.tanh, (-3, 3)),
    "Sigmoid": ("1.0 / (1.0 + tl.exp(-x0))", lambda x: 1 / (1 + np.exp(-x)), (-4, 4)),
    "Erf": ("tl.erf(x0)", _erf, (-2, 2)),
    "Reciprocal": ("1.0 / x0", np.reciprocal, (0.5, 2)),
    "HardSwish": ("x0 * tl.minimum(tl.maximum(x0 * 0.16666666666666666 + 0.5, 0.0), 1.0)",
                  lambda x: x * np.clip(x / 6 + 0.5, 0, 1), (-4, 4)),
    "Softplus": ("tl.where(x0 > 20.0, x0, tl.log(1.0 + tl.exp(tl.minimum(x0, 20.0))))",
                 lambda x: np.log1p(np.exp(x)), (-4, 4)),
    "Floor": ("tl.floor(x0)", np.floor, (-4, 4)),
    "Ceil": ("tl.ceil(x0)", np.ceil, (-4, 4)),
    "Sin": ("tl.sin(x0)", np.sin, (-3, 3)),
    "Cos": ("tl.cos(x0)", np.cos, (-3, 3)),
}

BINARY = {
    "Add": ("x0 + x1", np.add),
    "Sub": ("x0 - x1", np.subtract),
    "Mul": ("x0 * x1", np.multiply),
}

COMPARE = {
    "Equal": ("x0 == x1", np.equal),
    "Less": ("x0 < x1", np.less),
    "LessOrEqual": ("x0 <= x1", np.less_equal),
    "Greater": ("x0 > x1", np.greater),
    "GreaterOrEqual": ("x0 >= x1", np.greater_equal),
}

LOGICAL = {
    "And": ("x0 & x1", np.logical_and),
    "Or": ("x0 | x1", np.logical_or),
    "Xor": ("x0 ^ x1", np.logical_xor),
}

UNARY_SHAPES = [Sample([Rand((2, 3, 4))]), Sample([Rand((5,))])]


def _bcast_samples(low: float = -2, high: float = 2, dtype=None) -> list:
    return [
        Sample([Rand((2, 3, 4), dtype, low, high), Rand((3, 1), dtype, low, high)]),
        Sample([Rand((4,), dtype, low, high), Rand((2, 1, 4), dtype, low, high)]),
        Sample([Rand((2, 3), dtype, low, high), Rand((), dtype, low, high)]),
    ]


def same_type(*xs: TensorType, where: str = "inputs") -> TensorType:
    """The broadcast type of inputs that must share a dtype."""
    xs = [x for x in xs if x is not None]
    dtypes = {x.dtype for x in xs}
    if len(dtypes) > 1:
        raise ModelError(f"{where} have different dtypes {sorted(d.short for d in dtypes)}")
    return TensorType(xs[0].dtype, broadcast_shapes(*[x.shape for x in xs]))


def fixed_expr(expr: str, scalars=lambda attrs: ()):
    """An ``expr`` hook giving the same expression for every dtype; ``scalars(attrs)`` are its s0, s1, ..."""

    def hook(in_dtypes, out_dtype, attrs):
        return expr, tuple(scalars(attrs))

    return hook


def _declare_unary(name: str, expr: str, ref, rng) -> None:
    samples = [Sample([Rand(s.inputs[0].shape, None, *rng)]) for s in UNARY_SHAPES]
    d = op(name, since=1, kind=Kind.POINTWISE, samples=samples)(lambda x: x)
    d.reference(ref)
    d.expr(fixed_expr(expr))


def _declare_binary(name: str, expr: str, ref, out_dtype=None, samples=None, since=7) -> None:
    def infer(a: TensorType, b: TensorType) -> TensorType:
        t = same_type(a, b)
        return t.with_dtype(out_dtype) if out_dtype else t

    d = op(name, since=since, kind=Kind.POINTWISE, samples=samples or _bcast_samples())(infer)
    d.reference(ref)
    d.expr(fixed_expr(expr))


for _name, (_expr, _ref, _rng) in UNARY.items():
    _declare_unary(_name, _expr, _ref, _rng)
for _name, (_expr, _ref) in BINARY.items():
    _declare_binary(_name, _expr, _ref)
for _name, (_expr, _ref) in COMPARE.items():
    _declare_binary(_name, _expr, _ref, DType.BOOL)
for _name, (_expr, _ref) in LOGICAL.items():
    _declare_binary(_name, _expr, _ref, DType.BOOL,
                    [Sample([Rand((2, 3), "bool"), Rand((3,), "bool")], float_types=("-",))], since=7)




_SPECIALS = np.array([[0.5, -1.5, np.nan, np.inf], [-np.inf, 2.5, -0.0, 3.0]], np.float32)


@op("IsNaN", since=9, kind=Kind.POINTWISE, samples=[Sample([_SPECIALS]), Sample([Rand((2, 3))])])
def is_nan(x: TensorType) -> TensorType:
    return x.with_dtype(DType.BOOL)


is_nan.reference(np.isnan)
is_nan.expr(fixed_expr("x0 != x0"))


@op("IsInf", since=10, kind=Kind.POINTWISE,
    samples=[Sample([_SPECIALS]), Sample([_SPECIALS], {"detect_negative": 0}),
             Sample([_SPECIALS], {"detect_positive": 0})])
def is_inf(x: TensorType, *, detect_negative: int = 1, detect_positive: int = 1) -> TensorType:
    return x.with_dtype(DType.BOOL)


@is_inf.reference
def _(x, *, detect_negative=1, detect_positive=1):
    return (np.isposinf(x) & bool(detect_positive)) | (np.isneginf(x) & bool(detect_negative))


@is_inf.expr
def _(in_dtypes, out_dtype, attrs):
    terms = [t for flag, t in ((attrs["detect_positive"], "(x0 == float('inf'))"),
                               (attrs["detect_negative"], "(x0 == float('-inf'))")) if flag]
    return (" | ".join(terms) if terms else "x0 != x0 & (x0 == x0)"), ()


@op("Sign", since=13, kind=Kind.POINTWISE,
    samples=UNARY_SHAPES + [Sample([np.nan_to_num(_SPECIALS)]),  # NaN: numpy and onnxruntime's fp32 keep it,
                            Sample([np.array([-3, 0, 5], np.int64)], float_types=("-",))])  # its fp16 gives 0
def sign(x: TensorType) -> TensorType:
    return x


sign.reference(np.sign)
sign.expr(fixed_expr("tl.where(x0 > 0, 1, tl.where(x0 < 0, -1, x0))"))  # 0 and NaN stay


@op("Round", since=11, kind=Kind.POINTWISE,
    samples=[Sample([Rand((3, 4), None, -6, 6)]),
             Sample([np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4, -2.6, np.nan, np.inf], np.float32)])])
def round_(x: TensorType) -> TensorType:
    return x


round_.reference(np.round)  # half to even, as ONNX says


@round_.expr
def _(in_dtypes, out_dtype, attrs):
    """Half to even: floor, then up past .5, and at exactly .5 up only from an odd floor. Values
    at or above 2**mantissa bits are whole already (and inf, which the arithmetic would make NaN)."""
    whole = 4503599627370496.0 if in_dtypes[0] is DType.FP64 else 8388608.0
    f, d = "tl.floor(x0)", "(x0 - tl.floor(x0))"
    odd = f"({f} - 2.0 * tl.floor({f} * 0.5))"
    inner = f"tl.where({d} > 0.5, {f} + 1.0, tl.where({d} < 0.5, {f}, {f} + {odd}))"
    return f"tl.where(tl.abs(x0) >= {whole}, x0, {inner})", ()


@op("Div", since=7, kind=Kind.POINTWISE, samples=_bcast_samples(0.5, 2))
def div(a: TensorType, b: TensorType) -> TensorType:
    return same_type(a, b)


@div.reference
def _(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "iu":
        return np.trunc(a / b).astype(a.dtype)  # integer division truncates, as in C
    return a / b


@div.expr
def _(in_dtypes, out_dtype, attrs):
    return ("x0 / x1" if in_dtypes[0].is_float else "x0 // x1"), ()


def pow_expr(x: str, y: str) -> str:
    """x ** y for floats: exact signs for negative bases with integer exponents, NaN otherwise."""
    r = f"tl.exp({y} * tl.log(tl.abs({x})))"
    is_int = f"(tl.floor({y}) == {y})"
    odd = f"(tl.floor({y} * 0.5) * 2.0 != {y})"
    return (f"tl.where({y} == 0.0, 1.0, tl.where({x} < 0.0, tl.where({is_int}, tl.where({odd}, -{r}, {r}), "
            f"float('nan')), {r}))")


def int_pow_expr(x: str, y: str) -> str:
    """x ** y for an integer base, computed in fp64: rounded to the nearest integer where y is a
    whole number >= 0 (exp and log are off by a few ulps: 3 ** 4 is 80.99999999999999), truncated
    otherwise, as ONNX's cast of the float power is."""
    r = f"({pow_expr(x, y)})"
    whole = f"(({y} >= 0.0) & (tl.floor({y}) == {y}))"
    return f"tl.where({whole}, tl.where({r} >= 0.0, tl.floor({r} + 0.5), tl.ceil({r} - 0.5)), {r})"


@op("Pow", since=7, kind=Kind.POINTWISE,
    samples=_bcast_samples(0.5, 2) + [Sample([Rand((2, 3), "int64", -5, 5), Rand((3,), "int64", 0, 7)],
                                             float_types=("-",)),
                                      Sample([Rand((2, 3), "int32", 0, 9), Rand((3,), None, 0, 3)])])
def pow_(x: TensorType, y: TensorType) -> TensorType:
    return TensorType(x.dtype, broadcast_shapes(x.shape, y.shape))


@pow_.reference
def _(x, y):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "iu":
        return np.power(x.astype(np.float64), y.astype(np.float64)).astype(x.dtype)
    return np.power(x, y).astype(x.dtype)


@pow_.expr
def _(in_dtypes, out_dtype, attrs):
    if in_dtypes[0].is_float:
        return pow_expr("x0", "x1.to(tl.float32)"), ()
    return int_pow_expr("x0.to(tl.float64)", "x1.to(tl.float64)"), ()


@op("Not", since=1, kind=Kind.POINTWISE, samples=[Sample([Rand((2, 3), "bool")], float_types=("-",))])
def not_(x: TensorType) -> TensorType:
    return x


not_.reference(np.logical_not)
not_.expr(fixed_expr("x0 == 0"))


@op("LeakyRelu", since=6, kind=Kind.POINTWISE, samples=UNARY_SHAPES + [Sample([Rand((3, 4))], {"alpha": 0.3})])
def leaky_relu(x: TensorType, *, alpha: float = 0.01) -> TensorType:
    return x


@leaky_relu.reference
def _(x, *, alpha=0.01):
    return np.where(x >= 0, x, x * alpha)


leaky_relu.expr(fixed_expr("tl.where(x0 >= 0, x0, x0 * s0)", lambda a: (float(a["alpha"]),)))


@op("HardSigmoid", since=6, kind=Kind.POINTWISE,
    samples=UNARY_SHAPES + [Sample([Rand((3, 4))], {"alpha": 0.5, "beta": 0.6})])
def hard_sigmoid(x: TensorType, *, alpha: float = 0.2, beta: float = 0.5) -> TensorType:
    return x


@hard_sigmoid.reference
def _(x, *, alpha=0.2, beta=0.5):
    return np.clip(x * alpha + beta, 0, 1)


hard_sigmoid.expr(fixed_expr("tl.minimum(tl.maximum(x0 * s0 + s1, 0.0), 1.0)",
                              lambda a: (float(a["alpha"]), float(a["beta"]))))


@op("Elu", since=6, kind=Kind.POINTWISE, samples=UNARY_SHAPES)
def elu(x: TensorType, *, alpha: float = 1.0) -> TensorType:
    return x


@elu.reference
def _(x, *, alpha=1.0):
    return np.where(x > 0, x, alpha * (np.exp(x) - 1))


elu.expr(fixed_expr("tl.where(x0 > 0, x0, s0 * (tl.exp(x0) - 1.0))", lambda a: (float(a["alpha"]),)))


@op("Gelu", since=20, kind=Kind.POINTWISE,
    samples=UNARY_SHAPES + [Sample([Rand((3, 4))], {"approximate": "tanh"})])
def gelu(x: TensorType, *, approximate: str = "none") -> TensorType:
    if approximate not in ("none", "tanh"):
        raise ModelError(f"Gelu approximate='{approximate}' must be 'none' or 'tanh'")
    return x


@gelu.reference
def _(x, *, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


@gelu.expr
def _(in_dtypes, out_dtype, attrs):
    if attrs["approximate"] == "tanh":
        inner = "0.7978845608028654 * (x0 + 0.044715 * x0 * x0 * x0)"
        return f"0.5 * x0 * (1.0 + {tanh_expr(inner)})", ()
    return "0.5 * x0 * (1.0 + tl.erf(x0 * 0.7071067811865476))", ()


def _variadic(name: str, fn: str, ref, since: int = 8) -> None:
    def infer(*xs: TensorType) -> TensorType:
        if not xs:
            raise ModelError(f"{name} needs at least one input")
        return same_type(*xs)

    def expr(in_dtypes, out_dtype, attrs):
        text = "x0"
        for k in range(1, len(in_dtypes)):
            text = fn.format(a=text, b=f"x{k}")
        return text, ()

    samples = _bcast_samples() + [Sample([Rand((2, 3)), Rand((3,)), Rand((2, 1))])]
    d = op(name, since=since, kind=Kind.POINTWISE, samples=samples)(infer)
    d.reference(lambda *xs: _reduce(ref, xs))
    d.expr(expr)


def _reduce(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


_variadic("Max", "tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)", np.maximum)
_variadic("Min", "tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)", np.minimum)
_variadic("Sum", "({a} + {b})", np.add)


@op("Where", since=9, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 3, 4), "bool"), Rand((3, 4)), Rand((2, 1, 4))]),
             Sample([Rand((4,), "bool"), Rand((2, 4)), Rand(())])])
def where(cond: TensorType, x: TensorType, y: TensorType) -> TensorType:
    if cond.dtype is not DType.BOOL:
        raise ModelError(f"Where condition must be bool, got {cond.dtype.short}")
    t = same_type(x, y)
    return TensorType(t.dtype, broadcast_shapes(cond.shape, t.shape))


where.reference(np.where)
where.expr(fixed_expr("tl.where(x0, x1, x2)"))


@op("Clip", since=11, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 3, 4)), np.float32(-0.5), np.float32(0.7)]),
             Sample([Rand((3, 4)), None, np.float32(0.2)]), Sample([Rand((5,))])])
def clip(x: TensorType, lo: TensorType = None, hi: TensorType = None) -> TensorType:
    return x


@clip.reference
def _(x, lo=None, hi=None):
    if lo is not None:
        x = np.maximum(x, lo)
    if hi is not None:
        x = np.minimum(x, hi)
    return x


@clip.expr
def _(in_dtypes, out_dtype, attrs):
    """NaN passes through (as np.clip and onnxruntime do): tl.maximum would return the bound."""
    expr, k = "x0", 0
    lo, hi = (list(in_dtypes) + [None, None])[1:3]
    if lo is not None:
        k += 1
        expr = f"tl.maximum({expr}, x{k}, propagate_nan=tl.PropagateNan.ALL)"
    if hi is not None:
        k += 1
        expr = f"tl.minimum({expr}, x{k}, propagate_nan=tl.PropagateNan.ALL)"
    return expr, ()


@op("Cast", since=6, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 3, 4), None, -50, 50)], {"to": code}) for code in (1, 10, 7, 6, 9, 3)])
def cast(x: TensorType, *, to: int, saturate: int = 1, round_mode: str = "up") -> TensorType:
    try:
        return x.with_dtype(DType.from_onnx(to))
    except KeyError:
        raise UnsupportedOpError(f"Cast to element type {to} is not supported") from None


@cast.reference
def _(x, *, to, saturate=1, round_mode="up"):
    dt = DType.from_onnx(to)
    if dt is DType.BOOL:
        return x != 0
    return np.asarray(x).astype(dt.to_numpy())


def cast_expr(in_dtypes, out_dtype, attrs):
    """Cast and CastLike as one expression: a conversion (bool: x != 0). Casts to or from fp8 and
    to 4- and 2-bit ints take statements (``lower_cast``): they are never fused into other pointwise
    kernels (``special_cast``)."""
    if special_cast(in_dtypes[0], out_dtype):
        raise UnsupportedOpError(f"{'CastLike' if len(in_dtypes) > 1 else 'Cast'} from {in_dtypes[0].short} to "
                                 f"{out_dtype.short} runs in a kernel of its own (it cannot be fused)")
    return ("x0 != 0" if out_dtype is DType.BOOL else "x0"), ()


cast.expr(cast_expr)


def special_cast(src: DType, dst: DType) -> bool:
    """A cast to or from fp8, or to a 4- or 2-bit int: ONNX's saturating / range rules need more
    than a conversion (a byte store would neither round nor clamp to 4 bits)."""
    return src.short.startswith("fp8") or dst.short.startswith("fp8") or dst in SUB_BYTE_INTS


def lower_cast(ctx, x, *rest, saturate: int = 1, **attrs):
    out = ctx.outputs[0]
    if not special_cast(x.dtype, out.dtype):
        expr, _ = cast_expr([x.dtype], out.dtype, attrs)
        ctx.pointwise(expr, [x], out)
        return
    lines, v, from_float = [], "x0", x.dtype.is_float  # fp8 included
    if x.dtype.short.startswith("fp8"):  # its bits, decoded here (Triton's interpreter widens NaN wrongly)
        lines += decode_fp8("x0", x.dtype, "c_in")
        x, v = x.with_dtype(DType.UINT8), "c_in"
    elif x.dtype is DType.BOOL:
        v = "x0.to(tl.int32)"
    if out.dtype.short.startswith("fp8"):  # to nearest even; beyond the range as ``saturate`` says
        lines += encode_fp8(f"{v}.to(tl.float32)", out.dtype, bool(saturate), "c_out")
        v = "c_out"
    elif out.dtype in SUB_BYTE_INTS:
        lo, hi = INT_RANGES[out.dtype]
        if from_float:
            # toward zero, as numpy's (ml_dtypes') conversion and the onnx suite's data: a value out of
            # the type's range (NaN, inf too) becomes 0
            lines += [f"c_t = {v}.to(tl.float32)",
                      "c_t = tl.where(c_t < 0, -tl.floor(-c_t), tl.floor(c_t))",
                      f"c_i = tl.where((c_t >= {lo}) & (c_t <= {hi}), c_t, 0.0).to(tl.int32)"]
        else:  # ints wrap to the low bits, two's complement
            span = hi - lo + 1
            lines += [f"c_i = ((({v}).to(tl.int64) - {lo}) & {span - 1}) + {lo}"]
        v = "c_i"
    ctx.pointwise(v, [x], out, prologue=tuple(lines))


cast.lower(lower_cast)


@op("CastLike", since=15, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 3)), np.zeros(1, np.int32)], float_types=("fp32",))])
def cast_like(x: TensorType, like: TensorType, *, saturate: int = 1, round_mode: str = "up") -> TensorType:
    return x.with_dtype(like.dtype)


@cast_like.reference
def _(x, like, *, saturate=1, round_mode="up"):
    return (x != 0) if like.dtype == bool else np.asarray(x).astype(like.dtype)


cast_like.lower(lower_cast)


@op("BatchNormalization", since=9, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 3, 4, 5)), Rand((3,)), Rand((3,)), Rand((3,)), Rand((3,), None, 0.5, 2)]),
             Sample([Rand((2, 4, 3)), Rand((4,)), Rand((4,)), Rand((4,)), Rand((4,), None, 0.5, 2)],
                    {"epsilon": 1e-3})])
def batch_norm(x: TensorType, scale, bias, mean, var, *, epsilon: float = 1e-5, momentum: float = 0.9,
               training_mode: int = 0, spatial: int = 1) -> TensorType:
    if training_mode:
        raise UnsupportedOpError("BatchNormalization with training_mode=1 is not supported (inference only)")
    return x


@batch_norm.reference
def _(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    r = [np.reshape(a, shape) for a in (scale, bias, mean, var)]
    return (x - r[2]) / np.sqrt(r[3] + epsilon) * r[0] + r[1]


@batch_norm.lower
def _(ctx, x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1):
    channel = (x.shape[1],) + (1,) * (x.rank - 2)
    params = [p.reshape(channel) for p in (scale, bias, mean, var)]
    ctx.pointwise("(x0 - x3) / tl.sqrt(x4 + s0) * x1 + x2", [x] + params, ctx.outputs[0], (float(epsilon),))


@op("Mod", since=10, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 3, 4), "int64", -9, 9), Rand((4,), "int64", 1, 5)], float_types=("-",)),
             Sample([Rand((2, 3), "int32", -9, 9), np.array([-3, 2, 4], np.int32)], float_types=("-",)),
             Sample([Rand((2, 3)), Rand((3,), None, 0.5, 2)], {"fmod": 1})])
def mod(a: TensorType, b: TensorType, *, fmod: int = 0) -> TensorType:
    return same_type(a, b)


@mod.reference
def _(a, b, *, fmod=0):
    return np.fmod(a, b) if fmod else np.mod(a, b)


@mod.expr
def _(in_dtypes, out_dtype, attrs):
    """Triton's % truncates (C's fmod); fmod=0 takes the divisor's sign, as Python's % does."""
    if attrs["fmod"]:
        return "x0 % x1", ()
    return "tl.where(((x0 % x1) != 0) & (((x0 % x1) < 0) != (x1 < 0)), (x0 % x1) + x1, x0 % x1)", ()


# --- bitwise (opset 18) and BitShift (opset 11): integer types only ------------------------------------------

def _integers(name: str, *xs: TensorType) -> TensorType:
    t = same_type(*xs, where=f"{name} inputs")
    if not t.dtype.is_int or t.dtype in SUB_BYTE_INTS:
        raise ModelError(f"{name} takes 8- to 64-bit integer tensors, not {t.dtype.short}")
    return t


_INT_SAMPLES = [Sample([Rand((2, 3, 4), "int32", -1000, 1000), Rand((3, 1), "int32", -1000, 1000)], float_types=("-",)),
                Sample([Rand((4,), "uint8", 0, 255), Rand((2, 1, 4), "uint8", 0, 255)], float_types=("-",)),
                Sample([Rand((3, 2), "int8", -128, 127), Rand((), "int8", -128, 127)], float_types=("-",))]


def _declare_bitwise(name: str, expr: str, ref) -> None:
    d = op(name, since=18, kind=Kind.POINTWISE, samples=_INT_SAMPLES)(lambda a, b: _integers(name, a, b))
    d.reference(ref)
    d.expr(fixed_expr(expr))


for _name, (_expr, _ref) in {"BitwiseAnd": ("x0 & x1", np.bitwise_and), "BitwiseOr": ("x0 | x1", np.bitwise_or),
                             "BitwiseXor": ("x0 ^ x1", np.bitwise_xor)}.items():
    _declare_bitwise(_name, _expr, _ref)


@op("BitwiseNot", since=18, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 5), "int32", -1000, 1000)], float_types=("-",)),
             Sample([Rand((7,), "uint16", 0, 65535)], float_types=("-",))])
def bitwise_not(x: TensorType) -> TensorType:
    return _integers("BitwiseNot", x)


bitwise_not.reference(np.invert)
bitwise_not.expr(fixed_expr("~x0"))

_SHIFT_TYPES = (DType.UINT8, DType.UINT16, DType.UINT32, DType.UINT64, DType.INT8, DType.INT16, DType.INT32,
                DType.INT64)


@op("BitShift", since=11, kind=Kind.POINTWISE,
    samples=[Sample([Rand((2, 3), "uint8", 0, 255), Rand((3,), "uint8", 0, 10)], {"direction": "LEFT"},
                    float_types=("-",)),
             Sample([Rand((4,), "uint16", 0, 65535), Rand((4,), "uint16", 0, 20)], {"direction": "RIGHT"},
                    float_types=("-",)),
             Sample([Rand((2, 2), "uint16", 0, 65535), Rand((), "uint16", 0, 20)], {"direction": "LEFT"},
                    float_types=("-",)),
             Sample([Rand((3, 4), "int32", -1000, 1000), Rand((4,), "int32", -3, 40)], {"direction": "RIGHT"},
                    float_types=("-",), opset=21),
             Sample([Rand((3, 4), "int8", -128, 127), Rand((3, 1), "int8", -2, 10)], {"direction": "LEFT"},
                    float_types=("-",), opset=21)])
def bit_shift(x: TensorType, y: TensorType, *, direction: str) -> TensorType:
    """Unsigned types since opset 11; signed ones as BitShift-28 defines them (a left shift wraps, a
    right shift is arithmetic), which this declaration serves for every version."""
    t = _integers("BitShift", x, y)
    if t.dtype not in _SHIFT_TYPES:
        raise ModelError(f"BitShift of {t.dtype.short} is not supported (uint8/16 and int8..64 are)")
    if direction not in ("LEFT", "RIGHT"):
        raise ModelError(f"BitShift direction must be LEFT or RIGHT, not {direction!r}")
    return t


@bit_shift.reference
def _(x, y, *, direction):
    """onnx's reference: a shift count below 0 or of the type's width or more gives 0 (a right
    shift of a negative signed value: -1); otherwise a wrapping left / arithmetic right shift."""
    x, y = np.broadcast_arrays(x, y)
    bits = np.iinfo(x.dtype).bits
    valid = (y >= 0) & (y < bits)
    count = np.where(valid, y, 0).astype(x.dtype)
    signed = np.issubdtype(x.dtype, np.signedinteger)
    if direction == "LEFT":
        unsigned = np.dtype(f"u{x.dtype.itemsize}")
        shifted = np.left_shift(x.view(unsigned), count.astype(unsigned)).view(x.dtype)
        return np.where(valid, shifted, 0).astype(x.dtype)
    fill = np.where(x < 0, -1, 0) if signed else 0
    return np.where(valid, np.right_shift(x, count), fill).astype(x.dtype)


@bit_shift.expr
def _(in_dtypes, out_dtype, attrs):
    bits = in_dtypes[0].itemsize * 8
    valid = f"((x1 >= 0) & (x1 < {bits}))"
    count = f"tl.where({valid}, x1, 0)"
    if attrs["direction"] == "LEFT":
        return f"tl.where({valid}, x0 << {count}, 0)", ()
    fill = "tl.where(x0 < 0, -1, 0)" if in_dtypes[0].name.startswith("INT") else "0"
    return f"tl.where({valid}, x0 >> {count}, {fill})", ()
