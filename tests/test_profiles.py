"""Optimization profiles: parsing, validation against a graph, defaults, selection and the session's use."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import rtxjit
from rtxjit.errors import InputError, ShapeError
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn
from rtxjit.onnx.importer import import_model
from rtxjit.plan.profiles import (DEFAULT_MAX_DIM, DEFAULT_MIN_DIM, DEFAULT_OPT_DIM, Profile, default_profile,
                                     parse_shapes, resolve_profiles, select)

IMAGE = {"image": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))}


def _relu_model(shape=("N", 4)):
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def cnn():
    return resnet_cnn(size=16, width=8)


# -- parsing and construction

def test_parse_shapes_trtexec_syntax():
    assert parse_shapes("x:1x3x224x224,y:1x128") == {"x": (1, 3, 224, 224), "y": (1, 128)}
    assert parse_shapes(" input:0:2x3 , s: ") == {"input:0": (2, 3), "s": ()}
    assert parse_shapes("'ids':4x8") == {"ids": (4, 8)}


@pytest.mark.parametrize("text, match", [("x1x3", "name:1x2x3"), ("x:1xax3", "'x'.*not integers"),
                                         ("x:1,x:2", "'x' is given twice")])
def test_parse_shapes_errors(text, match):
    with pytest.raises(ShapeError, match=match):
        parse_shapes(text)


def test_profile_from_strings_equals_dict():
    p = Profile.from_strings(min="x:1x3x224x224,y:1x128", opt="x:8x3x224x224,y:4x128",
                             max="x:32x3x224x224,y:16x128")
    q = Profile({"x": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
                 "y": [[1, 128], [4, 128], [16, 128]]})
    assert p == q and hash(p) == hash(q)
    assert p.min("x") == (1, 3, 224, 224) and p.opt("y") == (4, 128) and p.max("x") == (32, 3, 224, 224)
    assert p.describe("x") == "[1..32, 3, 224, 224]"
    assert Profile.from_json(p.to_json()) == p
    with pytest.raises(ShapeError, match="'y' has no opt shape"):
        Profile.from_strings(min="x:1,y:1", opt="x:1", max="x:1,y:1")


def test_a_single_shape_fixes_the_input():
    p = Profile({"x": (2, 4)})
    assert p.shapes["x"] == ((2, 4), (2, 4), (2, 4)) and p.describe("x") == "[2, 4]"


@pytest.mark.parametrize("spec, match", [
    (((4, 3), (2, 3), (8, 3)), r"dim 0 needs min <= opt <= max, got 4, 2, 8"),
    (((1, 3), (2, 3), (1, 3)), r"dim 0 needs min <= opt <= max, got 1, 2, 1"),
    (((1, 3), (2, 3, 1), (4, 3)), "differ in rank"),
    (((1, 3), (2, 3)), r"expected \(min_shape, opt_shape, max_shape\)"),
    (((1, -3), (2, 3), (4, 3)), "int >= 0"),
])
def test_profile_construction_errors_name_the_input(spec, match):
    with pytest.raises(ShapeError, match="input 'x'.*" + match):
        Profile({"x": spec})


# -- validation against a graph

@pytest.fixture(scope="module")
def bert_graph():
    return import_model(bert_encoder())


def test_validation_rejects_unknown_input(bert_graph):
    with pytest.raises(InputError, match="names 'ids', which is not an input.*'hidden', 'mask'"):
        Profile({"ids": (1, 8)}).validate(bert_graph)


def test_validation_rejects_wrong_rank(bert_graph):
    with pytest.raises(ShapeError, match="input 'mask': rank 3 .* model's input has rank 2"):
        Profile({"mask": ((1, 1, 1), (2, 2, 2), (4, 4, 4))}).validate(bert_graph)


def test_validation_rejects_static_dim_mismatch(bert_graph):
    with pytest.raises(ShapeError, match=r"'hidden': dim 2 is static \(64\).*max shape \(4, 16, 128\) gives 128"):
        Profile({"hidden": ((1, 1, 64), (2, 8, 64), (4, 16, 128))}).validate(bert_graph)


def test_validation_rejects_disjoint_ranges_of_one_symbol(bert_graph):
    p = Profile({"hidden": ((1, 1, 64), (2, 8, 64), (4, 16, 64)), "mask": ((8, 1), (8, 8), (16, 16))})
    with pytest.raises(ShapeError, match="symbol 'N' is 1..4 in input 'hidden' but 8..16 in input 'mask'"):
        p.validate(bert_graph)


def test_default_profile_of_bert_encoder(bert_graph):
    assert [v.type.shape for v in bert_graph.inputs] == [("N", "S", 64), ("N", "S")]
    p = default_profile(bert_graph)
    lo, opt, hi = DEFAULT_MIN_DIM, DEFAULT_OPT_DIM, DEFAULT_MAX_DIM
    assert p.shapes["hidden"] == ((lo, lo, 64), (opt, opt, 64), (hi, hi, 64))
    assert p.shapes["mask"] == ((lo, lo), (opt, opt), (hi, hi))
    assert p.describe("hidden") == f"[1..{DEFAULT_MAX_DIM}, 1..{DEFAULT_MAX_DIM}, 64]"


def test_left_out_inputs_take_their_symbols_ranges_from_named_ones(bert_graph):
    p = Profile({"hidden": ((1, 8, 64), (2, 64, 64), (4, 128, 64))}).validate(bert_graph)
    assert p.shapes["mask"] == ((1, 8), (2, 64), (4, 128))
    assert list(p.shapes) == ["hidden", "mask"]


def test_resolve_profiles_accepts_profile_dict_or_list(bert_graph):
    one = {"hidden": ((1, 1, 64), (1, 8, 64), (2, 16, 64))}
    assert resolve_profiles(None, bert_graph) == [default_profile(bert_graph)]
    assert resolve_profiles(one, bert_graph) == resolve_profiles(Profile(one), bert_graph)
    assert len(resolve_profiles([one, Profile(one)], bert_graph)) == 2
    with pytest.raises(ShapeError, match="non-empty list"):
        resolve_profiles([], bert_graph)
    with pytest.raises(InputError, match="profile 1: .*names 'bogus'"):
        resolve_profiles([one, {"bogus": (1,)}], bert_graph)


# -- selection

TWO = [Profile({"x": ((1, 4), (2, 4), (4, 4))}), Profile({"x": ((4, 4), (8, 4), (16, 4))})]


def test_select_takes_the_first_profile_that_fits():
    assert select(TWO, {"x": (2, 4)}) == 0
    assert select(TWO, {"x": (4, 4)}) == 0  # in both: the first wins
    assert select(TWO, {"x": (9, 4)}) == 1


def test_select_error_names_input_shape_and_every_range():
    with pytest.raises(InputError) as e:
        select(TWO, {"x": (17, 4)})
    assert str(e.value) == ("input 'x' shape (17, 4) is outside every optimization profile: "
                            "profile 0 allows [1..4, 4]; profile 1 allows [4..16, 4]")


def test_select_error_when_profiles_reject_different_inputs():
    profiles = [Profile({"a": ((1,), (1,), (4,)), "b": ((1,), (1,), (4,))}),
                Profile({"a": ((5,), (5,), (8,)), "b": ((5,), (5,), (8,))})]
    with pytest.raises(InputError, match=r"'a' \(2,\), 'b' \(6,\) fit no single optimization profile: "
                                         r"profile 0 allows 'b' \[1..4\], not \(6,\); "
                                         r"profile 1 allows 'a' \[5..8\], not \(2,\)"):
        select(profiles, {"a": (2,), "b": (6,)})


# -- the session

def test_session_selects_profiles_and_reports_which():
    sess = rtxjit.InferenceSession(_relu_model(), profiles=TWO)
    assert sess.profiles == TWO
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)
    np.testing.assert_array_equal(sess.run(None, {"x": x[:2]})[0], np.maximum(x[:2], 0))
    assert sess.last_profile == 0
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(x, 0))
    assert sess.last_profile == 1
    sess.run(None, {"x": x[:3]})  # a cached executable still reports its profile
    assert sess.last_profile == 0
    with pytest.raises(InputError, match="profile 0 allows"):
        sess.run(None, {"x": np.ones((20, 4), np.float32)})
    with pytest.raises(InputError, match="profile 0 allows"):  # and again: a bad shape is never cached
        sess.run(None, {"x": np.ones((20, 4), np.float32)})


def test_default_session_profile_and_inputs_unchanged():
    sess = rtxjit.InferenceSession(_relu_model())
    assert sess.profiles == [Profile({"x": ((1, 4), (1, 4), (DEFAULT_MAX_DIM, 4))})]
    assert [(a.name, a.shape, a.type) for a in sess.get_inputs()] == [("x", ["N", 4], "tensor(float)")]
    with pytest.raises(InputError, match=rf"input 'x' shape \({DEFAULT_MAX_DIM + 1}, 4\) is outside every"):
        sess.run(None, {"x": np.ones((DEFAULT_MAX_DIM + 1, 4), np.float32)})


def test_bad_profile_fails_at_session_construction():
    with pytest.raises(ShapeError, match="'x': dim 1 is static"):
        rtxjit.InferenceSession(_relu_model(), profiles={"x": ((1, 5), (1, 5), (2, 5))})


def test_resnet_out_of_profile_feed_is_a_clear_error(cnn):
    sess = rtxjit.InferenceSession(cnn, profiles=IMAGE)
    with pytest.raises(InputError) as e:
        sess.run(None, demo_inputs(cnn, batch=5))
    assert str(e.value) == ("input 'image' shape (5, 3, 16, 16) is outside every optimization profile: "
                            "profile 0 allows [1..4, 3, 16, 16]")


def test_resnet_in_profile_runs_match_no_profile_runs(cnn):
    feeds = demo_inputs(cnn, batch=2)
    with_profile = rtxjit.InferenceSession(cnn, profiles=Profile(IMAGE)).run(None, feeds)[0]
    without = rtxjit.InferenceSession(cnn).run(None, feeds)[0]
    np.testing.assert_array_equal(with_profile, without)
