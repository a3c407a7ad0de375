"""Ops declared once per ONNX version that changed their meaning (rtxjit/ir/registry.py): how a node
resolves to a declaration, the declarations older than an op's newest run against onnxruntime on
their own samples (tests/test_ops.py runs the newest), and GroupNormalization 18 (scale and bias per
group) beside 21 (per channel), through import, fusion passes, serialization and engines."""

import json

import numpy as np
import pytest

import rtxjit
from rtxjit.errors import InternalError, UnsupportedOpError
from rtxjit.ir import registry
from rtxjit.ir.registry import Kind, all_op_versions, all_ops, get_op, op, op_versions
from rtxjit.ir.serialize import from_document, to_document
from rtxjit.ir.types import TensorType
from rtxjit.onnx.importer import import_model
from tests.oprunner import assert_close, make_inputs, run_onnxruntime, single_node_model
from tests.passes.helpers import model, node, random

OLDER = [d for d in all_op_versions() if d is not all_ops()[d.name]]
CASES = [pytest.param(d.name, d.since, i, ft, id=f"{d.name}-{d.since}-{i}-{ft}")
         for d in OLDER for i, sample in enumerate(d.samples) for ft in sample.float_types]


def test_group_normalization_has_versions_18_and_21():
    assert [d.since for d in op_versions("GroupNormalization")] == [18, 21]
    assert all_ops()["GroupNormalization"].since == 21
    assert {d.since for d in OLDER if d.name == "GroupNormalization"} == {18}


@pytest.mark.parametrize("version,since", [(18, 18), (19, 18), (20, 18), (21, 21), (22, 21), (0, 21)])
def test_a_node_resolves_to_the_newest_declaration_not_above_its_version(version, since):
    assert get_op("GroupNormalization", "here", version).since == since


def test_a_version_older_than_every_declaration_is_refused():
    with pytest.raises(UnsupportedOpError, match=r"here: GroupNormalization version 17 is not supported "
                                                 r"\(rtxjit implements it from version 18\)"):
        get_op("GroupNormalization", "here", 17)


def test_a_version_declared_twice_is_an_internal_error(monkeypatch):
    monkeypatch.setattr(registry, "_VERSIONS", {})  # the real registry stays as it is

    def infer(x: TensorType) -> TensorType:
        return x

    op("test.Twice", since=3, kind=Kind.POINTWISE)(infer)
    op("test.Twice", since=7, kind=Kind.POINTWISE)(infer)
    with pytest.raises(InternalError, match="op test.Twice version 7 is declared twice"):
        op("test.Twice", since=7, kind=Kind.POINTWISE)(infer)
    assert [d.since for d in op_versions("test.Twice")] == [3, 7]


def test_every_older_declaration_has_samples_a_reference_and_a_lowering():
    for d in OLDER:
        assert d.samples, f"{d.name}-{d.since} declares no test samples"
        assert all(s.opset is not None and d.since <= s.opset for s in d.samples), \
            f"{d.name}-{d.since}: each sample names an opset where this version applies"
        assert d.reference_fn is not None and (d.kind is Kind.SHAPE or d.lower_fn is not None), f"{d.name}-{d.since}"


@pytest.mark.parametrize("name,since,index,float_type", CASES)
def test_older_declaration_matches_onnxruntime(name, since, index, float_type, rng):
    """Like tests/test_ops.py for the newest declarations; onnxruntime must run the model."""
    opdef = next(d for d in op_versions(name) if d.since == since)
    sample = opdef.samples[index]
    arrays = make_inputs(sample, float_type, rng)
    proto, feeds = single_node_model(opdef, sample, arrays)
    sess = rtxjit.InferenceSession(proto)
    assert {n.version for n in sess.graph.nodes if n.op == name} == {since}
    got = sess.run(None, feeds)
    want = run_onnxruntime(proto, feeds)
    assert want is not None, "onnxruntime did not run the model"
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, np.asarray(w), float_type, f"{name}-{since} sample {index} {float_type} output {k}")


