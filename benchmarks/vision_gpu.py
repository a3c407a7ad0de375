"""Issue 15 on a GPU, fp16 with random weights: every torchvision classification, segmentation and
video model through rtxjit against eager PyTorch (``--part torchvision``), and the named diffusion
and speech models at full size against eager and torch.compile + CUDA-graph replay (``--part models``).

    python benchmarks/vision_gpu.py --part torchvision --out /tmp/vg --mirror $OUT --deadline 570
    python benchmarks/vision_gpu.py --part torchvision --resume-from EARLIER.jsonl ...   # the rest
    python benchmarks/vision_gpu.py --part torchvision --models 'resnet.*,vit_b_16' --workers 4
    python benchmarks/vision_gpu.py --part models --out /tmp/vgm --mirror $OUT      # 5 models at once
    python benchmarks/vision_gpu.py --part models --tiny --iters 1                  # CPU smoke run
    python benchmarks/vision_gpu.py --part torchvision --fake                       # CPU: the pool on stand-ins

Each model runs in its own subprocess (its own timeout, killed with its process group), several at
once, all sharing one rtxjit runtime cache (``DIR/rtxjit_cache``; Triton's own cache is shared
anyway), so a kernel common to many models compiles once. A subprocess rewrites its record
(``DIR/records/<name>.json``) after every stage, so a model killed by its timeout still says where
it stood; the parent appends each finished record to ``DIR/<part>.jsonl`` (flushed and synced) and
rewrites ``DIR/<part>.md`` at once (and copies both to ``--mirror``, e.g. a device machine's $OUT):
a run cut short keeps everything finished before. ``--resume`` skips the models already in DIR's
JSONL file, ``--resume-from FILE`` those in an earlier command's (``--rerun timeout,error`` runs
those statuses again), so the list can be covered by several commands of a few minutes each;
``--deadline S`` stops starting models when S seconds are nearly spent and ends the unfinished ones
unrecorded (not theirs to blame: the next resumed run starts them first, largest first).

torchvision part. ``list_models`` of ``torchvision.models`` (classification), ``.segmentation`` and
``.video``; ``weights=None`` (segmentation also ``weights_backbone=None``: no download), eval, fp16
on the GPU, zero-initialized parameters randomized (bench_models' ``_randomize_zero_inits``), batch
1. Input size: a ViT's own ``image_size``, else the crop size of the builder's first weights'
transform (inception_v3 299, efficientnet_b7 600, ...), else 224; segmentation ``--seg-size``
(520, the weights' resize size); video 8 x 112 x 112 raised to the weights' ``min_temporal_size``
and ``min_size`` (MViT 16 x 224 x 224: its positional embedding is built for that size; S3D
14 x 224 x 224). Export: the fp16 model on the GPU, TorchScript exporter (``dynamo=False``, opset
17; bench_models' ``export_onnx``, which also turns nn.MultiheadAttention's fused fast path off), so
rtxjit runs the fp16 graph eager runs, with no fp32 copy and no precision pass between them. Only if
that export raises, the fp32 model is exported on the CPU and run with ``precision="fp16"`` (fp32
in and out); the record's ``export`` says which. One rtxjit run on the generic kernels
(``specialize="none"``; ``--second-run``: specialize in the background, wait, run again and record
that error and the JIT's counters too). Errors: ``err`` = max|rtxjit - eager fp16| / max|eager fp16|
(tolerance ``--tol`` 1e-2, NaN positions must agree); ``eager_vs_fp32`` = eager fp16 against eager
fp32 (cuDNN/cuBLAS TF32 off), and ``err_vs_fp32`` = rtxjit against eager fp32: a model whose eager
fp16 is itself far from fp32 is ill-conditioned, not mis-compiled.

models part. tests/zoo/vision_archs.py ``build(name, "full")`` (SD-1.5 UNet2DConditionModel at
512 x 512: latents 64 x 64, batch 2; the SD AutoencoderKL decoder, latents 64 x 64; the FLUX-style
transformer, dynamo export only: the TorchScript exporter has no aten::rms_norm; wav2vec2-base,
1 s of audio) and tests/zoo/archs.py (Whisper-base encoder, batch 4, left-padded as
benchmarks/zoo_gpu.py runs it). Eager, torch.compile captured in a CUDA graph and rtxjit (after its
specialized kernels are in) are timed with zoo_gpu's helpers; all models compile side by side, then
time one at a time (zoo_gpu's ``Gate``; this parent marks a dead model ready, so none waits for it,
and opens the barrier for all at 0.6 of the per-model timeout, so one slow compile cannot push the
others past theirs).
Without diffusers the three diffusers models are recorded as "no diffusers".
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import rtxjit  # noqa: E402  (before triton, transformers and diffusers: on a CPU it turns the interpreter on)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.bench_models import _randomize_zero_inits, export_onnx  # noqa: E402
from benchmarks.zoo_gpu import Gate, _error, first, graphed, rel_err, time_ms  # noqa: E402

FP16_TOL = 1e-2
FAMILIES = ("classification", "segmentation", "video")
VIDEO_MIN = (8, 112)  # frames, side
LAUNCH_MARGIN_S = 45  # with --deadline: no model starts with less time than this left
BARRIER_RELEASE = 0.6  # models part: the timing barrier opens for all at this fraction of the timeout


# --- torchvision cases --------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A model to check: its builder's name, its family, and a size used only to start the largest
    first (the first weights' ``num_params``; 0 when unknown), so the slowest do not form the tail."""

    name: str
    family: str
    params: int = 0


