"""fuse_attention: attention subgraphs become one rtxjit.Attention node that computes what they
computed; and the op itself (its kernel against its float64 reference) on layouts, masks and
sizes that the pass tests do not reach."""

import numpy as np
import onnx
import pytest

from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.registry import get_op
from rtxjit.ir.types import DType, TensorType
from rtxjit.models import bert_encoder, demo_inputs
from rtxjit.onnx.importer import import_model
from rtxjit.passes.fuse_attention import fuse_attention
from rtxjit.session import InferenceSession
from tests.oprunner import rel_error, run_onnxruntime
from tests.passes.helpers import TOL, apply, model, node, ops, random

F32, F16 = np.float32, np.float16
DTYPES = pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
ONNX_TYPE = {F32: onnx.TensorProto.FLOAT, F16: onnx.TensorProto.FLOAT16}


# ---- the demo encoder ---------------------------------------------------------------------------

@DTYPES
def test_bert_encoder_attention_becomes_one_node(dtype):
    proto = bert_encoder(dtype=dtype)
    _, g, modified = apply(fuse_attention, proto, demo_inputs(proto, batch=2, seq=16), dtype)
    assert modified and ops(g)["rtxjit.Attention"] == 1
    assert "Softmax" not in ops(g) and "Transpose" not in ops(g)
    assert ops(g)["MatMul"] == 6  # the projections and the feed-forward stay
    (fused,) = [n for n in g.nodes if n.op == "rtxjit.Attention"]
    assert fused.attrs == {"scale": 0.25, "q_perm": (0, 2, 1, 3), "k_perm": (0, 2, 1, 3),
                           "v_perm": (0, 2, 1, 3), "out_perm": (0, 2, 1, 3)}
    assert fused.inputs[0].producer.op == "Reshape"  # reads the [B, S, H, D] tensor through strides


def test_second_run_changes_nothing():
    g = import_model(bert_encoder())
    assert fuse_attention(g).modified
    before = str(g)
    assert not fuse_attention(g).modified and str(g) == before


@pytest.mark.gpu
@DTYPES
@pytest.mark.parametrize("hidden,heads", [(128, 2), (96, 4), (256, 2)], ids=["d64", "d24", "d128"])
def test_bert_encoder_on_the_gpu(dtype, hidden, heads):
    """Several query and key blocks per (batch, head) on the GPU's smaller blocks."""
    proto = bert_encoder(dtype=dtype, hidden=hidden, heads=heads)
    feeds = demo_inputs(proto, batch=3, seq=200)
    g = fuse_attention(import_model(proto)).graph
    got = InferenceSession(g, device="cuda", optimize=False).run(None, feeds)[0]
    want = run_onnxruntime(proto, feeds)[0]
    assert rel_error(got, want) <= TOL[dtype]


# ---- variants of the pattern --------------------------------------------------------------------

