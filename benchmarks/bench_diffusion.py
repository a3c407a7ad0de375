"""Diffusion models on rtxjit (issue 15): a FLUX-style transformer whose image size changes while it
runs, fallback (shape-generic) kernels against specialized ones per step; and one Stable Diffusion
1.5 UNet step beside eager PyTorch and torch.compile replayed as a CUDA graph.

    python benchmarks/bench_diffusion.py                     # both parts, one process each (GPU, ~8 min)
    python benchmarks/bench_diffusion.py --part flux         # the FLUX figure only (~4 min on an H100)
    python benchmarks/bench_diffusion.py --part unet
    RTXJIT_DEVICE=cpu python benchmarks/bench_diffusion.py --tiny   # CPU plumbing check (interpreter)

**FLUX** (the figure of NVIDIA TensorRT for RTX's FLUX demo: the first iteration at a new image size
runs on fallback kernels while specialized ones compile in the background; later ones run
specialized). diffusers' ``FluxTransformer2DModel`` at 4 double + 8 single blocks, hidden 1536 (12
heads x 128), text 512 tokens, batch 1, fp16, random weights (tests/zoo/vision_archs.py). One
dynamo export whose image-token dim is symbolic (``dynamic_shapes``) serves every size: 512, 768
and 1024 px (32x32, 48x48, 64x64 packed latent tokens). Over ``--steps`` steps the size changes
512 -> 768 -> 1024 -> 512 -> 768 (``SCHEDULE``); the timestep changes every step as in a denoising
loop (a device input: the binding stays the same). A step is one ``run`` timed wall-clock to its
outputs on the serving stream. Two sessions over the same file, one after the other:
``specialize="none"`` (fallback kernels only, steps back to back: the reference of the issue's "no
step slower than the fallback's steady step + 20%" rule) and ``"lazy"`` (a step starts every
``--interval`` seconds; which kernels served it is ``jit_stats()["last_run"]``). Then per size, steady
state (median of ``--iters`` CUDA-event timed calls): eager PyTorch, the fallback session, and the
lazy session after ``wait_for_specialization``; errors max|out - ref| / max|ref| against eager fp16
and against the fp32 model. Writes ``bench_diffusion_flux_<gpu>.{json,md,png}`` (PNG if matplotlib
is installed).

**UNet**: diffusers' ``UNet2DConditionModel`` at SD 1.5's config, one denoising step at 512x512
(latents 64x64, batch 2 for classifier-free guidance, text 77 x 768), fp16. Systems, in this order,
each skipped with a note when the part's time budget cannot hold it: eager, rtxjit on the
TorchScript export (opset 17), torch.compile's compiled callable captured in a CUDA graph (replays
timed), rtxjit on the dynamo export. rtxjit sessions run ``specialize="eager"`` (specialized and
tuned before the first result). Writes ``bench_diffusion_unet_<gpu>.{json,md}``.

Cold compiles dominate the time: every part uses a fresh rtxjit runtime cache (in a temporary
folder) unless ``--cache DIR`` names one (a second run with the same DIR loads the optimized graph
and the kernels: the lazy timeline is then specialized from its first step). Results are rewritten
after every stage, so a run cut short keeps what it measured; ``--time-limit`` (seconds per part)
caps the waits and skips the stages that no longer fit (``--unet-systems X --merge`` runs one later
and keeps the earlier run's others).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import rtxjit  # noqa: E402  (before diffusers, which imports triton: the CPU needs its interpreter)
import torch  # noqa: E402

from benchmarks.bench_models import _plain, _sync, environment, time_calls  # noqa: E402
from benchmarks.zoo_gpu import _error, graphed, rel_err, time_ms  # noqa: E402
from rtxjit import config  # noqa: E402
from tests.zoo import vision_archs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PARTS = ("flux", "unet")
PX_PER_TOKEN = 16  # the VAE's 8x downsampling, then FLUX's 2x2 patches
FLUX_SIDES = {"full": (32, 48, 64), "tiny": (2, 3, 4)}  # packed latent side: 512, 768, 1024 px at full size
FLUX_TEXT = {"full": 512, "tiny": 6}  # text tokens (T5's 512 in FLUX.1-dev)
SCHEDULE = ((0, 0.24), (1, 0.24), (2, 0.28), (0, 0.12), (1, 0.12))  # (size index, share of the steps)
STALL_RATIO = 1.2  # the rule: no step slower than the fallback's steady step + 20% ...
MIN_SPEEDUP = 2.0  # ... and the specialized steady state at least 2x faster than the fallback's
REL_ERR_LIMIT = 2e-2
# seconds a UNet stage needs at full size on an H100 (export + compile + timing); one that no longer
# fits the part's budget is skipped with a note. Rough: measured on no GPU yet, refine after a run.
UNET_STAGE_S = {"rtxjit_torchscript": 120, "compile_cudagraph": 75, "rtxjit_dynamo": 90}
FLUX_RESERVE_S = 20  # of the budget kept, after the wait for specialization, for the steady state and the PNG
GRACE_S = 60  # beyond --time-limit before a part's process is killed (a stage in flight finishes)


# --- shared ----------------------------------------------------------------------------------------

class Budget:
    """Seconds left of a part's ``--time-limit``."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Report:
    """A part's record, rewritten as JSON and markdown after every stage (a run cut short keeps
    what it measured)."""

    def __init__(self, out: Path, stem: str, record: dict, markdown, budget: Budget):
        self.out, self.stem, self.record, self.markdown, self.budget = out, stem, record, markdown, budget

    def log(self, text: str) -> None:
        print(f"[{self.record['part']} {self.budget.elapsed():6.1f}s] {text}", flush=True)

    def save(self, status: str = "running") -> None:
        self.record.update(status=status, elapsed_s=self.budget.elapsed())
        self.out.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".json", json.dumps(_plain(self.record), indent=1) + "\n"),
                             (".md", self.markdown(self.record))):
            path = self.out / (self.stem + suffix)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # a process killed meanwhile leaves the previous complete file


