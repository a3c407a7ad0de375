"""The JIT's figure (issue 17): per-step latency while input shapes change, for rtxjit's fallback
kernels only, rtxjit lazy (fallback, then shape-specialized kernels swapped in by the background
specializer) and torch.compile(dynamic=True, mode="reduce-overhead") on the same shape sequence;
per shape the steady states, the first request's cost and the time to specialized kernels; and
the time to the first result cold, with a warm runtime cache, and torch.compile's first call.
Writes OUT/bench_jit.{json,md,png}.

Models (fp16, exported once per run with dynamic axes): bert-base (transformers ``BertModel``,
batch 4 with padded rows, sequence length 64-128 changing) and resnet50 (torchvision, batch 2-16
changing).

Timeline: one request every ``--interval`` seconds, each timed wall-clock from the call to the
outputs on the device (``torch.cuda.synchronize``), in a fresh process per mode. Each process first
runs one warm-up request at a shape outside the timeline (its kernels load or compile; rtxjit
waits for that binding's specialization). After the timeline (and the specializer) per shape: the
median of ``--iters`` CUDA-event timed runs. The time to specialized kernels is the binding's own
record (``jit_stats()["bindings"]``: seconds from its first request to each install).

Time to first result, each in a fresh process: ``cold`` (empty Triton cache, no runtime cache),
``warm`` (a runtime cache filled by an earlier process; Triton's own folder keeps only its launcher
modules), and ``torch.compile`` (inductor, empty inductor cache); three processes each for cold and
warm, the median reported. Measured from the session's construction (model import, passes, weights
upload included) to the outputs on the device; the import of torch, triton and rtxjit is reported
apart, and the sum of both as the process's time.

Needs a GPU, torchvision and transformers.  ``python benchmarks/bench_jit.py --out DIR [--parts timeline,first]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# one request every --interval seconds; each shape is held long enough to see it specialized
BERT_SEQS = [128] * 12 + [64] * 12 + [96] * 12 + [112] * 12 + [80] * 12 + [128] * 6 + [72] * 12
RESNET_BATCHES = [8] * 12 + [2] * 12 + [16] * 12 + [4] * 12 + [12] * 12 + [8] * 6 + [6] * 12
WARM_RUNS = COLD_RUNS = 3  # starts per model and case (the median is reported, every run listed)
BERT_BATCH = 4
MODELS = {
    "bert_base": {"steady": 128, "warmup": 32, "steps": BERT_SEQS},
    "resnet50": {"steady": 8, "warmup": 1, "steps": RESNET_BATCHES},
}
MODES = ("none", "lazy", "torch_compile")  # fallback only; fallback then specialized; the reference


# --- building the models (parent process) -------------------------------------------------------

def build_model(name: str, size: int):
    """(fp16 model on the GPU, feeds) at ``size`` (bert: sequence length, batch 4; resnet50: batch)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_models import _bert, _vision

    if name == "bert_base":
        return _bert(BERT_BATCH, size, "cuda")
    return _vision("resnet50", size, "cuda")


def export_models(tmp: Path) -> dict:
    import torch

    paths = {}
    model, inputs = build_model("bert_base", 128)
    paths["bert_base"] = tmp / "bert_base.onnx"
    with torch.no_grad():
        torch.onnx.export(model, tuple(inputs.values()), str(paths["bert_base"]), input_names=list(inputs),
                          output_names=["last_hidden_state", "pooler_output"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "B", 1: "S"} for n in inputs})
    model, inputs = build_model("resnet50", 1)
    paths["resnet50"] = tmp / "resnet50.onnx"
    with torch.no_grad():
        torch.onnx.export(model, tuple(inputs.values()), str(paths["resnet50"]), input_names=list(inputs),
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "N"}})
    return paths


# --- child processes ----------------------------------------------------------------------------

