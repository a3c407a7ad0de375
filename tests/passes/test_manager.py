import numpy as np
import pytest

from rtxjit import config
from rtxjit.ir.rewrite import copy_graph
from rtxjit.onnx.importer import import_model
from rtxjit.passes.base import PassError, PassManager, PassResult, conditions
from tests.passes.helpers import model, node

F32 = np.float32


def _graph():
    return import_model(model([node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["y"])],
                              {"x": (F32, [4])}, {"y": (F32, [4])}))


def _unchanged(graph):
    return PassResult(graph, False)


def _drop_first_node(graph):
    graph.nodes = graph.nodes[1:]
    return PassResult(graph, True)


def test_timings_name_every_pass_in_order():
    manager = PassManager([("a", _unchanged), ("b", _drop_first_node)])
    result = manager(_graph())
    assert result.modified and len(result.graph.nodes) == 1
    assert [(t.name, t.modified) for t in manager.timings] == [("a", False), ("b", True)]
    assert all(t.seconds >= 0 for t in manager.timings)


def test_verify_names_the_pass_that_broke_the_graph():
    PassManager([("dropper", _drop_first_node)])(_graph())  # not checked without verify
    with pytest.raises(PassError, match="pass 'dropper' left an invalid graph.*'r'"):
        PassManager([("dropper", _drop_first_node)], verify=True)(_graph())


def test_requires_and_ensures_are_checked():
    def refuse(graph):
        raise PassError("no Relu allowed")

    checked = conditions(requires=refuse)(lambda g: PassResult(g, False))
    with pytest.raises(PassError, match="precondition of pass 'picky': no Relu allowed"):
        PassManager([("picky", checked)])(_graph())
    promised = conditions(ensures=refuse)(lambda g: PassResult(g, False))
    with pytest.raises(PassError, match="postcondition of pass 'liar'"):
        PassManager([("liar", promised)])(_graph())


def test_repeat_until_fixed_runs_rounds_until_nothing_changes():
    def drop_one(graph):
        modified = len(graph.nodes) > 0
        graph.nodes = graph.nodes[1:]
        return PassResult(graph, modified)

    manager = PassManager([("drop", drop_one), ("noop", _unchanged)], repeat_until_fixed=True)
    result = manager(_graph())
    assert result.graph.nodes == [] and [t.modified for t in manager.timings[::2]] == [True, True, False]
    once = PassManager([("drop", drop_one)])
    assert len(once(_graph()).graph.nodes) == 1 and len(once.timings) == 1


def test_dump_to_a_directory(tmp_path):
    PassManager([("a", _unchanged), ("b", _drop_first_node)], dump=str(tmp_path / "dump"))(_graph())
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["00_00_input.txt", "01_01_a.txt", "01_02_b.txt"]
    assert "Relu" in (tmp_path / "dump" / "01_01_a.txt").read_text()
    assert "Relu" not in (tmp_path / "dump" / "01_02_b.txt").read_text()


def test_dump_to_stderr(capsys):
    PassManager([("a", _unchanged)], dump="-")(_graph())
    err = capsys.readouterr().err
    assert "// 01_01_a" in err and "Neg(" in err


def test_manager_is_a_pass():
    inner = PassManager([("b", _drop_first_node)])
    outer = PassManager([("inner", inner)])
    g = _graph()
    assert len(outer(copy_graph(g)).graph.nodes) == 1


def test_config_reads_the_pass_switches(monkeypatch):
    monkeypatch.delenv("RTXJIT_DUMP_PASSES", raising=False)
    monkeypatch.delenv("RTXJIT_VERIFY_PASSES", raising=False)
    assert config.dump_passes() is None and not config.verify_passes()
    monkeypatch.setenv("RTXJIT_DUMP_PASSES", "/tmp/x")
    monkeypatch.setenv("RTXJIT_VERIFY_PASSES", "1")
    assert config.dump_passes() == "/tmp/x" and config.verify_passes()


def test_a_pass_can_be_left_out_by_name_for_an_a_b(monkeypatch):
    """RTXJIT_SKIP_PASSES=name,...: those pipeline steps do not run (the session's graph keeps what
    they would have rewritten); an unknown name is an error listing the pipeline's passes."""
    import pytest

    import rtxjit
    from rtxjit.errors import UsageError
    from rtxjit.passes import optimize

    monkeypatch.delenv("RTXJIT_SKIP_PASSES", raising=False)
    assert config.skip_passes() == frozenset()
    monkeypatch.setenv("RTXJIT_SKIP_PASSES", " fuse_pointwise, fuse_epilogue ")
    assert config.skip_passes() == {"fuse_pointwise", "fuse_epilogue"}
    g = rtxjit.InferenceSession(_relu_chain(), device="cpu", optimize=False).graph
    kept = [n.op for n in optimize(g, skip=config.skip_passes())[0].nodes]
    fused = [n.op for n in optimize(g)[0].nodes]
    assert kept == ["Relu", "Relu"] and fused == ["rtxjit.Pointwise"]
    assert [n.op for n in rtxjit.InferenceSession(_relu_chain(), device="cpu").graph.nodes] == ["Relu", "Relu"]
    with pytest.raises(UsageError, match="no pass named fuse_everything"):
        optimize(g, skip={"fuse_everything"})


def _relu_chain():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
