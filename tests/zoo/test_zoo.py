"""The model zoo: real transformer architectures (tiny transformers configs, random weights), each
exported with both torch.onnx exporters (TorchScript, opset 17; dynamo, its default opset), run
by rtxjit on right-padded, left-padded and fully-masked-row batches and compared with onnxruntime
on the same file: fp32 relative error <= 1e-4 and NaN positions identical.

An architecture x exporter that still fails is in ``EXPECTED_FAILURES`` with its reason (strict
xfail: one that starts passing fails the suite until its entry is removed)."""

from __future__ import annotations

import numpy as np
import pytest

import rtxjit  # noqa: F401  (before transformers: it imports triton, and the CPU needs its interpreter)
from tests.zoo import archs

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

EXPORTERS = {"torchscript": False, "dynamo": True}
TOL = 1e-4

# (arch, exporter) -> reason
EXPECTED_FAILURES: dict = {}

_files: dict = {}


def exported(name: str, exporter: str, tmp_path_factory):
    """(path, make_feeds) of the architecture's export, made once per module."""
    key = (name, exporter)
    if key not in _files:
        model, make_feeds = archs.build(name, "tiny")
        path = str(tmp_path_factory.mktemp("zoo") / f"{name}_{exporter}.onnx")
        archs.export(name, model, make_feeds("right"), EXPORTERS[exporter], path)
        _files[key] = path, make_feeds, {}
    return _files[key]


CASES = []
for _name in archs.ARCHS:
    for _exporter in EXPORTERS:
        _reason = EXPECTED_FAILURES.get((_name, _exporter))
        _marks = [pytest.mark.xfail(reason=_reason, strict=True)] if _reason else []
        for _padding in archs.PADDINGS:
            CASES.append(pytest.param(_name, _exporter, _padding, marks=_marks, id=f"{_name}-{_exporter}-{_padding}"))


@pytest.mark.parametrize("name,exporter,padding", CASES)
def test_zoo_matches_onnxruntime(name, exporter, padding, tmp_path_factory):
    import onnxruntime as ort

    path, make_feeds, sessions = exported(name, exporter, tmp_path_factory)
    feeds = archs.to_numpy(make_feeds(padding))
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    if "rtxjit" not in sessions:
        sessions["rtxjit"] = rtxjit.InferenceSession(path)
    got = sessions["rtxjit"].run(None, feeds)[0]
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN positions differ from onnxruntime's"
    err = archs.rel_err(got, want)
    assert err <= TOL, f"relative error {err:.2e} against onnxruntime"


# arch -> reason, for torch.compile(backend="rtxjit") against eager
COMPILE_EXPECTED_FAILURES: dict = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(reason=COMPILE_EXPECTED_FAILURES[n],
                                                                             strict=True)]
                                               if n in COMPILE_EXPECTED_FAILURES else []) for n in archs.ARCHS])
def test_zoo_through_torch_compile_matches_eager(name):
    """torch.compile(model, backend="rtxjit") on every padding against eager PyTorch (fp32)."""
    import torch

    import rtxjit.torch  # noqa: F401  (registers the backend)

    torch._dynamo.reset()
    model, make_feeds = archs.build(name, "tiny")
    paddings = archs.PADDINGS
    feeds = [make_feeds(p) for p in paddings]
    wrapped = archs.Wrapped(model, list(feeds[0])).eval()
    compiled = torch.compile(wrapped, backend="rtxjit")
    try:
        with torch.no_grad():
            for padding, f in zip(paddings, feeds):
                want = wrapped(*f.values()).numpy()
                got = compiled(*f.values()).numpy()
                assert np.array_equal(np.isnan(got), np.isnan(want)), f"{padding}: NaN positions differ from eager"
                err = archs.rel_err(got, want)
                assert err <= TOL, f"{padding}: relative error {err:.2e} against eager"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fp16_models_through_torch_compile_keep_eager_dtypes(name):
    """fp16 models whose graph splits (transformers' cache concatenation runs eagerly): the
    TorchScript export of an fp16 SDPA part widens its output to fp32; each part hands on eager's
    dtype, so the next part gets the fp16 it was exported for (this raised an InputError)."""
    import torch

    import rtxjit.torch  # noqa: F401

    torch._dynamo.reset()
    model, make_feeds = archs.build(name, "tiny")
    model = model.half()
    feeds = make_feeds("left")
    wrapped = archs.Wrapped(model, list(feeds)).eval()
    try:
        with torch.no_grad():
            want = wrapped(*feeds.values())
            got = torch.compile(wrapped, backend="rtxjit")(*feeds.values())
        assert got.dtype == want.dtype == torch.float16
        assert archs.rel_err(got.float().numpy(), want.float().numpy()) <= 1e-2
    finally:
        torch._dynamo.reset()