def gpu_tag(cuda: bool, tiny: bool) -> str:
    """File-name tag of the device: the first word of its name with a digit in it ('h100')."""
    tag = "cpu"
    if cuda:
        words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name().lower())
        tag = next((w for w in words if any(c.isdigit() for c in w)), words[-1] if words else "gpu")
    return tag + ("_tiny" if tiny else "")


def on_device(feeds: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in feeds.items()}


def as_fp32(feeds: dict) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in feeds.items()}


def steady_ms(call, iters: int, cuda: bool) -> float:
    """Median ms of ``iters`` calls: zoo_gpu's timer on a GPU (5 warm-up calls first); on a CPU,
    where an interpreted call takes seconds, no warm-up beyond the call already made."""
    if cuda:
        return time_ms(call, iters, cuda)
    return time_calls(call, iters, cuda)["median_ms"]


def errors(out, ref, ref32) -> dict:
    e = {"err": rel_err(out, ref)}
    if ref32 is not None:
        e["err_vs_fp32"] = rel_err(out, ref32)
    return e


def session(path: Path, mode, cache: Path, cuda: bool):
    """An rtxjit session over ``path`` on the benchmark's device (``mode``: its ``specialize``)."""
    return rtxjit.InferenceSession(str(path), device="cuda" if cuda else "cpu", specialize=mode,
                                   runtime_cache=str(cache))


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def settings_of(args, cuda: bool) -> dict:
    return {"tiny": args.tiny, "cuda": cuda, "dtype": "fp16" if cuda else "fp32", "steps": args.steps,
            "interval_s": args.interval, "iters": args.iters, "time_limit_s": args.time_limit,
            "runtime_cache": args.cache or "fresh (temporary folder)", "command": " ".join(sys.argv)}


def environment_of(cuda: bool) -> dict:
    env = environment(cuda)
    try:
        env["diffusers"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        env["diffusers"] = None
    return env


# --- FLUX: the per-step figure ------------------------------------------------------------------------

def schedule(steps: int, sides: tuple) -> list:
    """The packed-latent side of each step: ``SCHEDULE``'s segments, in proportion to ``steps``."""
    out = []
    for i, (size, share) in enumerate(SCHEDULE):
        n = steps - len(out) if i == len(SCHEDULE) - 1 else max(1, round(share * steps))
        out += [sides[size]] * max(0, min(n, steps - len(out)))
    return out


def label(side: int) -> str:
    px = side * PX_PER_TOKEN
    return f"{px}x{px}"


def export_flux(module, feeds: dict, path: Path) -> dict:
    """The dynamo export with the image-token dim symbolic, so that one file serves every image size;
    raises if the file's inputs are static. ``F.rms_norm`` is written out as the zoo's exports do it
    (torch 2.11's exporter has no ONNX function for CUDA's ``aten._fused_rms_norm``)."""
    import unittest.mock

    import onnx

    tokens = torch.export.Dim("img_tokens", min=2, max=1 << 16)
    dims = {"hidden_states": {1: tokens}, "img_ids": {0: tokens}}
    start = time.perf_counter()
    with unittest.mock.patch.object(torch.nn.functional, "rms_norm", vision_archs.rms_norm):
        torch.onnx.export(module, tuple(feeds.values()), str(path), input_names=list(feeds), output_names=["out"],
                          dynamo=True, dynamic_shapes=(tuple(dims.get(n) for n in feeds),), verbose=False)
    export_s = time.perf_counter() - start
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    if not isinstance(shapes.get("hidden_states", [0, 0])[1], str):
        raise RuntimeError(f"the FLUX export has a static image-token dim: input shapes {shapes}")
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))  # with its external data
    return {"export_s": export_s, "input_shapes": shapes, "onnx_mib": size / 2**20}


