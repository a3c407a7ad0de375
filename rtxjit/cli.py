"""The ``rtxjit`` command line, in the spirit of ``trtexec`` / ``tensorrt_rtx``.

    rtxjit build   --onnx m.onnx [--shapes x:8x3x224x224 | --min-shapes .. --opt-shapes .. --max-shapes ..]
                   [--fp16 | --bf16] [--sm 89,90 | --sm current] [--strip-weights] [--no-kernels] --save-engine m.rtx
    rtxjit run     (--onnx m.onnx | --load-engine m.rtx [--refit-onnx m.onnx]) [--shapes ..] [--fp16 | --bf16]
                   [--runtime-cache DIR] [--specialize lazy|eager|none] [--warmup N] [--iterations N]
                   [--device cuda|cpu]
    rtxjit profile (same model flags as run) [--export-profile FILE.json]
    rtxjit inspect (--onnx m.onnx | --load-engine m.rtx) [--passes] [--launches] [--kernel INDEX|NAME]
                   [--specialized] [--shapes ..]
    rtxjit demo    (the built-in models against onnxruntime)

``build`` needs no GPU when ``--sm`` names the targets (the default, ``current``, is the GPU's SM)
and prints a progress line per phase on stderr (import, passes and checks, save; a bar redrawn in
place on a terminal). ``--shapes`` takes trtexec's syntax (``name:1x3x224x224,other:1x128``); for
``build`` it fixes those inputs' shapes (min = opt = max). ``run``, ``profile`` and ``inspect
--kernel`` feed random non-zero inputs of each input's type (integers 0 or 1, safe as indices and
flags); an input that ``--shapes`` leaves out takes its symbolic dims from the inputs it names,
else the shape its first optimization profile is tuned for (``opt``; for an engine, the profile it
was built with). ``run`` and ``profile`` time the steady state: after the warm-up they wait for
the background specializer (``--specialize``) to serve its kernels.

``profile`` times every kernel launch of the plan alone (CUDA events on a GPU, wall time under the
CPU interpreter) and prints, per launch, its node, kernel, which variant served it, time, share of
the total, bytes and flops, and on a GPU the roofline floor and the percentage of it reached
(``rtxjit.exec.roofline`` says how each is counted). ``inspect`` prints the imported graph
(``--passes``: after the pass pipeline; an engine's metadata and optimized graph), or with
``--launches`` / ``--kernel`` the plan's launches and a kernel's generated Triton source for the
given shapes (built without running it), so ``--kernel 3 > k.py`` gives a Python file.

Errors that a user can fix (a missing or malformed file, a bad ``--shapes``, an unknown input, an
input outside the engine's profiles, a weight-stripped engine) print one line, ``rtxjit: error:
...``, naming the file, input or weight, and exit with status 1; command-line usage errors exit with
status 2 (argparse's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np


OWN_TYPES = "the model's own types"


# --- shared helpers -----------------------------------------------------------------------------

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


# --- build --------------------------------------------------------------------------------------

class Progress:
    """Phases of a build on stderr: a bar redrawn in place on a terminal; otherwise one plain line
    per finished phase (``build [#######.............] 1/3 import: 0.012 s``), easy to parse."""

    WIDTH = 20

    def __init__(self, phases: list, stream=None):
        self.phases = list(phases)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0

    def _bar(self) -> str:
        filled = round(self.WIDTH * self.done / len(self.phases))
        return "[" + "#" * filled + "." * (self.WIDTH - filled) + f"] {self.done}/{len(self.phases)}"

    def step(self, done: int, total: int, what: str) -> None:
        """Progress inside a phase (kernels compiled: ``done`` of ``total``)."""
        if self.tty:
            self.stream.write(f"\r\033[Kbuild {self._bar()} kernels {done}/{total} {what}")
        elif done == total or done % 10 == 0:
            self.stream.write(f"build {self._bar()} kernels {done}/{total}\n")
        self.stream.flush()

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        if self.tty:
            self.stream.write(f"\r\033[Kbuild {self._bar()} {name} ...")
            self.stream.flush()
        try:
            yield
        except BaseException:
            if self.tty:
                self.stream.write("\n")
            raise
        self.done += 1
        seconds = time.perf_counter() - start
        if self.tty:
            end = "\n" if self.done == len(self.phases) else ""
            self.stream.write(f"\r\033[Kbuild {self._bar()} {name}: {seconds:.3f} s{end}")
        else:
            self.stream.write(f"build {self._bar()} {name}: {seconds:.3f} s\n")
        self.stream.flush()


def _targets(text) -> list:
    """``--sm`` as a list for ``rtxjit.build``: "89,90", "sm_89,sm_90", "current"; without it, the
    GPU's SM, or an error on a machine without a GPU."""
    from rtxjit.errors import EngineError

    if text is None:
        import torch

        if not torch.cuda.is_available():
            raise EngineError("no GPU here to build for (the default is --sm current): name the SM targets, "
                              "e.g. --sm 90 or --sm 80,86,89,90")
        return ["current"]
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise EngineError(f"--sm '{text}' names no SM target: use e.g. --sm 89,90 or --sm current")
    return items


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
    if not any(ranged):
        return None
    if not args.opt_shapes:
        raise ShapeError("--min-shapes and --max-shapes need --opt-shapes (the shapes to tune for)")
    return Profile.from_strings(args.min_shapes or args.opt_shapes, args.opt_shapes,
                                args.max_shapes or args.opt_shapes)


def _describe_profile(profile) -> str:
    from rtxjit.plan.profiles import describe_range

    return "; ".join(f"{name} {describe_range(t)} opt {list(t[1])}" for name, t in sorted(profile.shapes.items()))


def cmd_build(args) -> int:
    import rtxjit
    from rtxjit.engine.engine import parse_targets
    from rtxjit.errors import EngineError
    from rtxjit.frontdoor import import_graph

    sms = parse_targets(_targets(args.sm))
    profile = _profile_arg(args)
    target = Path(args.save_engine)
    if target.is_dir() or not target.parent.is_dir():
        raise EngineError(f"cannot save engine to '{target}': "
                          + ("it is a folder" if target.is_dir() else f"folder '{target.parent}' does not exist"))
    progress = Progress(["import", "passes, checks and kernels", "save"])
    start = time.perf_counter()
    with progress.phase("import"):
        graph = import_graph(args.onnx)  # then rtxjit.build takes it through the front door's passes
    imported = time.perf_counter()
    with progress.phase("passes, checks and kernels"):
        engine = rtxjit.build(graph, targets=list(sms), profiles=profile, precision=args.precision,
                              strip_weights=args.strip_weights, kernels=not args.no_kernels,
                              progress=progress.step)
    built = time.perf_counter()
    with progress.phase("save"):
        path = engine.save(args.save_engine)
    saved = time.perf_counter()
    weights = engine.weights
    weight_bytes = sum(w.nbytes for w in weights)
    size = Path(path).stat().st_size
    print(f"engine: {path}")
    print(f"size: {_mb(size)}")
    print(f"build time: {built - start:.3f} s (import {imported - start:.3f} s, passes and checks "
          f"{built - imported:.3f} s); saved in {saved - built:.3f} s")
    print(f"targets: {', '.join('sm_%d' % t for t in engine.targets)}")
    print(f"precision: {engine.precision or OWN_TYPES}")
    if args.strip_weights:
        print(f"stripped: yes ({len(weights)} weights, {weight_bytes:,} bytes not stored; refittable: "
              "rtxjit.Refitter(engine).refit_from_onnx(model), or run with --refit-onnx)")
    else:
        print(f"stripped: no ({len(weights)} weights, {weight_bytes:,} bytes stored)")
    report = getattr(engine, "build_report", None)
    per = ", ".join(f"sm_{sm}: {n}" for sm, n in sorted((report or {}).get("per_target", {}).items()))
    print(f"compiled kernels: {len(engine.binaries)}" + (f" ({per}; {report['seconds']:.1f} s)" if report else ""))
    for i, p in enumerate(engine.profiles):
        print(f"profile {i}: {_describe_profile(p)}")
    return 0


# --- run ----------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    sess, what = _open(args)
    shapes = _input_shapes(sess, args.shapes, what)
    feeds = _random_feeds(sess, shapes)
    for name, x in feeds.items():
        print(f"input {name}: shape {list(x.shape)} {str(x.dtype).replace('torch.', '')}")
    first = time.perf_counter()
    outputs = sess.run(None, feeds)
    first = time.perf_counter() - first
    if args.warmup:
        _time_runs(sess, feeds, args.warmup, 0)
    _settle(sess, feeds)
    times = _time_runs(sess, feeds, 0, args.iterations)
    for o, v in zip(sess.get_outputs(), outputs):
        v = _numpy(v)
        print(f"output {o.name}: shape {list(v.shape)} {v.dtype} mean {float(np.mean(v)):.6g}")
    median = float(np.median(times))
    print(f"first run: {first * 1e3:.3f} ms (builds the plan, loads kernels)")
    print(f"latency: median {median * 1e3:.3f} ms, mean {float(np.mean(times)) * 1e3:.3f} ms, min "
          f"{min(times) * 1e3:.3f} ms, max {max(times) * 1e3:.3f} ms over {args.iterations} iterations "
          f"({args.warmup} warm-up) on {sess.device}")
    print(f"throughput: {1.0 / median:.2f} inferences/s")
    print(f"launches per inference: {sess.launches_per_inference}")
    print(_jit_line(sess))
    return 0


# --- profile ------------------------------------------------------------------------------------

PROFILE_COLUMNS = ("#", "node", "kernel", "variant", "time us", "share", "bytes", "flops", "floor us",
                   "% roofline")


def _profile_rows(plan, kinds: list, times: list, machine) -> list:
    from rtxjit.exec import roofline

    total = sum(times) or 1.0
    rows = []
    for i, (step, kind, seconds) in enumerate(zip(plan.steps, kinds, times)):
        counts = roofline.step_counts(plan, step)
        floor = machine.floor(counts) if machine is not None else None
        rows.append({"index": i, "node": step.node, "kernel": step.kernel.name, "key": step.kernel.short_key,
                     "variant": kind, "seconds": seconds, "share": seconds / total, "bytes": counts.bytes,
                     "flops": counts.flops, "operand": counts.operand, "floor_seconds": floor,
                     "roofline": None if floor is None or seconds <= 0 else floor / seconds})
    return rows


def _profile_table(rows: list) -> list:
    """Lines of the table: fixed column order, widths from the longest node and kernel names."""
    wn = max([len("node")] + [len(r["node"]) for r in rows])
    wk = max([len("kernel")] + [len(r["kernel"]) for r in rows])
    widths = (4, wn, wk, 11, 11, 7, 9, 9, 10, 10)
    left = {1, 2, 3}

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    def na(x, fmt) -> str:
        return "n/a" if x is None else fmt(x)

    out = [line(PROFILE_COLUMNS)]
    for r in rows:
        out.append(line((str(r["index"]), r["node"], r["kernel"], r["variant"], f"{r['seconds'] * 1e6:.2f}",
                         f"{r['share'] * 100:.1f}%", _si(r["bytes"]), _si(r["flops"]),
                         na(r["floor_seconds"], lambda x: f"{x * 1e6:.2f}"),
                         na(r["roofline"], lambda x: f"{x * 100:.1f}%"))))
    total = sum(r["seconds"] for r in rows)
    floors = [r["floor_seconds"] for r in rows]
    floor = None if any(f is None for f in floors) else sum(floors)
    out.append(line(("", "total", "", "", f"{total * 1e6:.2f}", "100.0%", _si(sum(r["bytes"] for r in rows)),
                     _si(sum(r["flops"] for r in rows)), na(floor, lambda x: f"{x * 1e6:.2f}"),
                     na(None if floor is None or total <= 0 else floor / total, lambda x: f"{x * 100:.1f}%"))))
    return out


def cmd_profile(args) -> int:
    from rtxjit.exec import roofline

    sess, what = _open(args)
    shapes = _input_shapes(sess, args.shapes, what)
    feeds = _random_feeds(sess, shapes)
    _time_runs(sess, feeds, max(1, args.warmup), 0)
    _settle(sess, feeds)
    plan, kinds, times = sess.time_launches(feeds, args.iterations, warmup=1)
    end_to_end = float(np.median(_time_runs(sess, feeds, 0, args.iterations)))
    machine = roofline.measure_machine() if sess.device.kind == "cuda" else None
    rows = _profile_rows(plan, kinds, times, machine)
    shape_text = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    print(f"profile of {what} on {sess.device}: {len(rows)} launches, inputs {shape_text}; median of "
          f"{args.iterations} iterations, each launch timed alone "
          f"({'CUDA events' if machine is not None else 'wall time under the interpreter'})")
    if machine is not None:
        print(f"machine: bandwidth {machine.bandwidth / 1e9:.1f} GB/s (device copy), peak "
              f"{machine.peak_fp16 / 1e12:.1f} TFLOP/s fp16, {machine.peak_fp32 / 1e12:.1f} TFLOP/s fp32 "
              "(torch.matmul)")
        print("roofline: floor = max(bytes / bandwidth, flops / peak), bytes and flops counted from each launch's "
              "buffers and sizes (rtxjit/exec/roofline.py); % roofline = floor / time (100% = at the floor)")
    else:
        print("roofline: n/a on the CPU: the % roofline column needs a GPU (measured bandwidth and peak); "
              "times are the Triton interpreter's wall times")
    for text in _profile_table(rows):
        print(text)
    print(f"end to end: {end_to_end * 1e3:.4f} ms per inference (median of {args.iterations} session runs)")
    if args.export_profile:
        doc = {"source": what, "device": str(sess.device), "inputs": {n: list(s) for n, s in shapes.items()},
               "iterations": args.iterations, "end_to_end_seconds": end_to_end,
               "machine": None if machine is None else {"name": machine.name, "bandwidth": machine.bandwidth,
                                                        "peak_fp16": machine.peak_fp16,
                                                        "peak_fp32": machine.peak_fp32},
               "launches": rows}
        Path(args.export_profile).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"profile written to {args.export_profile}")
    return 0


# --- inspect ------------------------------------------------------------------------------------

def _engine_metadata(path: str) -> list:
    from rtxjit.engine.engine import current_versions, read_metadata
    from rtxjit.plan.profiles import Profile

    meta = read_metadata(path)
    now = current_versions()
    weights = meta.get("weights") or []
    weight_bytes = sum(int(w.get("nbytes", 0)) for w in weights if isinstance(w, dict))
    members = meta.get("members") or {}
    binaries = meta.get("binaries") or []

    def version(key: str, short: bool = False) -> str:
        found = str(meta.get(f"{key}_version"))
        shown = found[:12] if short else found
        return shown if found == now[key] else f"{shown} (this is {now[key][:12] if short else now[key]})"

    lines = [f"engine: {path}",
             f"  size: {_mb(Path(path).stat().st_size)}",
             f"  format: {meta.get('format')} version {meta.get('format_version')}",
             f"  built by: rtxjit {version('rtxjit')}, codegen {version('codegen', True)}, "
             f"triton {version('triton')}",
             f"  targets: {', '.join('sm_%s' % t for t in meta.get('targets') or [])}",
             f"  precision: {meta.get('precision') or OWN_TYPES}",
             f"  stripped: {'yes' if meta.get('stripped') else 'no'} ({len(weights)} weights, {weight_bytes:,} "
             f"bytes{' not stored' if meta.get('stripped') else ''}); refittable: "
             f"{'yes' if meta.get('refittable') else 'no'}",
             f"  compiled kernels: {len(binaries)} ({sum(int(b.get('size', 0)) for b in binaries):,} bytes)",
             "  members besides engine.json: " + (", ".join(f"{n} {int(m.get('size', 0)):,} bytes"
                                                          for n, m in sorted(members.items()) if isinstance(m, dict))
                                                 or "none")]
    for i, p in enumerate(meta.get("profiles") or []):
        lines.append(f"  profile {i}: {_describe_profile(Profile.from_json(p))}")
    return lines


def _pick_steps(plan, which: str) -> list:
    from rtxjit.errors import RtxjitError

    steps = plan.steps
    try:
        index = int(which)
    except ValueError:
        index = None
    if index is not None:
        if not -len(steps) <= index < len(steps):
            raise RtxjitError(f"--kernel {which}: the plan has {len(steps)} launches (0 to {len(steps) - 1}); "
                              "--launches lists them")
        return [index % len(steps)]
    found = [i for i, s in enumerate(steps)
             if which in (s.kernel.name, s.node, s.kernel.short_key, f"{s.kernel.name}:{s.kernel.short_key}")]
    if not found:
        names = sorted({s.kernel.name for s in steps})
        raise RtxjitError(f"--kernel '{which}' is no launch's index, kernel name, key or node; the kernels are "
                          f"{', '.join(names)} (--launches lists every launch)")
    return found


def cmd_inspect(args) -> int:
    from rtxjit.frontdoor import optimized_graph

    if args.kernel is None and not args.launches:
        if args.load_engine:
            for text in _engine_metadata(args.load_engine):
                print(text)
            print(_load_engine(args).ir)
            return 0
        optimize = bool(args.passes or args.precision)
        print(optimized_graph(args.onnx, optimize=optimize, precision=args.precision).graph)
        return 0
    sess, what = _open(args, specialize="none")  # the plan only: nothing runs
    shapes = _input_shapes(sess, args.shapes, what)
    plan = sess.plan(shapes, _random_feeds(sess, shapes))  # host-read inputs (shape tensors) get random values
    if args.launches:
        print(f"# {len(plan.steps)} launches of {what} for inputs "
              + ", ".join(f"{n} {list(s)}" for n, s in shapes.items()))
        wn = max(len(s.node) for s in plan.steps) if plan.steps else 0
        wk = max(len(s.kernel.name) for s in plan.steps) + 13 if plan.steps else 0
        for i, s in enumerate(plan.steps):
            kernel = f"{s.kernel.name}:{s.kernel.short_key}"
            print(f"{i:4d}  {s.node:<{wn}}  {kernel:<{wk}}  grid {list(s.grid)}")
        if args.kernel is None:
            return 0
    from rtxjit.exec.executor import specialized_source

    shown = {}
    for i in _pick_steps(plan, args.kernel):
        step = plan.steps[i]
        src = specialized_source(step) if args.specialized else step.kernel
        shown.setdefault(src.key, (src, []))[1].append(i)
    for src, indices in shown.values():
        for i in indices:
            step = plan.steps[i]
            cx = ", ".join(f"{k}={v}" for k, v in sorted(step.constexprs.items()))
            print(f"# launch {i} of {len(plan.steps)}: node '{step.node}', grid {list(step.grid)}, {cx}")
        kind = "specialized for these sizes" if args.specialized else "generic over sizes; --specialized shows " \
            "the kernel specialized for these sizes"
        print(f"# inputs {', '.join(f'{n} {list(s)}' for n, s in shapes.items())}; source {kind}")
        print(src.text)
    return 0


# --- demo ---------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    import onnxruntime as ort

    from rtxjit.models import DEMO_MODELS, demo_inputs

    names = list(DEMO_MODELS) if args.model == "all" else [args.model]
    worst = 0.0
    for name in names:
        for dtype in (np.float32, np.float16) if args.dtype == "both" else (np.dtype(args.dtype),):
            model = DEMO_MODELS[name](dtype=dtype)
            feeds = demo_inputs(model, batch=args.batch)
            ref_model = DEMO_MODELS[name](dtype=np.float32)
            ref = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, {k: v.astype(np.float32) for k, v in feeds.items()})[0]
            sess = _session(model, args.device)
            t0 = time.perf_counter()
            out = sess.run(None, feeds)[0]
            first = time.perf_counter() - t0
            err = float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())
            tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-2
            per = float(np.median(_time_runs(sess, feeds, 1, args.iterations)))
            worst = max(worst, err / tol)
            status = "OK" if err <= tol else "MISMATCH"
            print(f"{name:8s} {np.dtype(dtype).name:8s} batch {args.batch}  on {sess.device}: "
                  f"rel. error vs onnxruntime {err:.2e} (tolerance {tol:.0e}) {status}; "
                  f"first run {first * 1e3:.1f} ms, then {per * 1e3:.2f} ms per inference")
    return 0 if worst <= 1 else 1


