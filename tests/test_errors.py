"""Bad input gets a clear error that names what is wrong."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import rtxjit
from rtxjit.errors import InputError, ModelError, ShapeError, UnsupportedOpError


def _model(op="Relu", opset=17, **attrs):
    node = helper.make_node(op, ["x"], ["y"], name="the_node", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def session():
    return rtxjit.InferenceSession(_model())


def test_unsupported_op_names_node_op_and_opset():
    with pytest.raises(UnsupportedOpError) as e:
        rtxjit.InferenceSession(_model("Det"))
    assert "the_node" in str(e.value) and "Det" in str(e.value) and "opset 17" in str(e.value)


def test_unsupported_attribute_names_it():
    with pytest.raises(UnsupportedOpError, match="attribute 'bogus'.*Relu"):
        rtxjit.InferenceSession(_model(bogus=3))


def test_foreign_domain_is_unsupported():
    m = _model()
    m.graph.node[0].domain = "com.example"
    with pytest.raises(UnsupportedOpError, match="com.example"):
        rtxjit.InferenceSession(m)


def test_truncated_model_file_names_the_file(tmp_path):
    data = _model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.onnx"):
        rtxjit.InferenceSession(str(path))


def test_garbage_and_missing_files(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\xff not a model at all \x13\x37" * 8)
    with pytest.raises(ModelError, match="garbage.onnx"):
        rtxjit.InferenceSession(str(path))
    with pytest.raises(ModelError, match="nowhere.onnx"):
        rtxjit.InferenceSession(str(tmp_path / "nowhere.onnx"))


def test_dangling_input_and_cycle_are_model_errors():
    m = _model()
    m.graph.node[0].input[0] = "ghost"
    with pytest.raises(ModelError, match="ghost"):
        rtxjit.InferenceSession(m)
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    with pytest.raises(ModelError, match="cycle"):
        rtxjit.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_old_opset_is_rejected():
    with pytest.raises(UnsupportedOpError, match="opset 9"):
        rtxjit.InferenceSession(_model(opset=9))


def _mixed_layernorm():
    """LayerNormalization of a float32 input with float16 scale and bias: T bound to two dtypes, as
    torch.onnx's TorchScript exporter writes fp16 GPT-2 (onnxruntime refuses the file)."""
    rng = np.random.default_rng(0)
    scale, bias = rng.standard_normal(4).astype(np.float16), rng.standard_normal(4).astype(np.float16)
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln_2", axis=-1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor("s", TensorProto.FLOAT16, [4], scale.tobytes(), raw=True),
                               helper.make_tensor("b", TensorProto.FLOAT16, [4], bias.tobytes(), raw=True)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), scale, bias


def test_a_type_parameter_bound_to_two_dtypes_is_warned_about_and_runs():
    model, scale, bias = _mixed_layernorm()
    with pytest.warns(RuntimeWarning, match=r"not valid ONNX: node 'ln_2' \(LayerNormalization.*binds type "
                                            r"parameter T to fp16 and fp32.*dynamo=True"):
        sess = rtxjit.InferenceSession(model)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * scale + bias
    assert y.dtype == np.float32 and np.abs(y - want).max() <= 1e-4 * np.abs(want).max()


def test_a_valid_model_gets_no_type_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rtxjit.InferenceSession(_model())


def test_unknown_input_name(session):
    with pytest.raises(InputError, match="unknown input 'z'"):
        session.run(None, {"x": np.ones((2, 4), np.float32), "z": np.ones(1)})


def test_missing_input(session):
    with pytest.raises(InputError, match="missing input 'x'"):
        session.run(None, {})


def test_wrong_dtype(session):
    with pytest.raises(InputError, match="'x'.*expected dtype fp32, got fp64"):
        session.run(None, {"x": np.ones((2, 4), np.float64)})


def test_wrong_rank(session):
    with pytest.raises(InputError, match="'x'.*expected rank 2"):
        session.run(None, {"x": np.ones((2, 4, 1), np.float32)})


def test_wrong_static_dim(session):
    with pytest.raises(InputError, match="'x': dim 1 must be 4, got 5"):
        session.run(None, {"x": np.ones((2, 5), np.float32)})


def test_unknown_output_name(session):
    with pytest.raises(InputError, match="unknown output 'nope'"):
        session.run(["nope"], {"x": np.ones((2, 4), np.float32)})


