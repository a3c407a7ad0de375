"""Optimization profiles: per input, the smallest, typical and largest shape a session accepts.

As in TensorRT, a profile gives every graph input a ``(min_shape, opt_shape, max_shape)`` triple;
a feed fits a profile when each of its dims lies in ``[min, max]``. ``opt`` is the shape to tune for.
A session holds one or more profiles and serves a run with the first that contains every input's
shape; a feed outside all of them is an ``InputError`` that names the input, its shape and what each
profile allows.

Profiles come from the user (a dict, or trtexec-style strings through ``Profile.from_strings``) or
from the model's own symbolic dims (``default_profile``). ``Profile.validate(graph)`` checks a profile
against the graph's input types and fills in what the user left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from rtxjit.errors import InputError, ShapeError

# A symbolic dim's default range is [1, DEFAULT_MAX_DIM], tuned for DEFAULT_OPT_DIM. 4096 covers the
# batch sizes and sequence lengths that common models are served with (BERT's 512, LLM contexts of
# 2k-4k tokens) while still catching a feed whose dim is plainly wrong (a transposed or flattened
# tensor gives dims in the tens of thousands) before it is planned and allocated. A model with larger
# dims needs an explicit profile. ``opt`` is 1: small-batch latency is what the fallback-then-specialize
# design serves first; pass a profile to tune for another shape.
DEFAULT_MIN_DIM = 1
DEFAULT_OPT_DIM = 1
DEFAULT_MAX_DIM = 4096

_KINDS = ("min", "opt", "max")


def parse_shapes(text: str) -> dict:
    """``"x:1x3x224x224,y:1x128"`` -> ``{"x": (1, 3, 224, 224), "y": (1, 128)}`` (trtexec's syntax).

    A name may itself hold ``:`` (the last one splits name from dims); ``"s:"`` is a scalar.
    """
    shapes: dict = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, dims = item.rpartition(":")
        name = name.strip().strip("'\"")
        if not sep or not name:
            raise ShapeError(f"shape '{item}' in '{text}' is not of the form name:1x2x3")
        if name in shapes:
            raise ShapeError(f"input '{name}' is given twice in '{text}'")
        try:
            shapes[name] = tuple(int(d) for d in dims.strip().split("x")) if dims.strip() else ()
        except ValueError:
            raise ShapeError(f"input '{name}': dims '{dims}' in '{text}' are not integers joined by 'x'") from None
    return shapes


def _shape(name: str, kind: str, dims) -> tuple:
    try:
        out = tuple(dims)
    except TypeError:
        raise ShapeError(f"profile for input '{name}': {kind} shape {dims!r} is not a sequence of dims") from None
    for d in out:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ShapeError(f"profile for input '{name}': {kind} shape {out} has a dim that is not an int >= 0")
    return tuple(int(d) for d in out)


def _triple(name: str, spec) -> tuple:
    """A ``(min, opt, max)`` triple of shapes, or one shape (min = opt = max), checked for order."""
    spec = tuple(spec)
    if all(isinstance(d, int) for d in spec):
        shape = _shape(name, "fixed", spec)
        return shape, shape, shape
    if len(spec) != 3:
        raise ShapeError(f"profile for input '{name}': expected (min_shape, opt_shape, max_shape) or one "
                         f"shape, got {spec!r}")
    lo, opt, hi = (_shape(name, kind, s) for kind, s in zip(_KINDS, spec))
    if not len(lo) == len(opt) == len(hi):
        raise ShapeError(f"profile for input '{name}': min {lo}, opt {opt} and max {hi} differ in rank")
    for i, (a, b, c) in enumerate(zip(lo, opt, hi)):
        if not a <= b <= c:
            raise ShapeError(f"profile for input '{name}': dim {i} needs min <= opt <= max, got "
                             f"{a}, {b}, {c} (min {lo}, opt {opt}, max {hi})")
    return lo, opt, hi


def describe_range(triple) -> str:
    """``((1, 3), (8, 3), (32, 3))`` -> ``"[1..32, 3]"``: a fixed dim shows once."""
    lo, _, hi = triple
    return "[" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi)) + "]"


@dataclass(frozen=True)
class Profile:
    """Input name -> ``(min_shape, opt_shape, max_shape)``, each a tuple of ints.

    ``Profile({"x": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))})``; a single shape
    (``{"x": (1, 3, 224, 224)}``) fixes the input. Construction checks each triple on its own (ranks
    agree, ``min <= opt <= max``); ``validate`` checks it against a graph.
    """

    shapes: Mapping[str, tuple]

    def __post_init__(self):
        if not isinstance(self.shapes, Mapping):
            raise ShapeError(f"a profile is a dict of input name -> (min, opt, max) shapes, got {self.shapes!r}")
        triples = {str(name): _triple(str(name), spec) for name, spec in self.shapes.items()}
        object.__setattr__(self, "shapes", MappingProxyType(triples))

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.shapes.items())))

    @classmethod
    def from_strings(cls, min: str, opt: str, max: str) -> "Profile":
        """From trtexec-style ``--minShapes`` / ``--optShapes`` / ``--maxShapes`` strings."""
        parsed = [parse_shapes(s) for s in (min, opt, max)]
        names = list(dict.fromkeys(n for p in parsed for n in p))
        for name in names:
            for kind, p in zip(_KINDS, parsed):
                if name not in p:
                    raise ShapeError(f"input '{name}' has no {kind} shape (the {kind} shapes are '{p}')")
        return cls({n: tuple(p[n] for p in parsed) for n in names})

    def min(self, name: str) -> tuple:
        return self.shapes[name][0]

    def opt(self, name: str) -> tuple:
        return self.shapes[name][1]

    def max(self, name: str) -> tuple:
        return self.shapes[name][2]

    def contains(self, name: str, shape) -> bool:
        """Whether ``shape`` lies in this input's range (an input the profile does not name is free)."""
        triple = self.shapes.get(name)
        if triple is None:
            return True
        lo, _, hi = triple
        return len(shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shape, hi))

    def first_misfit(self, shapes: Mapping[str, tuple]) -> Optional[str]:
        """The first input (in ``shapes``' order) whose shape is outside this profile, or None."""
        for name, shape in shapes.items():
            if not self.contains(name, shape):
                return name
        return None

    def describe(self, name: str) -> str:
        return describe_range(self.shapes[name])

    def validate(self, graph) -> "Profile":
        """This profile checked against ``graph``'s inputs, with every input present.

        A named input must exist and have the model's rank; a static dim must equal the model's. An
        input the profile leaves out takes its symbols' ranges from the inputs it does name (so
        ``{"hidden": ...}`` also bounds ``mask[N, S]``), else the defaults; its static dims are fixed.
        A symbol whose ranges in two inputs do not overlap is an error.
        """
        inputs = {v.name: v for v in graph.inputs}
        for name in self.shapes:
            if name not in inputs:
                raise InputError(f"optimization profile names '{name}', which is not an input; the model's "
                                 f"inputs are {sorted(inputs)}")
        symbols: dict = {}  # symbol -> (min, opt, max, input that set it)
        for name, (lo, opt, hi) in self.shapes.items():
            want = inputs[name].type.shape
            if len(lo) != len(want):
                raise ShapeError(f"optimization profile for input '{name}': rank {len(lo)} "
                                 f"{describe_range((lo, opt, hi))} but the model's input has rank {len(want)} "
                                 f"{list(want)}")
            for i, d in enumerate(want):
                if isinstance(d, int):
                    for kind, s in zip(_KINDS, (lo, opt, hi)):
                        if s[i] != d:
                            raise ShapeError(f"optimization profile for input '{name}': dim {i} is static ({d}) "
                                             f"in the model but the {kind} shape {s} gives {s[i]}")
                elif d in symbols:
                    a, _, b, other = symbols[d]
                    if max(a, lo[i]) > min(b, hi[i]):
                        raise ShapeError(f"optimization profile: symbol '{d}' is {a}..{b} in input '{other}' but "
                                         f"{lo[i]}..{hi[i]} in input '{name}'; no shape fits both")
                elif d != "?":  # "?" is an anonymous dim, unrelated to any other
                    symbols[d] = (lo[i], opt[i], hi[i], name)
        full = dict(self.shapes)
        for name, v in inputs.items():
            if name not in full:
                dims = [(d, d, d) if isinstance(d, int) else symbols.get(d, _default_range())[:3]
                        for d in v.type.shape]
                full[name] = tuple(tuple(t[k] for t in dims) for k in range(3))
        return Profile({n: full[n] for n in inputs})

    def to_json(self) -> dict:
        """Plain JSON data (for engine files): ``{name: {"min": [...], "opt": [...], "max": [...]}}``."""
        return {n: {k: list(s) for k, s in zip(_KINDS, t)} for n, t in sorted(self.shapes.items())}

    @classmethod
    def from_json(cls, data: Mapping) -> "Profile":
        try:
            return cls({n: tuple(tuple(d[k]) for k in _KINDS) for n, d in data.items()})
        except (KeyError, TypeError, AttributeError):
            raise ShapeError(f"malformed optimization profile data: {data!r}") from None


