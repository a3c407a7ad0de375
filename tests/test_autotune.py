"""Tuned kernel templates: tile candidates per SM, autotuning bookkeeping, and Conv with constant
(pre-transposed) weights, checked against the float64 reference on the CPU interpreter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import rtxjit
from rtxjit.codegen.templates.matmul import TUNE_CANDIDATES, sm_family, tile_configs
from rtxjit.ir.registry import get_op
from rtxjit.ir.types import DType
from rtxjit.plan import autotune


def test_tile_configs_fit_the_problem_and_rank_large_tiles_first_for_large_problems():
    cfgs = tile_configs(4096, 4096, 4096, DType.FP16, interpret=False, sm=90, sm_count=132)
    assert 1 < len(cfgs) <= TUNE_CANDIDATES
    assert (cfgs[0]["BLOCK_M"], cfgs[0]["BLOCK_N"]) in ((128, 256), (256, 128))
    assert all(c["EVEN_K"] for c in cfgs)
    small = tile_configs(20, 9, 40, DType.FP16, interpret=False, sm=80, sm_count=108)
    for c in small:
        assert c["BLOCK_M"] <= 32 and c["BLOCK_N"] == 16 and c["BLOCK_K"] <= 64
        assert c["EVEN_K"] == (40 % c["BLOCK_K"] == 0)
    assert len({tuple(sorted(c.items())) for c in small}) == len(small)  # no duplicates after clipping
    conv = tile_configs(100352, 64, 576, DType.FP16, interpret=False, sm=90, sm_count=132, k_cap=64)
    assert all(c["BLOCK_K"] <= 64 for c in conv)


def test_interpreter_and_fp64_get_one_fixed_choice():
    assert len(tile_configs(512, 512, 512, DType.FP16, interpret=True)) == 1
    assert len(tile_configs(512, 512, 512, DType.FP64, interpret=False, sm=90)) == 1


def test_sm_families():
    assert [sm_family(s) for s in (70, 75, 80, 86, 89, 90, 100, 120)] == [70, 70, 80, 80, 80, 90, 90, 80]


def test_tune_key_buckets_sizes():
    assert autotune.tune_key("k", 90, 100, 768, 3000) == autotune.tune_key("k", 90, 128, 700, 4096)
    assert autotune.tune_key("k", 90, 100, 768, 3000) != autotune.tune_key("k", 80, 100, 768, 3000)


def test_choose_remembers_without_timing_again(monkeypatch):
    autotune.forget()
    calls = []
    monkeypatch.setattr(autotune, "time_ms", lambda fn, **kw: (fn(), calls.append(1), 3.0 - len(calls))[2])
    choices = [((1,), {"BLOCK_M": 16}), ((2,), {"BLOCK_M": 32}), ((3,), {"BLOCK_M": 64})]
    ran = []
    best = autotune.choose(("k",), choices, ran.append)
    assert best == 2 and ran == [0, 1, 2]
    assert autotune.choose(("k",), choices, ran.append) == 2 and ran == [0, 1, 2]
    assert [t for _, t in autotune.timings(("k",))] == [2.0, 1.0, 0.0]
    autotune.forget()


def test_choose_skips_failing_choices(monkeypatch):
    autotune.forget()
    monkeypatch.setattr(autotune, "time_ms", lambda fn, **kw: (fn(), 1.0)[1])

    def run(i):
        if i == 0:
            raise RuntimeError("out of shared memory")

    assert autotune.choose(("f",), [((1,), {"a": 0}), ((1,), {"a": 1})], run) == 1
    autotune.forget()


def _conv_model(x_shape, w, b, attrs):
    inits = [onnx.numpy_helper.from_array(w, "w")] + ([onnx.numpy_helper.from_array(b, "b")] if b is not None else [])
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if b is not None else []), ["y"], **attrs)
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((2, 20, 7, 6), (8, 20, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 1]}),  # tap-major, channel tail
    ((1, 32, 6, 6), (16, 16, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),  # tap-major, grouped
    ((2, 3, 9, 9), (6, 3, 7, 7), {"pads": [3, 3, 3, 3], "strides": [2, 2]}),  # flat (stem)
    ((2, 24, 5, 5), (10, 24, 1, 1), {}),  # 1x1: batched GEMM
    ((2, 24, 5, 5), (10, 24, 1, 1), {"strides": [2, 2]}),  # 1x1 stride 2: implicit GEMM
    ((2, 18, 11), (4, 18, 3), {"pads": [1, 1]}),  # 1-D
])
def test_conv_with_constant_weights(x_shape, w_shape, attrs, rng):
    x = rng.uniform(-1, 1, x_shape).astype(np.float32)
    w = rng.uniform(-1, 1, w_shape).astype(np.float32)
    b = rng.uniform(-1, 1, w_shape[:1]).astype(np.float32)
    (got,) = rtxjit.InferenceSession(_conv_model(x_shape, w, b, attrs)).run(None, {"x": x})
    want = get_op("Conv").reference_fn(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **attrs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c, taps", [(48, 4), (96, 4), (24, 16), (80, 4), (64, 9), (3, 49)])
def test_tap_major_convs_load_unmasked_only_when_each_taps_channels_fill_whole_k_steps(c, taps):
    """A tap-major conv steps over ``c`` channels per tap: a K step of 64 over 48 channels reads 16
    channels of the next pixel unless masked, even though K = 48 x 4 = 192 is a multiple of 64."""
    for sm in (80, 90):
        for cfg in tile_configs(4096, 128, c * taps, DType.FP16, False, sm=sm, k_cap=c):
            assert cfg["EVEN_K"] == (c % cfg["BLOCK_K"] == 0), cfg


class _FakeGPU:
    """torch.cuda's stream and events over a clock that the timed function advances (ms)."""

    def __init__(self, monkeypatch):
        import torch

        gpu = self
        self.clock, self.calls, self.queued, self.most_queued = 0.0, [], 0.0, 0.0

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                gpu.queued = 0.0
                self.t = gpu.clock

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.t - self.t

        class Stream:
            def synchronize(self):
                pass

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())

    def kernel(self, ms):
        def run():
            self.clock += ms
            self.queued += ms
            self.most_queued = max(self.most_queued, self.queued)
            self.calls.append(ms)
        return run


