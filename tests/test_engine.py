"""Engines (rtxjit/engine/engine.py): build, save, load and refit; integrity and compatibility
checks; precision legality per SM target; weight-stripped engines."""

import hashlib
import json
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto

import rtxjit
from rtxjit import Engine, EngineError, InferenceSession, Refitter, UnsupportedOpError
from rtxjit.engine.engine import parse_targets, read_metadata
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.types import DType, TensorType
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn
from rtxjit.onnx.importer import import_model
from rtxjit.passes import optimize
from tests.passes.helpers import model, node

CNN = resnet_cnn(size=8, width=8)
ENCODER = bert_encoder(hidden=16, heads=2, ffn=32)
FEEDS = {"cnn": demo_inputs(CNN, batch=2), "encoder": demo_inputs(ENCODER, batch=2, seq=4)}
MODELS = {"cnn": CNN, "encoder": ENCODER}


def outputs(graph, feeds) -> list:
    return InferenceSession(graph, device="cpu", optimize=False).run(None, feeds)


def assert_identical(a: list, b: list):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def consts(graph) -> dict:
    return {v.name: v.const for v in graph.constants()}


def read_members(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_members(path, members: dict):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def rewrite(src, dst, edit_meta=None, replace=None, fix_checksums=False):
    """A copy of engine ``src`` at ``dst`` with engine.json edited and members replaced (None drops
    one); ``fix_checksums`` recomputes the member checksums in engine.json."""
    members = read_members(src)
    for name, data in (replace or {}).items():
        if data is None:
            members.pop(name)
        else:
            members[name] = data
    meta = json.loads(members["engine.json"])
    if edit_meta:
        edit_meta(meta)
    if fix_checksums:
        meta["members"] = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                           for n, d in members.items() if n != "engine.json"}
    members["engine.json"] = json.dumps(meta).encode()
    write_members(dst, members)
    return dst


def data_offset(path, member: str) -> int:
    """Where ``member``'s bytes start in the zip file."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The demo CNN built for sm_80 and sm_90, saved: (engine, path)."""
    engine = rtxjit.build(CNN, targets=["sm_80", "sm_90"])
    return engine, engine.save(tmp_path_factory.mktemp("engine") / "cnn.engine")


# --- build, save, load ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,precision", [("cnn", None), ("encoder", None), ("encoder", "fp16")])
def test_saved_engine_runs_exactly_like_the_optimized_graph(tmp_path, name, precision):
    proto = MODELS[name]
    engine = rtxjit.build(proto, targets=["sm_80"], precision=precision)
    loaded = Engine.load(engine.save(tmp_path / "m.engine"))
    in_memory, _ = optimize(import_model(proto), precision=precision)
    assert str(loaded.graph) == str(in_memory) == str(engine.graph)
    assert loaded.targets == (80,) and loaded.precision == precision and not loaded.stripped
    assert [p.to_json() for p in loaded.profiles] == [p.to_json() for p in engine.profiles]
    assert [w.to_json() for w in loaded.weights] == [w.to_json() for w in engine.weights]
    want = outputs(in_memory, FEEDS[name])
    assert_identical(outputs(loaded.graph, FEEDS[name]), want)
    assert np.abs(want[0].astype(np.float32)).max() > 0.01


def test_engine_file_layout_and_metadata(saved):
    engine, path = saved
    members = read_members(path)
    assert list(members) == ["engine.json", "weights.safetensors"]
    with zipfile.ZipFile(path) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    meta = read_metadata(path)
    assert meta["format"] == "rtxjit-engine" and meta["format_version"] == 1
    assert meta["rtxjit_version"] == rtxjit.__version__ and meta["targets"] == [80, 90]
    assert meta["stripped"] is False and meta["refittable"] is True and meta["binaries"] == []
    assert meta["members"]["weights.safetensors"]["sha256"] == hashlib.sha256(members["weights.safetensors"]).hexdigest()
    assert {w["name"] for w in meta["weights"]} == {v.name for v in engine.graph.constants() if v.type.dtype.is_float}
    assert meta["graph"]["schema"] == 1 and meta["graph"]["name"] == "resnet_cnn"


