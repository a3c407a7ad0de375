"""``rtxjit build``: an engine ahead of time (no GPU needed with ``--sm``)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rtxjit.cli.common import OWN_TYPES, _describe_profile, _mb


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
