"""Helpers the subcommands share: opening a model or engine, input shapes and random feeds, timing, formats."""

from __future__ import annotations

import sys
import time

import numpy as np


OWN_TYPES = "the model's own types"


def _session(model, device, **kwargs):
    import rtxjit

    return rtxjit.InferenceSession(model, device=device, **kwargs)


def _time_runs(sess, feeds: dict, warmup: int, iterations: int, duration: float = 0.0) -> list:
    """Seconds of each timed inference, after ``warmup`` untimed ones (the first run builds the
    plan and loads kernels): ``iterations`` of them, and more until ``duration`` seconds have
    passed (trtexec's ``--iterations`` and ``--duration`` are both minimums)."""
    import torch

    cuda = sess.device.kind == "cuda"
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    start = time.perf_counter()
    while len(times) < iterations or time.perf_counter() - start < duration:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sess.run(None, feeds)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _warm_up(sess, feeds: dict, runs: int, ms: float) -> int:
    """Untimed runs: ``runs`` of them (``--warmup``), and more until ``ms`` milliseconds have passed
    (trtexec's ``--warmUp``). Returns how many ran."""
    done = 0
    start = time.perf_counter()
    while done < runs or (time.perf_counter() - start) * 1e3 < ms:
        sess.run(None, feeds)
        done += 1
    return done


