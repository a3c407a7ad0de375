"""Benchmark real models: rtxjit against torch.compile captured in a CUDA graph, eager PyTorch and
torch.compile's other modes.

Cases (fp16, random weights, no download; issue 18's thirteen): resnet50 batch 1 and 32, vit_b_16 b1,
mobilenet_v3_large b1, efficientnet_b0 b8, convnext_tiny b8, swin_t b1 (torchvision, 224 x 224);
bert-base sequence 128 batch 1 and 8 (``BertModel`` from its config); GPT-2 s128 b1, the Whisper-base
encoder (30 s of audio) and CLIP ViT-B/32 (tests/zoo/archs.py's configs and random weights); one
step of Stable Diffusion 1.5's UNet at 512 x 512 (batch 2, 64 x 64 latents; diffusers,
tests/zoo/vision_archs.py). A case whose package is missing is skipped with that reason.

The reference is ``compile_graph``: torch.compile's compiled callable captured in a
torch.cuda.CUDAGraph and its replays timed (zoo_gpu's ``graphed``); mode="reduce-overhead" stays as
the ``compile_cudagraphs`` row. Each model is exported to ONNX in a temporary folder for rtxjit. Each
case runs in its own process (``--isolate``, the default); in it, on one GPU, each system is timed
in its steady state (CUDA events, warm-up, median), its output is checked against eager, and its
kernel launches per inference, peak GPU memory and roofline fraction (the floor of rtxjit's plan,
rtxjit/exec/roofline.py, over its time) are recorded. Results go to ``<out>/bench_models.json`` and
``<out>/bench_models.md``, rewritten after every case.

    python benchmarks/bench_models.py                       # everything (GPU machine)
    python benchmarks/bench_models.py --time-limit 540      # stop in time; then the rest:
    python benchmarks/bench_models.py --time-limit 540 --resume
    python benchmarks/bench_models.py --cases resnet50_b1 --systems eager,compile_graph,rtxjit --quick
    python benchmarks/bench_models.py --dry-run             # CPU: tiny models, no torch.compile

``--jobs N`` sets up N cases at once (each in its own process: export, torch.compile, rtxjit's
compiles and autotuning, first calls) and then times them one at a time: a case that is ready waits
at a gate until no other case is still setting up (or until ``--setup-wait`` seconds have passed),
so no timing runs beside another case's compiles, and the setups, which take most of a run, overlap.

A system that fails on a case records its error and the script goes on.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rtxjit  # noqa: E402  (before triton: on a CPU it switches Triton's interpreter on)
from rtxjit.exec import roofline  # noqa: E402

SEED = 0
REL_ERR_LIMIT = 2e-2
MIB = 1 << 20
PROFILE_ITERS = 3
MIN_CASE_S = 60  # --time-limit: no case starts with less time left


# --- cases -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A model and its inputs. ``build(device)`` returns (module in eval mode, fp16, on device;
    ordered dict of input name -> tensor). The first output is the one compared with eager.
    ``requires``: packages the builder imports; a case whose package is missing is skipped with
    that reason (torchvision on a CPU box, diffusers on the GPU image unless its wheel is carried)."""

    name: str
    build: Callable
    output_names: tuple
    requires: tuple = ()


def _vision(ctor: str, batch: int, device, side: int = 224):
    import torchvision

    from benchmarks.vision_gpu import calibrate_batchnorm  # imported here: vision_gpu imports this module

    model = getattr(torchvision.models, ctor)(weights=None)
    _randomize_zero_inits(model)
    calibrate_batchnorm(model, (batch, 3, side, side), device)
    x = torch.randn(batch, 3, side, side, device=device, dtype=torch.float16)
    return _ready(model, device), {"image": x}


def _randomize_zero_inits(model: nn.Module) -> None:
    """torchvision initializes some layers to zero (ViT's classification head): its logits would
    then be the zero bias for any input, and the output check against eager would prove nothing."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


class _BertOutputs(nn.Module):
    """BertModel with positional inputs and a tuple output, for export and for torch.compile."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


def _bert(batch: int, seq: int, device):
    from transformers import BertConfig, BertModel

    try:  # bert-base defaults; eager attention exports as plain MatMul/Softmax
        config = BertConfig(attn_implementation="eager")
    except TypeError:
        config = BertConfig()
    model = _BertOutputs(BertModel(config))
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device, dtype=torch.int64)
    return _ready(model, device), {"input_ids": ids, "attention_mask": _padding_mask(batch, seq, device)}