def test_errors_share_one_base_class():
    for cls in (InputError, ModelError, UnsupportedOpError):
        assert issubclass(cls, rtxjit.RtxjitError)


# -- one error hierarchy (issue 8): every exception rtxjit raises on purpose is an RtxjitError

import ast  # noqa: E402
import builtins  # noqa: E402
from pathlib import Path  # noqa: E402

import rtxjit.errors as errors  # noqa: E402

PACKAGE = Path(rtxjit.__file__).parent
# (file, builtin exception): raised as a signal that its callers catch and turn into a named error
SIGNALS = {("ir/types.py", "KeyError"),       # DType lookups: the importer names the attribute
           ("cache/store.py", "OSError"),   # a short read of a blob: the entry is a miss, rebuilt
           ("exec/compiler.py", "TypeError")}  # json's default hook: "not JSON"


def _raised_builtins(root: Path = PACKAGE):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = call.id if isinstance(call, ast.Name) else None
                if isinstance(getattr(builtins, name or "", None), type) and issubclass(getattr(builtins, name),
                                                                                      BaseException):
                    yield rel, name, node.lineno


def test_rtxjit_raises_only_its_own_errors():
    found = [(f, name, line) for f, name, line in _raised_builtins()
             if (f, name) not in SIGNALS and name not in ("StopIteration", "SystemExit", "KeyboardInterrupt")]
    assert found == [], "raise an rtxjit.errors class (ModelError, ShapeError, UsageError, ...) instead: " + str(found)


def test_the_audit_sees_a_builtin_raise(tmp_path):
    (tmp_path / "bad.py").write_text("def f(e):\n    raise ValueError('x')\n    raise e\n    raise TypeError\n")
    assert list(_raised_builtins(tmp_path)) == [("bad.py", "ValueError", 2), ("bad.py", "TypeError", 4)]


def test_every_error_class_is_an_rtxjit_error_and_a_familiar_builtin():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 10
    for c in classes:
        assert issubclass(c, errors.RtxjitError), c
        if c is not errors.RtxjitError:  # callers catching ValueError / RuntimeError keep working
            assert any(issubclass(c, b) for b in (ValueError, RuntimeError, TypeError)), c
    from rtxjit.cache.store import CacheEntryError
    from rtxjit.passes.base import PassError
    assert issubclass(PassError, errors.RtxjitError) and issubclass(CacheEntryError, errors.CacheError)


def test_api_misuse_is_a_usage_error_naming_the_argument(tmp_path):
    with pytest.raises(errors.UsageError, match="runtime_cache"):
        rtxjit.InferenceSession(_model(), runtime_cache=3.5)
    from rtxjit.cache.store import RuntimeCache
    cache = RuntimeCache(tmp_path)
    with pytest.raises(errors.CacheError, match="key"):
        cache.get("not a valid key!")


@pytest.mark.parametrize("pad", [10**6, 10**12], ids=["larger_than_memory", "past_int64"])
def test_an_intermediate_larger_than_the_device_memory_is_a_shape_error_naming_the_node(pad):
    """Found by tools/fuzz.py: huge pads made the arena size wrap around int64 (a TypeError in torch)."""
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], pads=[pad] * 4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = rtxjit.InferenceSession(model)
    with pytest.raises(ShapeError, match=r"node 'pool' \(MaxPool\): an output of shape .* more than the device's memory"):
        sess.run(None, {"x": np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)})


def test_a_missing_required_input_is_a_model_error_naming_it():
    """Found by tools/fuzz.py: a BatchNormalization without its variance crashed fold_batchnorm."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [2], rng.random(2).tolist()) for n in ("s", "b", "m")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", ""], ["y"], name="bn")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=r"node 'bn' \(BatchNormalization.*required input 4 \('input_var'\) is missing"):
        rtxjit.InferenceSession(model)


def test_a_shape_tensor_of_absurd_length_is_a_shape_error_not_a_hang():
    """Found by tools/fuzz.py: a Reshape whose shape input is a data input of length 2**31 hung the
    importer building a 2**31-dim unknown shape."""
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                            helper.make_tensor_value_info("shape", TensorProto.INT64, [2 ** 31])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ShapeError, match=r"node 'reshape' \(Reshape.*rank 2147483648.*up to 64"):
        rtxjit.InferenceSession(model)
