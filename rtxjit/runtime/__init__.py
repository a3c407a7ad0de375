"""Sessions, plans, execution, device detection."""

from rtxjit.runtime.session import InferenceSession  # noqa: F401
