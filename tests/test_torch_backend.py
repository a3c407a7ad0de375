"""torch.compile(model, backend="rtxjit"): rtxjit/torch/backend.py (CPU: Triton's interpreter)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import rtxjit.torch as rt
from rtxjit.errors import RtxjitError, UnsupportedOpError


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(c)
        self.c2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(c)

        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        y += x
        return self.relu(y)


class ResNetLike(torch.nn.Module):
    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.block = Block(c)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(c, classes)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


class EncoderLayer(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln1 = torch.nn.LayerNorm(d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.ff1 = torch.nn.Linear(d, 2 * d)
        self.ff2 = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = (y.view(b, t, h, d // h).transpose(1, 2) for y in self.qkv(x).split(d, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v
        x = self.ln1(x + self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


class WithUnsupported(torch.nn.Module):
    """Atan (an ONNX op rtxjit has no kernel and ONNX no function body for) between supported ops."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(torch.atan(self.lin(x))) * 2


def _randomize_batchnorm(model):
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return model


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_resnet_like_cnn_matches_eager():
    torch.manual_seed(0)
    model = _randomize_batchnorm(ResNetLike()).eval()
    compiled = torch.compile(model, backend="rtxjit")
    x = torch.randn(2, 3, 8, 8)
    before = rt.export_count()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", rt.RtxjitFallbackWarning)
        _close(compiled(x), model(x))
    assert rt.export_count() == before + 1  # one part: the whole graph runs in rtxjit


def test_bert_like_encoder_layer_matches_eager():
    torch.manual_seed(0)
    model = EncoderLayer().eval()
    compiled = torch.compile(model, backend="rtxjit")
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        _close(compiled(x), model(x))
    with torch.inference_mode():
        _close(compiled(x), model(x))


def test_weights_changed_in_place_after_compiling_are_not_served_stale():
    model = ResNetLike().eval()
    compiled = torch.compile(model, backend="rtxjit")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        compiled(x)
        model.fc.weight.mul_(2)
        with pytest.raises(RtxjitError, match="changed in place"):
            compiled(x)


def test_an_unsupported_op_runs_eagerly_with_one_warning_naming_it():
    torch.manual_seed(0)
    model = WithUnsupported().eval()
    rt.compiler._warned.clear()  # warned once per process: forget earlier tests
    compiled = torch.compile(model, backend="rtxjit")
    x = torch.randn(3, 4)
    exports = rt.export_count()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _close(compiled(x), model(x))
        _close(compiled(x + 1), model(x + 1))
    messages = [str(w.message) for w in caught if issubclass(w.category, rt.RtxjitFallbackWarning)]
    assert len(messages) == 1 and "Atan" in messages[0], messages
    assert rt.export_count() == exports + 2  # a real split: Linear in rtxjit, atan eager, Relu*2 in rtxjit


def test_strict_mode_raises_naming_the_op():
    compiled = torch.compile(WithUnsupported().eval(), backend="rtxjit", options={"strict": True})
    with torch.no_grad(), pytest.raises(Exception) as info:
        compiled(torch.randn(3, 4))
    inner = getattr(info.value, "inner_exception", info.value)  # dynamo wraps backend errors
    assert isinstance(inner, UnsupportedOpError) and "Atan" in str(inner), repr(info.value)


def test_a_call_that_needs_gradients_raises_a_clear_error():
    model = EncoderLayer().eval()
    compiled = torch.compile(model, backend="rtxjit")
    with pytest.raises(rt.GradientError, match="no_grad"):
        compiled(torch.randn(2, 4, 16))


def test_new_input_shapes_are_served_without_export_or_compile(monkeypatch):
    torch.manual_seed(0)
    model = EncoderLayer().eval()
    compiled = torch.compile(model, backend="rtxjit")
    with torch.no_grad():
        for shape in [(2, 8, 16), (3, 5, 16)]:  # static graph, then dynamo's symbolic one (both dims change)
            x = torch.randn(*shape)
            _close(compiled(x), model(x))
        session = rt.sessions()[-1]
        compiles = session.jit_stats()["compiles"]
        exports = []
        real_export = torch.onnx.export
        monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
        n_sessions = len(rt.sessions())
        for shape in [(4, 7, 16), (5, 3, 16)]:  # (a dim of 1 would be specialized by dynamo)
            x = torch.randn(*shape)
            before = session.last_executable
            _close(compiled(x), model(x))
            assert session.last_executable is not before  # a new binding of this session served it
    stats = session.jit_stats()
    assert exports == [] and len(rt.sessions()) == n_sessions
    assert stats["compiles"] == compiles and stats["failed"] == 0 and stats["last_run"] == "generic", stats


def test_dynamic_true_serves_every_shape_from_the_first_export():
    torch.manual_seed(0)
    model = EncoderLayer().eval()
    compiled = torch.compile(model, backend="rtxjit", dynamic=True)  # symbolic from the first call
    exports = rt.export_count()
    with torch.no_grad():
        x = torch.randn(2, 8, 16)
        _close(compiled(x), model(x))
        session = rt.sessions()[-1]
        compiles = session.jit_stats()["compiles"]
        for shape in [(3, 5, 16), (4, 7, 16)]:
            x = torch.randn(*shape)
            before = session.last_executable
            _close(compiled(x), model(x))
            assert session.last_executable is not before
    stats = session.jit_stats()
    assert rt.export_count() == exports + 1 and rt.sessions()[-1] is session
    assert stats["compiles"] == compiles and stats["last_run"] == "generic", stats


class Flatten2d(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.lin(x.reshape(b * t, d))          # a size expression of two symbols: s0*s1
        return torch.relu(y.reshape(b, t // 1, d)) + x.mean()


def test_size_expressions_of_symbolic_dims_are_computed_from_the_inputs():
    torch.manual_seed(0)
    model = Flatten2d().eval()
    compiled = torch.compile(model, backend="rtxjit", dynamic=True)
    exports = rt.export_count()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", rt.RtxjitFallbackWarning)  # no part falls back to eager
        for shape in [(2, 3, 8), (4, 5, 8), (3, 7, 8)]:
            x = torch.randn(*shape)
            _close(compiled(x), model(x))
    assert rt.export_count() == exports + 1


CHILD = """
import sys, torch
assert "rtxjit" not in sys.modules
class M(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.lin = torch.nn.Linear(4, 3)
    def forward(self, x):
        return torch.softmax(torch.relu(self.lin(x)), -1)
m = M().eval()
x = torch.randn(2, 4)
with torch.no_grad():
    y = torch.compile(m, backend="rtxjit")(x)
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-6)
import rtxjit.torch
assert len(rtxjit.torch.sessions()) == 1
print("ok")
"""


def test_the_entry_point_works_without_importing_rtxjit_first():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RTXJIT_DEVICE")}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_cnn_and_encoder_match_eager(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # fp32: rtxjit's matmuls run in IEEE fp32, not tf32
    for model, x in ((_randomize_batchnorm(ResNetLike()), torch.randn(4, 3, 16, 16)),
                     (EncoderLayer(), torch.randn(2, 16, 16))):
        model = model.eval().to("cuda", dtype)
        x = x.to("cuda", dtype)
        compiled = torch.compile(model, backend="rtxjit")
        with torch.no_grad():
            want = model.float()(x.float()) if dtype == torch.float16 else model(x)
            model.to(dtype)
            got = compiled(x)
        assert got.device.type == "cuda" and got.dtype == dtype
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert err <= tol, (type(model).__name__, dtype, float(err))
        torch._dynamo.reset()