def _padding_mask(batch: int, seq: int, device) -> torch.Tensor:
    """Ones, with the last eighth of the positions masked out in every second sequence."""
    mask = torch.ones(batch, seq, device=device, dtype=torch.int64)
    mask[1::2, seq - seq // 8:] = 0
    return mask


def _ready(model: nn.Module, device) -> nn.Module:
    return model.eval().half().to(device)


def _on(feeds: dict, device) -> dict:
    """The feeds on ``device``, floating ones in fp16 (as the model)."""
    return {k: v.to(device, torch.float16) if v.is_floating_point() else v.to(device) for k, v in feeds.items()}


def _zoo(name: str, size: str, batch: int, seq: int, device):
    """A transformers model of tests/zoo/archs.py (its config, its random weights, SDPA attention),
    first output only: ``gpt2``, ``whisper_encoder`` (80 mel bins x 3000 frames: 30 s of audio, the
    length is the config's), ``clip_vision``. The feeds are unpadded ("right" padding of a batch of
    one keeps every token)."""
    from tests.zoo import archs

    if name == "clip_vision" and size == "full":
        # archs has no full size for CLIP vision; ViT-B/32 has bert-base's widths (768, 12 layers,
        # 12 heads, 3072) and archs' config gives it 224 x 224 images in 32 x 32 patches at that width
        config, cls = archs._config(name, archs.dims("bert", "full"))
        config._attn_implementation = "sdpa"
        torch.manual_seed(SEED)
        model = cls(config).eval()
        archs.randomize(model, SEED)
        g = torch.Generator().manual_seed(SEED + 1)
        feeds = {"pixel_values": torch.randn(batch, 3, config.image_size, config.image_size, generator=g)}
    else:
        model, make_feeds = archs.build(name, size, seed=SEED)
        feeds = make_feeds("right", batch, seq)
    return _ready(archs.Wrapped(model, list(feeds)), device), _on(feeds, device)


def _diffusion_unet(size: str, batch: int, device):
    """tests/zoo/vision_archs.py's UNet2DConditionModel: at "full" Stable Diffusion 1.5's (latents
    64 x 64 for 512 x 512 images, 77 text tokens of width 768), one denoising step."""
    from tests.zoo import vision_archs

    module, make_feeds = vision_archs.build("unet2d", size, seed=SEED)
    return _ready(module, device), _on(make_feeds(batch), device)


TEXT_OUT = ("last_hidden_state",)
CASES = [
    Case("resnet50_b1", partial(_vision, "resnet50", 1), ("logits",), ("torchvision",)),
    Case("resnet50_b32", partial(_vision, "resnet50", 32), ("logits",), ("torchvision",)),
    Case("vit_b_16_b1", partial(_vision, "vit_b_16", 1), ("logits",), ("torchvision",)),
    Case("bert_base_s128_b1", partial(_bert, 1, 128), ("last_hidden_state", "pooler_output"), ("transformers",)),
    Case("bert_base_s128_b8", partial(_bert, 8, 128), ("last_hidden_state", "pooler_output"), ("transformers",)),
    Case("mobilenet_v3_large_b1", partial(_vision, "mobilenet_v3_large", 1), ("logits",), ("torchvision",)),
    Case("efficientnet_b0_b8", partial(_vision, "efficientnet_b0", 8), ("logits",), ("torchvision",)),
    Case("convnext_tiny_b8", partial(_vision, "convnext_tiny", 8), ("logits",), ("torchvision",)),
    Case("swin_t_b1", partial(_vision, "swin_t", 1), ("logits",), ("torchvision",)),
    Case("gpt2_s128_b1", partial(_zoo, "gpt2", "full", 1, 128), TEXT_OUT, ("transformers",)),
    Case("whisper_base_encoder", partial(_zoo, "whisper_encoder", "full", 1, 0), TEXT_OUT, ("transformers",)),
    Case("clip_vit_b32", partial(_zoo, "clip_vision", "full", 1, 0), TEXT_OUT, ("transformers",)),
    Case("sd15_unet_512", partial(_diffusion_unet, "full", 2), ("noise_pred",), ("diffusers",)),
]


# --- tiny models for --dry-run (CPU) -----------------------------------------------------------

class _TinyCNN(nn.Module):
    """conv-bn-relu, a residual block, max and global pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, image):
        y = self.stem(image)
        y = torch.relu(y + self.block(y))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class _TinyEncoder(nn.Module):
    """A BERT-style layer written out: embeddings, masked multi-head attention, GELU MLP, pooler."""

    def __init__(self, vocab=64, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed, self.norm1, self.norm2 = nn.Embedding(vocab, dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.pool = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        x = self.norm1(self.embed(input_ids))
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5 + bias, dim=-1)
        x = self.norm2(x + self.proj((att @ v).transpose(1, 2).reshape(b, s, d)))
        x = x + self.mlp(x)
        return x, torch.tanh(self.pool(x[:, 0]))


class _TinyViT(nn.Module):
    """Patch embedding, class token, nn.MultiheadAttention (as torchvision's ViT), a head."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, image):
        x = self.patch(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.head(x[:, 0])


def _tiny_image(model_cls, batch: int, device):
    return _ready(model_cls(), device), {"image": torch.randn(batch, 3, 32, 32, device=device).half()}


def _tiny_text(batch: int, seq: int, device):
    ids = torch.randint(0, 64, (batch, seq), device=device, dtype=torch.int64)
    return _ready(_TinyEncoder(), device), {"input_ids": ids, "attention_mask": _padding_mask(batch, seq, device)}


DRY_RUN_CASES = [
    Case("tiny_cnn_b1", partial(_tiny_image, _TinyCNN, 1), ("logits",)),
    Case("tiny_cnn_b4", partial(_tiny_image, _TinyCNN, 4), ("logits",)),
    Case("tiny_encoder_s16_b2", partial(_tiny_text, 2, 16), ("last_hidden_state", "pooler_output")),
    Case("tiny_vit_b1", partial(_tiny_image, _TinyViT, 1), ("logits",)),
    # the new cases' builders at tiny sizes (torchvision's real models at 32 x 32: no tiny configs)
    Case("tiny_mobilenet_v3_large", partial(_vision, "mobilenet_v3_large", 1, side=32), ("logits",), ("torchvision",)),
    Case("tiny_swin_t", partial(_vision, "swin_t", 1, side=32), ("logits",), ("torchvision",)),
    Case("tiny_gpt2_s16_b1", partial(_zoo, "gpt2", "tiny", 1, 16), TEXT_OUT, ("transformers",)),
    Case("tiny_whisper_encoder", partial(_zoo, "whisper_encoder", "tiny", 1, 0), TEXT_OUT, ("transformers",)),
    Case("tiny_clip_vision", partial(_zoo, "clip_vision", "tiny", 1, 0), TEXT_OUT, ("transformers",)),
    Case("tiny_unet2d", partial(_diffusion_unet, "tiny", 1), ("noise_pred",), ("diffusers",)),
]


# --- ONNX export -------------------------------------------------------------------------------

EXPORTERS = {  # name -> torch.onnx.export keyword arguments, tried in this order by "auto"
    "torchscript": {"dynamo": False, "opset_version": 17},
    "dynamo": {"dynamo": True, "opset_version": 18},
}


@contextlib.contextmanager
def _export_mode():
    """No grad, quiet, and nn.MultiheadAttention off its fused fast path (which has no ONNX form)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(model: nn.Module, inputs: dict, output_names, path: Path, exporter: str = "auto") -> dict:
    """Exports ``model`` to ``path``; returns which exporter and opset worked and how long it took.
    With "auto", a file that onnx's strict type check rejects counts as a failed export (the
    TorchScript exporter's fp16 GPT-2: its SDPA with a boolean mask runs in float32 and every later
    layer with it, on float32 copies of the weights, and binds LayerNormalization's T to two dtypes;
    onnxruntime refuses that file, rtxjit runs it with a warning, in float32)."""
    names = list(EXPORTERS) if exporter == "auto" else [exporter]
    errors = []
    for i, name in enumerate(names):
        start = time.perf_counter()
        try:
            with _export_mode():
                torch.onnx.export(model, tuple(inputs.values()), str(path), input_names=list(inputs),
                                  output_names=list(output_names), **EXPORTERS[name])
            if i + 1 < len(names):
                _type_check(path)
        except Exception as exc:  # try the next exporter; report all if none works
            errors.append(f"{name}: {_short(exc)}")
            continue
        return {"exporter": name, "opset": EXPORTERS[name]["opset_version"],
                "export_s": round(time.perf_counter() - start, 2), "onnx_mib": round(path.stat().st_size / MIB, 1)}
    raise RuntimeError("ONNX export failed: " + " | ".join(errors))


def _type_check(path: Path) -> None:
    """onnx's shape inference in strict mode with type checks (raises on a type error)."""
    import onnx

    checked = path.with_name(path.name + ".checked")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(checked), check_type=True, strict_mode=True)
    finally:
        checked.unlink(missing_ok=True)


# --- systems -----------------------------------------------------------------------------------

@dataclass
class Context:
    """What a system needs to set itself up for one case."""

    model: nn.Module
    inputs: dict
    output_names: tuple
    onnx_path: Optional[Path]
    onnx_error: Optional[str]
    cuda: bool
    machine: object = None  # rtxjit.exec.roofline.Machine of this GPU (None on a CPU)


@dataclass
class Runner:
    """One system made ready: ``call()`` runs one inference (outputs first-output-first).
    ``launches()``, when given, counts kernel launches per inference without a profiler."""

    call: Callable
    launches: Optional[Callable] = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class System:
    name: str
    label: str
    make: Callable  # Context -> Runner
    gpu_only: bool = False  # skipped by --dry-run


def make_eager(ctx: Context) -> Runner:
    args = tuple(ctx.inputs.values())
    return Runner(lambda: ctx.model(*args))


def make_compiled(ctx: Context, mode: Optional[str] = None, backend: str = "inductor") -> Runner:
    """torch.compile; its compile happens in the first call (reported as first-call seconds)."""
    compiled = torch.compile(ctx.model, mode=mode, backend=backend)
    args = tuple(ctx.inputs.values())
    if mode != "reduce-overhead":
        return Runner(lambda: compiled(*args))

    def call():
        torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay may be overwritten
        return compiled(*args)

    return Runner(call)


def make_rtxjit(ctx: Context) -> Runner:
    """An rtxjit session over the exported ONNX file, fed torch tensors already on the device."""
    if ctx.onnx_path is None:
        raise RuntimeError(ctx.onnx_error or "no ONNX file")
    start = time.perf_counter()
    sess = rtxjit.InferenceSession(str(ctx.onnx_path), device="cuda" if ctx.cuda else "cpu")
    wanted = {i.name for i in sess.get_inputs()}  # an exporter may drop an unused input
    feeds = {n: t for n, t in ctx.inputs.items() if n in wanted}
    outputs = [o.name for o in sess.get_outputs()]
    first = ctx.output_names[0]
    names = [first] + [n for n in outputs if n != first] if first in outputs else outputs
    sess.run(names, feeds)  # the first run is served by generic kernels; time the specialized ones
    _sync(ctx.cuda)
    info: dict = {"first_output_s": time.perf_counter() - start}
    start = time.perf_counter()
    sess.wait_for_specialization(timeout=900)
    info["specialize_wait_s"] = time.perf_counter() - start
    return Runner(lambda: sess.run(names, feeds), launches=lambda: rtxjit_launches(sess, info, ctx.machine),
                  info=info)


def rtxjit_launches(sess, info: dict, machine=None) -> int:
    """Kernel launches per inference of the session's last plan; also records into ``info`` the
    kernel mix, the optimized graph's ops, rtxjit's own activation memory (its arena) and the
    plan's bytes and flops; with a ``machine``, their roofline floor (``floor_ms``)."""
    plan = sess.last_executable.plan
    info["rtxjit_kernels"] = dict(Counter(step.kernel.name for step in plan.steps))
    info["rtxjit_ops"] = dict(Counter(n.attrs["anchor"] + "+epilogue" if n.op == "rtxjit.Epilogue" else n.op
                                      for n in sess.graph.nodes))
    info["rtxjit_activation_mib"] = sess.activation_bytes / 2**20
    info.update(plan_floor(plan, machine))
    return sess.launches_per_inference


def plan_floor(plan, machine=None) -> dict:
    """What a plan must move and compute (rtxjit/exec/roofline.py counts each launch from its
    buffers and sizes) and, with a measured ``machine``, the floor time that allows: the sum over
    launches of max(bytes / bandwidth, flops / peak), as ``rtxjit profile`` totals it."""
    counts = roofline.plan_counts(plan)
    out = {"plan_bytes": sum(c.bytes for c in counts), "plan_flops": sum(c.flops for c in counts)}
    if machine is not None:
        out["floor_ms"] = sum(machine.floor(c) for c in counts) * 1e3
    return out


def make_rtxjit_backend(ctx: Context) -> Runner:
    """torch.compile(backend="rtxjit"): the first call exports and imports the graph, then timed
    after the background specialization of every session it made."""
    import rtxjit.torch as rtxjit_torch

    compiled = torch.compile(ctx.model, backend="rtxjit")
    args = tuple(ctx.inputs.values())

    def call():
        with torch.no_grad():
            return compiled(*args)

    call()
    for sess in rtxjit_torch.sessions():
        sess.wait_for_specialization(timeout=900)
    return Runner(call)


def make_compile_graph(ctx: Context) -> Runner:
    """torch.compile's compiled callable (default mode) captured in a torch.cuda.CUDAGraph, its
    replays timed: what a user who graphs the compiled model runs, with none of reduce-overhead's
    per-call guards and cudagraph-tree bookkeeping. The reference of every ratio. Compiled by its
    first call, outside the capture; its launches are the compiled callable's kernels, counted by
    the profiler before the capture (inside a graph the profiler may not see them)."""
    from benchmarks.zoo_gpu import graphed  # imported here: zoo_gpu imports this module

    compiled = torch.compile(ctx.model)
    args = tuple(ctx.inputs.values())

    def call():
        return compiled(*args)

    call()
    kernels = profile_kernels(call)["kernels_profiled"] if ctx.cuda else None
    return Runner(graphed(call, ctx.cuda), launches=lambda: kernels,
                  info={"launches_source": "profiler, compiled callable before capture"})


# Add a system here and it shows up in every table. The order is the running order: with a
# --time-limit, what matters most is measured first.
SYSTEMS = [
    System("eager", "eager PyTorch", make_eager),
    System("compile_graph", "torch.compile, CUDA-graph replay", make_compile_graph, gpu_only=True),
    System("rtxjit", "rtxjit", make_rtxjit),
    System("compile_cudagraphs", 'torch.compile mode="reduce-overhead" (CUDA graphs)',
           partial(make_compiled, mode="reduce-overhead"), gpu_only=True),
    System("compile", "torch.compile", make_compiled, gpu_only=True),
    System("compile_rtxjit", 'torch.compile(backend="rtxjit")', make_rtxjit_backend, gpu_only=True),
]
EAGER, REFERENCE, CUDAGRAPHS = "eager", "compile_graph", "compile_cudagraphs"


# --- measurement -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    iters: int
    warmup: int
    cuda: bool
    exporter: str = "auto"


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _short(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in fp32 (nan if the shapes differ or anything is not finite)."""
    out, ref = out.detach().float(), ref.detach().float()
    if out.shape != ref.shape:
        return float("nan")
    scale = ref.abs().max().item() or 1.0
    return (out - ref).abs().max().item() / scale


def time_calls(call: Callable, iters: int, cuda: bool) -> dict:
    """Latency per inference: each call synchronized, timed by CUDA events (wall clock on a CPU)."""
    device_ms, wall_ms = [], []
    for _ in range(iters):
        _sync(cuda)
        start_wall = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        call()
        if cuda:
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
        wall_ms.append((time.perf_counter() - start_wall) * 1e3)
    times = device_ms or wall_ms
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
            "wall_median_ms": statistics.median(wall_ms), "iters": iters,
            "timer": "cuda_events" if cuda else "perf_counter"}


def measure_memory(call: Callable, baseline: int) -> dict:
    """Peak during one steady-state call; activation = peak - memory resident just before it.

    ``resident_extra_mib`` is what the system keeps between calls beyond the eager model and inputs
    (rtxjit's own copy of the weights, a CUDA-graph memory pool).
    """
    gc.collect()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"peak_mib": peak / MIB, "activation_mib": (peak - resident) / MIB,
            "resident_extra_mib": (resident - baseline) / MIB}


def profile_kernels(call: Callable, iters: int = PROFILE_ITERS) -> dict:
    """CUDA kernels (not memcpy/memset) and CUDA-graph launches per call, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    kernels = attached = graphs = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels += not e.name.startswith(("Memcpy", "Memset"))
        else:
            attached += len(getattr(e, "kernels", []) or [])
            graphs += e.name in ("cudaGraphLaunch", "cuGraphLaunch")
    return {"kernels_profiled": (kernels or attached) / iters, "graph_launches": graphs / iters}


def count_launches(runner: Runner, cuda: bool) -> dict:
    """The system's own count if it has one, else the profiler's; profiler numbers kept as well."""
    counts = {}
    if cuda:
        try:
            counts.update(profile_kernels(runner.call))
        except Exception as exc:  # a profiler problem must not lose the timing
            counts["profile_error"] = _short(exc)
    own = runner.launches() if runner.launches else None
    if own is not None:
        counts.update(launches=own, launches_source="plan")
    elif counts.get("kernels_profiled"):
        counts.update(launches=counts["kernels_profiled"], launches_source="profiler")
    return counts


def set_up_system(system: System, ctx: Context, settings: Settings) -> tuple:
    """``(record, runner)``: the system made ready and called once (``setup_s``, ``first_call_s``);
    runner None and the record's ``error`` set if that failed. The record keeps the memory the
    system holds from then on (``_resident``)."""
    record = {"system": system.name, "label": system.label}
    runner = None
    try:
        baseline = torch.cuda.memory_allocated() if settings.cuda else 0
        start = time.perf_counter()
        runner = system.make(ctx)
        record["setup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        runner.call()
        _sync(settings.cuda)
        record["first_call_s"] = time.perf_counter() - start
        if settings.cuda:
            gc.collect()
            record["_resident"] = torch.cuda.memory_allocated() - baseline
    except Exception as exc:
        record["error"] = _short(exc)
        record["traceback"] = traceback.format_exc(limit=8)
        runner = None
    return record, runner


def measure_system(record: dict, runner: Runner, ref: dict, settings: Settings) -> dict:
    """Warm-up, check against ``ref`` ({"eager": fp16 output, "fp32": output or None, "eager_vs_fp32"}), time, memory and launches of a system set up by
    ``set_up_system``; an exception becomes the record's error."""
    try:
        for _ in range(settings.warmup):
            runner.call()
        out = _first(runner.call())
        record["max_rel_err"] = rel_err(out, ref["eager"])
        record["rel_err_ok"] = record["max_rel_err"] <= REL_ERR_LIMIT
        if ref.get("fp32") is not None:  # judged against fp32 where eager fp16 is itself that far off
            record["err_vs_fp32"] = rel_err(out, ref["fp32"])
            record["rel_err_ok"] |= (ref["eager_vs_fp32"] > REL_ERR_LIMIT / 2
                                     and record["err_vs_fp32"] <= 1.5 * ref["eager_vs_fp32"])
        record.update(time_calls(runner.call, settings.iters, settings.cuda))
        if settings.cuda:
            record.update(measure_memory(runner.call, 0))
            record["resident_extra_mib"] = record["_resident"] / MIB  # what it kept beyond the eager model
        record.update(count_launches(runner, settings.cuda))
        record.update(runner.info)
    except Exception as exc:
        record["error"] = _short(exc)
        record["traceback"] = traceback.format_exc(limit=8)
    record.pop("_resident", None)
    return record


def run_system(system: System, ctx: Context, ref: dict, settings: Settings) -> dict:
    """Set up, first call, warm-up, check, time, memory, launches; an exception becomes 'error'."""
    record, runner = set_up_system(system, ctx, settings)
    try:
        if runner is not None:  # a failed set-up leaves no runner (and no _resident)
            measure_system(record, runner, ref, settings)
    finally:
        del runner
        _release(settings.cuda)
    return record


def _release(cuda: bool) -> None:
    """Drop compiled graphs and cached memory so that the next system starts clean."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _seed() -> None:
    import random

    import numpy as np

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # seeds every CUDA device as well


def missing_packages(case: Case) -> list:
    return [name for name in case.requires if importlib.util.find_spec(name) is None]


def run_case(case: Case, systems: list, settings: Settings, tmp: Path, progress: Optional[Callable] = None,
             gate: Optional["FileGate"] = None) -> tuple:
    """All systems on one case; returns (case info, records). A failed build fails every system; a
    case whose packages are missing is skipped (no records). ``progress(info, records)`` is called
    after every system, so a process stopped mid-case still leaves what it measured. With a
    ``gate``, every system is set up first, then the case waits for its turn and times them all."""
    device = torch.device("cuda" if settings.cuda else "cpu")
    info = {"case": case.name}
    missing = missing_packages(case)
    if missing:
        info["skipped"] = f"needs {', '.join(missing)} (not installed)"
        return info, []
    try:
        _seed()
        model, inputs = case.build(device)
        ref = {"eager": _first(model(*inputs.values())).detach().clone()}
        ref["fp32"] = _fp32_reference(model, inputs)
        if ref["fp32"] is not None:
            ref["eager_vs_fp32"] = info["eager_vs_fp32"] = rel_err(ref["eager"], ref["fp32"])
    except Exception as exc:
        info["error"] = _short(exc)
        return info, [{"case": case.name, "system": s.name, "label": s.label,
                       "error": "case setup failed: " + info["error"]} for s in systems]
    info["inputs"] = {n: [list(t.shape), str(t.dtype).replace("torch.", "")] for n, t in inputs.items()}
    onnx_path, onnx_error = _export_case(case, model, inputs, settings.exporter, tmp, info)
    ctx = Context(model, inputs, case.output_names, onnx_path, onnx_error, settings.cuda, _machine(settings, info))
    if gate is not None:
        return _run_gated(case, systems, settings, ctx, ref, info, gate, progress)
    records = []
    for system in systems:
        print(f"[{case.name}] {system.name} ...", flush=True)
        records.append({"case": case.name, **run_system(system, ctx, ref, settings)})
        _fill_graph_launches(records)
        derive(info, records)
        if progress is not None:
            progress(info, records)
    return info, records


def _fp32_reference(model: nn.Module, inputs: dict) -> Optional[torch.Tensor]:
    """The first output of an fp32 copy of ``model`` (TF32 off) on the inputs widened to fp32: what
    judges a case whose eager fp16 output is itself far from it (random weights in a deep net);
    None if the model does not run so (a half-only kernel)."""
    import copy

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        wide = copy.deepcopy(model).float()
        feeds = [t.float() if t.is_floating_point() else t for t in inputs.values()]
        with torch.no_grad():
            return _first(wide(*feeds)).detach().float().clone()
    except Exception:  # noqa: BLE001 - the fp16 reference still judges the case
        return None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        wide = None


def _run_gated(case: Case, systems: list, settings: Settings, ctx: Context, ref, info: dict, gate: "FileGate",
               progress: Optional[Callable]) -> tuple:
    """``run_case`` with a gate: set up every system, wait for the turn, time each."""
    prepared = []
    for system in systems:
        print(f"[{case.name}] {system.name} setting up ...", flush=True)
        record, runner = set_up_system(system, ctx, settings)
        prepared.append(({"case": case.name, **record}, runner))
    records = [r for r, _ in prepared]
    if progress is not None:
        progress(info, [{k: v for k, v in r.items() if k != "_resident"} for r in records])
    info["gate_wait_s"] = round(gate.wait(), 1)
    info["timed_from"] = time.time()  # wall-clock stamps: the parent lets one case time at a time
    for i, (record, runner) in enumerate(prepared):
        print(f"[{case.name}] {record['system']} timing ...", flush=True)
        if runner is not None:
            measure_system(record, runner, ref, settings)
        prepared[i] = (record, None)
        del runner
        _fill_graph_launches(records)
        derive(info, records)
        if progress is not None:
            progress(info, records)
    del prepared
    _release(settings.cuda)
    info["timed_until"] = time.time()
    return info, records


class FileGate:
    """A case process's side of the gate of ``--jobs``: it writes ``<dir>/<case>.ready`` once set
    up and waits until the parent writes ``<dir>/<case>.go``."""

    def __init__(self, folder: Path, case: str):
        self.ready, self.go = Path(folder) / f"{case}.ready", Path(folder) / f"{case}.go"

    def wait(self) -> float:
        """Seconds spent waiting for the turn."""
        self.ready.touch()
        start = time.perf_counter()
        while not self.go.exists():
            time.sleep(GATE_POLL_S)
        return time.perf_counter() - start


GATE_POLL_S = 0.05


def _machine(settings: Settings, info: dict):
    """The GPU's measured bandwidth and peaks (rtxjit.exec.roofline.measure_machine, about a
    second), for the roofline floor of rtxjit's plan; None on a CPU."""
    if not settings.cuda:
        return None
    try:
        machine = roofline.measure_machine()
    except Exception as exc:  # no roofline column then, but the timings still count
        info["machine_error"] = _short(exc)
        return None
    info["machine"] = {"bandwidth_gbs": machine.bandwidth / 1e9, "peak_fp16_tflops": machine.peak_fp16 / 1e12,
                       "peak_fp32_tflops": machine.peak_fp32 / 1e12}
    return machine


def derive(info: dict, records: list) -> None:
    """Per record: speedup vs eager, ratio = its time / compile_graph's (< 1 is faster) and
    roofline = the floor of rtxjit's plan / its time. The floor comes from rtxjit's plan (its
    bytes and flops over the measured ceilings; rtxjit/exec/roofline.py): the same work floor for
    every system of the case, so the roofline column orders systems as their times do."""
    by_name = {r["system"]: r for r in records}
    floor = by_name.get("rtxjit", {}).get("floor_ms")
    if floor is not None:
        info["floor_ms"] = floor
    def ms(name: str) -> Optional[float]:
        r = by_name.get(name, {})
        return None if "error" in r else r.get("median_ms")

    eager, reference = ms(EAGER), ms(REFERENCE)
    for r in records:
        if "median_ms" not in r or "error" in r:
            continue
        if eager is not None:
            r["speedup_vs_eager"] = eager / r["median_ms"]
        if reference is not None:
            r["ratio_vs_compile_graph"] = r["median_ms"] / reference
        if floor is not None:
            r["roofline"] = floor / r["median_ms"]


def _export_case(case: Case, model, inputs: dict, exporter: str, tmp: Path, info: dict) -> tuple:
    """(ONNX path, None) or (None, error text); what happened is added to ``info``."""
    path = tmp / f"{case.name}.onnx"
    try:
        info.update(export_onnx(model, inputs, case.output_names, path, exporter))
        return path, None
    except Exception as exc:
        info["export_error"] = str(exc)[:2000]
        return None, info["export_error"]


def _fill_graph_launches(records: list) -> None:
    """reduce-overhead's CUDA-graph replay: if the profiler did not see the kernels inside the
    graph, use torch.compile's count (the same kernels, captured), from compile_graph or compile."""
    by_name = {r["system"]: r for r in records}
    graph = by_name.get(CUDAGRAPHS)
    if not graph or "error" in graph or graph.get("launches"):
        return
    for name in (REFERENCE, "compile"):
        plain = by_name.get(name)
        if plain and "error" not in plain and plain.get("launches"):
            graph.update(launches=plain["launches"], launches_source=f"same as {name} (graph not visible)")
            return


# --- report ------------------------------------------------------------------------------------

def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(cuda: bool) -> dict:
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": "CPU (Triton interpreter)", "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton.__version__, "rtxjit": rtxjit.__version__, "onnx": _version("onnx"),
           "onnxscript": _version("onnxscript"), "torchvision": _version("torchvision"),
           "transformers": _version("transformers"), "python": platform.python_version()}
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        env["device"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return env


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _row(r: dict) -> str:
    if "error" in r:
        cells = [r["case"], r["system"], "error"] + ["—"] * 7
    else:
        err = _fmt(r.get("max_rel_err"), ".1e") + f" / {_fmt(r.get('err_vs_fp32'), '.1e')}" + (
            "" if r.get("rel_err_ok") else " (!)")
        launches = r.get("launches")
        cells = [r["case"], r["system"], f"{r['median_ms']:.3f}", _fmt(r.get("speedup_vs_eager"), ".2f"),
                 _fmt(r.get("ratio_vs_compile_graph"), ".2f"), "—" if launches is None else f"{launches:g}",
                 _fmt(None if r.get("roofline") is None else 100 * r["roofline"], ".1f"),
                 _fmt(r.get("activation_mib"), ".1f"), err,
                 f"{r.get('first_output_s', r.get('setup_s', 0.0) + r['first_call_s']):.2f}"]
    return "| " + " | ".join(cells) + " |"


def summary(results: list, system: str = "rtxjit") -> dict:
    """``system``'s time / compile_graph's over the cases where both ran: geometric mean, worst
    case, and issue 18's bar (geomean <= 0.9, every case <= 1.1)."""
    ratios = {r["case"]: r["ratio_vs_compile_graph"] for r in results
              if r["system"] == system and r.get("ratio_vs_compile_graph") is not None}
    if not ratios:
        return {}
    geomean = math.exp(statistics.fmean(math.log(x) for x in ratios.values()))
    worst = max(ratios, key=ratios.get)
    return {"system": system, "cases": len(ratios), "geomean_ratio": geomean, "worst_case": worst,
            "worst_ratio": ratios[worst], "over_1_1": sorted(c for c, x in ratios.items() if x > 1.1),
            "meets_issue_18": len(ratios) >= 12 and geomean <= 0.9 and ratios[worst] <= 1.1}


def markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    cuda = f" (CUDA {env['cuda']})" if env["cuda"] else ""
    lines = [
        "# rtxjit model benchmarks", "",
        f"{env['device']} · torch {env['torch']}{cuda} · triton {env['triton']} · "
        f"rtxjit {env['rtxjit']} · {env['date']}", "",
        f"fp16, random weights, {'one process per case' if s.get('isolate') else 'all cases in one process'}"
        f"{f' ({jobs} set up at once, timed one at a time)' if (jobs := s.get('jobs') or 1) > 1 else ''}. "
        f"Median of {s['iters']} calls after {s['warmup']} warm-up calls, each call synchronized and timed by "
        f"{'CUDA events' if s['cuda'] else 'the wall clock'}. Reference: `{REFERENCE}` = torch.compile's compiled "
        f"callable captured in a torch.cuda.CUDAGraph, its replays timed; ratio = this median / its median "
        f"(< 1 is faster); speedup vs eager = eager's median / this median. Launches = kernels per inference. "
        f"% roofline = the floor of rtxjit's plan (each launch's bytes and flops over the GPU's measured "
        f"bandwidth and peaks, rtxjit/exec/roofline.py) / this median. Activation = peak during one call minus "
        f"memory resident before it. Max rel err = max|out - ref| / max|ref| on the first output, ref = eager "
        f"fp16 / an fp32 copy of the model (TF32 off); flagged (!) above {REL_ERR_LIMIT:g} vs eager fp16 unless "
        f"eager fp16 is itself over {REL_ERR_LIMIT / 2:g} off fp32 and this output at most 1.5x as far as it. First output = setup + first call, compilation included (rtxjit: its "
        f"session and first run, on its fallback kernels; the wait for the specialized kernels that the timing "
        f"uses is `specialize_wait_s` in the JSON){'; setups of several cases ran at once' if jobs > 1 else ''}.",
        "",
        "| case | system | median ms | speedup vs eager | ratio vs compile_graph | launches | % roofline | "
        "activation MiB | max rel err vs fp16 / fp32 | first output s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in report["cases"]:
        lines += [_row(r) for r in report["results"] if r["case"] == case["case"]]
    total = summary(report["results"])
    if total:
        lines += ["", f"rtxjit / compile_graph over {total['cases']} cases: geometric mean "
                      f"{total['geomean_ratio']:.2f}, worst {total['worst_ratio']:.2f} ({total['worst_case']}); "
                      f"above 1.1: {', '.join(total['over_1_1']) or 'none'}. Issue 18's bar (>= 12 cases, geomean "
                      f"<= 0.9, every case <= 1.1): {'met' if total['meets_issue_18'] else 'not met'}."]
    skipped = [c for c in report["cases"] if "skipped" in c]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {c['case']}: {c['skipped']}" for c in skipped]
    if report.get("not_run"):
        lines += ["", f"Not run (--time-limit reached; rerun with --resume): {', '.join(report['not_run'])}"]
    errors = [r for r in report["results"] if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['case']} / {r['system']}: `{' '.join(r['error'].split())[:300]}`"
                                       for r in errors]
    return "\n".join(lines) + "\n"


def _plain(value):
    """JSON-safe: nan/inf become null, floats keep 6 significant digits, odd objects become strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_report(report: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(_plain(report), indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))


# --- command line ------------------------------------------------------------------------------

def _pick(names: Optional[str], items: list, what: str) -> list:
    if not names:
        return items
    known = {i.name: i for i in items}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {sorted(known)}")
    return [known[n] for n in wanted]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="comma-separated subset, e.g. resnet50_b1,bert_base_s128_b1")
    p.add_argument("--systems", help="comma-separated subset of " + ",".join(s.name for s in SYSTEMS))
    p.add_argument("--iters", type=int, help="timed calls per system (default 100; --quick 10; --dry-run 3)")
    p.add_argument("--warmup", type=int, help="calls after the first, before timing (default 20; --quick 3)")
    p.add_argument("--exporter", choices=["auto", *EXPORTERS], default="auto",
                   help="ONNX exporter; auto tries torchscript (dynamo=False), then dynamo")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for JSON + markdown")
    p.add_argument("--quick", action="store_true", help="few iterations, to check that everything runs")
    p.add_argument("--merge", action="store_true", help="keep the other cases of an earlier run's JSON")
    p.add_argument("--resume", action="store_true",
                   help="--merge, and skip the cases that the earlier JSON already holds complete")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="one process per case (default): no compile cache, allocator state or poisoned "
                        "CUDA context carries from one model to the next")
    p.add_argument("--time-limit", type=float,
                   help="seconds for the whole run: no case starts with less than %d s left, and with "
                        "--isolate a case still running at the limit is stopped (what it measured is kept)"
                        % MIN_CASE_S)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU plumbing check: tiny models, eager and rtxjit (Triton interpreter) only")
    p.add_argument("--jobs", type=int, default=1,
                   help="cases set up at once, each in its own process, then timed one at a time (see above)")
    p.add_argument("--setup-wait", type=float, default=240.0,
                   help="--jobs: seconds a ready case waits for the others' setups before it is timed anyway")
    p.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS)  # a case's process writes here
    p.add_argument("--gate", type=Path, help=argparse.SUPPRESS)  # --jobs: the case process's gate folder
    return p.parse_args(argv)


def _merge_previous(report: dict, path: Path, running: set) -> dict:
    """``report`` plus the cases of an earlier run at ``path`` that this run does not repeat (one
    GPU call per case keeps each call short)."""
    if not path.exists():
        return report
    old = json.loads(path.read_text())
    report["cases"] = [c for c in old.get("cases", []) if c.get("case") not in running]
    report["results"] = [r for r in old.get("results", []) if r.get("case") not in running]
    return report


def _complete(path: Path) -> set:
    """Cases of an earlier run's JSON that need no rerun: measured (errors included) or skipped,
    not stopped by a time limit or a crash."""
    if not path.exists():
        return set()
    return {c["case"] for c in json.loads(path.read_text()).get("cases", []) if "incomplete" not in c}


def _worker_argv(args: argparse.Namespace, case: Case, path: Path) -> list:
    """The command line of one case's process: this run's settings, that case, its JSON file."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--cases", case.name, "--no-isolate",
            "--exporter", args.exporter, "--worker-json", str(path)]
    for flag, value in (("--systems", args.systems), ("--iters", args.iters), ("--warmup", args.warmup)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + ["--quick"] * args.quick + ["--dry-run"] * args.dry_run


def run_isolated(case: Case, args: argparse.Namespace, systems: list, tmp: Path, timeout: Optional[float]) -> tuple:
    """One case in its own process (its own session, so a stop ends its compile workers too).
    Returns what the process recorded; the systems it did not finish get an error saying why (the
    time limit, or its exit status and the end of its stderr), and the case is marked incomplete."""
    job = _start_case(case, args, tmp)
    try:
        rc = job.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = job.stop()
    return job.result(rc, systems)


@dataclass
class _CaseJob:
    """A case's process (``_start_case``)."""

    case: Case
    proc: subprocess.Popen
    path: Path
    log: Path
    started: float

    def stop(self):
        """Kill the process group; None (the return code of a stopped case)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return None

    def result(self, rc, systems: list) -> tuple:
        elapsed = time.perf_counter() - self.started
        path, log = self.path, self.log
        done = json.loads(path.read_text()) if path.exists() else {"case": {"case": self.case.name}, "results": []}
        info, records = done["case"], done["results"]
        info["process_s"] = round(elapsed, 1)
        if rc == 0 or "skipped" in info:
            return info, records
        why = (f"stopped by --time-limit after {elapsed:.0f} s" if rc is None else
               f"case process exited with status {rc}: " + " ".join(log.read_text()[-1500:].split()))
        info["incomplete"] = why
        finished = {r["system"] for r in records if "median_ms" in r or "error" in r}
        records = [r for r in records if r["system"] in finished]
        records += [{"case": self.case.name, "system": s.name, "label": s.label, "error": "not measured: " + why}
                    for s in systems if s.name not in finished]
        return info, records


def _start_case(case: Case, args: argparse.Namespace, tmp: Path, gate: Optional[Path] = None) -> _CaseJob:
    path, log = tmp / f"{case.name}.json", tmp / f"{case.name}.log"
    argv = _worker_argv(args, case, path) + (["--gate", str(gate)] if gate is not None else [])
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stderr=err, start_new_session=True)
    return _CaseJob(case, proc, path, log, time.perf_counter())


def run_parallel(cases: list, args: argparse.Namespace, systems: list, tmp: Path, started: float,
                 done: Callable) -> list:
    """``--jobs``: up to ``args.jobs`` case processes set up at once; one at a time is let through
    its gate to time its systems, when no other running case is still setting up (or the oldest
    ready one has waited ``args.setup_wait`` seconds). ``done(info, records)`` is called per case
    as it finishes. Returns the cases not started for lack of time."""
    gate = tmp / "gate"
    gate.mkdir(exist_ok=True)
    pending, running, not_run = list(cases), [], []
    granted, ready_since = None, {}
    while pending or running:
        left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - started)
        while pending and len(running) < args.jobs:
            case = pending.pop(0)
            if left is not None and left < MIN_CASE_S and not missing_packages(case):
                not_run.append(case.name)
                continue
            print(f"[{case.name}] starting (own process, {args.jobs} at once)", flush=True)
            running.append(_start_case(case, args, tmp, gate))
        for job in list(running):
            rc = job.proc.poll()
            if rc is None and left is not None and left <= 0:
                rc = job.stop()
            elif rc is None:
                continue
            running.remove(job)
            granted = None if granted is job else granted
            done(*job.result(rc, systems))
        now = time.perf_counter()
        ready = [j for j in running if (gate / f"{j.case.name}.ready").exists()]
        for j in ready:
            ready_since.setdefault(j.case.name, now)
        if granted is None and ready:
            first = ready[0]
            if len(ready) == len(running) or now - ready_since[first.case.name] >= args.setup_wait:
                granted = first
                (gate / f"{first.case.name}.go").touch()
        time.sleep(GATE_POLL_S)
    return not_run


def _write_worker(path: Path, info: dict, records: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_plain({"case": info, "results": records})))
    os.replace(tmp, path)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA GPU visible to torch; use --dry-run to check the script on a CPU")
    started = time.perf_counter()
    fast = args.quick or args.dry_run
    settings = Settings(iters=args.iters or (3 if args.dry_run else 10 if args.quick else 100),
                        warmup=args.warmup if args.warmup is not None else (1 if args.dry_run else 3 if fast else 20),
                        cuda=cuda, exporter=args.exporter)
    cases = _pick(args.cases, DRY_RUN_CASES if args.dry_run else CASES, "case")
    systems = [s for s in _pick(args.systems, SYSTEMS, "system") if cuda or not s.gpu_only]
    if args.worker_json:  # one case's process (see run_isolated)
        with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
            gate = FileGate(args.gate, cases[0].name) if args.gate is not None else None
            info, records = run_case(cases[0], systems, settings, Path(tmp),
                                     progress=partial(_write_worker, args.worker_json), gate=gate)
        _write_worker(args.worker_json, info, records)
        return 0
    stem = "bench_models_dryrun" if args.dry_run else "bench_models"
    report = {"environment": environment(cuda),
              "settings": vars(settings) | {"dry_run": args.dry_run, "isolate": args.isolate,
                                            "time_limit_s": args.time_limit, "jobs": args.jobs},
              "cases": [], "results": []}
    if args.resume:
        done = _complete(args.out / f"{stem}.json")
        cases = [c for c in cases if c.name not in done]
    if args.merge or args.resume:
        report = _merge_previous(report, args.out / f"{stem}.json", {c.name for c in cases})
    report["not_run"] = []
    def finished(info: dict, records: list) -> None:
        report["cases"].append(info)
        report["results"] += records
        report["summary"] = summary(report["results"])
        write_report(report, args.out, stem)  # after every case, so a crash keeps what was measured

    with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
        if args.isolate and args.jobs > 1:
            report["not_run"] = run_parallel(cases, args, systems, Path(tmp), started, finished)
            cases = []
        for case in cases:
            left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - started)
            if left is not None and left < MIN_CASE_S and not missing_packages(case):
                report["not_run"].append(case.name)
                continue
            print(f"[{case.name}] starting ({'own process' if args.isolate else 'this process'})", flush=True)
            if args.isolate:
                finished(*run_isolated(case, args, systems, Path(tmp), left))
            else:
                finished(*run_case(case, systems, settings, Path(tmp)))
    report["summary"] = summary(report["results"])
    write_report(report, args.out, stem)
    print(markdown(report))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
