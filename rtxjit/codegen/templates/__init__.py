"""Kernel templates, one module per kernel kind. Each ``render_*`` returns a ``KernelSource``."""
