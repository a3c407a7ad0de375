"""The one way from a model to its optimized graph (rtxjit/frontdoor.py), the one
precision-legality check (rtxjit/passes/precision_legality.py, inside fused programs too), and
``InferenceSession.plan`` (a binding's plan without a run)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import rtxjit
from rtxjit import InferenceSession, InputError, UnsupportedOpError
from rtxjit import session as session_module
from rtxjit.exec.device import Device
from rtxjit.frontdoor import import_graph, optimized_graph
from rtxjit.ir.rewrite import copy_graph
from rtxjit.models import bert_encoder, demo_inputs
from rtxjit.passes.precision_legality import check_precision
from tests.passes.helpers import model, node

ENCODER = bert_encoder(hidden=16, heads=2, ffn=32)
ROWS = {"x": (np.float32, ["N", 8])}


def _hidden_cast(to: int, matmul: bool = False):
    """fp32 -> ``to`` -> fp32 around a Relu (or after a MatMul): fusion hides the narrow type
    inside one fp32 kernel's program (an rtxjit.Pointwise, or an rtxjit.Epilogue of the MatMul)."""
    if matmul:
        nodes = [node("MatMul", ["x", "w"], ["p"]), node("Cast", ["p"], ["q"], to=to), node("Cast", ["q"], ["y"], to=1)]
        return model(nodes, ROWS, {"y": (np.float32, ["N", 8])}, inits={"w": np.full((8, 8), 0.5, np.float32)})
    nodes = [node("Cast", ["x"], ["q"], to=to), node("Relu", ["q"], ["r"]), node("Cast", ["r"], ["y"], to=1)]
    return model(nodes, ROWS, {"y": (np.float32, ["N", 8])})


# -- the front door

def test_sessions_engines_and_the_front_door_give_one_graph(tmp_path):
    path = tmp_path / "encoder.onnx"
    onnx.save(ENCODER, str(path))
    front = optimized_graph(str(path), precision="fp16")
    assert front.pass_timings and not front.from_cache and front.model_key is None  # no cache: no key
    sess = InferenceSession(str(path), device="cpu", precision="fp16")
    engine = rtxjit.build(str(path), targets=["sm_90"], precision="fp16")
    assert str(sess.graph) == str(front.graph) == str(engine.ir)
    assert [t.name for t in sess.pass_timings] == [t.name for t in front.pass_timings]


def test_the_runtime_caches_record_serves_the_next_call(tmp_path, monkeypatch):
    path = tmp_path / "encoder.onnx"
    onnx.save(ENCODER, str(path))
    cache = rtxjit.cache.store.open_cache(tmp_path / "cache")
    first = optimized_graph(str(path), cache=cache)
    for thread in __import__("threading").enumerate():  # the record is written on a thread of its own
        if thread.name == "rtxjit-cache-writer":
            thread.join()
    import rtxjit.onnx.importer as importer

    monkeypatch.setattr(importer, "import_model", lambda *a, **k: pytest.fail("imported again"))
    again = optimized_graph(str(path), cache=cache)
    assert again.from_cache and again.pass_timings == []
    assert again.model_key == first.model_key and str(again.graph) == str(first.graph)


def test_a_graph_without_passes_is_taken_as_it_is_and_an_engine_copies_it():
    graph = import_graph(ENCODER)
    assert optimized_graph(graph, optimize=False).graph is graph
    assert optimized_graph(graph).graph is not graph  # the passes work on a copy
    engine = rtxjit.build(graph, targets=["sm_90"], optimize=False, strip_weights=True)
    assert engine.ir is not graph and not any(v.const is None for v in graph.constants())
    assert str(engine.ir) == str(copy_graph(graph))


# -- one legality check, inside fused programs too

@pytest.mark.parametrize("matmul", [False, True], ids=["pointwise", "epilogue"])
@pytest.mark.parametrize("to, legal, illegal, short", [(TensorProto.BFLOAT16, 80, 75, "bf16")])
def test_a_type_hidden_in_a_fused_program_is_illegal_on_an_older_sm(matmul, to, legal, illegal, short):
    graph = optimized_graph(_hidden_cast(to, matmul)).graph
    fused = "rtxjit.Epilogue" if matmul else "rtxjit.Pointwise"
    assert [n.op for n in graph.nodes] == [fused]
    assert all(v.type.dtype.short == "fp32" for n in graph.nodes for v in n.inputs + n.outputs)
    check_precision(graph, legal)
    match = rf"node '.+' \({fused}\): fused step 0 \(Cast\) computes {short}, which needs sm_{legal}.*sm_{illegal}"
    with pytest.raises(UnsupportedOpError, match=match):
        check_precision(graph, illegal)
    with pytest.raises(UnsupportedOpError, match=rf"cannot build for target sm_{illegal}: .*fused step 0"):
        optimized_graph(_hidden_cast(to, matmul), targets=(legal, illegal))
    with pytest.raises(UnsupportedOpError, match=rf"cannot build for target sm_{illegal}: .*fused step 0"):
        rtxjit.build(_hidden_cast(to, matmul), targets=[f"sm_{illegal}"])