def torchvision_cases() -> list:
    import torchvision.models as tvm

    modules = {"classification": tvm, "segmentation": tvm.segmentation, "video": tvm.video}
    cases = []
    for family, module in modules.items():
        for name in tvm.list_models(module=module):
            weights = _first_weights(name)
            cases.append(Case(name, family, weights.meta.get("num_params", 0) if weights is not None else 0))
    return cases


def _first_weights(name: str):
    """The builder's first weights entry (metadata and transform only; nothing is downloaded)."""
    import torchvision.models as tvm

    try:
        return next(iter(tvm.get_model_weights(name)))
    except (StopIteration, ValueError, KeyError):
        return None


def build_torchvision(case: Case, seg_size: int, device: torch.device):
    """(module in eval mode, fp32, returning one tensor; input shape). Built on ``device``: a GPU
    initializes ViT-H's 632M random parameters in a fraction of the CPU's time."""
    import torchvision.models as tvm

    kwargs = {"weights": None}
    if case.family == "segmentation":
        kwargs["weights_backbone"] = None
    torch.manual_seed(0)
    try:
        with device:
            model = tvm.get_model(case.name, **kwargs)
    except Exception:  # a builder that insists on host tensors: build on the CPU
        if device.type == "cpu":
            raise
        torch.manual_seed(0)
        model = tvm.get_model(case.name, **kwargs)
    weights = _first_weights(case.name)
    meta = weights.meta if weights is not None else {}
    if case.family == "segmentation":
        shape = (1, 3, seg_size, seg_size)
    elif case.family == "video":
        frames = max(VIDEO_MIN[0], meta.get("min_temporal_size", 1))
        side = max(VIDEO_MIN[1], *meta.get("min_size", (1, 1)))
        shape = (1, 3, frames, side, side)
    else:
        side = getattr(model, "image_size", None) or _crop_size(weights) or 224
        shape = (1, 3, side, side)
    return Primary(model).eval(), shape


def _crop_size(weights):
    crop = getattr(getattr(weights, "transforms", None), "keywords", {}).get("crop_size")
    if isinstance(crop, (list, tuple)):
        return int(crop[0])
    return int(crop) if crop else None


class Primary(nn.Module):
    """The model with one tensor out: a segmentation model's ``"out"``, a tuple's first entry."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, dict):
            return out["out"]
        return out[0] if isinstance(out, (tuple, list)) else out


# --- stand-ins: the pool, timeouts, records and summary exercised on a CPU without torchvision --

class _FakeSegmentation(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 5, 1))

    def forward(self, x):
        y = nn.functional.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": y, "aux": y * 2}


class _NoHalfExport(nn.Module):
    """Exports in fp32 only: the fp16 export fails, as some torchvision models might (the fallback)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        if torch.jit.is_tracing() and x.dtype == torch.float16:
            raise RuntimeError("stand-in: no fp16 export")
        return self.body(x)