def attention_model(dtype=F32, b=2, heads=2, sq=16, sk=16, d=16, scale="mul", mask="b11s", k_layout="bert",
                    softmax_fp32=False, probs_output=False):
    """Multi-head attention of ``xq [b, sq, E]`` over ``xkv [b, sk, E]`` (E = heads * d).

    ``scale``: "mul", "mul_left" (the constant first), "div" (by sqrt(d)), "prescaled" (Q's
    projection is scaled) or "none". ``mask``: None, "b11s" ([b,1,1,sk]) or "b1ss" ([b,1,sq,sk],
    the Add's first input). ``k_layout``: "bert" (one Transpose(0,2,3,1)) or "torch" (Transpose(0,2,1,3)
    then Transpose(0,1,3,2), as torch.onnx.export writes ``k.transpose(-1, -2)``).
    ``softmax_fp32``: Cast to fp32 -> Softmax -> Cast back (transformers' eager attention in fp16).
    """
    e = heads * d
    w = {n: (random((e, e), dtype, seed) / np.sqrt(e)).astype(dtype) for seed, n in enumerate("qkv", 1)}
    inits = {**{"w" + n: a for n, a in w.items()}, "heads": np.array([0, 0, heads, d], np.int64),
             "merge": np.array([0, 0, e], np.int64), "c": np.array(d ** -0.5, dtype),
             "sqrt_d": np.array(np.sqrt(d), dtype)}
    nodes = [node("MatMul", ["xq", "wq"], ["qp"]), node("MatMul", ["xkv", "wk"], ["kp"]),
             node("MatMul", ["xkv", "wv"], ["vp"])]
    if scale == "prescaled":
        nodes += [node("Mul", ["qp0", "c"], ["qp"])]
        nodes[0] = node("MatMul", ["xq", "wq"], ["qp0"])
    for n in "qkv":
        nodes.append(node("Reshape", [n + "p", "heads"], [n + "4"]))
    nodes += [node("Transpose", ["q4"], ["q"], perm=[0, 2, 1, 3]), node("Transpose", ["v4"], ["v"], perm=[0, 2, 1, 3])]
    if k_layout == "bert":
        nodes.append(node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]))
    else:
        nodes += [node("Transpose", ["k4"], ["k"], perm=[0, 2, 1, 3]),
                  node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]
    nodes.append(node("MatMul", ["q", "kt"], ["scores"]))
    x = "scaled" if scale in ("mul", "mul_left", "div") else "scores"
    if scale in ("mul", "div"):
        nodes.append(node(scale.capitalize(), ["scores", "c" if scale == "mul" else "sqrt_d"], ["scaled"]))
    elif scale == "mul_left":
        nodes.append(node("Mul", ["c", "scores"], ["scaled"]))
    inputs = {"xq": (dtype, [b, sq, e]), "xkv": (dtype, [b, sk, e])}
    if mask is not None:
        inputs["mask"] = (dtype, [b, 1, 1, sk] if mask == "b11s" else [b, 1, sq, sk])
        nodes.append(node("Add", [x, "mask"] if mask == "b11s" else ["mask", x], ["masked"]))
        x = "masked"
    if softmax_fp32:
        nodes.append(node("Cast", [x], ["x32"], to=onnx.TensorProto.FLOAT))
        nodes += [node("Softmax", ["x32"], ["p32"], axis=-1), node("Cast", ["p32"], ["probs"], to=ONNX_TYPE[dtype])]
    else:
        nodes.append(node("Softmax", [x], ["probs"], axis=-1))
    nodes += [node("MatMul", ["probs", "v"], ["ctx"]), node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              node("Reshape", ["ctx_t", "merge"], ["y"])]
    outputs = {"y": (dtype, [b, sq, e])}
    if probs_output:
        outputs["probs"] = (dtype, [b, heads, sq, sk])
    return model(nodes, inputs, outputs, inits), _feeds(inputs, dtype)


def _feeds(inputs: dict, dtype) -> dict:
    feeds = {n: random(shape, dtype, seed) for seed, (n, (_, shape)) in enumerate(sorted(inputs.items()), 7)}
    if "mask" in feeds:
        keep = np.random.default_rng(3).random(feeds["mask"].shape) < 0.7
        keep[..., 0] = True
        feeds["mask"] = np.where(keep, 0.0, -10000.0).astype(dtype)
    return feeds


def _fused(proto, feeds, dtype, left=None) -> Node:
    """The one fused node; only the projections, the head reshapes (and ``left``) remain."""
    _, g, modified = apply(fuse_attention, proto, feeds, dtype)
    assert modified and ops(g) == {"rtxjit.Attention": 1, "MatMul": 3, "Reshape": 4, **(left or {})}
    return next(n for n in g.nodes if n.op == "rtxjit.Attention")


@pytest.mark.parametrize("scale,want", [("mul", 0.25), ("mul_left", 0.25), ("div", 0.25), ("none", 1.0)])
def test_scale_forms(scale, want):
    fused = _fused(*attention_model(scale=scale), F32)
    assert fused.attrs["scale"] == pytest.approx(want)


def test_scale_folded_into_q_stays_out_of_the_op():
    fused = _fused(*attention_model(scale="prescaled"), F32, left={"Mul": 1})
    assert fused.attrs["scale"] == 1.0 and fused.inputs[0].producer.op == "Reshape"


@DTYPES
@pytest.mark.parametrize("mask", [None, "b11s", "b1ss"])
def test_masks(mask, dtype):
    fused = _fused(*attention_model(dtype, mask=mask), dtype)
    assert len(fused.inputs) == (3 if mask is None else 4)


@DTYPES
def test_torch_export_layout_and_fp32_softmax(dtype):
    """K as Transpose(0,2,1,3) then Transpose(0,1,3,2); the softmax between Casts to and from fp32."""
    fused = _fused(*attention_model(dtype, scale="div", k_layout="torch", softmax_fp32=True), dtype)
    assert fused.attrs["k_perm"] == (0, 2, 1, 3)


def test_head_dim_that_is_not_a_power_of_two():
    _fused(*attention_model(heads=2, d=24), F32)


@DTYPES
def test_cross_attention(dtype):
    _fused(*attention_model(dtype, sq=12, sk=40, mask="b1ss"), dtype)


@DTYPES
def test_text_cross_attention_of_a_diffusion_unet(dtype):
    """Stable Diffusion's cross-attention: image tokens attend to 77 text tokens (not a multiple of
    any key block), head dim 40 (not a power of two), no mask."""
    _fused(*attention_model(dtype, b=1, heads=2, sq=36, sk=77, d=40, mask=None), dtype)