def test_paced_timing_queues_about_a_round_at_a_time_and_yields_between_rounds(monkeypatch):
    gpu = _FakeGPU(monkeypatch)
    yields = []
    assert autotune.time_ms(gpu.kernel(0.4), between=lambda: yields.append(1)) == pytest.approx(0.4)
    # warm-up, one call alone, then 5 rounds of int(ROUND_MS / 0.4) = 2 calls, a yield before each
    assert len(gpu.calls) == 1 + 1 + 5 * 2 and len(yields) == 1 + 5
    assert gpu.most_queued <= autotune.ROUND_MS
    gpu.calls.clear()
    assert autotune.time_ms(gpu.kernel(0.4)) == pytest.approx(0.4)  # unpaced: 5 rounds of 10
    assert len(gpu.calls) == 1 + 5 * 10


def test_paced_choose_times_a_far_slower_choice_only_once(monkeypatch):
    autotune.forget()
    gpu = _FakeGPU(monkeypatch)
    costs = [1.0, 9.0, 0.5]
    kernels = [gpu.kernel(ms) for ms in costs]
    choices = [((1,), {"BLOCK_M": m}) for m in (16, 32, 64)]
    assert autotune.choose(("slow",), choices, lambda i: kernels[i](), between=lambda: None) == 2
    assert gpu.calls.count(9.0) == 2  # its warm-up and one timed call: over GIVE_UP x 1.0 ms
    assert gpu.calls.count(1.0) == 1 + 1 + 5
    assert [t for _, t in autotune.timings(("slow",))] == pytest.approx(costs)
    autotune.forget()


def test_shapes_of_one_bucket_get_one_candidate_list():
    """tile_configs ranks M and the batch rounded up to powers of two (as the autotuner's key rounds
    them): a new shape in a bucket seen before gets the same candidates, so its specialized
    kernels are the ones compiled already (resnet50's 1x1 convs at batch 12 after 16)."""
    from rtxjit.codegen.templates.matmul import tile_configs
    from rtxjit.ir.types import DType

    for m_a, m_b in ((65, 128), (12 * 3136, 16 * 3136), (513, 1000)):
        assert tile_configs(m_a, 768, 768, DType.FP16, False) == tile_configs(m_b, 768, 768, DType.FP16, False)
    assert tile_configs(3136, 256, 64, DType.FP16, False, batch=12) == tile_configs(3136, 256, 64, DType.FP16, False,
                                                                                   batch=16)
    assert tile_configs(64, 768, 768, DType.FP16, False) != tile_configs(4096, 768, 768, DType.FP16, False)


