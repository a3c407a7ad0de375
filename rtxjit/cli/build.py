"""``rtxjit build``: an engine ahead of time (no GPU needed with ``--sm``)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rtxjit.cli.common import (OWN_TYPES, _describe_profile, _dims_text, _mb, _profile_arg, _unset_profile_dims,
                               _warn)


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


# What an engine is built for where there is no GPU to build for and no --sm: every common SM, no
# compiled kernels (each GPU compiles its own at first use). It runs on any of them and on the CPU.
PORTABLE_TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")


def _targets(text):
    """``--sm`` as a list for ``rtxjit.build``: "89,90", "sm_89,sm_90", "current"; without it, the
    GPU's SM, or None on a machine without a GPU (a portable engine: PORTABLE_TARGETS, no kernels)."""
    from rtxjit.errors import EngineError

    if text is None:
        import torch

        return ["current"] if torch.cuda.is_available() else None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise EngineError(f"--sm '{text}' names no SM target: use e.g. --sm 89,90 or --sm current")
    return items


def cmd_build(args) -> int:
    import rtxjit
    from rtxjit.engine.engine import parse_targets
    from rtxjit.errors import EngineError
    from rtxjit.frontdoor import import_graph

    targets = _targets(args.sm)
    kernels = not args.no_kernels
    if targets is None:
        targets, kernels = list(PORTABLE_TARGETS), False
        _warn(f"no GPU here and no --sm: building a portable engine for {', '.join(targets)} without compiled "
              "kernels (a GPU compiles them at first use; the CPU runs it too); --sm 90 (say) compiles them now")
    sms = parse_targets(targets)
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
    shapes = {v.name: v.type.shape for v in graph.inputs}  # the model's own (symbolic) dims, for warnings
    with progress.phase("passes, checks and kernels"):
        engine = rtxjit.build(graph, targets=list(sms), profiles=profile, precision=args.precision,
                              strip_weights=args.strip_weights, kernels=kernels,
                              progress=progress.step)
    built = time.perf_counter()
    with progress.phase("save"):
        path = engine.save(args.save_engine)
    saved = time.perf_counter()
    for name, dims in _unset_profile_dims(engine.profiles[0], profile):  # after the progress bar's last line
        lo, opt, hi = engine.profiles[0].shapes[name]
        _warn(f"input '{name}': dynamic {_dims_text(shapes.get(name, opt), dims)} not set by --shapes or "
              f"--min-shapes/--opt-shapes/--max-shapes: the engine accepts {lo[dims[0]]}..{hi[dims[0]]} and is "
              f"tuned for {opt[dims[0]]} there; choose with --minShapes/--optShapes/--maxShapes")
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