def test_profiles_and_binaries_are_kept(tmp_path):
    profile = {"image": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}
    engine = rtxjit.build(CNN, targets=[90], profiles=[profile, {"image": (8, 3, 8, 8)}])
    engine.binaries = {"sm_90/conv2d_abc": {"meta": {"sm": 90, "shared": 1024}, "data": b"\x7fELF\x00cubin"}}
    path = engine.save(tmp_path / "b.engine")
    loaded = Engine.load(path)
    assert [p.to_json() for p in loaded.profiles] == [p.to_json() for p in engine.profiles]
    assert loaded.profiles[1].min("image") == (8, 3, 8, 8)
    assert loaded.binaries == engine.binaries and loaded.binaries_usable and loaded.has_binaries_for(90)
    assert "binaries/sm_90/conv2d_abc" in read_members(path)
    engine.binaries = {"../escape": {"meta": {}, "data": b""}}
    with pytest.raises(EngineError, match="binary name '../escape'"):
        engine.save(tmp_path / "c.engine")


def test_save_is_atomic_and_deterministic(tmp_path, saved):
    engine, first = saved
    path = tmp_path / "again.engine"
    path.write_bytes(b"an older file")
    engine.save(path)
    assert path.read_bytes() == first.read_bytes()
    assert os.listdir(tmp_path) == ["again.engine"]  # no temp file left behind
    with pytest.raises(EngineError, match="does not exist"):
        engine.save(tmp_path / "no" / "such" / "folder.engine")


def test_fp8_constants_are_stored_and_read_back(tmp_path):
    x = Value("x", TensorType(DType.FP32, ("N", 4)))
    q = Value("q", TensorType(DType.FP8E4M3, (4,)), np.array([1.0, -2.0, 0.5, 448.0], ml_dtypes.float8_e4m3fn))
    qf, y = Value("qf", TensorType(DType.FP32, (4,))), Value("y", TensorType(DType.FP32, ("N", 4)))
    nodes = [Node("Cast", "cast", [q], [qf], {"to": 1, "saturate": 1}, 19), Node("Add", "add", [x, qf], [y], {}, 14)]
    qf.producer, y.producer = nodes
    engine = rtxjit.build(Graph("fp8", [x], [y], nodes, 21), targets=["sm_89"], optimize=False)
    assert [w.name for w in engine.weights] == ["q"]
    loaded = Engine.load(engine.save(tmp_path / "fp8.engine"))
    got = consts(loaded.graph)["q"]
    assert got.dtype == ml_dtypes.float8_e4m3fn and got.tobytes() == q.const.tobytes()
    with pytest.raises(EngineError, match=r"cannot run on sm_86.*node 'cast' \(Cast\).*fp8e4m3"):
        Engine.load(tmp_path / "fp8.engine", device="sm_86")


# --- targets and precision legality --------------------------------------------------------------