def feeds_for(name: str, size: int):
    import torch

    if name == "bert_base":
        ids = torch.randint(0, 30000, (BERT_BATCH, size), device="cuda")
        mask = torch.ones(BERT_BATCH, size, dtype=torch.int64, device="cuda")
        mask[1::2, size - size // 8:] = 0  # padded rows, as a real batch has
        return {"input_ids": ids, "attention_mask": mask}
    return {"image": torch.randn(size, 3, 224, 224, device="cuda", dtype=torch.float16)}


def cuda_median_ms(call, iters: int, warmup: int = 10) -> float:
    import torch

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def child_timeline(name: str, path: str, mode: str, interval: float, iters: int) -> dict:
    """One process: a warm-up request at a shape outside the timeline (its kernels compile; for
    rtxjit also its specialization), the timeline, then per shape of the timeline the steady state
    (median of ``iters`` CUDA-event timed runs, after the specializer is done)."""
    import torch

    spec = MODELS[name]
    bindings = {}  # size -> the rtxjit binding its first request built
    if mode == "torch_compile":  # the reference: dynamic shapes, CUDA graphs per shape (cudagraph trees)
        model, _ = build_model(name, spec["warmup"])
        compiled = torch.compile(model, dynamic=True, mode="reduce-overhead")

        def call(feeds):
            with torch.no_grad():
                return compiled(*feeds.values())
        t = time.perf_counter()
        call(feeds_for(name, spec["warmup"]))
        torch.cuda.synchronize()
        setup_s = time.perf_counter() - t
        jit = None
    else:
        import rtxjit

        t = time.perf_counter()
        sess = rtxjit.InferenceSession(path, device="cuda", specialize=mode)
        sess.run(None, feeds_for(name, spec["warmup"]))
        sess.wait_for_specialization(timeout=600)
        torch.cuda.synchronize()
        setup_s = time.perf_counter() - t

        def call(feeds):
            return sess.run(None, feeds)
        jit = sess
    steps = []
    t0 = time.perf_counter()
    for i, size in enumerate(spec["steps"]):
        feeds = feeds_for(name, size)
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(feeds)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        step = {"step": i + 1, "size": size, "ms": round(ms, 4), "t_s": round(start - t0, 3),
                "new_shape": size not in [s["size"] for s in steps]}
        if jit is not None:
            stats = jit.jit_stats()
            step.update(served=stats["last_run"], pending=stats["pending"])
            bindings.setdefault(size, jit.last_executable)
        steps.append(step)
        nxt = t0 + (i + 1) * interval
        time.sleep(max(0.0, nxt - time.perf_counter()))
    if jit is not None:
        jit.wait_for_specialization(timeout=600)
    shapes = {}
    for size in dict.fromkeys(spec["steps"]):
        feeds = feeds_for(name, size)
        entry = {"steady_ms": cuda_median_ms(lambda: call(feeds), iters)}
        exe = bindings.get(size)
        if exe is not None:
            entry["served"] = jit.jit_stats()["last_run"]
            entry["installed_after_s"] = [round(t - exe.created_s, 3) for t in exe.installed_s]
        shapes[str(size)] = entry
    out = {"model": name, "mode": mode, "setup_s": setup_s, "steps": steps, "shapes": shapes}
    if jit is not None:
        stats = jit.jit_stats()
        for key in ("served", "bindings"):
            stats.pop(key, None)
        out["stats"] = stats
    return out


def child_first(name: str, path: str, cache: str, profile: str = "") -> dict:
    if profile:  # where the time of a warm start goes: cProfile's top entries to a text file
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(child_first, name, path, cache)
        with open(profile, "w") as f:
            stats = pstats.Stats(prof, stream=f)
            stats.sort_stats("cumulative").print_stats("rtxjit|triton|torch/cuda", 90)
            stats.sort_stats("tottime").print_stats(40)
        return result
    t0 = time.perf_counter()
    import torch
    import triton  # noqa: F401 - every session needs it: its import is reported with torch's and rtxjit's

    import rtxjit

    imported = time.perf_counter() - t0
    feeds = feeds_for(name, MODELS[name]["steady"])
    torch.cuda.synchronize()
    start = time.perf_counter()
    sess = rtxjit.InferenceSession(path, device="cuda", specialize="lazy", runtime_cache=cache or None)
    built = time.perf_counter() - start
    sess.run(None, feeds)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    at_first = sess.jit_stats()
    sess.wait_for_specialization(timeout=600)
    after = sess.jit_stats()
    return {"import_s": imported, "session_s": built, "first_result_s": first, "process_s": imported + first,
            "compiles_at_first_result": at_first["compiles"], "cache_hits_at_first_result": at_first["cache_hits"],
            "compiles_after_specialization": after["compiles"], "specialized": after["specialized"],
            "failed": after["failed"], "errors": after["errors"]}


def child_torch_compile(name: str) -> dict:
    t0 = time.perf_counter()
    import torch

    model, inputs = build_model(name, MODELS[name]["steady"])
    imported = time.perf_counter() - t0
    torch.cuda.synchronize()
    start = time.perf_counter()
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(*inputs.values())
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    return {"import_s": imported, "first_result_s": first, "process_s": imported + first}


def _median_run(runs: list) -> dict:
    """The run with the median first-result time, listing every run's time."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["first_result_s"])
    return dict(ok[len(ok) // 2] if ok else runs[0], runs_s=[round(r.get("first_result_s", -1), 3) for r in runs])


def run_child(args: list, env: dict, timeout: int = 300) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    try:
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout} s: {str(exc.stderr or '')[-2000:]}"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout)[-4000:]}


# --- report ---------------------------------------------------------------------------------------

def analyse(timelines: dict) -> dict:
    """Per model and shape: the steady fallback, specialized and torch.compile times, the first
    request's time, the seconds to the first install (specialized) and to the last (tuned, peak);
    and issue 17's checks over them."""
    out = {}
    for name in MODELS:
        t = {mode: timelines.get((name, mode)) or {} for mode in MODES}
        lazy, none, tc = t["lazy"], t["none"], t["torch_compile"]
        if "shapes" not in lazy or "shapes" not in none:
            continue
        rows = []
        for size in dict.fromkeys(MODELS[name]["steps"]):
            key = str(size)
            first = next((s["ms"] for s in lazy["steps"] if s["size"] == size and s["new_shape"]), None)
            later = [s for s in lazy["steps"] if s["size"] == size and not s["new_shape"]]
            installs = lazy["shapes"][key].get("installed_after_s") or []
            fallback = none["shapes"][key]["steady_ms"]
            row = {"size": size, "fallback_ms": fallback, "specialized_ms": lazy["shapes"][key]["steady_ms"],
                   "first_ms": first, "first_over_fallback": first / fallback if first else None,
                   "specialized_after_s": installs[0] if installs else None,
                   "peak_after_s": installs[-1] if installs else None,
                   "steps_over_fallback_plus_20pct": [s["step"] for s in later if s["ms"] > 1.2 * fallback]}
            row["fallback_over_specialized"] = fallback / row["specialized_ms"]
            if "shapes" in tc:
                row["torch_compile_ms"] = tc["shapes"][key]["steady_ms"]
                row["torch_compile_first_ms"] = next((s["ms"] for s in tc["steps"]
                                                      if s["size"] == size and s["new_shape"]), None)
            rows.append(row)
        waits = sorted(r["specialized_after_s"] for r in rows if r["specialized_after_s"] is not None)
        never = [r["size"] for r in rows if r["specialized_after_s"] is None]
        out[name] = {
            "shapes": rows,
            "max_fallback_over_specialized": max(r["fallback_over_specialized"] for r in rows),
            "median_specialized_after_s": waits[len(waits) // 2] if waits else None,
            "max_specialized_after_s": (max(waits) if waits and not never else None), "never_specialized": never,
            "max_first_over_fallback": max((r["first_over_fallback"] or 0) for r in rows),
            "checks": {
                "fallback <= 1.5x specialized": all(r["fallback_over_specialized"] <= 1.5 for r in rows),
                "median time to specialized <= 2 s": bool(waits) and not never and waits[len(waits) // 2] <= 2.0,
                "every shape specialized within 5 s": bool(waits) and not never and max(waits) <= 5.0,
                "first request <= 3x fallback step": all((r["first_over_fallback"] or 99) <= 3.0 for r in rows)},
        }
    return out


def plot(timelines: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in MODELS if any((n, m) in timelines for m in MODES)]
    fig, axes = plt.subplots(1, len(names), figsize=(6.8 * len(names), 4.8), squeeze=False)
    labels = {"none": "rtxjit fallback only (specialize='none')", "lazy": "rtxjit lazy: fallback, then specialized",
              "torch_compile": "torch.compile(dynamic=True, mode='reduce-overhead')"}
    for ax, name in zip(axes[0], names):
        for mode, style in zip(MODES, ("o-", "s-", "^-")):
            t = timelines.get((name, mode))
            if not t or "steps" not in t:
                ax.plot([], [], style, label=f"{labels[mode]}: failed")
                continue
            xs = [s["step"] for s in t["steps"]]
            ax.plot(xs, [s["ms"] for s in t["steps"]], style, ms=3, lw=1, label=labels[mode])
            if mode == "lazy":
                for s in t["steps"]:
                    if s["new_shape"]:
                        ax.axvline(s["step"], color="grey", lw=0.5, ls=":")
                spec = [s for s in t["steps"] if s.get("served") == "specialized"]
                if spec:
                    ax.scatter([s["step"] for s in spec], [s["ms"] for s in spec], s=12, color="green", zorder=3,
                               label="served by specialized kernels")
        what = f"sequence length, batch {BERT_BATCH}" if name == "bert_base" else "batch"
        ax.set_title(f"{name} fp16: {what} changes {sorted(set(MODELS[name]['steps']))}", fontsize=10)
        ax.set_xlabel("step (one request per interval; dotted: a new shape)")
        ax.set_ylabel("latency ms (wall, to outputs on device)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _f(x, fmt=".2f"):
    return "—" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    lines = [f"# rtxjit JIT benchmark ({report['device']}, torch {report['torch']}, triton {report['triton']})", "",
             f"One request every {report['interval_s']} s per mode, each mode in a fresh process; per shape the "
             f"steady state is the median of {report.get('iters', 50)} CUDA-event timed runs after the timeline (the "
             "specializer done). first: the timeline's first request at the shape (wall ms). specialized after / "
             "peak after: seconds from the shape's first request to the first install of specialized kernels / "
             "to the last (tuned).", ""]
    for name, a in report["analysis"].items():
        lines += [f"## {name}", "",
                  "| shape | fallback ms | specialized ms | fallback / specialized | first ms | first / fallback | "
                  "specialized after s | peak after s | torch.compile ms | torch.compile first ms | steps > fallback +20% |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in a["shapes"]:
            lines.append(f"| {r['size']} | {r['fallback_ms']:.3f} | {r['specialized_ms']:.3f} | "
                         f"{r['fallback_over_specialized']:.2f} | {_f(r['first_ms'], '.1f')} | "
                         f"{_f(r['first_over_fallback'])} | {_f(r['specialized_after_s'])} | {_f(r['peak_after_s'])} | "
                         f"{_f(r.get('torch_compile_ms'), '.3f')} | {_f(r.get('torch_compile_first_ms'), '.1f')} | "
                         f"{r['steps_over_fallback_plus_20pct'] or 'none'} |")
        lines += [""] + [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in a["checks"].items()]
        lines += [f"- median / max time to specialized: {_f(a['median_specialized_after_s'])} / "
                  f"{_f(a['max_specialized_after_s'])} s; never specialized: {a['never_specialized'] or 'none'}", ""]
    lines += ["## Time to first result (s, fresh process)", "",
              "From the session's construction to the outputs on the device; the import of torch, triton "
              "and rtxjit before it is reported apart (import s), and their sum (process s).", "",
              "| model | case | import s | session s | first result s | process s | compiles at first result | runs |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, cases in report["first_result"].items():
        for case, r in cases.items():
            if "error" in r:
                lines.append(f"| {name} | {case} | error: {r['error'][-200:]!r} | | | | | |")
                continue
            lines.append(f"| {name} | {case} | {r.get('import_s', 0):.2f} | {r.get('session_s', float('nan')):.2f} | "
                         f"{r['first_result_s']:.2f} | {r.get('process_s', float('nan')):.2f} | "
                         f"{r.get('compiles_at_first_result', '-')} | {r.get('runs_s', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--iters", type=int, default=50, help="timed runs per shape for its steady state")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--parts", default="timeline,first", help="timeline (per-step latency while shapes change), "
                   "first (time to the first result: cold, warm runtime cache, torch.compile)")
    p.add_argument("--skip-compile", action="store_true", help="leave out torch.compile's first call")
    p.add_argument("--modes", default=",".join(MODES), help="timeline modes to run (a subset of the default)")
    p.add_argument("--profile-warm", action="store_true", help="cProfile a warm start into OUT/warm_profile_*.txt")
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = json.loads(args.child)
        fn = {"timeline": child_timeline, "first": child_first, "compile": child_torch_compile}[kind]
        print("RESULT " + json.dumps(fn(*rest)), flush=True)
        return 0
    import torch
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-jit-"))
    paths = export_models(tmp)
    names = args.models.split(",")
    parts = set(args.parts.split(","))
    timelines, first = {}, {}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "interval_s": args.interval, "iters": args.iters, "command": " ".join(sys.argv)}

    def save() -> None:  # after every model: a run cut short keeps what it measured
        report.update(first_result=first, timelines={f"{n}/{m}": t for (n, m), t in timelines.items()},
                      analysis=analyse(timelines))
        (out / "bench_jit.json").write_text(json.dumps(report, indent=1))
        (out / "bench_jit.md").write_text(markdown(report))
        report["plot"] = plot(timelines, out / "bench_jit.png")

    for name in names:
        if "timeline" in parts:
            # each mode with Triton's (and inductor's) cache of its own: specialized kernels compile
            for mode in args.modes.split(","):
                timelines[(name, mode)] = run_child(
                    ["timeline", name, str(paths[name]), mode, args.interval, args.iters],
                    {"TRITON_CACHE_DIR": str(tmp / f"timeline-{name}-{mode}"),
                     "TORCHINDUCTOR_CACHE_DIR": str(tmp / f"timeline-ind-{name}")})
                print(name, mode, str(timelines[(name, mode)].get("error", "ok"))[-800:], flush=True)
            save()
        if "first" not in parts:
            continue
        cold_runs = [run_child(["first", name, str(paths[name]), ""], {"TRITON_CACHE_DIR": str(tmp / f"triton-{name}-{i}")})
                     for i in range(COLD_RUNS)]
        first[name] = {"cold": _median_run(cold_runs)}
        cache = tmp / f"cache-{name}"
        run_child(["first", name, str(paths[name]), str(cache)], {"TRITON_CACHE_DIR": str(tmp / f"fill-{name}")})
        warm_runs = [run_child(["first", name, str(paths[name]), str(cache)],
                               {"TRITON_CACHE_DIR": str(tmp / f"fill-{name}")}) for _ in range(WARM_RUNS)]
        first[name]["warm_runtime_cache"] = _median_run(warm_runs)
        if args.profile_warm:
            run_child(["first", name, str(paths[name]), str(cache), str(out / f"warm_profile_{name}.txt")],
                      {"TRITON_CACHE_DIR": str(tmp / f"fill-{name}")})
        if not args.skip_compile:
            first[name]["torch_compile"] = run_child(["compile", name], {
                "TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}"), "TRITON_CACHE_DIR": str(tmp / f"ind-{name}")})
        print(name, json.dumps(first[name])[:600], flush=True)
        save()
    save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
