"""Generated source is deterministic: same template, parameters and dtypes give the same bytes."""

import numpy as np
import pytest

import rtxjit
from rtxjit.codegen.templates.pointwise import render_pointwise
from rtxjit.codegen.view import View, collapse
from rtxjit.ir.types import DType
from rtxjit.models import demo_inputs, resnet_cnn


def test_render_is_byte_identical():
    a = render_pointwise("x0 + x1", (DType.FP16, DType.FP16), DType.FP16, 3)
    b = render_pointwise("x0 + x1", (DType.FP16, DType.FP16), DType.FP16, 3)
    assert a.text == b.text and a.key == b.key
    assert render_pointwise("x0 + x1", (DType.FP32, DType.FP32), DType.FP32, 3).key != a.key
    assert a.text.startswith("# rtxjit kernel pointwise:")


def test_two_sessions_generate_the_same_kernels():
    model = resnet_cnn()
    feeds = demo_inputs(model, batch=1)
    keys = [[s.kernel.key for s in rtxjit.InferenceSession(model).plan_for(feeds).steps] for _ in range(2)]
    assert keys[0] == keys[1]


def test_collapse_merges_contiguous_dims_and_keeps_broadcast():
    shape, (out, inp) = collapse((2, 3, 4), (12, 4, 1), (0, 4, 1))
    assert shape == (2, 12) and out == (12, 1) and inp == (0, 1)
    shape, (out,) = collapse((1, 1), (1, 1))
    assert shape == (1,)


def test_view_broadcast_and_permute():
    v = View.of(0, DType.FP32, (3, 1))
    assert v.broadcast_to((2, 3, 4)).strides == (0, 1, 0)
    assert View.of(0, DType.FP32, (2, 3)).permute((1, 0)).strides == (1, 3)
    assert not View.of(0, DType.FP32, (2, 3)).permute((1, 0)).contiguous
    np.testing.assert_equal(View.of(0, DType.FP32, (4, 5)).slice(1, 1, 2, 2).strides, (5, 2))


def test_reshape_of_a_strided_view_matches_numpy():
    base = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for perm, shape in [((0, 2, 1, 3), (2, 4, 3, 5)), ((0, 1, 3, 2), (6, 5, 4)), ((0, 3, 1, 2), (2, 5, 12))]:
        v = View.of(0, DType.FP32, base.shape).permute(perm).reshape(shape)
        got = np.lib.stride_tricks.as_strided(base.reshape(-1), shape, [s * 8 for s in v.strides])
        np.testing.assert_array_equal(got, base.transpose(perm).reshape(shape))
    strided = View.of(0, DType.FP32, (2, 3, 4, 5)).permute((0, 2, 1, 3))
    with pytest.raises(ValueError):
        strided.reshape((2, 4, 15))  # dims 1 and 3 of the view are not adjacent in memory


def test_memoized_render_keys_on_every_value_type_nested_too():
    from dataclasses import dataclass

    from rtxjit.codegen.source import memoized

    @dataclass(frozen=True)
    class Program:
        steps: tuple

    calls = []

    @memoized
    def render(a, program=None):
        calls.append(1)
        return f"{a!r} {program!r}"

    assert render(1) == "1 None" and render(True) == "True None" and render(1.0) == "1.0 None"
    assert render(1) == "1 None" and len(calls) == 3  # the repeat is a hit
    assert render(1, program=Program(((2,),))) != render(1, program=Program(((2.0,),)))  # equal, not the same
    assert len(calls) == 5
    assert render(1, program=Program(([2],))) == render(1, program=Program(([2],))) and len(calls) == 6
    assert render({1: 2}) == render({1: 2}) and len(calls) == 8  # unhashable: rendered each time


def test_fused_epilogue_is_one_instance_per_node_and_keys_by_value_and_type():
    from rtxjit.codegen.templates.epilogue import FusedEpilogue
    from rtxjit.codegen.templates.matmul import render_matmul
    from rtxjit.ir.types import DType

    from rtxjit.ir.graph import Node

    relu = (("Relu", (("in", 0),), ()),)
    owner = Node("rtxjit.Epilogue", "n", [], [], {"program": relu})
    a = FusedEpilogue.of(relu, DType.FP16, (), owner=owner)
    assert FusedEpilogue.of(relu, DType.FP16, (), owner=owner) is a
    assert FusedEpilogue.of(relu, DType.FP32, (), owner=owner) is not a
    twin = (("Relu", (("in", 0),), ()),)  # an equal program, another node: the same rendered source
    b = FusedEpilogue.of(twin, DType.FP16, (), owner=Node("rtxjit.Epilogue", "m", [], [], {"program": twin}))
    assert b is not a
    assert b.memo_key == a.memo_key
    assert render_matmul(DType.FP16, DType.FP16, 0, False, fused=a) is render_matmul(DType.FP16, DType.FP16, 0, False,
                                                                                   fused=b)
    # constants that are equal in Python but render differently keep their sources apart
    one = FusedEpilogue.of((("Mul", (("in", 0), ("const", 1)), ()),), DType.FP16, ())
    one_f = FusedEpilogue.of((("Mul", (("in", 0), ("const", 1.0)), ()),), DType.FP16, ())
    assert one.memo_key != one_f.memo_key


def test_the_memoized_matmul_template_returns_one_source_object_per_configuration():
    from rtxjit.codegen.templates.matmul import render_matmul

    a = render_matmul(DType.FP16, DType.FP16, 1, True, unit=frozenset({"a_sk"}))
    assert render_matmul(DType.FP16, DType.FP16, 1, True, unit=frozenset({"a_sk"})) is a
    assert render_matmul(DType.FP16, DType.FP32, 1, True, unit=frozenset({"a_sk"})).text != a.text