def _fake_model(name: str):
    if name == "fake_cnn":
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 10)), (1, 3, 16, 16)
    if name == "fake_seg":
        return _FakeSegmentation(), (1, 3, 16, 16)
    if name == "fake_video":
        return nn.Sequential(nn.Conv3d(3, 4, (3, 3, 3), padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                             nn.Flatten(), nn.Linear(4, 6)), (1, 3, 4, 8, 8)
    if name == "fake_fallback":
        return _NoHalfExport(), (1, 3, 8, 8)
    if name == "fake_crash":
        os.abort()
    if name == "fake_error":
        raise RuntimeError("stand-in builder failure\nsecond line of the message")
    if name == "fake_hang":
        time.sleep(3600)
    raise KeyError(name)


FAKE_CASES = [Case("fake_cnn", "classification", 3), Case("fake_seg", "segmentation", 2),
              Case("fake_video", "video", 1), Case("fake_fallback", "classification", 1),
              Case("fake_error", "classification", 0), Case("fake_crash", "classification", 0),
              Case("fake_hang", "classification", 9)]


def build_case(case: Case, job: dict, device: torch.device):
    if job.get("fake"):
        torch.manual_seed(0)
        with device:
            model, shape = _fake_model(case.name)
        return Primary(model).eval(), shape
    return build_torchvision(case, job["seg_size"], device)


# --- one torchvision model (what a worker process runs) ----------------------------------------

class Record:
    """A worker's record, rewritten atomically after every stage (the parent reads what is there
    when the worker dies or is killed)."""

    def __init__(self, path: Path, **fields):
        self.path, self.data = path, dict(fields)
        self.t0 = time.perf_counter()

    def stage(self, name: str, **fields) -> None:
        self.data.update(fields, stage=name, elapsed_s=round(time.perf_counter() - self.t0, 2))
        _write_atomic(self.path, json.dumps(self.data, indent=1, default=str))


def _quiet_reference_math() -> None:
    """fp32 references without TF32 (cuDNN convolutions default to it)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def calibrate_batchnorm(model: torch.nn.Module, shape, dev) -> None:
    """Make a random-weight BatchNorm network as well-conditioned in fp16 as a trained one, in two
    steps (call it once per model; it leaves the model in eval mode, fp32, on ``dev``):

    1. The last BatchNorm of every torchvision ResNet-style residual branch (a module with a
       ``downsample`` attribute: ``bn3`` of a Bottleneck, else ``bn2`` of a BasicBlock) has its
       gamma scaled by 1/sqrt(number of such blocks): small but non-zero, all else left as built and
       randomized (torchvision's ``zero_init_residual`` and Goyal et al. set it to 0; SkipInit/Fixup
       scale the branches down like this), so each block is close to the identity as in trained
       ResNets.
    2. Running statistics from one fp32 eval-mode pass of a random batch of two (``randn``, the
       distribution the check feeds), *uncentered*: each BatchNorm, just before it first runs,
       sets ``running_mean`` to 0 and ``running_var`` to the mean square of its input per channel,
       so every channel leaves it with unit RMS (times gamma, plus beta). Hook by hook in eval
       mode, so each sees exactly what its input will be at inference; BatchNorms the eval forward
       does not reach (inception_v3's auxiliary head) and those without running statistics are
       left alone; a module called twice keeps its first measurement.

    Why statistics at all: with ``weights=None`` they are mean 0, var 1, and a deep network's
    activations grow block by block: resnet101/152, wide_resnet101_2, inception_v3 and the
    resnet101 segmentation nets overflow fp16 in eager PyTorch itself (inf/NaN, H100 run of
    2026-12-07). Why not just the centered batch statistics training would leave (this function's
    earlier form: one train-mode pass): they make a random conv-BN-ReLU network chaotic. A centered
    unit-variance pre-activation through ReLU and the next normalization stretches a small
    perturbation by sqrt(pi / (pi - 1)) ~ 1.21 per layer (the slope at 1 of the centered
    arc-cosine kernel; measured 1.20 on a 40-layer conv-BN-ReLU chain), so fp16 rounding (~1e-3)
    grows to ~1e-1 in a hundred layers: a relative input perturbation of 1e-3 moved the fp32
    resnet101 output by 1.1e-1, as much as fp16 did. It was not tiny variances (min/median >= 0.4
    in the classification ResNets; only deeplabv3's ASPP pooling branch, over two near-identical
    pooled vectors, had variance ~0 and amplified noise, which the uncentered moment avoids),
    logits small against the features, or residual growth (stream std 1 -> 1.6 per stage).
    Uncentered, the gain is ~1.15 per layer; the small residual gammas do the rest.

    Measured on the CPU (torchvision-equivalent modules, seed 0, batch 1, eager fp16 against eager
    fp32, max|diff| / max|fp32|, before -> after): resnet50 3.4e-2 -> 1.1e-3, resnet101 1.1e-1 ->
    1.2e-3, resnet152 1.6e-1 -> 1.5e-3, wide_resnet101_2 8.2e-2 -> 9.2e-4, fcn_resnet101 /
    deeplabv3_resnet101 at 160 x 160 5.4e-1 / 5.6e-1 -> 5.6e-3 / 7.4e-3, resnet34 4.4e-3 -> 6.0e-4;
    without residual blocks of this form only the uncentered statistics act: inception_v3 7.5e-2
    -> 1.8e-2 (still above the tolerance: ~50 conv-BN-ReLU layers deep), mobilenet_v2 1.6e-2 ->
    1.4e-2, an SE + SiLU inverted-residual net 7.7e-3 -> 4.7e-3, densenet121 6.6e-3 -> 2.0e-3,
    vgg16_bn 1.2e-2 -> 4.7e-3. Outputs still depend on the input: another random input
    moves them by 1e-1 to 8e-1 of max|out|, far above the 1e-2 tolerance."""
    blocks = [m for m in model.modules() if hasattr(m, "downsample")
              and isinstance(getattr(m, "bn3", getattr(m, "bn2", None)), torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in blocks:
            norm = getattr(m, "bn3", None) or m.bn2
            if norm.weight is not None:
                norm.weight.mul_(len(blocks) ** -0.5)
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    done = set()

    def measure(m, args):
        if m in done:
            return
        done.add(m)
        x = args[0].detach().float()
        m.running_mean.zero_()
        m.running_var.copy_(x.square().mean([0, *range(2, x.dim())]))

    hooks = [m.register_forward_pre_hook(measure) for m in norms]
    x = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(2)).to(dev)
    model.to(dev, torch.float32).eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def check_torchvision(job: dict, rec: Record) -> None:
    case = Case(job["name"], job["family"])
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if job["dtype"] == "fp16" else torch.float32
    rec.stage("build", family=case.family, device=_device_name(cuda))
    _quiet_reference_math()
    model, shape = build_case(case, job, dev)
    _randomize_zero_inits(model)
    calibrate_batchnorm(model, shape, dev)
    x32 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dev)
    rec.stage("eager", input=list(shape), params=sum(p.numel() for p in model.parameters()))
    with torch.no_grad():
        model.to(dev, torch.float32)
        ref32 = model(x32)
        model.to(dtype)
        x = x32.to(dtype)
        ref = model(x)
    rec.stage("export", eager_vs_fp32=rel_err(ref, ref32), eager_finite=bool(torch.isfinite(ref).all()))
    path = Path(job["tmp"]) / f"{case.name}.onnx"
    precision, feed = None, x
    try:
        info = export_onnx(model, {"input": x}, ("output",), path, "torchscript")
        export = f"torchscript {job['dtype']} on {dev.type}"
    except Exception as exc:  # the fp32 fallback: export on the CPU, rtxjit converts to fp16
        if dtype is torch.float32:
            raise
        rec.stage("export_fallback", export_error=_first_line(exc))
        model32 = copy.deepcopy(model).to("cpu", torch.float32)
        info = export_onnx(model32, {"input": x32.cpu()}, ("output",), path, "torchscript")
        del model32
        export, precision, feed = "torchscript fp32 on cpu, precision=fp16", "fp16", x32
    rec.stage("session", export=export, export_s=info["export_s"], onnx_mib=info["onnx_mib"])
    t = time.perf_counter()
    sess = rtxjit.InferenceSession(str(path), precision=precision, runtime_cache=job["cache"],
                                   specialize="lazy" if job["second_run"] and cuda else "none")
    session_s = time.perf_counter() - t
    rec.stage("run", session_s=round(session_s, 2))
    t = time.perf_counter()
    out = _run(sess, feed).to(ref.device)
    run_s = time.perf_counter() - t
    err = rel_err(out, ref)
    fields = dict(err=err, err_vs_fp32=rel_err(out, ref32), first_run_s=round(run_s, 2),
                  launches=sess.launches_per_inference, out_shape=list(out.shape))
    if out.shape != ref.shape:
        fields["note"] = f"output shape {list(out.shape)}, eager {list(ref.shape)}"
    fields["status"] = _status(err, job["tol"])  # stands if the second run runs out of time
    rec.stage("second_run" if job["second_run"] else "done", **fields)
    if job["second_run"]:
        done = sess.wait_for_specialization(timeout=job["specialize_timeout"])
        out2 = _run(sess, feed).to(ref.device)
        stats = sess.jit_stats()
        rec.stage("done", err_generic=err, err=rel_err(out2, ref), specialized_in_time=done,
                  jit={k: stats.get(k) for k in ("compiles", "cache_hits", "specialized", "rejected", "failed",
                                                 "errors")})
    rec.stage("done", status=_status(rec.data["err"], job["tol"]))


def _run(sess, feed: torch.Tensor) -> torch.Tensor:
    name = sess.get_inputs()[0].name
    return torch.as_tensor(sess.run(None, {name: feed})[0])


def _status(err: float, tol: float) -> str:
    return "ok" if err <= tol else "mismatch"  # NaN (shapes differ) and inf (NaN positions) mismatch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _device_name(cuda: bool) -> str:
    return torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"


# --- the named models at full size (what a worker process runs) --------------------------------

# (model, exporter) that cannot be exported, with the reason: recorded as skipped, never run
NO_EXPORT = {("flux", "torchscript"): "the TorchScript exporter has no aten::rms_norm symbolic "
                                     "(tests/zoo/test_vision_zoo.py's strict xfail)"}
# name -> (package, batch, default exporters)
NAMED = {
    "unet2d": ("diffusers", 2, ("torchscript",)),
    "vae_decoder": ("diffusers", 1, ("torchscript",)),
    "flux": ("diffusers", 1, ("dynamo",)),
    "whisper_encoder": ("transformers", 4, ("torchscript",)),
    "wav2vec2": ("transformers", 1, ("torchscript",)),
}


def build_named(name: str, size: str):
    """(module returning one tensor, feeds dict in argument order), on the CPU in fp32."""
    from tests.zoo import archs, vision_archs

    batch = NAMED[name][1]
    if name == "whisper_encoder":
        model, make_feeds = archs.build(name, size)
        feeds = make_feeds("left", batch, 16)  # Whisper's length is its config's, not this one
        return archs.Wrapped(model, list(feeds)).eval(), feeds
    module, make_feeds = vision_archs.build(name, size)
    return module, make_feeds(batch)


def measure_named(job: dict, rec: Record) -> None:
    from tests.zoo import vision_archs

    name, tiny = job["name"], job["tiny"]
    cuda = torch.cuda.is_available() and not tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    systems = {}
    rec.stage("build", device=_device_name(cuda), size="tiny" if tiny else "full", dtype=str(dtype)[6:],
              batch=NAMED[name][1], systems=systems)
    _quiet_reference_math()
    module, feeds = build_named(name, "tiny" if tiny else "full")
    model32 = copy.deepcopy(module).to(dev, torch.float32) if dtype is not torch.float32 else None
    module = module.to(dev, dtype)
    feeds = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in feeds.items()}
    args = tuple(feeds.values())
    rec.stage("eager", feeds={k: list(v.shape) for k, v in feeds.items()},
              params=sum(p.numel() for p in module.parameters()))
    runners = {}
    with torch.no_grad():
        ref = first(module(*args))
        ref32 = None
        if model32 is not None:
            ref32 = first(model32(*(a.float() if a.is_floating_point() else a for a in args)))
            del model32
            torch.cuda.empty_cache()

        def errs(out) -> dict:
            out = torch.as_tensor(out).to(ref.device)
            return {"err": rel_err(out, ref), **({"err_vs_fp32": rel_err(out, ref32)} if ref32 is not None else {})}

        systems["eager"] = {"err_vs_fp32": rel_err(ref, ref32)} if ref32 is not None else {}
        runners["eager"] = lambda: module(*args)
        if cuda:
            rec.stage("compile_cudagraph")
            try:
                t = time.perf_counter()
                compiled = torch.compile(module)
                compiled(*args)
                replay = graphed(lambda: compiled(*args), cuda)
                systems["compile_cudagraph"] = {**errs(first(replay())), "first_s": time.perf_counter() - t}
                runners["compile_cudagraph"] = replay
            except Exception as exc:
                systems["compile_cudagraph"] = _error(exc)
        tmp = Path(job["tmp"])
        for exporter in job["exporters"]:
            key = f"rtxjit_{exporter}"
            if (name, exporter) in NO_EXPORT:
                systems[key] = {"skipped": NO_EXPORT[name, exporter]}
                continue
            rec.stage(key)
            try:
                t = time.perf_counter()
                path = vision_archs.export(module, feeds, exporter == "dynamo", str(tmp / f"{name}_{exporter}.onnx"))
                export_s = time.perf_counter() - t
                t = time.perf_counter()
                sess = rtxjit.InferenceSession(path, runtime_cache=job["cache"], specialize="lazy" if cuda else "none")
                sfeeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
                generic = sess.run(None, sfeeds)[0]
                first_s = time.perf_counter() - t
                done = sess.wait_for_specialization(timeout=job["specialize_timeout"])
                stats = sess.jit_stats()
                systems[key] = {**errs(sess.run(None, sfeeds)[0]), "err_generic": errs(generic)["err"],
                                "export_s": export_s, "first_s": first_s, "specialized_in_time": done,
                                "launches": sess.launches_per_inference,
                                "jit": {k: stats.get(k) for k in ("compiles", "cache_hits", "specialized", "rejected",
                                                                  "failed", "errors")}}
                runners[key] = (lambda s, f: (lambda: s.run(None, f)))(sess, sfeeds)
            except Exception as exc:
                systems[key] = _error(exc)
        rec.stage("barrier", **_named_status(systems, job["tol"]))  # stands if the timing runs out of time
        gate = Gate()
        gate.barrier(name)
        rec.stage("timing")
        with gate.timing():
            for key, call in runners.items():
                if job["iters"] <= 0:
                    break
                try:
                    systems[key]["ms"] = time_ms(call, job["iters"], cuda)
                except Exception as exc:
                    systems[key].update(_error(exc))
                rec.stage("timing")
    rec.stage("done", **_named_status(systems, job["tol"]))


def _named_status(systems: dict, tol: float) -> dict:
    """ok when every rtxjit system ran within ``tol`` of eager; else mismatch, or error with the
    first line of the first failure."""
    checked = [s for k, s in systems.items() if k.startswith("rtxjit_") and "skipped" not in s]
    failed = [s["error"] for s in checked if "error" in s]
    if failed:
        return {"status": "error", "error": failed[0].splitlines()[0][:300]}
    return {"status": _status(max((s["err"] for s in checked), default=float("nan")), tol)}


def run_job(job: dict) -> int:
    """A worker process: one model. An exception ends it with status "error", its first line,
    the stage it failed in, and the end of its traceback."""
    rec = Record(Path(job["record"]), model=job["name"])
    try:
        (check_torchvision if job["part"] == "torchvision" else measure_named)(job, rec)
    except Exception as exc:
        rec.data["failed_in"] = rec.data.get("stage")
        rec.stage("failed", status="error", error=_first_line(exc), trace=traceback.format_exc()[-2000:])
        return 1
    return 0


# --- the pool of worker processes ---------------------------------------------------------------

@dataclass
class Job:
    name: str
    spec: dict  # what the worker gets (``--job``); its "record" is the file it rewrites
    base: dict  # the record of a worker that wrote nothing


class Pool:
    """Runs jobs as subprocesses, ``workers`` at once, each in its own process group (killed whole
    on its timeout or when this process is told to stop), and hands each finished record to
    ``on_record`` as soon as it finishes."""

    def __init__(self, workers: int, timeout: float, deadline, env: dict, logs: Path, on_record, on_exit=None,
                 on_tick=None):
        self.workers, self.timeout, self.deadline, self.env = workers, timeout, deadline, env
        self.logs, self.on_record, self.on_exit, self.on_tick = logs, on_record, on_exit, on_tick
        self.running: dict = {}  # name -> (job, Popen, start time, log file)

    def run(self, jobs: list) -> list:
        """The jobs not started or ended unrecorded because the deadline came."""
        pending = list(jobs)
        begin = time.monotonic()
        old = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while pending or self.running:
                now = time.monotonic()
                late = self.deadline is not None and now > self.deadline - LAUNCH_MARGIN_S
                while pending and len(self.running) < self.workers and not late:
                    self._start(pending.pop(0))
                for name in list(self.running):
                    self._poll(name, now)
                if self.on_tick is not None:
                    self.on_tick(now - begin)
                if late and (now > self.deadline or not self.running):
                    pending += [self._end(name, "deadline") for name in list(self.running)]
                    break
                time.sleep(0.2)
        finally:
            for name in list(self.running):
                self._end(name, "stopped")
            for s, h in old.items():
                signal.signal(s, h)
        return pending

    def _start(self, job: Job) -> None:
        Path(job.spec["tmp"]).mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{job.name}.log", "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(job.spec)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                start_new_session=True)
        self.running[job.name] = (job, proc, time.monotonic(), log)
        print(f"start {job.name} (pid {proc.pid})", flush=True)

    def _poll(self, name: str, now: float) -> None:
        job, proc, t0, _ = self.running[name]
        if proc.poll() is not None:
            self._end(name, "exit")
        elif now - t0 > self.timeout:
            self._end(name, "timeout")

    def _end(self, name: str, how: str) -> Job:
        """Kill the job's process group if it still runs. Record it ("exit" or "timeout"), but not
        when the deadline or a stop ended it: that is not the model's doing."""
        job, proc, t0, log = self.running.pop(name)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()
        shutil.rmtree(job.spec["tmp"], ignore_errors=True)  # its ONNX files: up to GBs a model
        if self.on_exit is not None:
            self.on_exit(job)
        if how not in ("exit", "timeout"):
            print(f"{name}: ended unrecorded ({how})", flush=True)
            return job
        rec = _read_json(Path(job.spec["record"])) or dict(job.base)
        rec["wall_s"] = round(time.monotonic() - t0, 1)
        if how == "timeout":
            why = f"timeout after {self.timeout:.0f} s, in stage {rec.get('stage', 'start')}"
            if "status" in rec:  # the worker had its verdict; only what came after it was cut short
                rec["note"] = why
            else:
                rec["status"], rec["error"] = "timeout", why
        elif "status" not in rec:  # died without a word: a crash (segfault, CUDA abort, out of memory)
            rec["status"] = "error"
            rec["error"] = _log_error(self.logs / f"{name}.log", proc.returncode)
            rec["log_tail"] = _tail(self.logs / f"{name}.log")
        rec["rc"] = proc.returncode
        self.on_record(rec)
        return job

    def _stop(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _log_error(log: Path, rc: int) -> str:
    """The first line of the last exception in a worker's log, or how it died."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
            return line[:300]
    return f"worker exited with {rc}" + (f" (signal {-rc})" if rc < 0 else "") + (f": {lines[-1][:200]}" if lines else "")


class Results:
    """``DIR/<part>.jsonl`` (one line per finished model; a model's last line wins) and
    ``DIR/<part>.md``, both rewritten or appended after every record and copied to ``mirror`` (a
    folder whose files survive this process, such as the device machine's $OUT)."""

    def __init__(self, out: Path, part: str, render, mirror=None):
        self.jsonl, self.md, self.render = out / f"{part}.jsonl", out / f"{part}.md", render
        self.mirror = Path(mirror) if mirror else None
        self.records: dict = {}

    def load(self, path: Path) -> None:
        """Take the records of an earlier run (this folder's, or a file that came back from one)."""
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                self.records[rec["model"]] = rec

    def begin(self, fresh: bool) -> None:
        """Rewrite the JSONL file with the records loaded; a fresh run keeps an earlier file under a
        new name instead of appending to it."""
        if fresh and self.jsonl.exists():
            self.jsonl.replace(self.jsonl.with_suffix(f".jsonl.{int(time.time())}"))
        _write_atomic(self.jsonl, "".join(json.dumps(r, default=str) + "\n" for r in self.records.values()))
        self.write()

    def add(self, rec: dict) -> None:
        self.records[rec["model"]] = rec
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.write()
        errs = {k: f"{s['err']:.1e}" for k, s in rec.get("systems", {}).items() if "err" in s}
        if "err" in rec:
            errs = {"err": _cell_err(rec["err"])}
        print(f"{rec['model']}: {rec.get('status')} {errs or ''} {(rec.get('error') or '')[:160]}", flush=True)

    def write(self) -> None:
        _write_atomic(self.md, self.render(list(self.records.values())))
        if self.mirror is not None:
            self.mirror.mkdir(parents=True, exist_ok=True)
            for f in (self.jsonl, self.md):
                _write_atomic(self.mirror / f.name, f.read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- summaries ----------------------------------------------------------------------------------

def _cell_err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def torchvision_markdown(records: list, tol: float = FP16_TOL) -> str:
    device = next((r["device"] for r in records if r.get("device")), "?")
    statuses = ("ok", "mismatch", "error", "timeout")
    lines = [f"# torchvision models through rtxjit, fp16, batch 1 ({device})", "",
             f"err: max|rtxjit - eager fp16| / max|eager fp16| (tolerance {tol:g}); eager vs fp32: eager fp16 "
             "against eager fp32 (above the tolerance: the model is ill-conditioned in fp16 with random "
             "weights); rtxjit vs fp32: rtxjit against eager fp32. ran = ok + mismatch.", "",
             "| family | models | " + " | ".join(statuses) + " | ran | ok |", "|---" * (len(statuses) + 4) + "|"]
    for family in FAMILIES + ("all",):
        rows = [r for r in records if family in ("all", r.get("family"))]
        if not rows:
            continue
        n = {s: sum(r.get("status") == s for r in rows) for s in statuses}
        ran = n["ok"] + n["mismatch"]
        lines.append(f"| {family} | {len(rows)} | " + " | ".join(str(n[s]) for s in statuses)
                     + f" | {ran} ({100 * ran / len(rows):.0f}%) | {n['ok']} ({100 * n['ok'] / len(rows):.0f}%) |")
    lines += ["", "| model | family | input | status | err | eager vs fp32 | rtxjit vs fp32 | export, session, "
              "first run (s) | launches | note |", "|---" * 10 + "|"]
    for r in sorted(records, key=lambda r: (FAMILIES.index(r["family"]) if r.get("family") in FAMILIES else 9,
                                            r["model"])):
        times = ", ".join(f"{r[k]:.0f}" if isinstance(r.get(k), (int, float)) else "-"
                          for k in ("export_s", "session_s", "first_run_s"))
        note = r.get("error") or r.get("note") or ""
        if r.get("status") == "mismatch" and (r.get("eager_vs_fp32") or 0) > tol:
            note = f"ill-conditioned: eager fp16 is {r['eager_vs_fp32']:.1e} off fp32. {note}"
        if r.get("export", "").startswith("torchscript fp32"):
            note = f"fp32 export fallback ({r.get('export_error', '')}). {note}"
        if "err_generic" in r:
            note = f"generic kernels err {_cell_err(r['err_generic'])}. {note}"
        shape = "x".join(str(d) for d in r.get("input", [])) or "-"
        lines.append(f"| {r['model']} | {r.get('family', '')} | {shape} | {r.get('status')} | {_cell_err(r.get('err'))} "
                     f"| {_cell_err(r.get('eager_vs_fp32'))} | {_cell_err(r.get('err_vs_fp32'))} | {times} "
                     f"| {r.get('launches', '-')} | {_md(note)} |")
    return "\n".join(lines) + "\n"


def models_markdown(records: list) -> str:
    device = next((r["device"] for r in records if r.get("device")), "?")
    size = next((f"{r['size']} configs, {r['dtype']}" for r in records if r.get("size")), "")
    cols = ["eager", "compile_cudagraph", "rtxjit_torchscript", "rtxjit_dynamo"]
    lines = [f"# Named models: {size} ({device})", "",
             "ms: median steady-state latency (CUDA events); err: max|out - eager| / max|eager| (rtxjit after its "
             "specialized kernels are in; generic: its first run); fp32: against eager fp32; ratio: rtxjit time / "
             "torch.compile + CUDA-graph time.", "",
             "| model | feeds | status | " + " | ".join(cols) + " | ratio |", "|---" * (len(cols) + 4) + "|"]
    for r in sorted(records, key=lambda r: list(NAMED).index(r["model"]) if r["model"] in NAMED else 99):
        systems = r.get("systems", {})
        cells = [_system_cell(systems.get(c)) for c in cols]
        ref = systems.get("compile_cudagraph", {}).get("ms")
        ratios = [f"{systems[c]['ms'] / ref:.2f}" for c in cols[2:] if ref and systems.get(c, {}).get("ms")]
        feeds = ", ".join("x".join(map(str, s)) for s in r.get("feeds", {}).values())
        status = r.get("status", "")
        if status in ("error", "timeout", "no diffusers") and r.get("error"):
            status += ": " + r["error"]
        if r.get("note"):
            status += f" ({r['note']})"
        lines.append(f"| {r['model']} | {feeds} | {_md(status)} | " + " | ".join(cells) + f" | {' / '.join(ratios) or '-'} |")
    return "\n".join(lines) + "\n"


def _system_cell(s) -> str:
    if not s:
        return "-"
    if "skipped" in s:
        return "skipped: " + _md(s["skipped"])
    if "error" in s:
        return "error: " + _md(s["error"].splitlines()[0][:120])
    parts = [f"{s['ms']:.3f} ms"] if "ms" in s else []
    parts += [f"{label} {s[k]:.1e}" for k, label in (("err", "err"), ("err_generic", "generic"),
                                                    ("err_vs_fp32", "fp32")) if k in s]
    return ", ".join(parts) or "-"


def _md(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:240]


# --- command line -------------------------------------------------------------------------------

def _select(names: list, patterns: str, limit: int) -> list:
    """Names matching any comma-separated pattern (a full regular-expression match; a plain name
    matches itself), in the given order, at most ``limit``."""
    if patterns:
        regexes = [re.compile(p.strip()) for p in patterns.split(",") if p.strip()]
        names = [n for n in names if any(r.fullmatch(n) for r in regexes)]
    return names[:limit] if limit else names


def _worker_env(workers: int, cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    share = str(max(1, min(4, (os.cpu_count() or 2) // max(workers, 1))))  # the cores, split between workers
    env.setdefault("OMP_NUM_THREADS", share)
    env.setdefault("RTXJIT_COMPILE_WORKERS", share)  # background compile processes per session
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)
    if cpu:
        env["RTXJIT_DEVICE"] = "cpu"
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("torchvision", "models"), default="torchvision")
    p.add_argument("--models", default="", help="comma-separated names or regular expressions (full match)")
    p.add_argument("--limit", type=int, default=0, help="at most this many models (after --models)")
    p.add_argument("--workers", type=int, default=0, help="models at once (default: torchvision 3/4 of the cores, at most 12; models all)")
    p.add_argument("--per-model-timeout", type=float, default=0, help="seconds (default: torchvision 300, models 560)")
    p.add_argument("--deadline", type=float, default=0, help="seconds for this whole command (0: none)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vision_gpu"))
    p.add_argument("--resume", action="store_true", help="skip models already recorded in the JSONL file")
    p.add_argument("--resume-from", help="also skip the models recorded in this JSONL file (an earlier command's)")
    p.add_argument("--mirror", help="copy the JSONL and markdown files here after every record (e.g. $OUT)")
    p.add_argument("--rerun", default="", help="statuses to run again despite a record, e.g. timeout,error")
    p.add_argument("--tol", type=float, default=FP16_TOL)
    p.add_argument("--seg-size", type=int, default=520)
    p.add_argument("--second-run", action="store_true", help="torchvision: also run after specialization")
    p.add_argument("--specialize-timeout", type=float, default=240)
    p.add_argument("--iters", type=int, default=100, help="models: timed calls per system (0: no timing)")
    p.add_argument("--exporters", default="", help="models: exporters for every model (default: per model)")
    p.add_argument("--tiny", action="store_true", help="models: tiny configs on the CPU (Triton interpreter)")
    p.add_argument("--list", action="store_true", help="print the selected models and exit")
    p.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)  # stand-ins for torchvision (CPU test)
    p.add_argument("--job", help=argparse.SUPPRESS)  # a worker process: one model, JSON spec
    a = p.parse_args(argv)
    if a.job:
        return run_job(json.loads(a.job))

    out = Path(a.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    cpu = not torch.cuda.is_available() or a.tiny
    t_start = time.monotonic()
    deadline = t_start + a.deadline if a.deadline else None
    if a.part == "torchvision":
        if a.fake:
            cases = FAKE_CASES
        else:
            if importlib.util.find_spec("torchvision") is None:
                print("torchvision is not installed (use --fake for the CPU test of this script)", file=sys.stderr)
                return 2
            cases = torchvision_cases()
        by_name = {c.name: c for c in cases}
        names = _select([c.name for c in cases], a.models, a.limit)
        workers = a.workers or max(1, min(12, (os.cpu_count() or 4) * 3 // 4))  # export and import: one core each
        timeout = a.per_model_timeout or 300
        render = lambda recs: torchvision_markdown(recs, a.tol)  # noqa: E731
    else:
        names = _select(list(NAMED), a.models, a.limit)
        workers = a.workers or len(names)
        timeout = a.per_model_timeout or 560
        render = models_markdown
    results = Results(out, a.part, render, a.mirror)
    if a.resume and results.jsonl.exists():
        results.load(results.jsonl)
    if a.resume_from:
        results.load(Path(a.resume_from))
    rerun = {s.strip() for s in a.rerun.split(",") if s.strip()}
    names = [n for n in names if n not in results.records or results.records[n].get("status") in rerun]
    if a.list:
        print("\n".join(f"{n}\t{by_name[n].family}\t{by_name[n].params}" if a.part == "torchvision" else n
                        for n in names))
        return 0
    results.begin(fresh=not a.resume)
    env = _worker_env(workers, cpu)
    scratch = Path(tempfile.mkdtemp(prefix=f"vision_gpu_{a.part}_"))  # a folder per job, removed when it ends
    common = dict(part=a.part, cache=str(out / "rtxjit_cache"), tol=a.tol, specialize_timeout=a.specialize_timeout)
    on_exit = on_tick = None
    if a.part == "torchvision":
        jobs = [_job(n, out, scratch, common, {"family": by_name[n].family}, fake=a.fake, dtype="fp16",
                     seg_size=a.seg_size, second_run=a.second_run)
                for n in sorted(names, key=lambda n: -by_name[n].params)]
    else:
        jobs = []
        for n in names:
            if NAMED[n][0] == "diffusers" and importlib.util.find_spec("diffusers") is None:
                results.add({"model": n, "status": "no diffusers", "error": "diffusers is not importable"})
                continue
            exporters = a.exporters.split(",") if a.exporters else list(NAMED[n][2])
            jobs.append(_job(n, out, scratch, common, {}, tiny=a.tiny, iters=a.iters, exporters=exporters))
        on_exit, on_tick = _gate(jobs, workers, env, BARRIER_RELEASE * timeout)
    for job in jobs:  # a record left by an earlier command must not stand for this one's
        Path(job.spec["record"]).unlink(missing_ok=True)
    pool = Pool(min(workers, max(len(jobs), 1)), timeout, deadline, env, out / "logs", results.add, on_exit, on_tick)
    try:
        left = pool.run(jobs)
    except KeyboardInterrupt:
        print(f"stopped; finished records are in {results.jsonl}", flush=True)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results.write()
    print(f"{len(results.records)} recorded in {results.jsonl}; {len(left)} not run (deadline: rerun with "
          f"--resume); {time.monotonic() - t_start:.0f} s", flush=True)
    print(results.md.read_text())
    return 0


def _job(name: str, out: Path, scratch: Path, common: dict, base: dict, **spec) -> Job:
    return Job(name, dict(common, name=name, record=str(out / "records" / f"{name}.json"), tmp=str(scratch / name),
                          **base, **spec), dict(base, model=name))


def _gate(jobs: list, workers: int, env: dict, release_s: float):
    """With a worker per model: compile side by side, then time one at a time (zoo_gpu's Gate,
    through ZOO_GATE). Returns the pool's (on_exit, on_tick): a model that ends (or dies) counts as
    ready, so none waits at the barrier for it; after ``release_s`` the barrier opens for all, so
    one slow compile does not drag every model past its timeout (timings may then overlap it)."""
    if workers < len(jobs):
        print(f"{workers} workers for {len(jobs)} models: timings may overlap other models' compiles", flush=True)
        return None, None
    gate_dir = Path(tempfile.mkdtemp(prefix="vision_gpu_gate_"))
    env["ZOO_GATE"] = f"{gate_dir}:{len(jobs)}"

    def ready(job: Job) -> None:
        (gate_dir / f"ready_{job.name}").write_text("1")

    def release(elapsed: float) -> None:
        if elapsed > release_s and not (gate_dir / "released").exists():
            print(f"barrier opened after {elapsed:.0f} s", flush=True)
            for job in jobs:
                ready(job)
            (gate_dir / "released").write_text("1")
    return ready, release

if __name__ == "__main__":
    sys.exit(main())
