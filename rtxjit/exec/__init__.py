"""Running a plan: the executor (executor.py: buffers, launches, CUDA graphs), compiling its kernels
(compiler.py), the device (device.py), the contiguous copy (copy.py) and the roofline (roofline.py).
Above kernels and plan."""
