"""Quantized models (issue 19): ops of the contrib domain (``contrib.py``: com.microsoft
MatMulNBits), the internal quantized-product op (``qlinear.py``), the pass that folds Q/DQ pairs
into quantized products (``fuse.py``) and a calibration helper that writes FP8 Q/DQ models
(``calibrate.py``). The quantized kernels' text is in codegen/templates/quant_gemm.py; the
QuantizeLinear / DequantizeLinear ops themselves are rtxjit/ops/quant.py.

A sub-package of its own (not ops/): it sits above ops, ir and codegen, and importing it (as
``rtxjit/__init__`` does, after ``rtxjit.ops``) registers its ops."""

from rtxjit.quant import contrib, qlinear  # noqa: F401
