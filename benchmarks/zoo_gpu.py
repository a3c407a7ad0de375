"""The model zoo at full size on a GPU (fp16, random weights, transformers' default SDPA attention,
left-padded batches): rtxjit's InferenceSession (ONNX from each exporter) and
``torch.compile(backend="rtxjit")`` against eager PyTorch, beside torch.compile's compiled callable
captured in a CUDA graph (the replays timed), and eager.

    python benchmarks/zoo_gpu.py --out DIR                  # every model, one process each
    python benchmarks/zoo_gpu.py --model bert --out DIR     # one model (what each process runs)
    python benchmarks/zoo_gpu.py --model bert --tiny        # CPU smoke run: tiny config, no timing

Errors: max |out - eager| / max |eager| over the tokens that are not padding (``err``; what a padded
query position holds differs between eager SDPA and every ONNX export, onnxruntime's included) and
over the whole output (``err_all``), fp16; ``err_vs_fp32``: against the same model run in fp32 by
eager PyTorch, for every system eager fp16 included (a model whose fp16 activations run near fp16's
range, such as T5 with random weights, is off fp32 by more than fp16's tolerance in every system).
Timing: CUDA events around each call after warm-up, median of ``--iters`` (rtxjit after its
specialized kernels are in). Writes ``zoo_gpu.json`` and ``zoo_gpu.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import rtxjit  # noqa: E402  (before transformers, which imports triton)
import torch  # noqa: E402

from benchmarks.bench_models import time_calls  # noqa: E402
from tests.zoo import archs  # noqa: E402

MODELS = ["bert", "gpt2", "llama", "t5_encoder", "whisper_encoder"]
BATCH, SEQ = 4, 128
FP16_TOL = 1e-2


def rel_err(out, ref, valid=None) -> float:
    """max |out - ref| / max |ref| over the positions ``valid`` ([B, S] bool: the tokens that are
    not padding) or everywhere."""
    out, ref = out.detach().float(), ref.detach().float()
    if out.shape != ref.shape:
        return float("nan")
    if valid is not None:
        out, ref = out[valid], ref[valid]
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return float("inf")
    ok = ~torch.isnan(ref)
    return ((out[ok] - ref[ok]).abs().max() / ref[ok].abs().max().clamp_min(1e-30)).item()


def time_ms(call, iters: int, cuda: bool) -> float:
    """Median ms of ``iters`` synchronized calls after 5 warm-up calls (bench_models' timer)."""
    for _ in range(5):
        call()
    return time_calls(call, iters, cuda)["median_ms"]


def graphed(fn, cuda: bool):
    """fn's work captured in a CUDA graph; the returned callable replays it (its output is static)."""
    if not cuda:
        return fn
    out = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    holder = {"out": out}

    def replay():
        g.replay()
        return holder["out"]

    return replay


def first(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "last_hidden_state", out)


class Gate:
    """With ``ZOO_GATE=dir:n`` (set by ``--parallel``), the model processes compile side by side,
    then meet at a barrier, and time one at a time under a file lock: no timing shares the GPU."""

    def __init__(self):
        spec = os.environ.get("ZOO_GATE")
        self.dir, self.n = (Path(spec.split(":")[0]), int(spec.split(":")[1])) if spec else (None, 0)

    def barrier(self, name: str) -> None:
        if self.dir is None:
            return
        (self.dir / f"ready_{name}").write_text("1")
        deadline = time.time() + 900
        while len(list(self.dir.glob("ready_*"))) < self.n and time.time() < deadline:
            time.sleep(0.5)

    def timing(self):
        import contextlib
        import fcntl

        if self.dir is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def locked():
            with open(self.dir / "lock", "w") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

        return locked()


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[:800]}", "trace": traceback.format_exc()[-1500:]}


