"""The errors rtxjit raises. Every message names the node, op, input or file concerned."""


class RtxjitError(Exception):
    """Base class of every error rtxjit raises on purpose."""


class ModelError(RtxjitError, ValueError):
    """The model file or graph is malformed (unreadable, dangling names, cycles, bad attributes)."""


class UnsupportedOpError(RtxjitError, NotImplementedError):
    """An op, op version or attribute value that rtxjit does not implement."""


class NoNumpyDtypeError(UnsupportedOpError, TypeError):
    """A dtype numpy has no equivalent of (bf16, fp8): host evaluation and constant folding skip such
    values (they catch TypeError), a caller that needs the array gets the UnsupportedOpError."""


class ShapeError(RtxjitError, ValueError):
    """Shapes that do not fit together (broadcasting, reshape sizes, ranks)."""


class InputError(RtxjitError, ValueError):
    """A feed given to ``InferenceSession.run`` is unknown, missing, or of the wrong dtype or rank."""


class KernelError(RtxjitError, RuntimeError):
    """A generated kernel failed to compile or launch."""


class EngineError(RtxjitError, ValueError):
    """An engine file that is truncated, altered, of another version, or does not fit the device;
    or an engine whose weights are missing (stripped and not refitted)."""


class GradientError(RtxjitError, RuntimeError):
    """A compiled model was called in a way that needs gradients; rtxjit runs inference only."""


class CacheError(RtxjitError, ValueError):
    """A runtime-cache key, blob name or entry that is not valid (a damaged entry is reported as a
    warning and rebuilt, never trusted)."""


class UsageError(RtxjitError, ValueError, TypeError):
    """An argument of rtxjit's API of the wrong type or value (an option, a device name, a count of
    inputs); the message names the argument and what is accepted."""


class InternalError(RtxjitError, RuntimeError):
    """A broken invariant inside rtxjit: a bug, please report it with the model that shows it."""