# --- the parser ---------------------------------------------------------------------------------

def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def _model_args(p, engine: bool = True) -> None:
    if engine:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--onnx", metavar="MODEL.onnx", help="the ONNX model")
        src.add_argument("--load-engine", metavar="ENGINE", help="an engine file written by 'rtxjit build'")
    else:
        p.add_argument("--onnx", metavar="MODEL.onnx", required=True, help="the ONNX model")


def _precision_args(p, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                   help=f"convert the model's fp32 values to fp16 ({what})")
    g.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                   help=f"convert the model's fp32 values to bf16 ({what})")


def _shapes_arg(p) -> None:
    p.add_argument("--shapes", default="", metavar="SHAPES",
                   help="input shapes, trtexec's syntax: name:1x3x224x224,other:1x128 (default: the profile's opt "
                        "shapes)")


def _run_args(p) -> None:
    p.add_argument("--runtime-cache", default=None, metavar="DIR", help="keep compiled kernels across processes")
    p.add_argument("--specialize", choices=["lazy", "eager", "none"], default=None,
                   help="when shape-specialized kernels replace the generic ones (default: lazy on a GPU, none on "
                        "the CPU); timing starts once they serve")
    p.add_argument("--refit-onnx", default=None, metavar="MODEL.onnx",
                   help="a weight-stripped engine's weights, from the model it was built from")