def run_model(name: str, tiny: bool, iters: int, exporters: list) -> dict:
    cuda = torch.cuda.is_available() and not tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    model, make_feeds = archs.build(name, "tiny" if tiny else "full")
    model32 = None
    if dtype is not torch.float32:  # the fp32 model: how far fp16 itself (eager's included) lands from it
        import copy

        model32 = copy.deepcopy(model).to(dev, torch.float32)
    model = model.to(dev, dtype)
    feeds = make_feeds("left", BATCH, 16 if tiny else SEQ)
    feeds = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in feeds.items()}
    wrapped = archs.Wrapped(model, list(feeds)).eval()
    args = tuple(feeds.values())
    rec = {"model": name, "dims": archs.dims(name, "tiny" if tiny else "full"), "batch": BATCH,
           "feeds": {k: list(v.shape) for k, v in feeds.items()}, "padding": "left", "systems": {}}
    runners = {}  # system -> callable timed after the barrier
    tmp = tempfile.mkdtemp()
    mask = feeds.get("attention_mask")
    valid = mask.bool() if mask is not None else None

    def errs(out) -> dict:
        out = out.to(ref.device)
        e = {"err": rel_err(out, ref, valid), "err_all": rel_err(out, ref)}
        if ref32 is not None:
            e["err_vs_fp32"] = rel_err(out, ref32, valid)
        return e

    with torch.no_grad():
        ref = first(wrapped(*args))
        ref32 = None
        if model32 is not None:
            args32 = tuple(a.float() if a.is_floating_point() else a for a in args)
            ref32 = first(archs.Wrapped(model32, list(feeds)).eval()(*args32))
            del model32
        runners["eager"] = lambda: wrapped(*args)
        rec["systems"]["eager"] = {"err_vs_fp32": rel_err(ref, ref32, valid)} if ref32 is not None else {}
        if cuda:
            try:
                t = time.perf_counter()
                compiled = torch.compile(wrapped)
                compiled(*args)
                replay = graphed(lambda: compiled(*args), cuda)
                rec["systems"]["compile_cudagraph"] = {**errs(first(replay())),
                                                       "first_s": time.perf_counter() - t}
                runners["compile_cudagraph"] = replay
            except Exception as exc:
                rec["systems"]["compile_cudagraph"] = _error(exc)
        for exporter in exporters:
            key = f"rtxjit_{exporter}"
            try:
                path = os.path.join(tmp, f"model_{exporter}.onnx")
                t = time.perf_counter()
                archs.export(name, model, feeds, exporter == "dynamo", path)
                export_s = time.perf_counter() - t
                t = time.perf_counter()
                sess = rtxjit.InferenceSession(path, specialize="eager" if cuda else None)
                sfeeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
                out = torch.as_tensor(sess.run(None, sfeeds)[0])
                first_s = time.perf_counter() - t
                rec["systems"][key] = {**errs(out), "export_s": export_s,
                                       "first_s": first_s, "launches": sess.launches_per_inference,
                                       "fused_attention": sum(n.op == "rtxjit.Attention" for n in sess.graph.nodes),
                                       "ops": sorted({n.op for n in sess.graph.nodes})}
                runners[key] = (lambda s, f: (lambda: s.run(None, f)))(sess, sfeeds)
            except Exception as exc:
                rec["systems"][key] = _error(exc)
        try:
            import rtxjit.torch as rtxjit_torch

            t = time.perf_counter()
            compiled_rt = torch.compile(wrapped, backend="rtxjit")
            out = first(compiled_rt(*args))
            for sess in rtxjit_torch.sessions():
                sess.wait_for_specialization(timeout=600)
            rec["systems"]["compile_rtxjit"] = {**errs(first(compiled_rt(*args))),
                                                "err_first_call": rel_err(out, ref, valid),
                                                "first_s": time.perf_counter() - t}
            runners["compile_rtxjit"] = lambda: compiled_rt(*args)
        except Exception as exc:
            rec["systems"]["compile_rtxjit"] = _error(exc)
        gate = Gate()
        gate.barrier(name)
        with gate.timing():
            for key, call in runners.items():
                try:
                    rec["systems"][key]["ms"] = time_ms(call, iters, cuda)
                except Exception as exc:
                    rec["systems"][key].update(_error(exc))
    return rec


def markdown(records: list, device: str) -> str:
    cols = ["eager", "compile_cudagraph", "rtxjit_torchscript", "rtxjit_dynamo", "compile_rtxjit"]
    lines = [f"# Model zoo at full size, fp16, left-padded batch {BATCH} x {SEQ} ({device})", "",
             "ms: median steady-state latency (CUDA events); err: max|out - eager| / max|eager| (fp16 "
             f"tolerance {FP16_TOL}); ratio: rtxjit time / torch.compile+CUDA graph time.", "",
             "| model | " + " | ".join(cols) + " | ratio (ts / dynamo) |", "|" + "---|" * (len(cols) + 2)]
    for r in records:
        cells = []
        for c in cols:
            s = r.get("systems", {}).get(c, {})
            if "error" in s:
                cells.append("error: " + s["error"][:80].replace("|", "/"))
            elif "ms" in s:
                cells.append(f"{s['ms']:.3f} ms" + (f", err {s['err']:.1e}" if "err" in s else ""))
            else:
                cells.append("-")
        ref = r.get("systems", {}).get("compile_cudagraph", {}).get("ms")
        ratios = []
        for c in ("rtxjit_torchscript", "rtxjit_dynamo"):
            ms = r.get("systems", {}).get(c, {}).get("ms")
            ratios.append(f"{ms / ref:.2f}" if ms and ref else "-")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {' / '.join(ratios)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--exporters", default="torchscript,dynamo")
    p.add_argument("--parallel", action="store_true",
                   help="compile all models side by side, then time them one at a time (see Gate)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.model:
        rec = run_model(a.model, a.tiny, 5 if a.tiny else a.iters, a.exporters.split(","))
        (out / f"zoo_gpu_{a.model}.json").write_text(json.dumps(rec, indent=1, default=str))
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("ms", "err", "error")}
                          for k, v in rec["systems"].items()}), flush=True)
        return 0
    names = a.models.split(",")
    env = dict(os.environ)
    gate_dir = Path(tempfile.mkdtemp())
    if a.parallel:
        env["ZOO_GATE"] = f"{gate_dir}:{len(names)}"
    procs = {}
    for name in names:
        cmd = [sys.executable, __file__, "--model", name, "--out", str(out), "--iters", str(a.iters),
               "--exporters", a.exporters] + (["--tiny"] if a.tiny else [])
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
                       time.perf_counter())
        if not a.parallel:
            procs[name] = procs[name] + tuple(procs[name][0].communicate())
    records = []
    for name in names:
        proc, t0 = procs[name][:2]
        stdout, stderr = procs[name][2:] if len(procs[name]) > 2 else proc.communicate()
        print(f"{name}: rc={proc.returncode} {time.perf_counter() - t0:.0f}s {stdout.strip()[-600:]}", flush=True)
        if proc.returncode != 0:
            print(stderr[-3000:], flush=True)
        f = out / f"zoo_gpu_{name}.json"
        records.append(json.loads(f.read_text()) if f.exists() else {"model": name, "systems": {},
                                                                        "error": stderr[-1000:]})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (interpreter)"
    env = {"device": device, "torch": torch.__version__, "triton": __import__("triton").__version__,
           "transformers": __import__("transformers").__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "zoo_gpu.json").write_text(json.dumps({"env": env, "records": records}, indent=1, default=str))
    (out / "zoo_gpu.md").write_text(markdown(records, device) + "\n" + json.dumps(env) + "\n")
    print(markdown(records, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