def test_targets_are_parsed():
    assert parse_targets(["sm_90", "86", 80, "sm_90", " SM_120 "]) == (80, 86, 90, 120)
    assert parse_targets("sm_100") == (100,)
    for bad in (["sm_8x"], ["9"], [True], []):
        with pytest.raises(EngineError, match="target|targets"):
            parse_targets(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_current_target_without_a_gpu_is_a_clear_error():
    with pytest.raises(EngineError, match="'current' means the GPU's SM, but there is no GPU"):
        rtxjit.build(CNN)


def test_bf16_below_sm80_is_a_build_error_naming_op_and_target():
    with pytest.raises(UnsupportedOpError, match=r"cannot build for target sm_75: node '.+' \(\w+\): .*bf16.*sm_80"):
        rtxjit.build(ENCODER, targets=["sm_90", "sm_75"], precision="bf16")
    rtxjit.build(ENCODER, targets=["sm_80", "sm_90"], precision="bf16")


def test_fp8_below_sm89_is_a_build_error_naming_op_and_target():
    fp8 = model([node("Cast", ["x"], ["q"], to=TensorProto.FLOAT8E4M3FN), node("Cast", ["q"], ["y"], to=1)],
                {"x": (np.float32, ["N", 4])}, {"y": (np.float32, ["N", 4])})
    with pytest.raises(UnsupportedOpError, match=r"cannot build for target sm_86: node 'q_node' \(Cast\).*fp8e4m3"):
        rtxjit.build(fp8, targets=["sm_86", "sm_90"], optimize=False)
    # optimized, the fp8 casts stay kernels of their own (never fused): still named
    with pytest.raises(UnsupportedOpError, match=r"cannot build for target sm_86: node 'q_node' \(Cast\).*fp8e4m3"):
        rtxjit.build(fp8, targets=["sm_86", "sm_90"])
    engine = rtxjit.build(fp8, targets=["sm_89", "sm_90"])
    with pytest.raises(EngineError, match=r"cannot run on sm_80 .*fp8e4m3"):
        engine.check_device("sm_80")


def test_a_fused_programs_inner_precision_is_checked_too():
    """After fusion a bf16 value lives inside one fp32 -> fp32 kernel: its program is checked."""
    bf16 = model([node("Cast", ["x"], ["q"], to=TensorProto.BFLOAT16), node("Cast", ["q"], ["y"], to=1)],
                 {"x": (np.float32, ["N", 4])}, {"y": (np.float32, ["N", 4])})
    match = r"cannot build for target sm_75: node '.+' \(rtxjit.Pointwise\): fused step 0 \(Cast\) computes bf16"
    with pytest.raises(UnsupportedOpError, match=match):
        rtxjit.build(bf16, targets=["sm_75", "sm_90"])
    engine = rtxjit.build(bf16, targets=["sm_80", "sm_90"])
    with pytest.raises(EngineError, match=r"cannot run on sm_75 .*fused step 0 \(Cast\) computes bf16"):
        engine.check_device("sm_75")


def test_loading_on_an_sm_that_cannot_run_the_precision_is_an_error(tmp_path):
    path = rtxjit.build(ENCODER, targets=["sm_90"], precision="bf16").save(tmp_path / "bf16.engine")
    with pytest.raises(EngineError, match=r"bf16.engine' cannot run on sm_75 \(built for sm_90\): node '.+' \(.+\)"):
        Engine.load(path, device="sm_75")
    engine = Engine.load(path, device=86)  # portable IR: an SM without binaries JIT-compiles
    assert engine.device_sm == 86 and not engine.has_binaries_for(86)


# --- version and integrity checks ----------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("rtxjit_version", "0.0.1", r"built by rtxjit 0.0.1.*expected 0.1.0, found 0.0.1"),
    ("codegen_version", "0" * 64, r"codegen version mismatch: expected [0-9a-f]{16}\.\.\., found 0{16}"),
    ("format_version", 2, r"engine format version 2, this rtxjit reads version 1"),
    ("format", "onnx", r"does not describe an rtxjit engine"),
])
def test_version_mismatch_is_an_error_saying_what_was_expected(tmp_path, saved, key, value, match):
    path = rewrite(saved[1], tmp_path / "v.engine", lambda m: m.__setitem__(key, value))
    with pytest.raises(EngineError, match=match):
        Engine.load(path)


def test_another_triton_version_only_makes_binaries_unusable(tmp_path, saved):
    path = rewrite(saved[1], tmp_path / "t.engine", lambda m: m.__setitem__("triton_version", "0.0.0"))
    engine = Engine.load(path)
    assert not engine.binaries_usable and not engine.has_binaries_for(90)
    assert_identical(outputs(engine.graph, FEEDS["cnn"]), outputs(saved[0].graph, FEEDS["cnn"]))


def test_truncated_file_is_an_error_naming_it(tmp_path, saved):
    data = saved[1].read_bytes()
    for cut in (0, 10, 100, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        path = tmp_path / f"cut{cut}.engine"
        path.write_bytes(data[:cut])
        with pytest.raises(EngineError, match=rf"cut{cut}.engine' is not a readable engine \(truncated"):
            Engine.load(path)
    with pytest.raises(EngineError, match="does not exist"):
        Engine.load(tmp_path / "missing.engine")


@pytest.mark.parametrize("member", ["weights.safetensors", "engine.json"])
def test_flipped_byte_is_an_error_naming_the_member(tmp_path, saved, member):
    data = bytearray(saved[1].read_bytes())
    at = data_offset(saved[1], member) + 40
    data[at] ^= 0x10
    path = tmp_path / "flipped.engine"
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=f"member '{member}' is corrupt"):
        Engine.load(path)


def test_altered_member_is_an_error_unless_engine_json_vouches_for_it(tmp_path, saved):
    members = read_members(saved[1])
    weights = bytearray(members["weights.safetensors"])
    weights[-1] ^= 0x01  # a valid zip (CRC recomputed) holding other weight bytes
    path = rewrite(saved[1], tmp_path / "a.engine", replace={"weights.safetensors": bytes(weights)})
    with pytest.raises(EngineError, match=r"a.engine': member 'weights.safetensors' was altered"):
        Engine.load(path)
    # engine.json is the root of trust: with its checksums updated, the new bytes are the engine's
    path = rewrite(saved[1], tmp_path / "b.engine", replace={"weights.safetensors": bytes(weights)}, fix_checksums=True)
    before = consts(saved[0].graph)
    assert [n for n, a in consts(Engine.load(path).graph).items() if a.tobytes() != before[n].tobytes()]