def timeline(sess, inputs: dict, sides: list, interval: float, cuda: bool) -> list:
    """One ``run`` per step at that step's size, each timed to its outputs on the device (the
    serving stream synchronized, not the device: the specializer's side stream is not waited for,
    as an application waits only for its own outputs); which kernels served it, and what the JIT
    has queued after it."""
    feeds = {side: {k: v.clone() for k, v in inputs[side].items()} for side in set(sides)}
    steps, seen = [], set()
    t0 = time.perf_counter()
    for i, side in enumerate(sides):
        feeds[side]["timestep"].fill_(1.0 - i / len(sides))  # a new timestep, the same binding
        _sync(cuda)
        start = time.perf_counter()
        sess.run(None, feeds[side])
        if cuda:
            torch.cuda.current_stream().synchronize()
        ms = (time.perf_counter() - start) * 1e3
        stats = sess.jit_stats()
        kinds = list(stats["served"].values())
        steps.append({"step": i + 1, "image": label(side), "tokens": side * side, "ms": ms,
                      "served": stats.get("last_run"), "new_shape": side not in seen,
                      "specialized_nodes": kinds.count("specialized") / max(1, len(kinds)),
                      "pending": stats["pending"], "t_s": start - t0})
        seen.add(side)
        time.sleep(max(0.0, t0 + (i + 1) * interval - time.perf_counter()))
    return steps


def steady(rep: Report, key: str, sess, inputs: dict, refs: dict, iters: int, cuda: bool) -> None:
    """Steady state of ``sess`` at every size into ``shapes[size][key]``."""
    for side, feeds in inputs.items():
        entry = rep.record["shapes"][label(side)]
        try:
            out = sess.run(None, feeds)[0]
            entry[key] = {**errors(out, *refs[side]), "served": sess.jit_stats().get("last_run"),
                          "ms": steady_ms(lambda: sess.run(None, feeds), iters, cuda)}
        except Exception as exc:  # noqa: BLE001 - recorded; the other sizes still run
            entry[key] = _error(exc)
    rep.save()


def flux_checks(record: dict) -> dict:
    """The issue's done-when: specialized steady state >= 2x the fallback's at every size; no
    step of the lazy timeline but the first at a new size slower than the fallback's steady step
    of its size + 20%."""
    shapes = record["shapes"]
    fallback = {k: s.get("fallback", {}).get("ms") for k, s in shapes.items()}
    special = {k: s.get("specialized", {}).get("ms") for k, s in shapes.items()}
    speedup = {k: fallback[k] / special[k] for k in shapes if fallback[k] and special[k]}
    out = {"speedup": speedup, "min_speedup": min(speedup.values()) if speedup else None}
    out["speedup_ok"] = bool(speedup) and len(speedup) == len(shapes) and out["min_speedup"] >= MIN_SPEEDUP
    lazy, base = record["timelines"].get("lazy"), record["timelines"].get("fallback")
    if lazy and all(fallback.values()):
        later = [s for s in lazy if not s["new_shape"]]
        out["stalls"] = [s["step"] for s in later if s["ms"] > STALL_RATIO * fallback[s["image"]]]
        out["worst_step_vs_fallback_steady"] = max((s["ms"] / fallback[s["image"]] for s in later), default=None)
        out["stall_ok"] = not out["stalls"]
        out["first_step_of_new_shape_ms"] = {s["image"]: s["ms"] for s in lazy if s["new_shape"]}
        first = {}
        for s in lazy:
            if s["served"] == "specialized":
                first.setdefault(s["image"], s["step"])
        out["first_specialized_step"] = first
        out["steps_specialized"] = sum(s["served"] == "specialized" for s in lazy)
    errs = [r["err"] for sh in shapes.values() for r in (sh.get("fallback", {}), sh.get("specialized", {}))
            if "err" in r]
    out["errors_ok"] = bool(errs) and max(errs) <= REL_ERR_LIMIT  # nan and inf fail too
    if lazy and base:
        out["worst_step_vs_fallback_timeline"] = max(a["ms"] / b["ms"] for a, b in zip(lazy, base)
                                                     if not a["new_shape"])
    return out


