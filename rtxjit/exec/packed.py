"""A kernel compilation split in two: Triton's binder in the calling process (``pack``), its compiler
in a process that imports neither torch nor rtxjit's package (``compile_packed``, ``serve``).

A new session's generic kernels are compiled before its first result (bert-base: 15). In threads of
the session's process most of each compile holds the GIL (Triton's code generator walks the kernel's
Python AST; its MLIR and LLVM passes run under the GIL too): on an H100's host 15 kernels took ~3 s
of a 4.2 s cold first result. Worker processes compile them side by side, but a worker that
imports torch (as the background compile workers do, exec/compiler.py) needs seconds to start. So
the binder, which needs the arguments' torch dtypes, runs here: ``pack`` gives the compile's
signature, constants, attributes and options as Python literals, and a light worker (started with
rtxjit's package stubbed: only ``rtxjit.config``, ``rtxjit.codegen.source``, ``rtxjit.kernels.binaries``
and ``rtxjit.errors`` load) rebuilds the kernel from its generated text and compiles it for the
target named. The literals travel as ``repr`` text read back with ``ast.literal_eval``: no code runs
from them.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future

from rtxjit.codegen.source import KernelSource, load_kernel
from rtxjit.errors import KernelError
from rtxjit.kernels import binaries


def pack(src: KernelSource, generic: bool, args: tuple, constexprs: dict, sm: int) -> str:
    """The compile of ``src`` for ``sm`` as Triton's binder specializes ``args`` (pointers as 16-byte
    aligned buffers of their torch dtype, as a launch would see them): ``repr`` of
    ``(signature, constants, attributes, options)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = load_kernel(src, False, generic=generic)
    backend = make_backend(GPUTarget("cuda", sm, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(constexprs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*[MockTensor.wrap_dtype(a) for a in args], **kwargs)
    options, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    text = repr((signature, consts, attrs, options.__dict__))
    if ast.literal_eval(text) != (signature, consts, attrs, options.__dict__):
        raise KernelError(f"kernel {src.name}: its compile options are not plain literals")
    return text


def compile_packed(name: str, text: str, generic: bool, packed: str, sm: int) -> tuple:
    """``(meta, cubin)`` of the kernel ``text`` compiled as ``packed`` (``pack``) says, for ``sm``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = load_kernel(KernelSource(name, text), False, generic=generic)
    signature, consts, attrs, options = ast.literal_eval(packed)
    kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", sm, 32), options=options)
    entry = binaries.entry_of(kernel)
    if entry is None:
        raise KernelError(f"kernel {name}: Triton gave no cubin for sm_{sm}")
    return entry


def serve() -> None:
    """A light worker: one JSON task per line on stdin (``[name, text, generic, packed, sm]``), one
    answer per line: ``{"result": [meta, cubin as base64]}`` or ``{"error": text}``."""
    for line in sys.stdin.buffer:
        try:
            meta, cubin = compile_packed(*json.loads(line))
            answer = {"result": [meta, base64.b64encode(cubin).decode()]}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which compiles it itself
            answer = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# the worker's start: rtxjit's package replaced by an empty one over the same folder, so importing
# this module loads none of its siblings (rtxjit/__init__ imports torch and every op)
_BOOT = ("import sys, types; p = types.ModuleType('rtxjit'); p.__path__ = [{path!r}]; sys.modules['rtxjit'] = p; "
         "import rtxjit.config as c; c.prepare_triton(); from rtxjit.exec.packed import serve; serve()")


class Light:
    """Light workers, started together: tasks handed in (``submit``) while the binder packs the next
    ones go to whichever worker is free, one line at a time."""

    def __init__(self, n: int):
        path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        environ = {**os.environ, "RTXJIT_DEVICE": "cuda"}
        environ.pop("TRITON_INTERPRET", None)
        self.tasks: queue.Queue = queue.Queue()
        self.procs = [subprocess.Popen([sys.executable, "-c", _BOOT.format(path=path)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=environ)
                      for _ in range(n)]
        self.threads = [threading.Thread(target=self._feed, args=(p,), daemon=True, name="rtxjit-light")
                        for p in self.procs]
        for t in self.threads:
            t.start()

    def submit(self, task: list) -> Future:
        """``task`` is ``[name, text, generic, packed, sm]``; the future's result ``(meta, cubin)``."""
        f: Future = Future()
        self.tasks.put((f, task))
        return f

    def _feed(self, proc) -> None:
        while True:
            item = self.tasks.get()
            if item is None:
                return
            f, task = item
            try:
                proc.stdin.write(json.dumps(task).encode() + b"\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except OSError as exc:
                line, error = b"", f"{type(exc).__name__}: {exc}"
            else:
                error = "the worker exited"
            answer = json.loads(line) if line else {"error": error}
            if "error" in answer:
                f.set_exception(KernelError(f"kernel {task[0]}: {answer['error']}"))
            else:
                f.set_result((answer["result"][0], base64.b64decode(answer["result"][1])))
            if not line:  # this worker is gone: the others take the rest
                return

    def close(self) -> None:
        """No more tasks: the workers finish theirs and exit (the futures of tasks no worker took fail)."""
        for _ in self.threads:
            self.tasks.put(None)
        for t in self.threads:
            t.join(timeout=300)
        while True:  # left by workers that died
            try:
                item = self.tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].set_exception(KernelError(f"kernel {item[1][0]}: no compile worker left"))
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
