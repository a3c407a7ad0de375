"""Custom ops (rtxjit/custom.py): a user's op of their own ONNX domain with a @triton.jit
kernel runs in sessions and engines against its float64 reference; a missing registration is an
error naming the op, at import and at engine load; bad registrations are refused at once; a changed
kernel is never served from the runtime cache."""

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper

import rtxjit  # before triton: rtxjit turns Triton's interpreter on for the CPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from rtxjit.cache.keys import compiler_version
from rtxjit.engine.engine import Engine
from rtxjit.errors import EngineError, UnsupportedOpError, UsageError
from rtxjit.ir.registry import all_ops

DOMAIN = "test.custom"


@triton.jit
def swish_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (x * tl.sigmoid(alpha * x)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swish_kernel_v2(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):  # a changed kernel: 2 * swish
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (2 * x * tl.sigmoid(alpha * x)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_center_kernel(x_ptr, y_ptr, m_ptr, cols, COLS: tl.constexpr):
    """Each program one row: y = x - max(row), m = max(row) (two outputs)."""
    row = tl.program_id(0)
    offs = tl.arange(0, COLS)
    mask = offs < cols
    x = tl.load(x_ptr + row * cols + offs, mask=mask, other=-float("inf")).to(tl.float32)
    m = tl.max(x, 0)
    tl.store(y_ptr + row * cols + offs, (x - m).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + row, m.to(m_ptr.dtype.element_ty))


def _swish_ref(x, *, alpha=1.0):
    return x / (1 + np.exp(-alpha * x))


def register_swish(kernel=swish_kernel, reference=_swish_ref, replace=False, version=1):
    return rtxjit.register_op(
        DOMAIN, "Swish", version=version, replace=replace,
        infer=lambda x, *, alpha=1.0: x, reference=reference, kernel=kernel,
        grid=lambda x, y, *, alpha=1.0: (triton.cdiv(x.numel, 128),),
        args=lambda x, y, *, alpha=1.0: (x.numel, alpha),
        meta={"BLOCK": 128})


def _row_center_infer(x):
    from rtxjit.ir.types import TensorType

    return x, TensorType(x.dtype, x.shape[:-1])


def register_row_center():
    return rtxjit.register_op(
        DOMAIN, "RowCenter",
        infer=_row_center_infer,
        reference=lambda x: (x - x.max(-1, keepdims=True), x.max(-1)),
        kernel=row_center_kernel,
        grid=lambda x, y, m: (x.numel // x.shape[-1],),
        args=lambda x, y, m: (x.shape[-1],),
        meta=lambda x, y, m: {"COLS": triton.next_power_of_2(x.shape[-1])})


@pytest.fixture
def ops():
    """Registers the test ops, and removes them afterwards (the registry is process-wide)."""
    register_swish()
    register_row_center()
    yield
    for name in ("Swish", "RowCenter"):
        try:
            rtxjit.unregister_op(DOMAIN, name)
        except UsageError:
            pass


def swish_model(shape=("b", 70), dtype=TensorProto.FLOAT, alpha=1.5, domain_version=1):
    """x -> Swish (custom) -> + x: the custom node between built-in ones."""
    nodes = [helper.make_node("Swish", ["x"], ["s"], domain=DOMAIN, alpha=alpha, name="swish"),
             helper.make_node("Add", ["s", "x"], ["y"])]
    g = helper.make_graph(nodes, "swish", [helper.make_tensor_value_info("x", dtype, list(shape))],
                          [helper.make_tensor_value_info("y", dtype, list(shape))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                               helper.make_opsetid(DOMAIN, domain_version)])


def test_custom_kernel_matches_its_reference_in_a_session(ops, rng):
    sess = rtxjit.InferenceSession(swish_model())
    for rows in (3, 5):  # two bindings of the dynamic dim
        x = rng.standard_normal((rows, 70)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        want = _swish_ref(x.astype(np.float64), alpha=1.5) + x
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_custom_kernel_in_fp16_and_a_strided_input(ops, rng):
    """A Transpose feeds the op a strided view: the kernel gets a contiguous copy."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Swish", ["t"], ["y"], domain=DOMAIN)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [6, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [9, 6])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    x = rng.standard_normal((6, 9)).astype(np.float16)
    (y,) = rtxjit.InferenceSession(m).run(None, {"x": x})
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), _swish_ref(x.T.astype(np.float64)), rtol=1e-2, atol=1e-3)


def test_two_outputs_and_meta_from_the_shapes(ops, rng):
    node = helper.make_node("RowCenter", ["x"], ["y", "m"], domain=DOMAIN)
    g = helper.make_graph([node], "rc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 37])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 37]),
                           helper.make_tensor_value_info("m", TensorProto.FLOAT, [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    x = rng.standard_normal((4, 37)).astype(np.float32)
    y, mx = rtxjit.InferenceSession(m).run(None, {"x": x})
    np.testing.assert_allclose(mx, x.max(-1), rtol=1e-6)
    np.testing.assert_allclose(y, x - x.max(-1, keepdims=True), rtol=1e-6)


def test_constant_inputs_fold_through_the_reference(ops):
    """A custom node whose input is a constant is folded on the host by its float64 reference."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [3], [0.5, -1.0, 2.0])
    nodes = [helper.make_node("Swish", ["c"], ["s"], domain=DOMAIN), helper.make_node("Add", ["s", "x"], ["y"])]
    g = helper.make_graph(nodes, "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [c])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    x = np.ones(3, np.float32)
    (y,) = rtxjit.InferenceSession(m).run(None, {"x": x})
    np.testing.assert_allclose(y, _swish_ref(np.array([0.5, -1.0, 2.0])) + 1, rtol=1e-6)


def test_versions_resolve_at_the_domain_version_the_model_imports(ops, rng):
    register_swish(kernel=swish_kernel_v2, reference=lambda x, *, alpha=1.0: 2 * _swish_ref(x, alpha=alpha),
                   version=3)
    x = rng.standard_normal((2, 70)).astype(np.float32)
    base = _swish_ref(x.astype(np.float64), alpha=1.5)
    for imported, factor in ((1, 1), (2, 1), (3, 2), (7, 2)):
        (y,) = rtxjit.InferenceSession(swish_model(domain_version=imported)).run(None, {"x": x})
        np.testing.assert_allclose(y, factor * base + x, rtol=1e-4, atol=1e-5, err_msg=f"imported {imported}")


def test_custom_ops_are_not_listed_as_rtxjits_own(ops):
    assert f"{DOMAIN}.Swish" not in all_ops()


def test_engine_round_trip(ops, tmp_path, rng):
    engine = rtxjit.build(swish_model(), targets=["sm_90"])
    path = engine.save(tmp_path / "swish.engine")
    loaded = Engine.load(path)
    assert str(loaded.graph) == str(engine.graph)
    x = rng.standard_normal((4, 70)).astype(np.float32)
    (y,) = rtxjit.InferenceSession(loaded).run(None, {"x": x})
    np.testing.assert_allclose(y, _swish_ref(x.astype(np.float64), alpha=1.5) + x, rtol=1e-4, atol=1e-5)
    from rtxjit.engine.engine import read_metadata

    (entry,) = read_metadata(path)["custom_ops"]
    assert entry["domain"] == DOMAIN and entry["name"] == "Swish" and entry["version"] == 1


def test_missing_registration_at_import_names_the_op():
    with pytest.raises(UnsupportedOpError, match=f"'Swish' of domain '{DOMAIN}'.*register_op"):
        rtxjit.InferenceSession(swish_model())


def test_missing_registration_at_engine_load_names_the_op(tmp_path):
    register_swish()
    try:
        path = rtxjit.build(swish_model(), targets=["sm_90"]).save(tmp_path / "swish.engine")
    finally:
        rtxjit.unregister_op(DOMAIN, "Swish")
    with pytest.raises(EngineError, match=f"custom op 'Swish' of domain '{DOMAIN}'.*not registered"):
        Engine.load(path)


def test_engine_warns_when_its_custom_op_changed(ops, tmp_path, rng):
    path = rtxjit.build(swish_model(), targets=["sm_90"]).save(tmp_path / "swish.engine")
    register_swish(kernel=swish_kernel_v2, reference=lambda x, *, alpha=1.0: 2 * _swish_ref(x, alpha=alpha),
                   replace=True)
    with pytest.warns(RuntimeWarning, match="custom op 'Swish'.*changed since the engine was built"):
        loaded = Engine.load(path)
    x = rng.standard_normal((2, 70)).astype(np.float32)
    (y,) = rtxjit.InferenceSession(loaded).run(None, {"x": x})  # the registered (new) kernel runs
    np.testing.assert_allclose(y, 2 * _swish_ref(x.astype(np.float64), alpha=1.5) + x, rtol=1e-4, atol=1e-5)


def test_runtime_cache_serves_no_stale_kernel(ops, tmp_path, rng):
    """The same model file and runtime cache, with the kernel changed between two sessions: the
    recorded optimized graph is not served (its key holds the op's fingerprint), the new kernel's
    text is in the plan (the kernel text is part of every kernel key) and it runs."""
    from rtxjit.cache.store import open_cache
    from rtxjit.frontdoor import optimized_graph

    model = tmp_path / "swish.onnx"
    model.write_bytes(swish_model().SerializeToString())
    cache = tmp_path / "cache"
    x = rng.standard_normal((3, 70)).astype(np.float32)
    base = _swish_ref(x.astype(np.float64), alpha=1.5)
    sess = rtxjit.InferenceSession(str(model), runtime_cache=str(cache))
    (y1,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(y1, base + x, rtol=1e-4, atol=1e-5)
    old = [s.kernel for s in sess.plan({"x": (3, 70)}).steps if "swish_kernel" in s.kernel.text]
    assert optimized_graph(str(model), cache=open_cache(str(cache))).from_cache  # the cache is in use

    register_swish(kernel=swish_kernel_v2, replace=True)  # the reference is unchanged: only the kernel differs
    assert not optimized_graph(str(model), cache=open_cache(str(cache))).from_cache
    sess = rtxjit.InferenceSession(str(model), runtime_cache=str(cache))
    new = [s.kernel for s in sess.plan({"x": (3, 70)}).steps if "swish_kernel" in s.kernel.text]
    assert len(old) == len(new) == 1 and old[0].key != new[0].key and "swish_kernel_v2" in new[0].text
    (y2,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(y2, 2 * base + x, rtol=1e-4, atol=1e-5)


def test_graph_cache_key_follows_the_registered_ops(ops):
    before = compiler_version()
    register_swish(kernel=swish_kernel_v2, replace=True)
    assert compiler_version() != before


# --- registration errors ---------------------------------------------------------------------------

def test_duplicate_registration_is_refused(ops):
    with pytest.raises(UsageError, match="already registered.*replace=True"):
        register_swish()


@triton.jit
def _helper(x):
    return x * 2


@triton.jit
def calls_a_helper(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _helper(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def _plain(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    pass


@pytest.mark.parametrize("change,match", [
    ({"domain": ""}, "reserved"),
    ({"domain": "ai.onnx"}, "reserved"),
    ({"domain": "rtxjit"}, "reserved"),
    ({"domain": "bad domain"}, "dotted name"),
    ({"name": "Sw.ish"}, "identifier"),
    ({"version": 0}, "version must be"),
    ({"kernel": _plain}, "must be a @triton.jit function"),
    ({"kernel": calls_a_helper}, r"refers to global\(s\) \['_helper'\]"),
    ({"meta": {"BLOCK_SIZE": 128}}, "constexpr parameters are \\['BLOCK'\\]"),
    ({"meta": {"BLOCK": "128"}}, "must be an int"),
    ({"infer": lambda x, **attrs: x}, "keyword-only"),
    ({"grid": lambda x, y: (1,)}, r"grid does not take attribute\(s\) \['alpha'\]"),
    ({"reference": lambda x: x}, r"reference does not take attribute\(s\) \['alpha'\]"),
    ({"grid": 4}, "grid must be a function"),
])
def test_bad_registrations_are_refused_clearly(change, match):
    kw = dict(domain=DOMAIN, name="Bad", infer=lambda x, *, alpha=1.0: x, reference=_swish_ref,
              kernel=swish_kernel, grid=lambda x, y, *, alpha=1.0: (1,),
              args=lambda x, y, *, alpha=1.0: (x.numel, alpha), meta={"BLOCK": 128})
    kw.update(change)
    domain, name = kw.pop("domain"), kw.pop("name")
    with pytest.raises(UsageError, match=match):
        rtxjit.register_op(domain, name, **kw)
    assert f"{domain}.{name}" not in all_ops()


def test_launch_that_does_not_fit_the_kernel_names_the_op(rng):
    rtxjit.register_op(DOMAIN, "Swish", infer=lambda x, *, alpha=1.0: x, reference=_swish_ref,
                       kernel=swish_kernel, grid=lambda x, y, *, alpha=1.0: (1,),
                       args=lambda x, y, *, alpha=1.0: (x.numel,), meta={"BLOCK": 128})  # alpha forgotten
    try:
        with pytest.raises(UsageError, match=r"node 'swish'.*Swish.*swish_kernel.*4 non-constexpr.*= 3"):
            rtxjit.InferenceSession(swish_model()).run(None, {"x": np.ones((1, 70), np.float32)})
    finally:
        rtxjit.unregister_op(DOMAIN, "Swish")


def test_unregistering_an_unknown_op_is_an_error():
    with warnings.catch_warnings():
        with pytest.raises(UsageError, match="not registered"):
            rtxjit.unregister_op(DOMAIN, "Nope")


# --- AOT kernels and torch.compile ---------------------------------------------------------------

def test_an_aot_engine_holds_the_custom_kernel_for_sm90(ops):
    """Compiled for sm_90 by Triton's compiler on this CPU-only machine: the wrapper and the user's
    kernel go through the GPU road too, generic and specialized (sizes as constants)."""
    engine = rtxjit.build(swish_model(shape=(4, 70)), targets=["sm_90"], kernels=True)
    names = [b["meta"]["metadata"]["name"] for b in engine.binaries.values()]
    assert names.count("rtxjit_test_custom_Swish") == 2  # generic + specialized
    assert all(b["data"][:4] == b"\x7fELF" for b in engine.binaries.values())


def test_torch_compile_runs_a_torch_library_op_mapped_to_the_domain(ops):
    """A torch.library op whose ONNX export (TorchScript symbolic) is the custom domain's node: the
    backend's probe imports it, so it runs inside the rtxjit part instead of falling back."""
    import torch
    from torch.onnx import symbolic_helper

    import rtxjit.torch as rt

    @torch.library.custom_op("rtxjit_custom_test::swish", mutates_args=())
    def swish(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x * torch.sigmoid(alpha * x)

    @swish.register_fake
    def _(x, alpha):
        return torch.empty_like(x)

    @symbolic_helper.parse_args("v", "f")
    def symbolic(g, x, alpha):
        return g.op(f"{DOMAIN}::Swish", x, alpha_f=alpha).setType(x.type())

    torch.onnx.register_custom_op_symbolic("rtxjit_custom_test::swish", symbolic, 1)

    class M(torch.nn.Module):
        def forward(self, x):
            return swish(x * 2, 1.5) + 1

    torch._dynamo.reset()
    try:
        x = torch.randn(3, 70)
        exports = rt.export_count()
        with warnings.catch_warnings():
            warnings.simplefilter("error", rt.RtxjitFallbackWarning)  # no part may fall back to eager
            y = torch.compile(M(), backend="rtxjit")(x)
        assert rt.export_count() == exports + 1  # one part: the custom op is inside it
        torch.testing.assert_close(y, M()(x), rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()
