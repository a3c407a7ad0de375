"""Triton's interpreter, turned on after Triton was imported (CPU-only machines).

``torch.compile`` imports ``torch._dynamo``, which imports Triton, before it loads the "rtxjit"
entry point; so ``rtxjit.config.prepare_triton`` comes too late to set TRITON_INTERPRET. Triton
reads that knob each time ``@triton.jit`` decorates a function, so rtxjit's kernels (decorated
later) are interpreted once it is set; the library's own jit functions (``tl.sum``, ``tl.max``,
``tl.cdiv`` ...) were decorated at import as compiled ``JITFunction``s, which cannot be called from
an interpreted kernel, so they are re-wrapped as ``InterpretedFunction``s here.
"""

from __future__ import annotations

import os
import sys


def enable_late() -> bool:
    """Turn the interpreter on if Triton is already imported, no GPU is visible and nobody chose;
    True if it did."""
    if "triton" not in sys.modules or "TRITON_INTERPRET" in os.environ:
        return False
    if os.environ.get("RTXJIT_DEVICE", "").strip().lower() in ("cuda", "gpu"):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    owners = [m for n, m in list(sys.modules.items()) if n.startswith("triton.language") and m is not None]
    for owner in owners + [tl.tensor]:
        for name, value in list(vars(owner).items()):
            if type(value) is JITFunction:
                setattr(owner, name, InterpretedFunction(value.fn))
    return True