def flux_part(args, rep: Report, work: Path, cuda: bool) -> None:
    size = "tiny" if args.tiny else "full"
    dev, dtype = torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32
    rec, budget = rep.record, rep.budget
    rep.log(f"building FluxTransformer2DModel ({size})")
    module, _ = vision_archs.build("flux", size)
    cfg = dict(module.model.config)
    rec["model"] = {k: cfg[k] for k in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
                                        "joint_attention_dim", "in_channels")}
    rec["model"].update(hidden=cfg["num_attention_heads"] * cfg["attention_head_dim"], text_tokens=FLUX_TEXT[size],
                        params_m=sum(p.numel() for p in module.parameters()) / 1e6)
    sides = FLUX_SIDES[size]
    inputs = {s: on_device(vision_archs.flux_feeds(cfg, s, s, FLUX_TEXT[size])(1, torch.Generator().manual_seed(s)),
                           dev, dtype) for s in sides}
    rec["shapes"] = {label(s): {"tokens": s * s} for s in sides}
    module = module.to(dev)
    refs = {}
    for s in sides:  # the fp32 model first (the same fp16-rounded inputs), then the model in fp16
        refs[s] = [None, module(*as_fp32(inputs[s]).values()) if dtype != torch.float32 else None]
    module = module.to(dtype)
    for s in sides:
        refs[s][0] = module(*inputs[s].values())
        rec["shapes"][label(s)]["eager"] = {**({"err_vs_fp32": rel_err(refs[s][0], refs[s][1])} if cuda else {}),
                                            "ms": steady_ms(lambda: module(*inputs[s].values()), args.iters, cuda)}
    rep.save()
    rep.log("exporting (dynamo, symbolic image tokens)")
    path = work / "flux.onnx"
    rec["export"] = export_flux(module, inputs[sides[1]], path)
    del module
    free_memory(cuda)
    rep.save()
    steps = schedule(args.steps, sides)
    cache = Path(args.cache) if args.cache else work / "runtime_cache"
    for key, mode in (("fallback", "none"), ("lazy", "lazy")):
        rep.log(f"session specialize='{mode}': {len(steps)} steps")
        start = time.perf_counter()
        sess = session(path, mode, cache, cuda)
        rec.setdefault("sessions", {})[key] = {"mode": mode, "session_s": time.perf_counter() - start,
                                               "passes_s": sum(t.seconds for t in sess.pass_timings)}
        # the fallback timeline runs back to back (nothing compiles behind it: pacing changes nothing
        # but the budget); the lazy one at --interval
        rec["timelines"][key] = timeline(sess, inputs, steps, args.interval if mode == "lazy" else 0.0, cuda)
        rep.save()
        if mode == "lazy":
            wait = max(5.0, min(600.0, budget.left() - (0 if args.tiny else FLUX_RESERVE_S)))
            rep.log(f"waiting for specialization (at most {wait:.0f}s)")
            start = time.perf_counter()
            done = sess.wait_for_specialization(timeout=wait)
            rec["sessions"][key].update(specialization_done=done, waited_s=time.perf_counter() - start)
        steady(rep, "specialized" if mode == "lazy" else "fallback", sess, inputs, refs, args.iters, cuda)
        stats = sess.jit_stats()
        stats.pop("served", None)
        rec["sessions"][key]["jit"] = stats
        rec["sessions"][key]["launches"] = sess.launches_per_inference
        del sess
        free_memory(cuda)
        rec["checks"] = flux_checks(rec)
        rep.save()
    rec["png"] = plot_flux(rec, rep.out / f"{rep.stem}.png")
    rep.log(rec["png"])