@pytest.mark.parametrize("change,match", [
    ({"weights.safetensors": None}, r"member 'weights.safetensors' listed in engine.json is missing"),
    ({"extra.bin": b"x"}, r"members \['extra.bin'\] are not listed in engine.json"),
    ({"engine.json": None}, r"has no 'engine.json' member"),
])
def test_missing_or_unlisted_member_is_an_error(tmp_path, saved, change, match):
    members = read_members(saved[1])
    for name, data in change.items():
        if data is None:
            members.pop(name)
        else:
            members[name] = data
    path = tmp_path / "m.engine"
    write_members(path, members)
    with pytest.raises(EngineError, match=match):
        Engine.load(path)


def test_tampered_graph_document_is_an_error(tmp_path, saved):
    def edit(meta):
        meta["graph"]["nodes"][0]["op"] = "Frobnicate"

    with pytest.raises(EngineError, match=r"t.engine': .*op Frobnicate is not supported"):
        Engine.load(rewrite(saved[1], tmp_path / "t.engine", edit))

    def shape(meta):
        meta["weights"][0]["shape"] = [1]

    with pytest.raises(EngineError, match=r"array '.+' in 'weights.safetensors' is float32\[.+\], engine.json says"):
        Engine.load(rewrite(saved[1], tmp_path / "s.engine", shape))


# --- weight-stripped engines and refit -----------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A resnet-style model with 128-256 channel convs (about 1.2 M weights): full and stripped engines."""
    proto = resnet_cnn(size=8, width=128)
    folder = tmp_path_factory.mktemp("wide")
    full = rtxjit.build(proto, targets=["sm_90"])
    stripped = rtxjit.build(proto, targets=["sm_90"], strip_weights=True)
    return proto, full, full.save(folder / "full.engine"), stripped.save(folder / "stripped.engine")


def test_stripped_engine_is_at_least_90_percent_smaller(wide):
    _, full, full_path, stripped_path = wide
    meta = read_metadata(stripped_path)
    assert meta["stripped"] is True and "weights.safetensors" not in read_members(stripped_path)
    assert [w["sha256"] for w in meta["weights"]] == [w.sha256 for w in full.weights]
    assert os.path.getsize(stripped_path) <= 0.1 * os.path.getsize(full_path), \
        (os.path.getsize(stripped_path), os.path.getsize(full_path))


def test_refit_from_onnx_restores_the_full_engine_bit_for_bit(tmp_path, wide):
    proto, full, full_path, stripped_path = wide
    engine = Engine.load(stripped_path)
    refitter = Refitter(engine)
    assert refitter.missing() == [w.name for w in full.weights]
    assert refitter.refit_from_onnx(proto) == [w.name for w in full.weights]
    assert refitter.refit() is engine and not engine.stripped
    full_consts = consts(full.graph)
    for name, a in consts(engine.graph).items():
        assert a.dtype == full_consts[name].dtype and a.tobytes() == full_consts[name].tobytes(), name
    assert engine.save(tmp_path / "refit.engine").read_bytes() == full_path.read_bytes()


def test_missing_weights_are_named_at_load_and_at_refit(wide):
    _, full, _, stripped_path = wide
    engine = Engine.load(stripped_path)
    names = [w.name for w in full.weights]
    assert engine.stripped and engine.missing_weights() == names
    with pytest.raises(EngineError) as e:
        engine.graph
    assert all(n in str(e.value) for n in names) and "weight-stripped" in str(e.value)
    refitter = Refitter(engine)
    refitter.set_named_weights(names[0], consts(full.graph)[names[0]])
    with pytest.raises(EngineError) as e:
        refitter.refit()
    assert all(n in str(e.value) for n in names[1:]) and f"{names[0]}," not in str(e.value)
    assert engine.stripped  # nothing was installed


@pytest.mark.parametrize("name,precision", [("cnn", None), ("encoder", "fp16")])
def test_refit_gives_outputs_identical_to_the_full_engine(tmp_path, name, precision):
    proto = MODELS[name]
    full = rtxjit.build(proto, targets=["sm_80"], precision=precision)
    want = outputs(full.graph, FEEDS[name])
    path = rtxjit.build(proto, targets=["sm_80"], precision=precision, strip_weights=True).save(tmp_path / "s.engine")
    from_arrays = Engine.load(path)
    refitter = Refitter(from_arrays)
    for n, a in consts(full.graph).items():
        if n in refitter.weights():
            refitter.set_named_weights(n, a)
    assert_identical(outputs(refitter.refit().graph, FEEDS[name]), want)
    from_onnx = Engine.load(path)
    refitter = Refitter(from_onnx)
    refitter.refit_from_onnx(proto.SerializeToString())
    assert_identical(outputs(refitter.refit().graph, FEEDS[name]), want)


