"""rtxjit: a pure-Python JIT inference compiler for ONNX models on Triton."""

__version__ = "0.1.0"

from rtxjit import config as _config  # noqa: E402

_config.prepare_triton()

from rtxjit import ops as _ops  # noqa: F401,E402  (importing the op families fills the registry)
from rtxjit import quant as _quant  # noqa: F401,E402  (quantized ops: MatMulNBits, rtxjit.QLinearMatMul)
from rtxjit.errors import (  # noqa: F401,E402
    EngineError, InputError, KernelError, ModelError, RtxjitError, ShapeError, UnsupportedOpError)
from rtxjit.custom import TensorInfo, register_op, unregister_op  # noqa: F401,E402
from rtxjit.session import InferenceSession  # noqa: F401,E402
from rtxjit.engine.engine import Engine, Refitter, build  # noqa: F401,E402