def test_probs_used_elsewhere_are_not_fused():
    proto, feeds = attention_model(probs_output=True)
    _, g, modified = apply(fuse_attention, proto, feeds)
    assert not modified and "rtxjit.Attention" not in ops(g) and ops(g)["Softmax"] == 1


def test_transpose_used_elsewhere_stays_and_the_op_reads_its_output():
    proto, feeds = attention_model()
    proto.graph.output.append(onnx.helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [2, 2, 16, 16]))
    _, g, modified = apply(fuse_attention, proto, feeds)
    fused = next(n for n in g.nodes if n.op == "rtxjit.Attention")
    assert modified and ops(g)["Transpose"] == 1
    assert fused.inputs[0].name == "q" and fused.attrs["q_perm"] == (0, 1, 2, 3)


# ---- the op on its own --------------------------------------------------------------------------

def _run_op(arrays: list, attrs: dict, dtype, device: str = None) -> tuple:
    """(kernel output, float64 reference) of one rtxjit.Attention node on ``arrays`` (q, k, v, mask)."""
    dt = DType.from_numpy(dtype)
    inputs = [Value(f"in{i}", TensorType(dt if i < 3 else DType.FP32, a.shape)) for i, a in enumerate(arrays)]
    opdef = get_op("rtxjit.Attention")
    (t,) = opdef.infer([v.type for v in inputs], opdef.bind_attrs(attrs, "test"), 1)
    out = Value("out", t)
    g = Graph("attention", inputs, [out], [Node("rtxjit.Attention", "att", inputs, [out], attrs, 1)])
    out.producer = g.nodes[0]
    feeds = {v.name: a for v, a in zip(inputs, arrays)}
    got = InferenceSession(g, device=device, optimize=False).run(None, feeds)[0]
    (want,) = opdef.run_reference(arrays, opdef.bind_attrs(attrs, "test"), 1)
    return got, want


