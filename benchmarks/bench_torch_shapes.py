"""torch.compile with changing input shapes: how long each call waits, rtxjit's backend against
inductor. Writes benchmarks/results/bench_torch_shapes.{json,md}.

Model: bert-base (transformers ``BertModel``, fp16, batch 2), called with the sequence lengths
``SEQS`` (three calls each; dynamo specializes dims of size 0 or 1, so the batch is 2). Systems,
each in a fresh process: ``torch.compile(backend="rtxjit")`` and ``torch.compile()`` (inductor),
each with dynamo's default (static graph first, a symbolic one at the second distinct shape) and
with ``dynamic=True`` (symbolic from the first call). Every call is timed wall-clock up to the
outputs on the device (``torch.cuda.synchronize``): the first call of a shape includes whatever
compiling it waits for. rtxjit's counters (ONNX exports, sessions, kernel compiles) are recorded
after each shape.

Needs a GPU and transformers.  ``python benchmarks/bench_torch_shapes.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQS = [128, 64, 96, 32, 128]
CALLS = 3
BATCH = 2
SYSTEMS = {"rtxjit": ("rtxjit", None), "rtxjit_dynamic": ("rtxjit", True),
           "inductor": ("inductor", None), "inductor_dynamic": ("inductor", True)}


def child(system: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_models import _bert

    backend, dynamic = SYSTEMS[system]
    if backend == "rtxjit":
        import rtxjit.torch as rt
    model, _ = _bert(BATCH, SEQS[0], "cuda")
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    calls = []
    with torch.no_grad():
        for seq in SEQS:
            inputs = _bert_inputs(seq)
            for k in range(CALLS):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = compiled(*inputs)
                torch.cuda.synchronize()
                calls.append({"seq": seq, "call": k, "ms": (time.perf_counter() - t0) * 1e3})
            ref = model(*inputs)[0].float()
            err = float((out[0].float() - ref).abs().max() / ref.abs().max())
            calls[-1]["rel_err"] = err
            if backend == "rtxjit":
                sessions = rt.sessions()
                calls[-1].update(exports=rt.export_count(), sessions=len(sessions),
                                 compiles=sum(s.jit_stats()["compiles"] for s in sessions))
    return {"system": system, "calls": calls}


def _bert_inputs(seq: int) -> tuple:
    import torch
    from bench_models import _padding_mask

    g = torch.Generator(device="cuda").manual_seed(seq)
    ids = torch.randint(0, 30522, (BATCH, seq), device="cuda", generator=g)
    return ids, _padding_mask(BATCH, seq, "cuda")


def markdown(report: dict) -> str:
    lines = ["# torch.compile with changing shapes: bert-base fp16, batch 2", "",
             f"{report['device']} · torch {report['torch']} · triton {report['triton']} · {report['date']}", "",
             f"Wall-clock ms of each call, synchronized (first / third call at each sequence length, in order "
             f"{SEQS}). The first call of a shape includes any compile it waits for; rtxjit's later calls "
             "also gain the specialized kernels its background thread swaps in. The systems run one after "
             "another, each in a fresh process; they share Triton's and inductor's on-disk caches, so a later "
             "rtxjit process may find kernels there (compiles counts this process's own).", "",
             "| system | " + " | ".join(f"s{s} first / third" for s in SEQS) + " | max rel err | rtxjit exports / "
             "sessions / compiles |", "|---|" + "---:|" * (len(SEQS) + 2)]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['system']} | error: {r['error'][:200]} |")
            continue
        cells = []
        for i in range(len(SEQS)):
            first, third = r["calls"][i * CALLS], r["calls"][i * CALLS + CALLS - 1]
            cells.append(f"{first['ms']:.0f} / {third['ms']:.1f}")
        last = r["calls"][-1]
        err = max(c.get("rel_err", 0.0) for c in r["calls"])
        counts = f"{last['exports']} / {last['sessions']} / {last['compiles']}" if "exports" in last else "-"
        lines.append(f"| {r['system']} | " + " | ".join(cells) + f" | {err:.1e} | {counts} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    import torch
    import triton

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seqs": SEQS, "results": []}
    for system in args.systems.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", system], capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            report["results"].append({"system": system, "error": proc.stderr[-3000:]})
        else:
            report["results"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(system, "done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_torch_shapes.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "bench_torch_shapes.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
