"""A LayerNorm or RMSNorm over the last axis whose output only products read runs inside them
(rtxjit.NormMatMul, passes/fuse_norm_matmul.py, the matmul template's ``a_norm``): checked against
onnxruntime and the float64 reference in fp32 and fp16 on random inputs with an offset mean (the
statistics must be centred), with a bias epilogue joining the product, against the unfused graph,
and where the rewrite must not apply (the norm's output read by an Add; its Mean read)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from onnx import TensorProto, helper

import rtxjit
from rtxjit.ir.registry import get_op
from tests.oprunner import rel_error, run_onnxruntime

pass_module = importlib.import_module("rtxjit.passes.fuse_norm_matmul")
ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
TOL = {np.float32: 1e-4, np.float16: 1e-2}
K, N = 48, 40


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """The pass is off by default (measured slower on ViT, see its module); these tests turn it on."""
    monkeypatch.setattr(pass_module, "ENABLED", True)


def _const(name, a):
    return helper.make_tensor(name, ONNX[a.dtype.type], a.shape, a.tobytes(), raw=True)


def _pre_norm(dtype, rms: bool = False, tail: str = "gelu"):
    """x [2, 7, K] -> LayerNorm (or the decomposed RMSNorm an exporter writes) -> MatMul(w) + b ->
    ``tail``: "gelu" (the product's epilogue), "add" (the norm's output is also added: post-norm)
    or "mean" (LayerNorm's Mean output is a graph output)."""
    rng = np.random.default_rng(11)
    inits = [_const("w", (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)),
             _const("b", rng.standard_normal(N).astype(dtype)),
             _const("s", (1 + 0.3 * rng.standard_normal(K)).astype(dtype)),
             _const("sh", (0.2 * rng.standard_normal(K)).astype(dtype))]
    outputs = [helper.make_tensor_value_info("y", ONNX[dtype], [2, 7, N])]
    if rms:
        inits += [_const("two", np.array(2, dtype)), _const("eps", np.array(1e-6, dtype)),
                  helper.make_tensor("last", TensorProto.INT64, [1], [-1])]
        nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
                 helper.make_node("ReduceMean", ["sq", "last"], ["ms"], keepdims=1),
                 helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
                 helper.make_node("Div", ["x", "rms"], ["xn"]), helper.make_node("Mul", ["xn", "s"], ["n"])]
    else:
        outs = ["n", "mean"] if tail == "mean" else ["n"]
        nodes = [helper.make_node("LayerNormalization", ["x", "s", "sh"], outs, axis=-1, epsilon=1e-5)]
        if tail == "mean":
            outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [2, 7, 1]))
    nodes += [helper.make_node("MatMul", ["n", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["pb"])]
    if tail == "add":
        inits.append(_const("back", (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)))
        inits.append(helper.make_tensor("axes", TensorProto.INT64, [1], [-1]))
        nodes += [helper.make_node("MatMul", ["n", "back"], ["q"]), helper.make_node("Add", ["pb", "q"], ["r"]),
                  helper.make_node("Sigmoid", ["n"], ["sg"]), helper.make_node("ReduceSum", ["sg", "axes"], ["rs"], keepdims=1),
                  helper.make_node("Add", ["r", "rs"], ["y"])]
    else:
        nodes.append(helper.make_node("Gelu", ["pb"], ["y"]))
    graph = helper.make_graph(nodes, "pre_norm", [helper.make_tensor_value_info("x", ONNX[dtype], [2, 7, K])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    x = (3.0 + rng.standard_normal((2, 7, K)) * 1.5).astype(dtype)  # an offset mean
    return model, {"x": x}


def _anchors(sess):
    return [n.attrs.get("anchor", n.op) for n in sess.graph.nodes]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_a_pre_norm_projection_runs_as_one_product_and_matches_onnxruntime(dtype, rms, monkeypatch):
    model, feeds = _pre_norm(dtype, rms=rms)
    sess = rtxjit.InferenceSession(model)
    assert _anchors(sess) == ["rtxjit.NormMatMul"] and sess.launches_per_inference in (0, 1)
    out = sess.run(None, feeds)[0]
    assert sess.launches_per_inference == 1
    want = run_onnxruntime(model, feeds)
    assert want is not None or dtype == np.float16  # onnxruntime's CPU kernels lack some fp16 ops
    if want is not None:
        assert rel_error(out, want[0]) <= TOL[dtype]
    monkeypatch.setattr(pass_module, "ENABLED", False)
    unfused = rtxjit.InferenceSession(model)
    assert "rtxjit.NormMatMul" not in _anchors(unfused)
    assert rel_error(out, unfused.run(None, feeds)[0]) <= TOL[dtype]


@pytest.mark.parametrize("tail", ["add", "mean"])
def test_a_norm_whose_output_or_statistics_are_read_elsewhere_keeps_its_kernel(tail):
    model, feeds = _pre_norm(np.float32, tail=tail)
    sess = rtxjit.InferenceSession(model)
    assert "rtxjit.NormMatMul" not in _anchors(sess) and "LayerNormalization" in _anchors(sess)
    got = sess.run(None, feeds)
    for g, w in zip(got, run_onnxruntime(model, feeds)):
        assert rel_error(g, w) <= 1e-4


@pytest.mark.parametrize("index", range(4))
def test_norm_matmul_samples_match_the_float64_reference(index, rng):
    """The op's declared samples, as single nodes (an rtxjit-domain node: no onnxruntime kernel)."""
    from rtxjit.ir.graph import Graph, Node, Value
    from rtxjit.ir.types import DType, TensorType

    opdef = get_op("rtxjit.NormMatMul")
    sample = opdef.samples[index]
    arrays = [None if r is None else (rng.standard_normal(r.shape) + (2.0 if i == 0 else 0.0)).astype(np.float32)
              for i, r in enumerate(sample.inputs)]
    arrays += [None] * (4 - len(arrays))
    inputs = [None if a is None else Value(f"i{i}", TensorType(DType.FP32, a.shape)) for i, a in enumerate(arrays)]
    attrs = opdef.bind_attrs(dict(sample.attrs), "test")
    [t] = opdef.infer([None if v is None else v.type for v in inputs], attrs, 1)
    out = Value("out", t)
    node = Node("rtxjit.NormMatMul", "nm", inputs, [out], attrs, 1)
    out.producer = node
    graph = Graph("nm", [v for v in inputs if v is not None], [out], [node])
    feeds = {f"i{i}": a for i, a in enumerate(arrays) if a is not None}
    got = rtxjit.InferenceSession(graph, optimize=False).run(None, feeds)[0]
    want = opdef.run_reference([None if a is None else a.astype(np.float64) for a in arrays], attrs, 1)[0]
    assert rel_error(got, want) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_gpu_pre_norm_projection_matches_the_unfused_graph_and_onnxruntime(dtype, rms, monkeypatch):
    """Generic, then specialized (tuned) kernels on the GPU, against onnxruntime on the fp32 model
    (fp16: the same model in fp32, on the fp16 input widened) and against the unfused graph."""
    model, feeds = _pre_norm(dtype, rms=rms)
    model32, _ = _pre_norm(np.float32, rms=rms)
    want = run_onnxruntime(model32, {"x": feeds["x"].astype(np.float32)})[0]
    sess = rtxjit.InferenceSession(model, device="cuda")
    for _ in range(2):
        out = sess.run(None, feeds)[0]
        assert rel_error(out, want) <= TOL[dtype], rel_error(out, want)
        sess.wait_for_specialization(timeout=300)
    monkeypatch.setattr(pass_module, "ENABLED", False)
    unfused = rtxjit.InferenceSession(model, device="cuda")
    assert rel_error(out, unfused.run(None, feeds)[0]) <= TOL[dtype]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gpt2s_view_then_gemm_after_the_norm_fuses_too(trans_b):
    """GPT-2's Conv1D: ``x.view(-1, nx)`` then ``addmm`` (a Gemm with C), B stored either way."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((N, K) if trans_b else (K, N)) / np.sqrt(K)).astype(np.float32)
    inits = [_const("w", w), _const("c", rng.standard_normal(N).astype(np.float32)),
             _const("s", (1 + 0.3 * rng.standard_normal(K)).astype(np.float32)),
             _const("sh", (0.2 * rng.standard_normal(K)).astype(np.float32)),
             helper.make_tensor("flat", TensorProto.INT64, [2], [-1, K]),
             helper.make_tensor("back", TensorProto.INT64, [3], [2, 7, N])]
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "sh"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("Reshape", ["n", "flat"], ["n2"]),
             helper.make_node("Gemm", ["n2", "w", "c"], ["g"], transB=trans_b),
             helper.make_node("Reshape", ["g", "back"], ["y"])]
    graph = helper.make_graph(nodes, "gpt2_proj", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    feeds = {"x": (3.0 + 1.5 * rng.standard_normal((2, 7, K))).astype(np.float32)}
    sess = rtxjit.InferenceSession(model)
    assert "rtxjit.NormMatMul" in _anchors(sess) and "LayerNormalization" not in _anchors(sess)
    assert rel_error(sess.run(None, feeds)[0], run_onnxruntime(model, feeds)[0]) <= 1e-4
    assert sess.launches_per_inference == 1  # C added in the product's epilogue