def _default_range() -> tuple:
    return DEFAULT_MIN_DIM, DEFAULT_OPT_DIM, DEFAULT_MAX_DIM


def default_profile(graph) -> Profile:
    """Static dims fixed; every symbolic dim in ``[DEFAULT_MIN_DIM, DEFAULT_MAX_DIM]``, opt ``DEFAULT_OPT_DIM``."""
    return Profile({}).validate(graph)


def resolve_profiles(profiles, graph) -> list:
    """A session's ``profiles=`` argument -> a list of validated profiles (the default one for None).

    Accepts a ``Profile``, a dict of input name -> triple, or a list of either.
    """
    if profiles is None:
        return [default_profile(graph)]
    if isinstance(profiles, (Profile, Mapping)):
        profiles = [profiles]
    if not isinstance(profiles, Sequence) or isinstance(profiles, str) or not profiles:
        raise ShapeError(f"profiles must be a Profile, a dict of input name -> (min, opt, max) shapes, "
                         f"or a non-empty list of them; got {profiles!r}")
    out = []
    for i, p in enumerate(profiles):
        p = p if isinstance(p, Profile) else Profile(p)
        try:
            out.append(p.validate(graph))
        except (ShapeError, InputError) as e:
            raise type(e)(f"profile {i}: {e}") from None
    return out


def select(profiles: Sequence[Profile], shapes: Mapping[str, tuple]) -> int:
    """The index of the first profile that contains every input shape, else an ``InputError``.

    The error names the input, its shape and what every profile allows for it; when different
    profiles reject different inputs, it names each profile's first misfit.
    """
    misfits = []
    for i, p in enumerate(profiles):
        name = p.first_misfit(shapes)
        if name is None:
            return i
        misfits.append(name)
    common = [n for n in shapes if all(not p.contains(n, shapes[n]) for p in profiles)]
    if common:
        name = common[0]
        allowed = "; ".join(f"profile {i} allows {p.describe(name)}" for i, p in enumerate(profiles))
        raise InputError(f"input '{name}' shape {tuple(shapes[name])} is outside every optimization profile: "
                         f"{allowed}")
    given = ", ".join(f"'{n}' {tuple(s)}" for n, s in shapes.items())
    reasons = "; ".join(f"profile {i} allows {n!r} {p.describe(n)}, not {tuple(shapes[n])}"
                        for i, (p, n) in enumerate(zip(profiles, misfits)))
    raise InputError(f"input shapes {given} fit no single optimization profile: {reasons}")