# ---- GroupNormalization 18 and 21 --------------------------------------------------------------

SHAPE, GROUPS = (2, 6, 3, 4), 3


def _group_norm(opset: int, params: int, tail: bool = False, channels=6):
    """x -> GroupNormalization(num_groups=3) [-> SiLU] with ``params`` values of scale and bias."""
    nodes = [node("GroupNormalization", ["x", "scale", "bias"], ["n" if tail else "y"], num_groups=GROUPS,
                  epsilon=1e-4)]
    if tail:
        nodes += [node("Sigmoid", ["n"], ["s"]), node("Mul", ["n", "s"], ["y"])]
    shape = [SHAPE[0], channels, *SHAPE[2:]]
    inits = {"scale": random((params,), np.float32, 1), "bias": random((params,), np.float32, 2)}
    return model(nodes, {"x": (np.float32, shape)}, {"y": (np.float32, shape)}, inits, opset=opset)


@pytest.mark.parametrize("opset,params,version", [(18, GROUPS, 18), (20, GROUPS, 18), (21, 6, 21)])
def test_group_normalization_per_group_or_per_channel_matches_onnxruntime(opset, params, version):
    proto = _group_norm(opset, params)
    (gn,) = [n for n in import_model(proto).nodes if n.op == "GroupNormalization"]
    assert gn.version == version and gn.inputs[1].type.shape == (params,)
    x = random(SHAPE, np.float32, 3)
    want = run_onnxruntime(proto, {"x": x})
    assert want is not None, f"onnxruntime does not run GroupNormalization at opset {opset}"
    assert_close(rtxjit.InferenceSession(proto).run(None, {"x": x})[0], want[0], "fp32", f"opset {opset}")


def test_version_18_with_per_channel_parameters_is_a_clear_error():
    with pytest.raises(rtxjit.errors.ShapeError, match=r"scale of shape \[6\], one value per group \(\[3\]\)"):
        rtxjit.InferenceSession(_group_norm(18, 6))


def test_version_18_is_not_fused_into_the_per_channel_kernel_even_with_unknown_channels():
    """fuse_group_norm folds the activation into rtxjit.GroupNorm, whose scale and bias are per
    channel: version 18 stays a node of its own (with unknown C nothing would catch the mismatch)."""
    for channels in (6, "C"):
        proto = _group_norm(18, GROUPS, tail=True, channels=channels)
        x = random(SHAPE, np.float32, 4)
        sess = rtxjit.InferenceSession(proto)
        assert "rtxjit.GroupNorm" not in {n.op for n in sess.graph.nodes}
        assert_close(sess.run(None, {"x": x})[0], run_onnxruntime(proto, {"x": x})[0], "fp32", f"C={channels}")
    fused = rtxjit.InferenceSession(_group_norm(21, 6, tail=True))
    assert [n.op for n in fused.graph.nodes] == ["rtxjit.GroupNorm"]


def test_the_version_survives_serialization_and_engines(tmp_path):
    proto = _group_norm(18, GROUPS)
    graph = import_model(proto)
    doc, arrays = to_document(graph)
    back = from_document(json.loads(json.dumps(doc)), arrays)
    assert [n.version for n in back.nodes] == [n.version for n in graph.nodes] == [18]
    engine = rtxjit.Engine.load(rtxjit.build(proto, targets=["sm_80"]).save(tmp_path / "gn18.engine"))
    assert [(n.op, n.version) for n in engine.graph.nodes] == [("GroupNormalization", 18)]
    x = random(SHAPE, np.float32, 5)
    assert_close(rtxjit.InferenceSession(engine).run(None, {"x": x})[0], run_onnxruntime(proto, {"x": x})[0],
                 "fp32", "engine")


def test_a_stored_node_of_a_version_rtxjit_does_not_declare_is_refused():
    doc, arrays = to_document(import_model(_group_norm(18, GROUPS)))
    doc["nodes"][0]["version"] = 17
    with pytest.raises(rtxjit.errors.ModelError, match="GroupNormalization version 17 is not supported"):
        from_document(doc, arrays)

