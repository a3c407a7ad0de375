"""``torch.compile(model, backend="rtxjit")``: rtxjit as a dynamo backend (see ``compiler.py``).

The name "rtxjit" is registered through the ``torch_dynamo_backends`` entry point in
pyproject.toml, so torch finds the backend without an import of rtxjit first: torch imports this
module when the name is first used. By then torch._dynamo has imported Triton; on a CPU-only
machine ``_interpreter.enable_late`` turns Triton's interpreter on anyway.
"""

from rtxjit.torch import _interpreter

_interpreter.enable_late()

import rtxjit  # noqa: E402,F401  (prepares Triton when it is not imported yet)
from rtxjit.torch.compiler import (  # noqa: E402,F401
    GradientError, RtxjitFallbackWarning, backend, export_count, sessions)

__all__ = ["backend", "sessions", "export_count", "GradientError", "RtxjitFallbackWarning"]


def _register() -> None:
    """Also register by name on import: where rtxjit runs from a source tree without its package
    metadata (no entry point), ``import rtxjit.torch`` before ``torch.compile`` is enough."""
    import torch._dynamo

    try:
        if "rtxjit" not in torch._dynamo.list_backends(exclude_tags=()):
            torch._dynamo.register_backend(backend, name="rtxjit")
    except Exception:  # noqa: BLE001 - the entry point registered it already
        pass


_register()
