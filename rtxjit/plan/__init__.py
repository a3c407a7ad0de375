"""A graph lowered for one binding of input shapes: the flat launch list (plan.py), its buffers in one
arena (memory.py), input-shape profiles (profiles.py) and the tuning choices lowerings offer
(autotune.py). Below the kernels; above ops, ir and codegen."""
