"""The JIT's figure: per-step latency while input shapes change, generic kernels first and
specialized ones after the swap; time to the first result cold, with a warm runtime cache, and
torch.compile's first call. Writes benchmarks/results/bench_jit.{json,md,png}.

Models (fp16, exported once per run with dynamic axes): bert-base (transformers ``BertModel``,
sequence length changing) and resnet50 (torchvision, batch changing).

Timeline: one request every ``--interval`` seconds (50 steps), each timed wall-clock from ``run``
to the outputs on the device (``torch.cuda.synchronize``), in a fresh process per mode: ``lazy``
(generic kernels, then specialized ones swapped in by the background specializer) and ``none``
(generic kernels only; the reference the issue's "no stall" rule compares each step with). Each
process first runs one warm-up request at a shape outside the timeline (its kernels load, Triton's
cache is warm) and waits for its specialization. Steady state: median of CUDA-event timings of
``--iters`` runs at bert s128 b1 / resnet50 b8 after warm-up, for both modes.

Time to first result, each in a fresh process: ``cold`` (empty Triton cache, no runtime cache),
``warm`` (a runtime cache filled by an earlier process; Triton's own folder keeps only its launcher
modules), and ``torch.compile`` (inductor, empty inductor cache); three processes each for cold and
warm, the median reported. Measured from the session's construction (model import, passes, weights
upload included) to the outputs on the device; the import of torch, triton and rtxjit is reported
apart, and the sum of both as the process's time.

Needs a GPU, torchvision and transformers.  ``python benchmarks/bench_jit.py [--quick]``
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

BERT_SEQS = [128] * 12 + [64] * 8 + [128] * 6 + [96] * 10 + [128] * 8 + [64] * 6
RESNET_BATCHES = [8] * 12 + [4] * 8 + [8] * 6 + [16] * 10 + [8] * 8 + [4] * 6
WARM_RUNS = COLD_RUNS = 3  # starts per model and case (the median is reported, every run listed)
MODELS = {
    "bert_base": {"steady": 128, "warmup": 32, "steps": BERT_SEQS},
    "resnet50": {"steady": 8, "warmup": 2, "steps": RESNET_BATCHES},
}


# --- building the models (parent process) -------------------------------------------------------

def export_models(tmp: Path) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_models import _bert, _vision

    paths = {}
    model, inputs = _bert(1, 128, "cuda")
    paths["bert_base"] = tmp / "bert_base.onnx"
    with torch.no_grad():
        torch.onnx.export(model, tuple(inputs.values()), str(paths["bert_base"]), input_names=list(inputs),
                          output_names=["last_hidden_state", "pooler_output"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "B", 1: "S"} for n in inputs})
    model, inputs = _vision("resnet50", 1, "cuda")
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
        ids = torch.randint(0, 30000, (1, size), device="cuda")
        return {"input_ids": ids, "attention_mask": torch.ones(1, size, dtype=torch.int64, device="cuda")}
    return {"image": torch.randn(size, 3, 224, 224, device="cuda", dtype=torch.float16)}


def cuda_median_ms(call, iters: int) -> float:
    import torch

    for _ in range(10):
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
    import torch

    import rtxjit

    spec = MODELS[name]
    sess = rtxjit.InferenceSession(path, device="cuda", specialize=mode)
    sess.run(None, feeds_for(name, spec["warmup"]))
    sess.wait_for_specialization(timeout=600)
    torch.cuda.synchronize()
    steps = []
    t0 = time.perf_counter()
    for i, size in enumerate(spec["steps"]):
        feeds = feeds_for(name, size)
        torch.cuda.synchronize()
        start = time.perf_counter()
        sess.run(None, feeds)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        stats = sess.jit_stats()
        steps.append({"step": i + 1, "size": size, "ms": round(ms, 4), "served": stats["last_run"],
                      "t_s": round(start - t0, 3), "pending": stats["pending"]})
        nxt = t0 + (i + 1) * interval
        time.sleep(max(0.0, nxt - time.perf_counter()))
    sess.wait_for_specialization(timeout=600)
    steady_feeds = feeds_for(name, spec["steady"])
    steady = cuda_median_ms(lambda: sess.run(None, steady_feeds), iters)
    stats = sess.jit_stats()
    stats.pop("served", None)
    return {"model": name, "mode": mode, "steps": steps, "steady_ms": steady, "steady_served": stats["last_run"],
            "stats": stats}


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

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_models import _bert, _vision

    if name == "bert_base":
        model, inputs = _bert(1, MODELS[name]["steady"], "cuda")
    else:
        model, inputs = _vision("resnet50", MODELS[name]["steady"], "cuda")
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


def run_child(args: list, env: dict, timeout: int = 900) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout)[-4000:]}


# --- report ---------------------------------------------------------------------------------------

def analyse(timelines: dict) -> dict:
    out = {}
    for name in MODELS:
        lazy, none = timelines.get((name, "lazy")), timelines.get((name, "none"))
        if not lazy or not none or "steps" not in lazy or "steps" not in none:
            continue
        worst = max(l["ms"] / n["ms"] for l, n in zip(lazy["steps"], none["steps"]))
        stalls = [l["step"] for l, n in zip(lazy["steps"], none["steps"]) if l["ms"] > 1.2 * n["ms"]]
        out[name] = {"steady_generic_ms": none["steady_ms"], "steady_specialized_ms": lazy["steady_ms"],
                     "speedup": none["steady_ms"] / lazy["steady_ms"], "worst_step_ratio_vs_generic": worst,
                     "steps_over_generic_plus_20pct": stalls}
    return out


def plot(timelines: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(MODELS), figsize=(13, 4.5))
    for ax, name in zip(axes, MODELS):
        for mode, style in (("none", "o-"), ("lazy", "s-")):
            t = timelines.get((name, mode))
            if not t or "steps" not in t:
                continue
            xs = [s["step"] for s in t["steps"]]
            ys = [s["ms"] for s in t["steps"]]
            label = "generic only (specialize='none')" if mode == "none" else "lazy: generic, then specialized"
            ax.plot(xs, ys, style, ms=3, label=label)
            if mode == "lazy":
                spec = [s["step"] for s in t["steps"] if s["served"] == "specialized"]
                new = [i + 1 for i, s in enumerate(t["steps"]) if i == 0 or s["size"] != t["steps"][i - 1]["size"]]
                for x in new:
                    ax.axvline(x, color="grey", lw=0.5, ls=":")
                if spec:
                    ax.scatter(spec, [t["steps"][x - 1]["ms"] for x in spec], s=12, color="green", zorder=3,
                               label="served by specialized kernels")
        sizes = MODELS[name]["steps"]
        ax.set_title(f"{name} fp16: {'sequence length' if name == 'bert_base' else 'batch'} changes "
                     f"({sorted(set(sizes))})")
        ax.set_xlabel("step (one request every interval; dotted: a new shape)")
        ax.set_ylabel("latency ms (wall, to outputs on device)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(report: dict) -> str:
    lines = [f"# rtxjit JIT benchmark ({report['device']}, torch {report['torch']}, triton {report['triton']})", ""]
    lines += ["## Steady state: generic vs specialized", "",
              "| model | generic ms | specialized ms | speedup | worst step / generic step | steps > generic +20% |",
              "|---|---:|---:|---:|---:|---|"]
    for name, a in report["analysis"].items():
        lines.append(f"| {name} | {a['steady_generic_ms']:.3f} | {a['steady_specialized_ms']:.3f} | "
                     f"{a['speedup']:.2f}x | {a['worst_step_ratio_vs_generic']:.2f} | "
                     f"{a['steps_over_generic_plus_20pct'] or 'none'} |")
    lines += ["", "## Time to first result (s, fresh process)", "",
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
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--skip-compile", action="store_true", help="leave out torch.compile's first call")
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
    timelines, first = {}, {}
    for name in names:
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
        for mode in ("none", "lazy"):  # each with Triton's cache of its own: specialized kernels compile
            timelines[(name, mode)] = run_child(["timeline", name, str(paths[name]), mode, args.interval, args.iters],
                                                {"TRITON_CACHE_DIR": str(tmp / f"timeline-{name}-{mode}")})
        print(name, json.dumps(first[name])[:600], flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "interval_s": args.interval, "first_result": first,
              "timelines": {f"{n}/{m}": t for (n, m), t in timelines.items()}, "analysis": analyse(timelines)}
    (out / "bench_jit.json").write_text(json.dumps(report, indent=1))
    (out / "bench_jit.md").write_text(markdown(report))
    report["plot"] = plot(timelines, out / "bench_jit.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
