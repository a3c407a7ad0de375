"""rtxjit: a pure-Python JIT inference compiler for ONNX models on Triton."""

__version__ = "0.1.0"

from rtxjit.errors import (  # noqa: F401,E402
    InputError, KernelError, ModelError, RtxjitError, ShapeError, UnsupportedOpError)
from rtxjit.runtime.session import InferenceSession  # noqa: F401,E402
