import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from rtxjit import InferenceSession
from rtxjit import session as session_module
from rtxjit.errors import RtxjitError, UnsupportedOpError
from rtxjit.exec.device import Device
from rtxjit.ir.rewrite import copy_graph
from rtxjit.ir.types import DType
from rtxjit.ir.verify import verify
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn
from rtxjit.onnx.importer import import_model
from rtxjit.passes import optimize
from rtxjit.passes.convert_precision import convert_precision
from rtxjit.passes.precision_legality import check_precision
from tests.oprunner import rel_error
from tests.passes.helpers import apply, model, node, random

F32, F16 = np.float32, np.float16
MODELS = {"cnn": resnet_cnn, "encoder": bert_encoder}
SHAPE = ["N", 4]


def _to(dtype: DType):
    return lambda g: convert_precision(g, dtype)


def _inner_float_dtypes(graph) -> set:
    """Dtypes of the float values that nodes read and write, except the Casts at the graph's edges."""
    ins, outs = {id(v) for v in graph.inputs}, {id(v) for v in graph.outputs}
    dtypes = set()
    for n in graph.nodes:
        if n.op == "Cast" and (id(n.inputs[0]) in ins or id(n.outputs[0]) in outs):
            continue
        dtypes |= {v.type.dtype for v in n.inputs + n.outputs if v is not None and v.type.dtype.is_float}
    return dtypes


def _edges_stay_fp32(before, after):
    assert [(v.name, v.type) for v in after.inputs] == [(v.name, v.type) for v in before.inputs]
    assert [(v.name, v.type) for v in after.outputs] == [(v.name, v.type) for v in before.outputs]


# -- the demo models


@pytest.mark.parametrize("name", list(MODELS))
def test_demo_model_in_fp16_matches_onnxruntime_fp32(name):
    m = MODELS[name]()
    feeds = demo_inputs(m)
    sess = InferenceSession(m, precision="fp16")
    assert [a.dtype for a in sess.get_inputs() + sess.get_outputs()] == [DType.FP32] * (len(feeds) + 1)
    got = sess.run(None, feeds)[0]
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert rel_error(got, want) <= 1e-2
    assert _inner_float_dtypes(sess.graph) == {DType.FP16}
    assert "convert_precision_fp16" in [t.name for t in sess.pass_timings]


@pytest.mark.parametrize("dtype", [DType.FP16, DType.BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_inner_float_value_takes_the_new_type(name, dtype):
    before = import_model(MODELS[name]())
    result = convert_precision(copy_graph(before), dtype)
    verify(result.graph)
    assert result.modified
    _edges_stay_fp32(before, result.graph)
    assert _inner_float_dtypes(result.graph) == {dtype}
    assert _inner_float_dtypes(before) == {DType.FP32}  # the original graph is left as it is
    for c in result.graph.constants():
        if c.type.dtype is DType.BF16:  # held as float32 values that bf16 represents exactly
            assert c.const.dtype == np.float32 and not (c.const.view(np.uint32) & 0xFFFF).any()


def test_bf16_pipeline_builds_a_bf16_graph():
    """bf16 arithmetic is not exact in the CPU interpreter: the types are checked, not the numbers."""
    m = resnet_cnn()
    graph, timings = optimize(import_model(m), verify=True, precision="bf16")
    assert _inner_float_dtypes(graph) == {DType.BF16}
    assert "convert_precision_bf16" in [t.name for t in timings]


def test_bf16_constants_round_to_nearest_even():
    values = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -9), 3.14159, 1e-40, 3.4e38, np.inf, -np.inf,
                       65504.0, 1 + 2 ** -8 + 2 ** -20], F32)
    m = model([node("Add", ["x", "c"], ["y"])], {"x": (F32, [10])}, {"y": (F32, [10])}, {"c": values})
    g = convert_precision(import_model(m), DType.BF16).graph
    (c,) = g.constants()
    assert c.type.dtype is DType.BF16
    want = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(c.const, want)


# -- small models: what is converted and what is not


def test_casts_to_fp32_become_casts_to_the_new_type():
    m = model([node("Cast", ["i"], ["f"], to=TensorProto.FLOAT), node("Mul", ["x", "f"], ["y"])],
              {"x": (F32, SHAPE), "i": (np.int64, SHAPE)}, {"y": (F32, SHAPE)})
    feeds = {"x": random((3, 4)), "i": np.arange(12, dtype=np.int64).reshape(3, 4) - 6}
    before, g, modified = apply(_to(DType.FP16), m, feeds, F16)
    assert modified
    cast = next(n for n in g.nodes if n.op == "Cast" and n.inputs[0].name == "i")
    assert cast.attrs["to"] == TensorProto.FLOAT16 and cast.outputs[0].type.dtype is DType.FP16
    assert g.inputs[1].type.dtype is DType.INT64  # integers are left alone
    _edges_stay_fp32(before, g)


def _constant_of_shape_model(value: float):
    return model([node("Shape", ["x"], ["s"]), node("ConstantOfShape", ["s"], ["c"], value=_tensor(value)),
                  node("Add", ["x", "c"], ["y"])], {"x": (F32, SHAPE)}, {"y": (F32, SHAPE)})


