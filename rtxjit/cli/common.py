"""Helpers the subcommands share: opening a model or engine, input shapes and random feeds, timing, formats."""

from __future__ import annotations

import time

import numpy as np


OWN_TYPES = "the model's own types"


def _session(model, device, **kwargs):
    import rtxjit

    return rtxjit.InferenceSession(model, device=device, **kwargs)


def _time_runs(sess, feeds: dict, warmup: int, iterations: int) -> list:
    """Seconds of each of ``iterations`` inferences, after ``warmup`` (the first run builds the
    plan and loads kernels)."""
    import torch

    cuda = sess.device.kind == "cuda"
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(iterations):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sess.run(None, feeds)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


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
    if args.load_engine:
        from rtxjit.errors import EngineError

        engine = _load_engine(args)
        try:
            sess = _session(engine, args.device, runtime_cache=cache, **kwargs)
        except EngineError as exc:
            if not engine.stripped:
                raise
            raise EngineError(f"{exc}; on the command line: --refit-onnx MODEL.onnx") from None
        return sess, f"engine file '{args.load_engine}'"
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
    return shapes


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