def test_fallback_of_a_weight_product_takes_wider_tiles_from_the_models_n_and_k():
    """The fallback configuration of a product whose B is a weight: its N and K are the model's, so
    fp16 tiles take up to 128 columns and 64-deep unmasked K steps (3 stages from sm_80, 2 below);
    without a weight, fp32, or a conv's channel cap: the moderate 64x64x32 tiles as before."""
    from rtxjit.codegen.templates.matmul import generic_tile_config
    from rtxjit.ir.types import DType

    cfg = generic_tile_config(DType.FP16, weight_nk=(768, 3072), sm=90)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["EVEN_K"], cfg["num_stages"]) == (64, 128, 64, True, 3)
    assert generic_tile_config(DType.FP16, weight_nk=(40, 100), sm=75)["BLOCK_N"] == 64
    assert generic_tile_config(DType.FP16, weight_nk=(40, 100), sm=75)["EVEN_K"] is False
    assert generic_tile_config(DType.FP16, weight_nk=(40, 100), sm=75)["num_stages"] == 2
    plain = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "EVEN_K": False}
    for cfg in (generic_tile_config(DType.FP16), generic_tile_config(DType.FP32, weight_nk=(768, 768))):
        assert {k: cfg[k] for k in plain} == plain
    # a conv with a constant weight: K steps over the channels of one tap, unmasked only where they divide
    cfg = generic_tile_config(DType.FP16, k_cap=64, weight_nk=(256, 64 * 9), sm=90)  # resnet50's 3x3, 64 channels
    assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["EVEN_K"]) == (128, 64, True)
    cfg = generic_tile_config(DType.FP16, k_cap=48, weight_nk=(64, 48 * 4), sm=90)  # K 192 = 3 x 64, a tap 48
    assert (cfg["BLOCK_K"], cfg["EVEN_K"]) == (64, False)
    assert generic_tile_config(DType.FP16, k_cap=3, weight_nk=(64, 3 * 49), sm=90)["BLOCK_K"] == 16  # a stem's 3


def test_attention_offers_other_blocks_to_the_tuner_on_a_gpu_only():
    """Issue 18: attention tiles are timed like products' (fewer query rows for short sequences at
    a small batch: bert-base at batch 1 and 128 tokens is 2 x 12 programs of 64 rows on an H100).
    The heuristic's blocks come first and serve until then; every choice fits the SM's shared memory;
    the interpreter keeps its one configuration. (The choices compile for sm_90 and sm_80 with
    triton 3.6, checked ahead of time on this machine's CPU.)"""
    from rtxjit.codegen.templates.attention import attention_choices, attention_config
    from rtxjit.ir.types import TensorType
    from rtxjit.plan.plan import PlanBuilder
    from tests.test_fallback_specialization import H100
    import io
    import torch

    choices = attention_choices(128, 128, 64, 64, DType.FP16, 90)
    assert choices[0] == attention_config(128, 128, 64, 64, DType.FP16, False)
    assert {(c["BLOCK_M"], c["BLOCK_N"]) for c in choices} >= {(64, 64), (16, 64), (32, 64), (128, 64)}
    assert [(c["BLOCK_M"], c["BLOCK_N"]) for c in attention_choices(7, 7, 64, 64, DType.FP16, 90)] == [(16, 16)]
    assert all(c["BLOCK_N"] <= 32 for c in attention_choices(512, 512, 128, 128, DType.FP32, 90))
    small = attention_choices(512, 512, 256, 256, DType.FP16, 75)  # 99 KB: the widest tiles are left out
    assert all((c["BLOCK_M"] * 256 + 4 * c["BLOCK_N"] * 256) * 2 <= 99 * 1024 for c in small[1:])

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 128, 64),), buf, input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False)
    sess = rtxjit.InferenceSession(onnx.load_from_string(buf.getvalue()), device="cpu")
    types = {v.name: TensorType(v.type.dtype, tuple(v.type.shape)) for v in sess.graph.inputs}
    for device, tuned in ((H100, True), (sess.device, False)):
        plan = PlanBuilder(sess.graph, device, frozenset()).build(types, {})
        step = next(s for s in plan.steps if s.kernel.name == "attention")
        assert bool(step.choices) is tuned
        if tuned:  # the heuristic's first; timed once per bucket of (Sq, Sk, Dk, Dv, batch x heads) on an sm_90
            assert step.choices[0] == (step.grid, step.constexprs) and len(step.choices) >= 4
            assert step.tune_key[1:] == (90, 128, 128, 32, 32, 2)