def _warn(text: str) -> None:
    """A warning the user should read (a default chosen for them), one line on stderr."""
    print(f"rtxjit: warning: {text}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _load_engine(args):
    """The engine of ``--load-engine``, refitted from ``--refit-onnx`` when given."""
    import rtxjit
    from rtxjit.errors import EngineError

    engine = rtxjit.Engine.load(args.load_engine, device=getattr(args, "device", None))
    precision = getattr(args, "precision", None)
    if precision is not None and precision != engine.precision:
        raise EngineError(f"engine file '{args.load_engine}' was built with precision "
                          f"{engine.precision or 'of the model (none given)'}; --{precision} applies when "
                          "building (rtxjit build), not to a built engine")
    refit = getattr(args, "refit_onnx", None)
    if refit:
        refitter = rtxjit.Refitter(engine)
        refitter.refit_from_onnx(refit)
        refitter.refit()
    return engine


def _open(args, **kwargs):
    """``(session, what)``: a session of ``--onnx`` or ``--load-engine``, and a name for messages."""
    cache = getattr(args, "runtime_cache", None)
    kwargs.setdefault("specialize", getattr(args, "specialize", None))
    ranged = _range_profile(args) if hasattr(args, "opt_shapes") else None
    if args.load_engine:
        from rtxjit.errors import EngineError

        if ranged is not None:
            raise EngineError(f"--min-shapes/--opt-shapes/--max-shapes apply to --onnx (or when building); engine "
                              f"file '{args.load_engine}' keeps the profiles it was built with: choose the shapes "
                              "to run with --shapes")
        engine = _load_engine(args)
        try:
            sess = _session(engine, args.device, runtime_cache=cache, **kwargs)
        except EngineError as exc:
            if not engine.stripped:
                raise
            raise EngineError(f"{exc}; on the command line: --refit-onnx MODEL.onnx") from None
        return sess, f"engine file '{args.load_engine}'"
    if ranged is not None:
        kwargs["profiles"] = ranged
    return (_session(args.onnx, args.device, precision=args.precision, runtime_cache=cache, **kwargs),
            f"model file '{args.onnx}'")


def _input_shapes(sess, text: str, what: str) -> dict:
    """Concrete shape of every input: ``--shapes``, else symbols bound by the named inputs, else the
    first profile's opt shape. Unknown names, wrong ranks and wrong static dims name the input."""
    from rtxjit.errors import InputError
    from rtxjit.plan.profiles import parse_shapes

    given = parse_shapes(text) if text else {}
    inputs = {i.name: i for i in sess.get_inputs()}
    for name in given:
        if name not in inputs:
            raise InputError(f"--shapes names input '{name}', which {what} does not have; its inputs are "
                             f"{', '.join(repr(n) for n in inputs)}")
    symbols = {}
    for name, dims in given.items():
        want = inputs[name].shape
        if len(dims) != len(want):
            raise InputError(f"--shapes gives input '{name}' rank {len(dims)} {list(dims)}, but {what} has it as "
                             f"rank {len(want)} {want}")
        for i, (w, d) in enumerate(zip(want, dims)):
            if isinstance(w, int) and w != d:
                raise InputError(f"--shapes gives input '{name}' dim {i} = {d}, but it is static ({w}) in {what} "
                                 f"(shape {want})")
            if isinstance(w, str) and w != "?":
                symbols.setdefault(w, d)
    profile = sess.profiles[0]
    shapes = {}
    for name, i in inputs.items():
        if name in given:
            shapes[name] = tuple(given[name])
            continue
        opt = profile.opt(name)
        shapes[name] = tuple(symbols.get(w, d) if isinstance(w, str) else d for w, d in zip(i.shape, opt))
        unset = [k for k, w in enumerate(i.shape) if isinstance(w, str) and w not in symbols
                 and _chosen_by_nobody(profile, name, k)]
        if unset:
            pattern = "x".join(str(w) if k in unset else str(d) for k, (w, d) in enumerate(zip(i.shape, shapes[name])))
            _warn(f"input '{name}' of {what}: dynamic {_dims_text(i.shape, unset)} not set by --shapes or a "
                  f"profile: using shape {list(shapes[name])} (the default profile's opt); choose with --shapes "
                  f"{name}:{pattern}")
    return shapes


def _chosen_by_nobody(profile, name: str, dim: int) -> bool:
    """Whether a dim's range in ``profile`` is the default one that a model's symbolic dim gets
    (``rtxjit.plan.profiles.default_profile``): no one chose its opt value."""
    from rtxjit.plan.profiles import DEFAULT_MAX_DIM, DEFAULT_MIN_DIM, DEFAULT_OPT_DIM

    triple = tuple(s[dim] for s in profile.shapes[name])
    return triple == (DEFAULT_MIN_DIM, DEFAULT_OPT_DIM, DEFAULT_MAX_DIM)


def _dims_text(shape, dims: list) -> str:
    """``dim 0 ('batch')`` / ``dims 0 ('batch'), 1 ('seq')``: which dims of an input, by index and symbol."""
    named = [f"{k}" + (f" ('{shape[k]}')" if isinstance(shape[k], str) and shape[k] != "?" else "") for k in dims]
    return f"dim{'s' if len(dims) > 1 else ''} " + ", ".join(named)


def _profile_arg(args):
    """``--shapes`` (a fixed shape per named input) or ``--min/opt/max-shapes`` as a Profile; None
    keeps the model's default profile. A missing min or max shape is the opt shape (as in trtexec)."""
    from rtxjit.errors import ShapeError
    from rtxjit.plan.profiles import Profile, parse_shapes

    ranged = (args.min_shapes, args.opt_shapes, args.max_shapes)
    if args.shapes and any(ranged):
        raise ShapeError("give either --shapes (fixed shapes) or --min-shapes/--opt-shapes/--max-shapes "
                         "(a range), not both")
    if args.shapes:
        return Profile(parse_shapes(args.shapes))
    return _range_profile(args)


def _range_profile(args):
    """``--min/opt/max-shapes`` (trtexec's ``--minShapes/--optShapes/--maxShapes``) as a Profile, or
    None where none is given. A missing min or max shape is the opt shape (as in trtexec)."""
    from rtxjit.errors import ShapeError
    from rtxjit.plan.profiles import Profile

    if not any((args.min_shapes, args.opt_shapes, args.max_shapes)):
        return None
    if not args.opt_shapes:
        raise ShapeError("--min-shapes and --max-shapes need --opt-shapes (the shapes to tune for)")
    return Profile.from_strings(args.min_shapes or args.opt_shapes, args.opt_shapes,
                                args.max_shapes or args.opt_shapes)


def _unset_profile_dims(profile, given) -> list:
    """``(input, [dim, ...])`` for each input whose dynamic dims nobody chose: not in ``given``
    (the profile the user passed, or None) and at the default range in ``profile``."""
    out = []
    for name, triple in sorted(profile.shapes.items()):
        if given is not None and name in given.shapes:
            continue
        lo, opt, hi = triple
        dims = [k for k in range(len(opt)) if _chosen_by_nobody(profile, name, k)]
        if dims:
            out.append((name, dims))
    return out


def _random_feeds(sess, shapes: dict, seed: int = 0) -> dict:
    """Random non-zero feeds of each input's type: floats standard normal, integers 0 or 1 (safe as
    indices and flags), bools random. Types without a numpy dtype (bf16, fp8) become torch tensors."""
    import torch

    from rtxjit.exec.executor import torch_dtype

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        dims = shapes[i.name]
        if i.dtype.is_float:
            x = rng.standard_normal(dims)
        elif i.dtype.short == "bool":
            x = rng.random(dims) < 0.5
        else:
            x = rng.integers(0, 2, dims)
        try:
            feeds[i.name] = x.astype(i.dtype.to_numpy())
        except TypeError:  # no numpy dtype
            feeds[i.name] = torch.from_numpy(np.asarray(x, np.float32)).to(torch_dtype(i.dtype))
    return feeds


def _numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()


def _settle(sess, feeds: dict) -> None:
    """Let the background specializer finish and serve its kernels (steady state), where it runs."""
    if sess.specialize != "none":
        sess.wait_for_specialization(None)
        sess.run(None, feeds)


def _jit_line(sess) -> str:
    s = sess.jit_stats()
    return (f"jit: mode {s['mode']}, {s['compiles']} kernels compiled, {s['cache_hits']} loaded from caches, "
            f"{s['specialized']} bindings specialized, {s['rejected']} kernels rejected, {s['failed']} failed")


def _mb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:.2f} MB)"


def _si(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


def _describe_profile(profile) -> str:
    from rtxjit.plan.profiles import describe_range

    return "; ".join(f"{name} {describe_range(t)} opt {list(t[1])}" for name, t in sorted(profile.shapes.items()))
