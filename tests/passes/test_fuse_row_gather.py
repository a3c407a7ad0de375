"""fuse_row_gather: Swin's roll + window partition (Slices, Concats, Reshape, Transpose, Reshape) and
the window reverse + roll back become one Gather of whole rows; chains that are not row gathers
(a channel reordered, a non-zero pad, a run-time shape, a value read outside the chain) stay."""

import numpy as np
import pytest

from rtxjit.passes.fuse_row_gather import fuse_row_gather
from tests.passes.helpers import apply, model, node, ops, random

F32 = np.float32
H = W = 8  # a 2 x 2 grid of 4 x 4 windows
C = 6
S = 2  # the shift


def _i64(*v):
    return np.array(v, np.int64)


def _roll(x: str, out: str, shift: int, axis: int, size: int, tag: str) -> list:
    """torch.roll(x, -shift, axis) as the TorchScript exporter writes it: two Slices and a Concat."""
    return [node("Slice", [x, f"{tag}_s", f"{tag}_e", f"{tag}_a"], [f"{tag}_hi"]),
            node("Slice", [x, "zero", f"{tag}_s", f"{tag}_a"], [f"{tag}_lo"]),
            node("Concat", [f"{tag}_hi", f"{tag}_lo"], [out], axis=axis)]


def _roll_inits(tag: str, shift: int, axis: int, size: int) -> dict:
    return {f"{tag}_s": _i64(shift), f"{tag}_e": _i64(size), f"{tag}_a": _i64(axis)}


def _swin_in(extra_reader: bool = False):
    """LayerNorm-ish source -> roll over H and W -> window partition -> MatMul (the QKV product)."""
    nodes = [node("Reshape", ["x", "hw"], ["img"]),
             *_roll("img", "r1", S, 1, H, "a"), *_roll("r1", "r2", S, 2, W, "b"),
             node("Reshape", ["r2", "win6"], ["w6"]),
             node("Transpose", ["w6"], ["wt"], perm=[0, 1, 3, 2, 4, 5]),
             node("Reshape", ["wt", "win3"], ["windows"]),
             node("MatMul", ["windows", "wq"], ["y"])]
    inits = {"hw": _i64(1, H, W, C), "zero": _i64(0), "win6": _i64(1, 2, 4, 2, 4, C), "win3": _i64(4, 16, C),
             "wq": random((C, 5), seed=3), **_roll_inits("a", S, 1, H), **_roll_inits("b", S, 2, W)}
    outputs = {"y": (F32, [4, 16, 5])}
    if extra_reader:  # the image rolled over H is also read by a Neg: chains start and end there
        nodes.append(node("Neg", ["r1"], ["n"]))
        outputs["n"] = (F32, [1, H, W, C])
    return model(nodes, {"x": (F32, [1, H * W, C])}, outputs, inits)


def test_roll_and_window_partition_become_one_row_gather():
    proto = _swin_in()
    _, g, modified = apply(fuse_row_gather, proto, {"x": random((1, H * W, C))})
    assert modified
    assert ops(g) == {"Reshape": 2, "Gather": 1, "MatMul": 1}, ops(g)


def test_window_reverse_and_roll_back_before_the_residual_add():
    nodes = [node("MatMul", ["windows", "wo"], ["p"]),
             node("Reshape", ["p", "win6"], ["p6"]),
             node("Transpose", ["p6"], ["pt"], perm=[0, 1, 3, 2, 4, 5]),
             node("Reshape", ["pt", "hw"], ["img"]),
             *_roll("img", "r1", H - S, 1, H, "a"), *_roll("r1", "r2", W - S, 2, W, "b"),
             node("Reshape", ["r2", "flat"], ["back"]),
             node("Add", ["res", "back"], ["y"])]
    inits = {"hw": _i64(1, H, W, C), "zero": _i64(0), "win6": _i64(1, 2, 2, 4, 4, C), "flat": _i64(1, H * W, C),
             "wo": random((C, C), seed=4), **_roll_inits("a", H - S, 1, H), **_roll_inits("b", W - S, 2, W)}
    proto = model(nodes, {"windows": (F32, [4, 16, C]), "res": (F32, [1, H * W, C])}, {"y": (F32, [1, H * W, C])},
                  inits)
    _, g, modified = apply(fuse_row_gather, proto, {"windows": random((4, 16, C), seed=1),
                                                    "res": random((1, H * W, C), seed=2)})
    assert modified and ops(g) == {"MatMul": 1, "Reshape": 2, "Gather": 1, "Add": 1}, ops(g)


def test_a_chain_value_read_outside_the_chain_splits_it_in_two():
    proto = _swin_in(extra_reader=True)
    _, g, modified = apply(fuse_row_gather, proto, {"x": random((1, H * W, C))})
    # the roll over H ends at the value the Neg reads; the roll over W and the partition start there
    assert modified and ops(g)["Gather"] == 2 and "Concat" not in ops(g) and ops(g)["Neg"] == 1, ops(g)


def test_a_channel_reordering_or_a_padding_chain_is_not_a_row_gather():
    # roll over the channel axis: each output row mixes its input row's channels
    nodes = [*_roll("x", "r", 2, 1, C, "a"), node("Reshape", ["r", "flat"], ["y"])]
    proto = model(nodes, {"x": (F32, [4, C])}, {"y": (F32, [2, 2, C])},
                  {"zero": _i64(0), "flat": _i64(2, 2, C), **_roll_inits("a", 2, 1, C)})
    _, g, modified = apply(fuse_row_gather, proto, {"x": random((4, C))})
    assert not modified and ops(g)["Concat"] == 1
    # a zero row padded in: no input row to gather
    nodes = [node("Pad", ["x", "pads"], ["p"]), *_roll("p", "r", 1, 0, 5, "a"), node("Identity", ["r"], ["y"])]
    proto = model(nodes, {"x": (F32, [4, C])}, {"y": (F32, [5, C])},
                  {"zero": _i64(0), "pads": _i64(0, 0, 1, 0), **_roll_inits("a", 1, 0, 5)})
    _, g, modified = apply(fuse_row_gather, proto, {"x": random((4, C))})
    assert not modified and ops(g)["Pad"] == 1


def test_a_symbolic_batch_keeps_the_chain():
    nodes = [*_roll("x", "r", 1, 1, 4, "a"), node("Identity", ["r"], ["y"])]
    proto = model(nodes, {"x": (F32, ["B", 4, C])}, {"y": (F32, ["B", 4, C])},
                  {"zero": _i64(0), **_roll_inits("a", 1, 1, 4)})
    _, g, modified = apply(fuse_row_gather, proto, {"x": random((3, 4, C))})
    assert not modified and ops(g)["Concat"] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_swin_block_through_a_session_matches_onnxruntime(dtype):
    """The whole pipeline (fusion after the gather) on both sides of a shifted-window block."""
    import onnxruntime as ort

    import rtxjit
    from onnx import numpy_helper

    proto = _swin_in()
    for init in proto.graph.initializer:
        if init.name == "wq":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(dtype), "wq"))
    for v in list(proto.graph.input) + list(proto.graph.output):
        v.type.tensor_type.elem_type = 10 if dtype == np.float16 else 1
    x = random((1, H * W, C), dtype)
    (got,) = rtxjit.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    tol = 1e-2 if dtype == np.float16 else 1e-4
    assert np.max(np.abs(got.astype(np.float64) - want)) <= tol * np.max(np.abs(want))