@DTYPES
@pytest.mark.parametrize("device", [pytest.param(None, id="default"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_op_with_strided_layouts_broadcast_mask_and_several_key_blocks(dtype, device):
    """Sk = 160 needs two key blocks even at the interpreter's 128; Dv != Dk; the mask broadcasts
    over batch and query rows and hides whole key blocks from some rows (-inf), which must not
    turn into NaN."""
    b, h, sq, sk, dk, dv = 2, 3, 20, 160, 12, 8
    q = random((b, sq, h, dk), dtype, 1)  # stored [B, S, H, D]
    k = random((h, dk, b, sk), dtype, 2)  # an odd layout: logical K = transpose(k, (2, 0, 3, 1))
    v = random((b, h, sk, dv), dtype, 3)
    mask = np.zeros((1, h, 1, sk), np.float32)
    mask[:, 1, :, :130] = -np.inf
    mask[:, 2, :, 140:] = -10000.0
    attrs = {"scale": 0.3, "q_perm": (0, 2, 1, 3), "k_perm": (2, 0, 3, 1), "v_perm": (0, 1, 2, 3),
             "out_perm": (2, 0, 1, 3)}
    got, want = _run_op([q, k, v, mask], attrs, dtype, device)
    assert got.shape == (sq, b, h, dv) and np.isfinite(got).all()
    assert rel_error(got, want) <= TOL[dtype]


def test_op_fully_masked_row_is_nan_as_in_the_reference():
    q, k, v = (random((1, 2, 16, 16), F32, s) for s in (1, 2, 3))
    mask = np.zeros((1, 1, 16, 16), np.float32)
    mask[0, 0, 3, :] = -np.inf
    got, want = _run_op([q, k, v, mask], {"scale": 0.25}, F32)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).sum() == 2 * 16
    ok = ~np.isnan(want)
    assert rel_error(got[ok], want[ok]) <= TOL[F32]


def test_q_and_k_scaled_separately_fold_into_the_scale():
    """torch's export of scaled_dot_product_attention: Mul(q, sqrt(s)), Mul(k^T, sqrt(s))."""
    from onnx import TensorProto, helper, numpy_helper

    from rtxjit.passes.fuse_attention import fuse_attention as fuse
    from tests.passes.helpers import apply, ops, random

    s = np.array(0.25 ** 0.5, np.float32)
    nodes = [helper.make_node("Mul", ["q", "s"], ["qs"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("Mul", ["kt", "s"], ["ks"]), helper.make_node("MatMul", ["qs", "ks"], ["sc"]),
             helper.make_node("Softmax", ["sc"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    shape = [2, 3, 5, 4]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                          [numpy_helper.from_array(s, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # readable by older onnxruntime builds too
    feeds = {n: random(shape, np.float32, i) for i, n in enumerate("qkv")}
    _, out, _ = apply(fuse, m, feeds, np.float32)
    assert ops(out) == {"rtxjit.Attention": 1}
    assert abs(out.nodes[0].attrs["scale"] - 0.25) < 1e-6


@DTYPES
def test_grouped_query_attention_reads_unrepeated_k_and_v(dtype):
    """transformers' repeat_kv as exported: K/V [B, Hkv, S, D] -> Unsqueeze(2) -> Expand
    [B, Hkv, g, S, D] -> Reshape [B, Hkv * g, S, D]; the op takes kv_group = g and the
    unrepeated K and V (no copy of the repeated heads)."""

    b, hkv, g, s, d = 2, 2, 3, 10, 8
    nodes = [node("Unsqueeze", ["k", "ax2"], ["k5"]), node("Expand", ["k5", "shape5"], ["ke"]),
             node("Reshape", ["ke", "shape4"], ["kr"]), node("Unsqueeze", ["v", "ax2"], ["v5"]),
             node("Expand", ["v5", "shape5"], ["ve"]), node("Reshape", ["ve", "shape4"], ["vr"]),
             node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"], ["s0"]),
             node("Mul", ["s0", "c"], ["s1"]), node("Add", ["s1", "mask"], ["s2"]),
             node("Softmax", ["s2"], ["p"], axis=-1), node("MatMul", ["p", "vr"], ["y"])]
    inits = {"ax2": np.array([2], np.int64), "shape5": np.array([b, hkv, g, s, d], np.int64),
             "shape4": np.array([b, hkv * g, s, d], np.int64), "c": np.array(d ** -0.5, dtype)}
    inputs = {"q": (dtype, [b, hkv * g, s, d]), "k": (dtype, [b, hkv, s, d]), "v": (dtype, [b, hkv, s, d]),
              "mask": (dtype, [b, 1, 1, s])}
    proto = model(nodes, inputs, {"y": (dtype, [b, hkv * g, s, d])}, inits)
    feeds = {n: random(shape, dtype, i) for i, (n, (_, shape)) in enumerate(inputs.items())}
    feeds["mask"] = np.where(np.arange(s) < 7, 0, np.finfo(dtype).min).astype(dtype).reshape(1, 1, 1, s).repeat(b, 0)
    _, graph, modified = apply(fuse_attention, proto, feeds, dtype)
    fused = [n for n in graph.nodes if n.op == "rtxjit.Attention"]
    assert modified and len(fused) == 1 and fused[0].attrs["kv_group"] == g
    assert [v.name for v in fused[0].inputs[1:3]] == ["k", "v"] and "Expand" not in ops(graph)



def test_fp16_attention_whose_export_upcasts_scores_and_v_fuses_with_an_fp32_output():
    """The TorchScript export of an fp16 model's SDPA: fp16 Q.K^T, Cast to fp32, + mask, Softmax,
    Where(IsNaN), then Cast(V) to fp32 and an fp32 product (and fp32 from there on). The op reads
    fp16 Q/K/V and writes fp32 (out_dtype); within fp16's tolerance of the graph."""
    f16, f32 = np.float16, np.float32
    b, h, s, d = 2, 3, 12, 8
    nodes = [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"], ["s0"]),
             node("Mul", ["s0", "c"], ["s1"]), node("Cast", ["s1"], ["s2"], to=1), node("Add", ["s2", "mask"], ["s3"]),
             node("Softmax", ["s3"], ["p0"], axis=-1), node("IsNaN", ["p0"], ["nan"]),
             node("Where", ["nan", "zero", "p0"], ["p"]), node("Cast", ["v"], ["v32"], to=1),
             node("MatMul", ["p", "v32"], ["y"])]
    inputs = {"q": (f16, [b, h, s, d]), "k": (f16, [b, h, s, d]), "v": (f16, [b, h, s, d]), "mask": (f32, [b, 1, 1, s])}
    proto = model(nodes, inputs, {"y": (f32, [b, h, s, d])},
                  {"c": np.array(d ** -0.5, f16), "zero": np.array([0.0], f32)})
    feeds = {n: random(shape, dt, i) for i, (n, (dt, shape)) in enumerate(inputs.items())}
    feeds["mask"] = np.where(np.arange(s) < 9, 0, -np.inf).astype(f32).reshape(1, 1, 1, s).repeat(b, 0)
    feeds["mask"][1] = -np.inf  # a fully masked batch row: 0 through Where(IsNaN)
    _, graph, modified = apply(fuse_attention, proto, feeds, np.float16)
    fused = [n for n in graph.nodes if n.op == "rtxjit.Attention"]
    assert modified and len(fused) == 1 and fused[0].attrs["out_dtype"] == 1 and fused[0].attrs["nan_rows_zero"] == 1
    assert ops(graph) == {"rtxjit.Attention": 1}