def plot_flux(rec: dict, path: Path) -> str:
    """The figure: per-step latency of both timelines (log scale), the steps served by specialized
    kernels marked, each size's segment labelled, the fallback's steady step + 20% dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib, then run again)"
    lazy, base = rec["timelines"].get("lazy") or [], rec["timelines"].get("fallback") or []
    fig, ax = plt.subplots(figsize=(11, 5))
    for steps, style, text in ((base, "o-", "fallback kernels only (specialize='none')"),
                               (lazy, "s-", "lazy: fallback kernels, specialized ones swapped in")):
        if steps:
            ax.plot([s["step"] for s in steps], [s["ms"] for s in steps], style, ms=3, lw=1, label=text)
    special = [s for s in lazy if s["served"] == "specialized"]
    if special:
        ax.scatter([s["step"] for s in special], [s["ms"] for s in special], s=16, color="green", zorder=3,
                   label="step served by specialized kernels")
    segments = [s for i, s in enumerate(lazy or base) if i == 0 or s["image"] != (lazy or base)[i - 1]["image"]]
    ends = [s["step"] for s in segments[1:]] + [len(lazy or base) + 1]
    labelled = set()
    for seg, end in zip(segments, ends):
        ax.axvline(seg["step"] - 0.5, color="grey", lw=0.6, ls=":")
        ax.annotate(seg["image"], (seg["step"] - 0.3, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8)
        shape = rec["shapes"][seg["image"]]
        fallback, eager = shape.get("fallback", {}).get("ms"), shape.get("eager", {}).get("ms")
        for ms, color, style, text in ((fallback and STALL_RATIO * fallback, "red", "--", "fallback steady step + 20%"),
                                       (eager, "black", "-.", "eager PyTorch, steady")):
            if ms:
                ax.hlines(ms, seg["step"] - 0.5, end - 0.5, colors=color, linestyles=style, lw=0.8,
                          label=None if text in labelled else text)
                labelled.add(text)
    m = rec.get("model", {})
    ax.set_title(f"FLUX-style transformer ({m.get('num_layers')} double + {m.get('num_single_layers')} single blocks, "
                 f"hidden {m.get('hidden')}), {rec['settings']['dtype']}, batch 1: the image size changes\n"
                 f"{rec['environment']['device']}; lazy session: {pacing(rec['settings'])}, fallback: back to back",
                 fontsize=10)
    ax.set_xlabel("denoising step (dotted: the image size changes)")
    ax.set_ylabel("step latency, ms (wall, to outputs on the device)")
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def pacing(settings: dict) -> str:
    interval = settings["interval_s"]
    return f"one step every {interval:g} s" if interval else "steps back to back"


def _fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _err(r: dict) -> str:
    """``err (err vs fp32)``, flagged where the error against eager exceeds ``REL_ERR_LIMIT``."""
    err = r.get("err")
    flag = f" **> {REL_ERR_LIMIT:g}**" if err is not None and not err <= REL_ERR_LIMIT else ""
    return f"{_fmt(err, '.1e')}{flag} ({_fmt(r.get('err_vs_fp32'), '.1e')})"


def header(rec: dict, title: str) -> list:
    """A report's first lines: title and status, where and with what it ran, how errors and times read."""
    env, s = rec["environment"], rec["settings"]
    return [f"# {title} ({rec['status']})", "",
            f"{env['device']} · torch {env['torch']} · triton {env['triton']} · diffusers {env.get('diffusers')} · "
            f"{env['date']} · `{s['command']}`", "",
            f"ms: median of {s['iters']} calls ({'CUDA events' if s['cuda'] else 'wall clock'}). "
            f"err: max|out - eager| / max|eager|, eager in the same dtype ({s['dtype']}); in brackets against the "
            "model in fp32.", ""]


def footer(rec: dict) -> list:
    return [f"- error: `{e}`" for e in rec.get("errors", [])] + [
        "", f"Runtime cache: {rec['settings']['runtime_cache']}; time limit {rec['settings']['time_limit_s']:g} s, "
        f"elapsed {rec.get('elapsed_s', 0):.0f} s."]


