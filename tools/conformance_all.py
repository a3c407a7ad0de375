"""The whole onnx node conformance suite (every case, not only the ones whose ops rtxjit has) on the
CPU through Triton's interpreter: ``python -m pytest tools/conformance_all.py -q -p no:cacheprovider``
prints passed / failed over all node cases (1884 with onnx 1.2x). Used for the before/after figure
of an issue; the CI suite is tests/test_onnx_conformance.py (selected cases, strict xfails)."""

import os

os.environ.setdefault("RTXJIT_DEVICE", "cpu")

import onnx.backend.test  # noqa: E402

from rtxjit.onnx.backend import RtxjitBackend  # noqa: E402

_bt = onnx.backend.test.BackendTest(RtxjitBackend, __name__).include(r"^test_.*_cpu$")
OnnxBackendNodeModelTest = _bt.test_cases["OnnxBackendNodeModelTest"]
