"""Kernels compiled for an H100 (sm_90) on a machine without a GPU: Triton's CUDA backend compiles in a
process without the interpreter (as the light compile workers do, exec/packed.py), and the PTX comes
back to be read (vector loads, the conversions used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rtxjit.exec import packed
from rtxjit.kernels.keys import step_args

_CODE = ("import sys, types, json, ast; p = types.ModuleType('rtxjit'); p.__path__ = [{path!r}]; "
         "sys.modules['rtxjit'] = p; import rtxjit.config as c; c.prepare_triton(); import triton; "
         "from triton.backends.compiler import GPUTarget; from triton.compiler import ASTSource; "
         "from rtxjit.codegen.source import KernelSource, load_kernel; t = json.loads(sys.stdin.read()); "
         "sig, consts, attrs, opts = ast.literal_eval(t[2]); "
         "k = triton.compile(ASTSource(load_kernel(KernelSource(t[0], t[1]), False), sig, consts, attrs), "
         "target=GPUTarget('cuda', 90, 32), options=opts); print(json.dumps(k.asm['ptx']))")


def ptx(plan, step, src) -> str:
    """The PTX of ``src`` (``step``'s kernel, specialized or not) compiled for sm_90 with the step's
    arguments and constexprs."""
    spec = packed.pack(src, False, step_args(plan, step), dict(step.constexprs), 90)
    path = os.path.dirname(os.path.dirname(os.path.abspath(packed.__file__)))
    env = {**os.environ, "RTXJIT_DEVICE": "cuda"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", _CODE.format(path=path)], input=json.dumps([src.name, src.text, spec]),
                         text=True, capture_output=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
