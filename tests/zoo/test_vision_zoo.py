"""The model zoo, second half: vision, speech and diffusion architectures (tiny transformers and
diffusers configs, random weights; tests/zoo/vision_archs.py), each exported with both torch.onnx
exporters (TorchScript, opset 17; dynamo, its default opset) and run by rtxjit against onnxruntime
on the same file: fp32 relative error <= 1e-4, NaN positions identical. (Whisper's encoder and
CLIP's vision tower run in tests/zoo/test_zoo.py.)

An architecture x exporter that still fails is in ``EXPECTED_FAILURES`` with its reason (strict
xfail: one that starts passing fails the suite until its entry is removed)."""

from __future__ import annotations

import numpy as np
import pytest

import rtxjit  # noqa: F401  (before transformers: it imports triton, and the CPU needs its interpreter)
from tests.zoo import archs, vision_archs

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

EXPORTERS = {"torchscript": False, "dynamo": True}
TOL = 1e-4

# (arch, exporter) -> reason
EXPECTED_FAILURES: dict = {}


def _case(name: str, exporter: str):
    reason = EXPECTED_FAILURES.get((name, exporter))
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}")


@pytest.mark.parametrize("name,exporter", [_case(n, e) for n in vision_archs.ARCHS for e in EXPORTERS])
def test_vision_zoo_matches_onnxruntime(name, exporter, tmp_path):
    import onnxruntime as ort

    model, make_feeds = vision_archs.build(name, "tiny")
    feeds = make_feeds(2)
    path = vision_archs.export(model, feeds, EXPORTERS[exporter], str(tmp_path / f"{name}.onnx"))
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in ref.get_inputs()}  # an exporter drops inputs the graph does not read
    feeds = {k: v for k, v in archs.to_numpy(feeds).items() if k in names}
    want = ref.run(None, feeds)[0]
    got = rtxjit.InferenceSession(path).run(None, feeds)[0]
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN positions differ from onnxruntime's"
    err = archs.rel_err(got, want)
    assert err <= TOL, f"relative error {err:.2e} against onnxruntime"
