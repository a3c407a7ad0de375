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
    # the roll over H ends at the value the Neg reads (one Concat: it stays); the roll over W and the
    # partition start there and become the gather
    assert modified and ops(g)["Gather"] == 1 and ops(g)["Concat"] == 1 and ops(g)["Neg"] == 1, ops(g)


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


def test_session_runs_the_partition_inside_the_qkv_product():
    import rtxjit

    proto = _swin_in()
    sess = rtxjit.InferenceSession(proto.SerializeToString())
    assert "rtxjit.RowGatherMatMul" in {n.op for n in sess.graph.nodes}
    sess.run(None, {"x": random((1, H * W, C))})
    texts = [s.kernel.text.split("\n")[0] for s in sess.last_executable.plan.steps]
    assert len(texts) == 1 and "a_rows" in texts[0], texts  # no gather or copy kernel before the product


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_hf_swin_with_shifted_windows_matches_onnxruntime(tmp_path, exporter):
    _check_hf_swin(tmp_path, exporter, None)


@pytest.mark.gpu
def test_gpu_hf_swin_with_shifted_windows_matches_onnxruntime(tmp_path):
    _check_hf_swin(tmp_path, "torchscript", "cuda")


def _check_hf_swin(tmp_path, exporter, device):
    """A small Swin whose stages shift their windows (56 x 56 image, 4 x 4 patches, window 7): rolls,
    partitions and reverses as row gathers, inside the QKV products; vs onnxruntime in fp32."""
    import onnxruntime as ort
    import torch
    from transformers import SwinConfig, SwinModel

    import rtxjit

    torch.manual_seed(0)
    config = SwinConfig(image_size=56, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=7)
    model = SwinModel(config).eval()
    x = torch.randn(1, 3, 56, 56)

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).last_hidden_state

    path = tmp_path / "swin.onnx"
    with torch.no_grad():
        torch.onnx.export(Hidden(model), (x,), str(path), input_names=["pixel_values"], output_names=["h"],
                          opset_version=18, dynamo=exporter == "dynamo")
    import onnx

    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 9)  # the GPU machine's onnxruntime reads IR <= 13
    onnx.save(proto, str(path))
    feeds = {"pixel_values": x.numpy()}
    sess = rtxjit.InferenceSession(str(path), device=device)
    (got,) = sess.run(None, feeds)
    (want,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), np.max(np.abs(got - want))
    assert "rtxjit.RowGatherMatMul" in str([n.attrs.get("anchor", n.op) for n in sess.graph.nodes])
    texts = [s.kernel.text.split("\n")[0] for s in sess.last_executable.plan.steps]
    assert any("a_rows" in t for t in texts), texts


def test_a_lone_roll_stays_one_concat():
    """One roll is one concat kernel already: no gather for it."""
    nodes = [*_roll("x", "r", 1, 1, 4, "a"), node("Neg", ["r"], ["y"])]
    proto = model(nodes, {"x": (F32, [2, 4, C])}, {"y": (F32, [2, 4, C])}, {"zero": _i64(0), **_roll_inits("a", 1, 1, 4)})
    _, g, modified = apply(fuse_row_gather, proto, {"x": random((2, 4, C))})
    assert not modified and ops(g)["Concat"] == 1


