"""Compiled kernels: what identifies one (keys.py), their binaries (binaries.py), a session's store of
them (store.py) and the torch<->DType table of their arguments (tensors.py). Above plan."""
