"""Ops that rtxjit's registry lacks but ONNX defines as functions (opset-23 Attention and
RotaryEmbedding, Mish, Celu, ...), and model-local functions, are expanded inline by the importer
(rtxjit/onnx/functions.py) and match onnxruntime. opset-23 Attention that rtxjit.Attention can
compute is translated into it instead (rtxjit/onnx/native.py); the rest is expanded."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

import rtxjit
from rtxjit.errors import ModelError, UnsupportedOpError
from rtxjit.ir.registry import all_ops

TOL = 1e-4
FLOAT = TP.FLOAT


def _model(op, inputs, attrs=None, outputs=("Y",), opset=23, domain="", functions=(), extra_opsets=()):
    """A one-node model: ``inputs`` are (name, elem type, shape); outputs are float of unknown shape."""
    node = helper.make_node(op, [n for n, _, _ in inputs], list(outputs), name="the_node", domain=domain,
                            **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs if n],
                              [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs if o])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = max(8, helper.find_min_ir_version_for(opsets[:1]))  # older onnxruntimes refuse newer IRs
    return model


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check(model, feeds, tol=TOL):
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = rtxjit.InferenceSession(model).run(None, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = _numpy(g)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    return [_numpy(g) for g in got]


def _qkv(rng, b=2, hq=4, hkv=4, sq=3, skv=5, d=8, dv=8):
    return (rng.standard_normal((b, hq, sq, d)).astype(np.float32),
            rng.standard_normal((b, hkv, skv, d)).astype(np.float32),
            rng.standard_normal((b, hkv, skv, dv)).astype(np.float32))


def _attention(feeds, attrs=None, outputs=("Y",), types=None):
    types = types or {}
    inputs = [(n, types.get(n, FLOAT), x.shape) if x is not None else ("", FLOAT, None) for n, x in feeds.items()]
    return _model("Attention", inputs, attrs, outputs)


def test_the_ops_under_test_are_not_in_the_registry():
    """Otherwise these tests would run the registry's kernels, not the expansion."""
    assert "Attention" not in all_ops() and "RotaryEmbedding" not in all_ops()


def test_attention_4d_float_mask(rng):
    q, k, v = _qkv(rng)
    mask = rng.standard_normal((3, 5)).astype(np.float32)
    feeds = {"Q": q, "K": k, "V": v, "M": mask}
    _check(_attention(feeds), feeds)


def test_attention_4d_bool_mask_broadcast_over_heads(rng):
    q, k, v = _qkv(rng)
    mask = rng.random((2, 1, 3, 5)) > 0.3
    mask[..., 0] = True
    feeds = {"Q": q, "K": k, "V": v, "M": mask}
    _check(_attention(feeds, types={"M": TP.BOOL}), feeds)


@pytest.mark.parametrize("sq,skv", [(4, 4), (3, 5)], ids=["square", "rect"])
def test_attention_4d_causal(rng, sq, skv):
    q, k, v = _qkv(rng, sq=sq, skv=skv)
    feeds = {"Q": q, "K": k, "V": v}
    _check(_attention(feeds, {"is_causal": 1}), feeds)


def test_attention_4d_gqa_with_scale_and_softcap(rng):
    q, k, v = _qkv(rng, hq=6, hkv=2, dv=4)
    feeds = {"Q": q, "K": k, "V": v}
    _check(_attention(feeds, {"scale": 0.3, "softcap": 2.0}), feeds)


def test_attention_3d_gqa_causal(rng):
    b, sq, skv, hq, hkv, d = 2, 4, 4, 4, 2, 8
    feeds = {"Q": rng.standard_normal((b, sq, hq * d)).astype(np.float32),
             "K": rng.standard_normal((b, skv, hkv * d)).astype(np.float32),
             "V": rng.standard_normal((b, skv, hkv * d)).astype(np.float32)}
    _check(_attention(feeds, {"q_num_heads": hq, "kv_num_heads": hkv, "is_causal": 1}), feeds)


def test_attention_3d_with_mask(rng):
    b, sq, skv, h, d = 1, 3, 6, 2, 4
    feeds = {"Q": rng.standard_normal((b, sq, h * d)).astype(np.float32),
             "K": rng.standard_normal((b, skv, h * d)).astype(np.float32),
             "V": rng.standard_normal((b, skv, h * d)).astype(np.float32),
             "M": rng.standard_normal((sq, skv)).astype(np.float32)}
    _check(_attention(feeds, {"q_num_heads": h, "kv_num_heads": h}), feeds)