def _random_chain(rng, shape):
    """A random chain of data movement over ``x`` of ``shape`` that keeps the last axis: rolls (as
    Slices + Concat, with negative steps sometimes), transposes and reshapes of the leading axes,
    then a MatMul or a Neg reading it. Returns (nodes, inits, output shape, reader)."""
    nodes, inits, cur, cur_shape = [], {"zero": _i64(0)}, "x", list(shape)
    for k in range(int(rng.integers(1, 5))):
        lead = len(cur_shape) - 1
        kind = rng.choice(["roll", "transpose", "reshape", "reverse"])
        if kind == "roll" and lead >= 1:
            axis = int(rng.integers(0, lead))
            size = cur_shape[axis]
            if size < 2:
                continue
            s = int(rng.integers(1, size))
            inits.update({f"s{k}": _i64(s), f"e{k}": _i64(size), f"a{k}": _i64(axis)})
            nodes += [node("Slice", [cur, f"s{k}", f"e{k}", f"a{k}"], [f"hi{k}"]),
                      node("Slice", [cur, "zero", f"s{k}", f"a{k}"], [f"lo{k}"]),
                      node("Concat", [f"hi{k}", f"lo{k}"], [f"c{k}"], axis=axis)]
            cur = f"c{k}"
        elif kind == "reverse" and lead >= 1:
            axis = int(rng.integers(0, lead))
            inits.update({f"rs{k}": _i64(-1), f"re{k}": _i64(-(2 ** 62)), f"ra{k}": _i64(axis), f"rp{k}": _i64(-1)})
            nodes.append(node("Slice", [cur, f"rs{k}", f"re{k}", f"ra{k}", f"rp{k}"], [f"c{k}"]))
            cur = f"c{k}"
        elif kind == "transpose" and lead >= 2:
            perm = list(rng.permutation(lead)) + [lead]
            nodes.append(node("Transpose", [cur], [f"c{k}"], perm=[int(p) for p in perm]))
            cur_shape = [cur_shape[p] for p in perm]
            cur = f"c{k}"
        elif kind == "reshape":
            rows = int(np.prod(cur_shape[:-1]))
            split = [d for d in (2, 3, 4) if rows % d == 0]
            new = [split[int(rng.integers(0, len(split)))], -1, cur_shape[-1]] if split else [rows, cur_shape[-1]]
            inits[f"shape{k}"] = _i64(*new)
            nodes.append(node("Reshape", [cur, f"shape{k}"], [f"c{k}"]))
            cur_shape = [new[0], rows // new[0], cur_shape[-1]] if split else [rows, cur_shape[-1]]
            cur = f"c{k}"
    if not nodes:
        return None
    if rng.random() < 0.5:
        inits["w"] = random((shape[-1], 3), seed=9)
        nodes.append(node("MatMul", [cur, "w"], ["y"]))
        out_shape = cur_shape[:-1] + [3]
    else:
        nodes.append(node("Neg", [cur], ["y"]))
        out_shape = cur_shape
    return nodes, inits, out_shape


@pytest.mark.parametrize("seed", range(40))
def test_random_data_movement_chains_give_what_onnxruntime_gives(seed):
    """Whatever the pass does with a random chain (a row gather, a row gather inside the product, or
    nothing), the whole pipeline's result is onnxruntime's (the pass is checked alone by ``apply``)."""
    import onnxruntime as ort

    import rtxjit

    rng = np.random.default_rng(seed)
    shape = [int(rng.integers(1, 4)), int(rng.integers(2, 6)), int(rng.integers(2, 6)), int(rng.integers(1, 5))]
    made = _random_chain(rng, shape)
    if made is None:
        pytest.skip("empty chain")
    nodes, inits, out_shape = made
    proto = model(nodes, {"x": (F32, shape)}, {"y": (F32, out_shape)}, inits)
    x = random(tuple(shape), seed=seed)
    apply(fuse_row_gather, proto, {"x": x})
    (got,) = rtxjit.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert got.shape == want.shape and np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))


@pytest.mark.parametrize("seed", range(30))
def test_random_chains_after_a_product_give_what_onnxruntime_gives(seed):
    """The chain's source is a product (with a bias half the time): a row gather of it becomes the
    product of gathered rows (the output side of a Swin block); vs onnxruntime."""
    import onnxruntime as ort

    import rtxjit

    rng = np.random.default_rng(1000 + seed)
    shape = [int(rng.integers(1, 4)), int(rng.integers(2, 6)), int(rng.integers(2, 6)), int(rng.integers(1, 5))]
    made = _random_chain(rng, shape)
    if made is None:
        pytest.skip("empty chain")
    nodes, inits, out_shape = made
    k = 5
    head = [node("MatMul", ["x0", "w0"], ["p" if rng.random() < 0.5 else "x"])]
    inits["w0"] = random((k, shape[-1]), seed=11)
    if head[0].output[0] == "p":
        head.append(node("Add", ["p", "b0"], ["x"]))
        inits["b0"] = random((shape[-1],), seed=12)
    proto = model(head + nodes, {"x0": (F32, shape[:-1] + [k])}, {"y": (F32, out_shape)}, inits)
    x0 = random(tuple(shape[:-1] + [k]), seed=seed)
    sess = rtxjit.InferenceSession(proto.SerializeToString())
    (got,) = sess.run(None, {"x0": x0})
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x0": x0})
    assert got.shape == want.shape and np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))
