"""The JIT: serving a new binding on shape-generic kernels and specializing it in the background
(specializer.py); a binding's checked variant read back from the runtime cache (warm.py). Above exec."""