def test_attention_past_and_present(rng):
    q, k, v = _qkv(rng, hq=4, hkv=2, sq=2, skv=2)
    _, past_k, past_v = _qkv(rng, hq=4, hkv=2, sq=2, skv=3)
    feeds = {"Q": q, "K": k, "V": v, "M": rng.standard_normal((2, 5)).astype(np.float32),
             "past_key": past_k, "past_value": past_v}
    _check(_attention(feeds, outputs=("Y", "present_key", "present_value")), feeds)


@pytest.mark.parametrize("kind", ["bool", "neginf"])
def test_attention_fully_masked_row_matches_onnxruntime(rng, kind):
    """A row whose every key is masked: onnxruntime (and the opset-23 function body) give zeros,
    never NaN."""
    q, k, v = _qkv(rng)
    if kind == "bool":
        mask = np.ones((3, 5), bool)
        mask[1] = False
    else:
        mask = np.zeros((3, 5), np.float32)
        mask[1] = -np.inf
    feeds = {"Q": q, "K": k, "V": v, "M": mask}
    got = _check(_attention(feeds, types={"M": TP.BOOL} if kind == "bool" else None), feeds)[0]
    assert np.isfinite(got).all()


def test_attention_with_symbolic_dims(rng):
    q, k, v = _qkv(rng)
    inputs = [("Q", FLOAT, ["B", 4, "S", 8]), ("K", FLOAT, ["B", 4, "T", 8]), ("V", FLOAT, ["B", 4, "T", 8])]
    model = _model("Attention", inputs, {"is_causal": 1})
    _check(model, {"Q": q, "K": k, "V": v})