def _timing_args(p, warmup: int, iterations: int) -> None:
    p.add_argument("--warmup", type=_count(0), default=warmup, metavar="N", help=f"untimed runs first ({warmup})")
    p.add_argument("--iterations", type=_count(1), default=iterations, metavar="N",
                   help=f"timed runs; the median is reported ({iterations})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtxjit", description="JIT inference compiler: ONNX -> Triton kernels. "
                                "Build engines ahead of time, run, profile and inspect them (trtexec-style flags).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="cuda, or cpu (Triton's interpreter); default: a GPU if torch sees one")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an engine ahead of time (no GPU needed with --sm)")
    _model_args(b, engine=False)
    _shapes_arg(b)
    b.add_argument("--min-shapes", default="", metavar="SHAPES", help="optimization profile: smallest shapes")
    b.add_argument("--opt-shapes", default="", metavar="SHAPES", help="optimization profile: shapes to tune for")
    b.add_argument("--max-shapes", default="", metavar="SHAPES", help="optimization profile: largest shapes")
    _precision_args(b, "precision legality is checked for every target")
    b.add_argument("--sm", default=None, metavar="SMS",
                   help="SM targets: 80,86,89,90,120 (or sm_90), or 'current' (the GPU's; the default)")
    b.add_argument("--strip-weights", action="store_true", help="store no weights (refit them later)")
    b.add_argument("--no-kernels", action="store_true",
                   help="store no compiled kernels (the GPU compiles them at first use); by default every "
                        "kernel of the profiles is compiled for each target, no GPU needed")
    b.add_argument("--save-engine", required=True, metavar="ENGINE", help="where to write the engine")
    b.set_defaults(fn=cmd_build)

    r = sub.add_parser("run", parents=[common], help="run a model or engine on random inputs and time it")
    _model_args(r)
    _shapes_arg(r)
    _precision_args(r, "--onnx only")
    _run_args(r)
    _timing_args(r, 2, 10)
    r.set_defaults(fn=cmd_run)

    f = sub.add_parser("profile", parents=[common], help="time every kernel launch against its roofline floor")
    _model_args(f)
    _shapes_arg(f)
    _precision_args(f, "--onnx only")
    _run_args(f)
    f.add_argument("--export-profile", default=None, metavar="FILE.json", help="also write the table as JSON")
    _timing_args(f, 2, 10)
    f.set_defaults(fn=cmd_profile)

    i = sub.add_parser("inspect", parents=[common],
                       help="print the graph (after passes for an engine), or launches and kernel sources")
    _model_args(i)
    _shapes_arg(i)
    _precision_args(i, "--onnx only; implies --passes")
    i.add_argument("--passes", action="store_true", help="the graph after the pass pipeline (an engine's always is)")
    i.add_argument("--launches", action="store_true", help="list the kernel launches of the plan for --shapes")
    i.add_argument("--kernel", default=None, metavar="INDEX|NAME",
                   help="print the generated Triton source of a launch (by index, kernel name, key or node)")
    i.add_argument("--specialized", action="store_true",
                   help="with --kernel: the source specialized for these sizes, not the generic one")
    i.add_argument("--refit-onnx", default=None, metavar="MODEL.onnx",
                   help="a weight-stripped engine's weights (needed for --kernel/--launches)")
    i.set_defaults(fn=cmd_inspect)

    d = sub.add_parser("demo", parents=[common], help="run the built-in models and compare with onnxruntime")
    d.add_argument("--model", choices=["cnn", "encoder", "all"], default="all")
    d.add_argument("--dtype", choices=["float32", "float16", "both"], default="both")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--iterations", type=int, default=3)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from rtxjit.errors import RtxjitError  # importing rtxjit first readies Triton (see rtxjit.config)

    try:
        return args.fn(args)
    except RtxjitError as exc:
        print(f"rtxjit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a folder that cannot be written, a path that is a directory ...
        print(f"rtxjit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rtxjit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
