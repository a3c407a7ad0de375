"""What a pass is, and the manager that runs a pipeline of them.

A pass is a function ``Graph -> PassResult``. It edits the graph it is given in place and returns
it, with ``modified`` saying whether anything changed (the manager repeats a pipeline until nothing
does, where asked). A pass may carry ``requires(graph)`` / ``ensures(graph)`` checks (as onnx_ir's
pass infra does) that raise ``PassError`` when a pre- or postcondition fails; ``conditions``
attaches them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

from rtxjit.errors import RtxjitError
from rtxjit.ir.graph import Graph
from rtxjit.ir.verify import verify as verify_graph


class PassError(RtxjitError, RuntimeError):
    """A pass broke the graph, or a pass's pre- or postcondition does not hold."""


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool


class Pass(Protocol):
    """A named function ``Graph -> PassResult``; ``requires`` / ``ensures`` are optional attributes."""

    __name__: str

    def __call__(self, graph: Graph) -> PassResult: ...


def conditions(requires: Optional[Callable] = None, ensures: Optional[Callable] = None):
    """Attach pre- and postcondition checks (functions of the graph that raise PassError) to a pass."""

    def deco(fn):
        fn.requires, fn.ensures = requires, ensures
        return fn

    return deco


@dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float
    modified: bool


class PassManager:
    """Runs a flat list of named passes, top to bottom; is a pass itself.

    ``verify``: run the IR verifier after every pass (debug mode); a failure names the pass.
    ``dump``: write the graph's text after every pass: "-" to stderr, else into that directory.
    ``repeat_until_fixed``: run the list again while some pass modified the graph (``max_rounds``).
    ``timings`` holds a ``PassTiming`` per pass run of the last call.
    """

    def __init__(self, steps: list, verify: bool = False, dump: Optional[str] = None,
                 repeat_until_fixed: bool = False, max_rounds: int = 8):
        self.steps = list(steps)
        self.verify = verify
        self.dump = dump
        self.repeat_until_fixed = repeat_until_fixed
        self.max_rounds = max_rounds
        self.timings: list = []
        self.__name__ = "pipeline"

    def __call__(self, graph: Graph) -> PassResult:
        self.timings = []
        self._dump(graph, "00_00_input")
        modified = False
        for round_ in range(1, self.max_rounds + 1):
            changed = False
            for index, (name, fn) in enumerate(self.steps, 1):
                graph, step_changed = self._run_step(name, fn, graph)
                changed = changed or step_changed
                self._dump(graph, f"{round_:02d}_{index:02d}_{name}")
            modified = modified or changed
            if not (self.repeat_until_fixed and changed):
                break
        return PassResult(graph, modified)

    def _run_step(self, name: str, fn: Pass, graph: Graph) -> tuple:
        _check(getattr(fn, "requires", None), graph, f"precondition of pass '{name}'")
        start = time.perf_counter()
        result = fn(graph)
        self.timings.append(PassTiming(name, time.perf_counter() - start, result.modified))
        if self.verify:
            _check(verify_graph, result.graph, f"pass '{name}' left an invalid graph")
        _check(getattr(fn, "ensures", None), result.graph, f"postcondition of pass '{name}'")
        return result.graph, result.modified

    def _dump(self, graph: Graph, label: str) -> None:
        if self.dump is None:
            return
        text = f"// {label}\n{graph}\n"
        if self.dump == "-":
            sys.stderr.write(text)
            return
        folder = Path(self.dump)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{label}.txt").write_text(text)


def _check(check: Optional[Callable], graph: Graph, what: str) -> None:
    if check is None:
        return
    try:
        check(graph)
    except RtxjitError as exc:
        raise PassError(f"{what}: {exc}") from exc
