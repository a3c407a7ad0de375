"""The runtime cache: its keys and versions (keys.py) and the store on disk (store.py). The bottom
layer: usable by every other one, it imports nothing of rtxjit but errors and config."""
