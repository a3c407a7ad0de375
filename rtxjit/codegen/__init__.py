"""Triton source generation: templates per kernel kind, deterministic text and hash."""

from rtxjit.codegen.source import KernelSource, load_kernel  # noqa: F401