def test_scalar_weights_round_trip_and_refit(tmp_path):
    proto = model([node("Sqrt", ["two"], ["s"]), node("Mul", ["x", "s"], ["y"]), node("Mul", ["y", "c"], ["z"])],
                  {"x": (np.float32, [3])}, {"z": (np.float32, [3])},
                  {"two": np.array(2.0, np.float32), "c": np.array(1.5, np.float32)})
    full = rtxjit.build(proto, targets=[80])
    for v in full.graph.constants():  # a declared scalar held 0-d or as one element (see serialize.shape_fits)
        v.const = v.const.reshape(1) if v.name == "c" else v.const.reshape(())
    feeds = {"x": np.array([1.0, -2.0, 3.0], np.float32)}
    want = outputs(full.graph, feeds)
    assert_identical(outputs(Engine.load(full.save(tmp_path / "f.engine")).graph, feeds), want)
    stripped = Engine.load(full.save(tmp_path / "s.engine", strip_weights=True))
    refitter = Refitter(stripped)
    for n, a in consts(full.graph).items():
        refitter.set_named_weights(n, a.reshape(()))  # either form of a scalar is accepted
    got = consts(refitter.refit().graph)
    assert {n: a.shape for n, a in got.items()} == {n: a.shape for n, a in consts(full.graph).items()}
    assert_identical(outputs(stripped.graph, feeds), want)


def test_set_named_weights_checks_name_dtype_and_shape(saved):
    refitter = Refitter(saved[0])
    with pytest.raises(EngineError, match=r"no weight named 'Conv_node3_w'; close names: Conv_node3_w_bn"):
        refitter.set_named_weights("Conv_node3_w", np.zeros((8, 3, 3, 3), np.float32))
    with pytest.raises(EngineError, match=r"weight 'Conv_node3_w_bn': expected float32\[8, 3, 3, 3\] \(fp32 in the "
                                          r"graph\), got float64\[8, 3, 3, 3\]"):
        refitter.set_named_weights("Conv_node3_w_bn", np.zeros((8, 3, 3, 3)))
    with pytest.raises(EngineError, match=r"expected float32\[8, 3, 3, 3\] .*got float32\[8, 3, 3\]"):
        refitter.set_named_weights("Conv_node3_w_bn", np.zeros((8, 3, 3), np.float32))
    assert refitter.missing() == []


def test_refit_from_another_model_is_an_error(tmp_path):
    engine = rtxjit.build(CNN, targets=["sm_80"])
    before = consts(engine.graph)
    refitter = Refitter(engine)
    with pytest.raises(EngineError, match=r"does not give this engine's graph .*first difference, line \d+"):
        refitter.refit_from_onnx(resnet_cnn(size=8, width=16))
    path = tmp_path / "cnn.onnx"
    path.write_bytes(resnet_cnn(size=8, width=8, seed=3).SerializeToString())
    refitter.refit_from_onnx(path)  # the same structure with other weights refits
    after = consts(refitter.refit().graph)
    assert all(after[w].tobytes() != before[w].tobytes() for w in refitter.weights())
    assert all(after[n] is before[n] for n in before if n not in refitter.weights())


def test_a_session_runs_an_engine_with_its_profiles(tmp_path):
    from rtxjit.models import DEMO_MODELS, demo_inputs

    model = DEMO_MODELS["cnn"]()
    engine = rtxjit.build(model, targets=["sm_90"], profiles={"image": [(1, 3, 32, 32), (2, 3, 32, 32), (2, 3, 32, 32)]})
    engine.save(tmp_path / "e.rtx")
    loaded = rtxjit.Engine.load(tmp_path / "e.rtx", device="cpu")
    sess = rtxjit.InferenceSession(loaded, device="cpu")
    feeds = demo_inputs(model, batch=2)
    np.testing.assert_array_equal(sess.run(None, feeds)[0], rtxjit.InferenceSession(model, device="cpu").run(None, feeds)[0])
    with pytest.raises(rtxjit.errors.InputError, match="image"):
        sess.run(None, demo_inputs(model, batch=3))
