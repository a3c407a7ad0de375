"""Every environment variable rtxjit reads, read here and nowhere else."""

from __future__ import annotations

import os


def device_override() -> str | None:
    """RTXJIT_DEVICE=cpu forces Triton's interpreter; =cuda forces the GPU."""
    value = os.environ.get("RTXJIT_DEVICE", "").strip().lower()
    return value or None