def flux_markdown(rec: dict) -> str:
    s, m = rec["settings"], rec.get("model", {})
    lines = header(rec, "FLUX-style transformer: fallback vs specialized kernels as the image size changes")
    lines += [f"FluxTransformer2DModel, {m.get('num_layers')} double + {m.get('num_single_layers')} single blocks, "
              f"hidden {m.get('hidden')}, {m.get('params_m', 0):.4g}M parameters, text {m.get('text_tokens')} tokens, "
              f"batch 1, {s['dtype']}, random weights; one dynamo export with a symbolic image-token dim. Steady state "
              f"per size; timelines: the lazy session's {pacing(s)}, the fallback's back to back; per-step rows in "
              "the JSON.",
              "", "| image | tokens | eager ms | fallback ms | specialized ms | speedup | fallback err (fp32) | "
              "specialized err (fp32) | specialized served by |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, sh in rec.get("shapes", {}).items():
        e, f, p = sh.get("eager", {}), sh.get("fallback", {}), sh.get("specialized", {})
        speed = f["ms"] / p["ms"] if f.get("ms") and p.get("ms") else None
        lines.append(f"| {name} | {sh['tokens']} | {_fmt(e.get('ms'))} | {_fmt(f.get('ms'))} | {_fmt(p.get('ms'))} | "
                     f"{_fmt(speed)}x | {_err(f)} | {_err(p)} | {p.get('served') or p.get('error', '—')[:80]} |")
    c = rec.get("checks", {})
    if c:
        lines += ["", "## Done-when (issue 15)", "",
                  f"- specialized steady state >= {MIN_SPEEDUP:g}x the fallback's at every size: "
                  f"{'PASS' if c.get('speedup_ok') else 'FAIL'} (min {_fmt(c.get('min_speedup'))}x)",
                  f"- fallback and specialized within {REL_ERR_LIMIT:g} of eager: "
                  f"{'PASS' if c.get('errors_ok') else 'FAIL'}"]
        if "stall_ok" in c:
            lines += [f"- no step but the first at a new size slower than the fallback's steady step + 20%: "
                      f"{'PASS' if c['stall_ok'] else 'FAIL'} (worst {_fmt(c.get('worst_step_vs_fallback_steady'))}x "
                      f"of it; over: {c['stalls'] or 'none'})",
                      f"- steps served by specialized kernels: {c.get('steps_specialized')} of "
                      f"{len(rec['timelines'].get('lazy', []))}; first specialized step per size: "
                      f"{c.get('first_specialized_step')}; first step at a new size (ms): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in c.get("first_step_of_new_shape_ms", {}).items())]
    for key, sess in rec.get("sessions", {}).items():
        jit = sess.get("jit", {})
        lines.append(f"- session {key} (specialize='{sess['mode']}'): created in {_fmt(sess.get('session_s'))} s, "
                     f"{sess.get('launches', '—')} launches; compiles {jit.get('compiles', '—')}, cache hits "
                     f"{jit.get('cache_hits', '—')}, specialized {jit.get('specialized', '—')}, rejected "
                     f"{jit.get('rejected', '—')}, failed {jit.get('failed', '—')}"
                     + (f"; specialization done: {sess['specialization_done']} after waiting "
                        f"{_fmt(sess.get('waited_s'), '.1f')} s" if "specialization_done" in sess else ""))
    if rec.get("export"):
        lines.append(f"- export: {_fmt(rec['export'].get('export_s'), '.1f')} s, inputs "
                     f"{rec['export'].get('input_shapes')}")
    return "\n".join(lines + footer(rec)) + "\n"


# --- UNet: one SD-1.5 denoising step ------------------------------------------------------------------

def unet_part(args, rep: Report, work: Path, cuda: bool) -> None:
    size = "tiny" if args.tiny else "full"
    dev, dtype = torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32
    rec, budget = rep.record, rep.budget
    wanted = args.unet_systems.split(",")
    rep.log(f"building UNet2DConditionModel ({size})")
    module, make_feeds = vision_archs.build("unet2d", size)
    rec["model"] = {"params_m": sum(p.numel() for p in module.parameters()) / 1e6}
    feeds = on_device(make_feeds(2), dev, dtype)
    rec["inputs"] = {k: list(v.shape) for k, v in feeds.items()}
    module = module.to(dev)
    ref32 = module(*as_fp32(feeds).values()) if dtype != torch.float32 else None
    module = module.to(dtype)
    args_ = tuple(feeds.values())
    ref = module(*args_)
    systems = rec["systems"]
    systems["eager"] = {**({"err_vs_fp32": rel_err(ref, ref32)} if ref32 is not None else {}),
                        "ms": steady_ms(lambda: module(*args_), args.iters, cuda)}
    if args.merge:  # the systems an earlier run measured and this one does not repeat
        earlier = rep.out / f"{rep.stem}.json"
        old = json.loads(earlier.read_text()).get("systems", {}) if earlier.exists() else {}
        systems.update({k: {**r, "earlier_run": True} for k, r in old.items()
                        if k != "eager" and k not in wanted and "ms" in r})
    rep.save()
    cache = Path(args.cache) if args.cache else work / "runtime_cache"
    for key in ("rtxjit_torchscript", "compile_cudagraph", "rtxjit_dynamo"):
        need = 0 if args.tiny else UNET_STAGE_S[key]
        if key not in wanted:
            continue
        if budget.left() < need:
            systems[key] = {"skipped": f"time budget: {budget.left():.0f} s left of --time-limit "
                                       f"{args.time_limit:g}, the stage needs ~{need} s (run it alone: --part unet "
                                       f"--unet-systems {key} --merge)"}
            rep.save()
            continue
        rep.log(key)
        try:
            if key == "compile_cudagraph":
                systems[key] = compile_cudagraph(module, args_, ref, ref32, args.iters, cuda, args.cpu_compile)
            else:
                systems[key] = unet_rtxjit(module, feeds, key.split("_")[1], work, cache, ref, ref32, args.iters, cuda)
        except Exception as exc:  # noqa: BLE001 - recorded; the next system still runs
            systems[key] = _error(exc)
        free_memory(cuda)
        rep.save()


def unet_rtxjit(module, feeds: dict, exporter: str, work: Path, cache: Path, ref, ref32, iters: int,
                cuda: bool) -> dict:
    """rtxjit on the ``exporter``'s file, specialized and tuned before its first result."""
    path = work / f"unet_{exporter}.onnx"
    start = time.perf_counter()
    vision_archs.export(module, feeds, exporter == "dynamo", str(path))
    rec = {"export_s": time.perf_counter() - start}
    start = time.perf_counter()
    sess = session(path, "eager" if cuda else None, cache, cuda)
    used = {i.name: feeds[i.name] for i in sess.get_inputs()}  # an exporter may drop an unused input
    out = sess.run(None, used)[0]
    _sync(cuda)
    rec["first_s"] = time.perf_counter() - start
    rec.update(errors(out, ref, ref32), launches=sess.launches_per_inference, served=sess.jit_stats().get("last_run"))
    rec["ms"] = steady_ms(lambda: sess.run(None, used), iters, cuda)
    stats = sess.jit_stats()
    rec["jit"] = {k: stats[k] for k in ("compiles", "cache_hits", "specialized", "rejected", "failed", "errors")}
    path.unlink(missing_ok=True)  # about 1.7 GB at full size
    return rec


def compile_cudagraph(module, args_: tuple, ref, ref32, iters: int, cuda: bool, cpu_compile: bool) -> dict:
    """torch.compile (inductor, default mode), its compiled callable captured in a CUDA graph."""
    if not cuda and not cpu_compile:
        return {"skipped": "no GPU: torch.compile takes ~90 s for the tiny UNet on 2 CPU cores (--cpu-compile runs it)"}
    start = time.perf_counter()
    compiled = torch.compile(module)
    compiled(*args_)
    replay = graphed(lambda: compiled(*args_), cuda)
    out = replay()
    _sync(cuda)
    rec = {"first_s": time.perf_counter() - start, **errors(out, ref, ref32), "ms": steady_ms(replay, iters, cuda)}
    torch._dynamo.reset()
    return rec


def unet_markdown(rec: dict) -> str:
    s, systems = rec["settings"], rec.get("systems", {})
    eager = systems.get("eager", {}).get("ms")
    graph = systems.get("compile_cudagraph", {}).get("ms")
    lines = header(rec, "SD-1.5 UNet, one denoising step at 512x512")
    lines += [f"UNet2DConditionModel (SD 1.5 config, {rec.get('model', {}).get('params_m', 0):.4g}M parameters), "
              f"{s['dtype']}, random weights, inputs {rec.get('inputs')}. first s: export excluded, compilation (for "
              "rtxjit specialization and tile timing too) included.", "",
              "| system | ms | speedup vs eager | time / compile+graph | err (fp32) | first s | launches |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in systems.items():
        name += " (earlier run)" if r.get("earlier_run") else ""
        if "ms" not in r:
            note = (r.get("error") or r.get("skipped", "—"))[:200].replace("|", "/")
            lines.append(f"| {name} | {note} | | | | | |")
            continue
        lines.append(f"| {name} | {r['ms']:.3f} | {_fmt(eager / r['ms'] if eager else None)}x | "
                     f"{_fmt(r['ms'] / graph if graph else None)} | {_err(r)} | {_fmt(r.get('first_s'), '.1f')} | "
                     f"{r.get('launches', '—')} |")
    return "\n".join(lines + footer(rec)) + "\n"


# --- driver ------------------------------------------------------------------------------------------

PART_RUNS = {"flux": (flux_part, flux_markdown, {"shapes": {}, "timelines": {}}),
             "unet": (unet_part, unet_markdown, {"systems": {}})}


def run_part(part: str, args) -> int:
    cuda = torch.cuda.is_available() and config.device_override() != "cpu"
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA GPU visible to torch: use --tiny (with RTXJIT_DEVICE=cpu) on a CPU")
    missing = [m for m in ("diffusers", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:  # diffusers is not on the GPU image: benchmarks/README.md (vision_gpu.py) says how to carry it
        raise SystemExit(f"bench_diffusion needs {' and '.join(missing)} (pip install; see benchmarks/README.md)")
    fn, markdown, fields = PART_RUNS[part]
    budget = Budget(args.time_limit)
    record = {"part": part, "environment": environment_of(cuda), "settings": settings_of(args, cuda), "errors": [],
              **copy.deepcopy(fields)}
    rep = Report(Path(args.out), f"bench_diffusion_{part}_{gpu_tag(cuda, args.tiny)}", record, markdown, budget)
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix=f"bench_diffusion_{part}_"))
    status = "done"
    try:
        fn(args, rep, work, cuda)
    except Exception as exc:  # noqa: BLE001 - what was measured is kept, the error recorded
        err = _error(exc)
        record["errors"].append(err["error"])
        record["trace"] = err["trace"]
        status = "error"
        rep.log(err["trace"])
    finally:
        rep.save(status)
        shutil.rmtree(work, ignore_errors=True)
    print(rep.markdown(record), flush=True)
    rep.log(f"wrote {rep.out / rep.stem}.json and .md")
    return 0 if status == "done" else 1


def run_all(args, argv: list) -> int:
    """Each part in a process of its own (its GPU memory, compile workers and a crash stay there),
    killed ``GRACE_S`` after its ``--time-limit``."""
    rc = 0
    for part in PARTS:
        cmd = [sys.executable, __file__, *_without_part(argv), "--part", part]
        try:
            rc |= subprocess.run(cmd, timeout=args.time_limit + GRACE_S).returncode
        except subprocess.TimeoutExpired:
            print(f"[{part}] killed after {args.time_limit + GRACE_S:g} s; its JSON holds what it measured", flush=True)
            rc = 1
    return rc


def _without_part(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--part":
            skip = True
        elif not a.startswith("--part="):
            out.append(a)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--tiny", action="store_true",
                   help="tiny configs (a CPU check under the interpreter, or a quick GPU check)")
    p.add_argument("--steps", type=int, help="FLUX timeline steps (default 50; --tiny 12)")
    p.add_argument("--interval", type=float,
                   help="seconds from one FLUX step's start to the next's (default 0.5; --tiny 0; 0: back to back)")
    p.add_argument("--iters", type=int, help="timed calls per steady-state measurement (default 20; --tiny 3)")
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds per part (default 240)")
    p.add_argument("--cache", help="rtxjit runtime cache folder (default: a fresh one per part)")
    p.add_argument("--unet-systems", default=",".join(UNET_STAGE_S),
                   help="UNet systems beside eager (they run in the default's order)")
    p.add_argument("--merge", action="store_true",
                   help="UNet: keep the systems of an earlier run's JSON that --unet-systems leaves out")
    p.add_argument("--cpu-compile", action="store_true", help="torch.compile the UNet on a CPU too (slow)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.steps = args.steps or (12 if args.tiny else 50)
    args.interval = args.interval if args.interval is not None else (0.0 if args.tiny else 0.5)
    args.iters = args.iters or (3 if args.tiny else 20)
    unknown = set(args.unet_systems.split(",")) - set(UNET_STAGE_S)
    if unknown:
        p.error(f"--unet-systems: unknown {sorted(unknown)}; choose from {','.join(UNET_STAGE_S)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.part == "all":
        return run_all(args, argv)
    return run_part(args.part, args)


if __name__ == "__main__":
    sys.exit(main())