def _rope_caches(rng, rows, half):
    angles = rng.random((rows, half)).astype(np.float32) * 3
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding_with_position_ids(rng, interleaved):
    b, h, s, d = 2, 3, 5, 8
    cos, sin = _rope_caches(rng, 16, d // 2)
    feeds = {"X": rng.standard_normal((b, h, s, d)).astype(np.float32), "cos": cos, "sin": sin,
             "pos": rng.integers(0, 16, (b, s)).astype(np.int64)}
    inputs = [("X", FLOAT, [b, h, s, d]), ("cos", FLOAT, list(cos.shape)), ("sin", FLOAT, list(sin.shape)),
              ("pos", TP.INT64, [b, s])]
    _check(_model("RotaryEmbedding", inputs, {"interleaved": interleaved}), feeds)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding_without_position_ids_3d_partial(rng, interleaved):
    """3-D input (num_heads given), caches per (batch, position), half of each head rotated."""
    b, s, h, d, rot = 2, 4, 2, 8, 4
    cos, sin = _rope_caches(rng, b * s, rot // 2)
    cos, sin = cos.reshape(b, s, rot // 2), sin.reshape(b, s, rot // 2)
    feeds = {"X": rng.standard_normal((b, s, h * d)).astype(np.float32), "cos": cos, "sin": sin}
    inputs = [("X", FLOAT, [b, s, h * d]), ("cos", FLOAT, list(cos.shape)), ("sin", FLOAT, list(sin.shape))]
    attrs = {"interleaved": interleaved, "num_heads": h, "rotary_embedding_dim": rot}
    _check(_model("RotaryEmbedding", inputs, attrs), feeds)


@pytest.mark.parametrize("op,attrs,opset", [("Mish", {}, 18), ("Celu", {"alpha": 0.7}, 13),
                                            ("Shrink", {"bias": 0.5, "lambd": 0.8}, 13),
                                            ("ThresholdedRelu", {"alpha": 0.4}, 13), ("Softsign", {}, 13),
                                            ("Swish", {"alpha": 1.5}, 24)])
def test_older_function_ops(rng, op, attrs, opset):
    if op in all_ops():
        pytest.skip(f"{op} is in the registry now")
    x = rng.standard_normal((3, 7)).astype(np.float32)
    _check(_model(op, [("X", FLOAT, [3, 7])], attrs, opset=opset), {"X": x})


def _local(name, inputs, outputs, nodes, attrs=(), defaults=(), domain="custom"):
    f = helper.make_function(domain, name, inputs, outputs, nodes, [helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(domain, 1)],
                             attributes=list(attrs))
    f.attribute_proto.extend(defaults)
    return f


def _ref_attr(name, ref, kind):
    a = helper.make_attribute_ref(name, kind)
    a.ref_attr_name = ref
    return a


def test_model_local_functions_nested_with_attribute_references(rng):
    """custom.Outer(x) = Mish(Leaky(Leaky(x), slope=0.5)): custom.Leaky is a LeakyRelu whose 'alpha'
    refers to the function's 'slope' (default 3.0 where the call omits it), resolved at each call;
    Mish, missing from the registry, expands from its ONNX body inside the local one."""
    if "Mish" in all_ops():
        pytest.skip("Mish is in the registry now")
    leaky = helper.make_node("LeakyRelu", ["a"], ["b"])
    leaky.attribute.append(_ref_attr("alpha", "slope", helper.AttributeProto.FLOAT))
    leaky_fn = _local("Leaky", ["a"], ["b"], [leaky], defaults=[helper.make_attribute("slope", 3.0)])
    call = helper.make_node("Leaky", ["x"], ["t"], domain="custom")
    call2 = helper.make_node("Leaky", ["t"], ["u"], domain="custom", slope=0.5)
    mish = helper.make_node("Mish", ["u"], ["y"])
    outer = _local("Outer", ["x"], ["y"], [call, call2, mish])
    x = rng.standard_normal((4, 6)).astype(np.float32)
    model = _model("Outer", [("X", FLOAT, [4, 6])], domain="custom", functions=[leaky_fn, outer],
                   extra_opsets=["custom"], opset=18)
    _check(model, {"X": x})


def test_a_function_body_with_an_unsupported_op_names_the_node_and_the_op():
    inner = helper.make_node("Det", ["a"], ["b"])
    f = _local("Bad", ["a"], ["b"], [inner])
    model = _model("Bad", [("X", FLOAT, [2, 3])], domain="custom", functions=[f], extra_opsets=["custom"],
                   opset=18)
    with pytest.raises(UnsupportedOpError) as e:
        rtxjit.InferenceSession(model)
    assert "the_node" in str(e.value) and "Det" in str(e.value)


def test_a_function_that_calls_itself_is_a_model_error():
    inner = helper.make_node("Loopy", ["a"], ["b"], domain="custom")
    f = _local("Loopy", ["a"], ["b"], [inner])
    model = _model("Loopy", [("X", FLOAT, [2, 3])], domain="custom", functions=[f], extra_opsets=["custom"],
                   opset=18)
    with pytest.raises(ModelError, match="the_node.*calls itself"):
        rtxjit.InferenceSession(model)


def test_a_function_body_that_lacks_a_requested_output_is_a_model_error():
    inner = helper.make_node("Relu", ["a"], ["b"])
    f = _local("Two", ["a"], ["b", "c"], [inner])
    model = _model("Two", [("X", FLOAT, [2, 3])], outputs=("Y", "Z"), domain="custom", functions=[f],
                   extra_opsets=["custom"], opset=18)
    with pytest.raises(ModelError, match="the_node.*does not compute"):
        rtxjit.InferenceSession(model)


def test_an_op_without_registry_entry_or_function_stays_unsupported():
    model = _model("Det", [("X", FLOAT, [2, 3])], opset=18)
    with pytest.raises(UnsupportedOpError, match="the_node.*Det"):
        rtxjit.InferenceSession(model)


def test_attention_with_bad_attributes_is_an_rtxjit_error_naming_the_node(rng):
    """3-D inputs need q_num_heads and kv_num_heads; ONNX's body builder refuses without them."""
    inputs = [("Q", FLOAT, [1, 3, 8]), ("K", FLOAT, [1, 3, 8]), ("V", FLOAT, [1, 3, 8])]
    with pytest.raises(rtxjit.RtxjitError, match="the_node"):
        rtxjit.InferenceSession(_model("Attention", inputs))


@pytest.mark.parametrize("case,fused", [("float_mask", True), ("bool_causal", True), ("gqa_3d", True),
                                        ("softcap", False)])
def test_attention_23_runs_as_the_fused_op_where_it_can(rng, case, fused):
    from rtxjit.onnx.importer import import_model

    q, k, v = _qkv(rng, hq=4, hkv=2 if case == "gqa_3d" else 4)
    feeds, attrs, types = {"Q": q, "K": k, "V": v}, {}, None
    if case == "float_mask":
        feeds["M"] = np.where(rng.random((2, 1, 3, 5)) < 0.3, np.float32(np.finfo(np.float32).min), 0).astype(np.float32)
    if case == "bool_causal":
        feeds["M"] = rng.random((2, 4, 3, 5)) < 0.7
        attrs, types = {"is_causal": 1}, {"M": TP.BOOL}
    if case == "gqa_3d":
        feeds = {n: x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1) for n, x in feeds.items()}
        attrs = {"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1}
    if case == "softcap":
        attrs = {"softcap": 2.0}
    model = _attention(feeds, attrs, types=types)
    ops = [n.op for n in import_model(model).nodes]
    assert ("rtxjit.Attention" in ops) == fused and ("Softmax" not in ops) == fused, ops
    _check(model, feeds)