def test_constant_of_shape_value_is_converted():
    m = _constant_of_shape_model(-3.25)
    _, g, _ = apply(_to(DType.FP16), m, {"x": random((3, 4))}, F16)
    cos = next(n for n in g.nodes if n.op == "ConstantOfShape")
    assert cos.attrs["value"].dtype == F16 and cos.attrs["value"][0] == -3.25
    assert _inner_float_dtypes(g) == {DType.FP16}
    # a -1e9 mask value is clamped to fp16's largest finite value, not turned into -inf
    g = convert_precision(import_model(_constant_of_shape_model(-1e9)), DType.FP16).graph
    assert next(n for n in g.nodes if n.op == "ConstantOfShape").attrs["value"][0] == -65504
    # bf16: numpy has no bf16 value, so the fp32 ConstantOfShape is followed by a Cast
    g = convert_precision(import_model(m), DType.BF16).graph
    verify(g)
    assert _inner_float_dtypes(g) - {DType.FP32} == {DType.BF16}
    cos = next(n for n in g.nodes if n.op == "ConstantOfShape")
    (reader,) = [n for n in g.nodes if cos.outputs[0] in n.inputs]
    assert reader.op == "Cast" and reader.attrs["to"] == TensorProto.BFLOAT16


def test_an_output_that_nodes_also_read_stays_fp32_and_its_readers_read_fp16():
    m = model([node("Relu", ["x"], ["a"]), node("Neg", ["a"], ["b"])], {"x": (F32, SHAPE)},
              {"a": (F32, SHAPE), "b": (F32, SHAPE), "x_out": (F32, SHAPE)})
    m.graph.node.append(node("Identity", ["x"], ["x_out"]))
    before, g, _ = apply(_to(DType.FP16), m, {"x": random((3, 4))}, F16)
    _edges_stay_fp32(before, g)
    neg = next(n for n in g.nodes if n.op == "Neg")
    assert neg.inputs[0].type.dtype is DType.FP16 and neg.inputs[0] is not g.outputs[0]
    assert _inner_float_dtypes(g) == {DType.FP16}


def test_fp16_and_fp64_values_are_left_alone():
    m = model([node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT), node("Add", ["x", "h32"], ["y"]),
               node("Cast", ["d"], ["d2"], to=TensorProto.DOUBLE)],
              {"x": (F32, SHAPE), "h": (F16, SHAPE), "d": (np.float64, SHAPE)},
              {"y": (F32, SHAPE), "d2": (np.float64, SHAPE)})
    feeds = {"x": random((3, 4)), "h": random((3, 4), F16, 1), "d": random((3, 4), np.float64, 2)}
    before, g, _ = apply(_to(DType.FP16), m, feeds, F16)
    _edges_stay_fp32(before, g)
    assert g.outputs[1].type.dtype is DType.FP64


def test_a_graph_without_fp32_values_is_not_modified():
    m = model([node("Neg", ["x"], ["y"])], {"x": (np.int64, SHAPE)}, {"y": (np.int64, SHAPE)})
    before = import_model(m)
    result = convert_precision(copy_graph(before), DType.FP16)
    assert not result.modified and str(result.graph) == str(before)


def test_an_fp32_model_keeps_its_types_without_the_option():
    m = resnet_cnn()
    graph = InferenceSession(m).graph
    assert _inner_float_dtypes(graph) == {DType.FP32}
    assert not any(t.name.startswith("convert_precision") for t in InferenceSession(m).pass_timings)


def test_the_option_works_without_the_pipeline():
    m = model([node("Relu", ["x"], ["y"])], {"x": (F32, SHAPE)}, {"y": (F32, SHAPE)})
    sess = InferenceSession(m, optimize=False, precision="fp16")
    assert [t.name for t in sess.pass_timings] == ["convert_precision_fp16"]
    x = random((3, 4))
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(x, 0).astype(F16).astype(F32))


@pytest.mark.parametrize("precision", ["fp8", "int8", "fp32", 16])
def test_an_unknown_precision_is_an_error(precision):
    with pytest.raises(RtxjitError, match="precision"):
        InferenceSession(resnet_cnn(), precision=precision)


# -- legality on the target SM


def _fp8_model():
    return model([node("Cast", ["x"], ["q"], to=TensorProto.FLOAT8E4M3FN), node("Cast", ["q"], ["y"], to=1)],
                 {"x": (F32, SHAPE)}, {"y": (F32, SHAPE)})


def test_bf16_below_sm80_is_an_error_naming_the_op_and_the_sm():
    g = convert_precision(import_model(bert_encoder()), DType.BF16).graph
    with pytest.raises(UnsupportedOpError, match=r"node '.+' \(Cast\): .*bf16.*sm_80.*sm_75"):
        check_precision(g, 75)
    check_precision(g, 80)
    check_precision(g, 90)


def test_fp8_below_sm89_is_an_error():
    g = import_model(_fp8_model())
    with pytest.raises(UnsupportedOpError, match=r"\(Cast\).*fp8e4m3.*sm_89.*sm_86"):
        check_precision(g, 86)
    check_precision(g, 89)


@pytest.mark.parametrize("sm", [70, 75, 80, 86, 89, 90, 100, 120])
@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_and_fp16_graphs_run_everywhere(name, sm):
    check_precision(import_model(MODELS[name]()), sm)
    check_precision(convert_precision(import_model(MODELS[name]()), DType.FP16).graph, sm)


def test_the_session_checks_the_gpu_sm(monkeypatch):
    """A session on a GPU checks its graph against the GPU's SM (here a CPU pretending to be sm_75)."""
    monkeypatch.setattr(session_module, "detect", lambda requested=None: Device("cpu", "cpu", 75))
    with pytest.raises(UnsupportedOpError, match="sm_75"):
        InferenceSession(resnet_cnn(), precision="bf16")
    InferenceSession(resnet_cnn(), precision="fp16")


def _tensor(v: float):
    return helper.make_tensor("value", TensorProto.FLOAT, [1], [v])