@pytest.mark.parametrize("matmul", [False, True], ids=["pointwise", "epilogue"])
def test_fp8_casts_stay_nodes_of_their_own_and_are_illegal_below_sm89(matmul):
    """Casts to and from fp8 are never fused (their conversion is statements, ops/elementwise.py):
    the check names the Cast that makes the fp8 value."""
    graph = optimized_graph(_hidden_cast(TensorProto.FLOAT8E4M3FN, matmul)).graph
    assert [n.op for n in graph.nodes].count("Cast") == 2
    check_precision(graph, 89)
    with pytest.raises(UnsupportedOpError, match=r"node '.+' \(Cast\): output '.+' is fp8e4m3, which needs sm_89"):
        check_precision(graph, 86)


def test_a_session_on_an_older_gpu_checks_inside_fused_programs(monkeypatch):
    """Sessions used a check that saw only node inputs and outputs: a bf16 Cast fused into an fp32
    kernel passed on sm_75. They now run the same check as engines (the device faked: it raises
    before anything touches a GPU)."""
    monkeypatch.setattr(session_module, "detect", lambda requested=None: Device("cuda", "fake sm_75", 75))
    with pytest.raises(UnsupportedOpError, match=r"sm_75: node '.+' \(rtxjit.Pointwise\): fused step 0 \(Cast\)"):
        InferenceSession(_hidden_cast(TensorProto.BFLOAT16), device="cuda")
    graph = optimized_graph(_hidden_cast(TensorProto.BFLOAT16)).graph
    engine = rtxjit.build(graph, targets=["sm_80"], optimize=False)
    with pytest.raises(UnsupportedOpError, match=r"sm_75: .*fused step 0 \(Cast\) computes bf16"):
        InferenceSession(engine, device="cuda")


# -- InferenceSession.plan

def _steps(plan) -> list:
    return [(s.node, s.kernel.name, s.kernel.key, tuple(s.grid), tuple(sorted(s.constexprs.items())))
            for s in plan.steps]


def test_plan_is_the_plan_a_run_uses():
    sess = InferenceSession(ENCODER, device="cpu", specialize="none")
    feeds = demo_inputs(ENCODER, batch=2, seq=4)
    shapes = {n: x.shape for n, x in feeds.items()}
    planned = sess.plan(shapes)
    assert sess.last_executable is None  # nothing ran
    ran = sess.plan_for(feeds)
    assert _steps(planned) == _steps(ran) and len(planned.steps) > 3
    assert [(b.dtype, b.numel, b.role, b.name) for b in planned.buffers] == \
        [(b.dtype, b.numel, b.role, b.name) for b in ran.buffers]
    assert sess.plan(shapes) is ran  # a binding that ran: its executable's own plan
    plan, kinds, seconds = sess.time_launches(feeds, iterations=1, warmup=0)  # for rtxjit profile
    assert plan is ran and kinds == ["generic"] * len(ran.steps) and len(seconds) == len(ran.steps)


def test_plan_needs_the_values_a_plan_reads_on_the_host():
    reshape = model([node("Reshape", ["x", "s"], ["r"]), node("Relu", ["r"], ["y"])],
                    {"x": (np.float32, ["N", 8]), "s": (np.int64, [2])}, {"y": (np.float32, ["A", "B"])})
    sess = InferenceSession(reshape, device="cpu")
    assert sess.host_inputs == ["s"]
    with pytest.raises(InputError, match=r"input 's': its values fix the plan.*host_values"):
        sess.plan({"x": (2, 8), "s": (2,)})
    with pytest.raises(InputError, match=r"input 's': host_values gives int32"):
        sess.plan({"x": (2, 8), "s": (2,)}, {"s": np.array([4, 4], np.int32)})
    s = np.array([4, 4], np.int64)
    planned = sess.plan({"x": (2, 8), "s": (2,)}, {"s": s})
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    out = sess.run(None, {"x": x, "s": s})[0]
    np.testing.assert_array_equal(out, np.maximum(x.reshape(4, 4), 0))
    assert _steps(planned) == _steps(sess.last_executable.plan)
    assert planned.outputs["y"].shape == (4, 4)


@pytest.mark.parametrize("shapes, match", [
    ({"hidden": (2, 4, 16)}, r"missing input 'mask'"),
    ({"hidden": (2, 4, 16), "mask": (2, 4), "other": (1,)}, r"unknown input 'other'"),
    ({"hidden": (2, 4), "mask": (2, 4)}, r"input 'hidden': expected rank 3"),
    ({"hidden": (2, 4, 8), "mask": (2, 4)}, r"input 'hidden': dim 2 must be 16"),
    ({"hidden": (2, 4, 16), "mask": (2, 5)}, r"input 'mask': dim 1 \('S'\) is 5"),
])
def test_plan_checks_shapes_as_a_run_checks_feeds(shapes, match):
    sess = InferenceSession(ENCODER, device="cpu")
    with pytest.raises(InputError, match=match):
        sess.plan(shapes)


def test_plan_outside_every_profile_is_an_error_naming_the_input():
    sess = InferenceSession(ENCODER, device="cpu", profiles={"hidden": [(1, 1, 16), (2, 4, 16), (4, 8, 16)],
                                                             "mask": [(1, 1), (2, 4), (4, 8)]})
    with pytest.raises(InputError, match="hidden"):
        sess.plan({"hidden": (8, 4, 16), "mask": (8, 4)})
