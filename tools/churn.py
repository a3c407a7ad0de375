"""Session churn (issue 8): create and drop N sessions, one run each, and report whether host (and
GPU) memory stays flat.

After a warm-up (the first ``--warmup`` sessions: kernels loaded, module caches filled) and at the
end it samples, after a ``gc.collect()``: RSS (/proc/self/statm), Python's allocated blocks, the
traced heap (``--tracemalloc``: slower, ~4x on the CPU interpreter), live ``InferenceSession``
objects, threads, and on a GPU ``torch.cuda.memory_allocated`` / ``memory_reserved``. Prints one
JSON object; ``flat`` is true when every measure at the end is within 5% of the warm one plus the
slack named in the output.

    python tools/churn.py                                   # CPU, 200 sessions of a tiny encoder
    python tools/churn.py --device cuda --model bert --hidden 64 --sessions 200 --specialize lazy
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import tracemalloc

SLACK = {"rss": 4 << 20, "blocks": 2000, "traced": 256 << 10, "cuda_allocated": 0, "cuda_reserved": 2 << 20}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sample(traced: bool, cuda: bool) -> dict:
    import rtxjit

    gc.collect()
    out = {"rss": _rss(), "blocks": sys.getallocatedblocks(),
           "sessions": sum(type(o) is rtxjit.InferenceSession for o in gc.get_objects()),
           "threads": threading.active_count()}
    if traced:
        out["traced"] = tracemalloc.get_traced_memory()[0]
    if cuda:
        import torch

        torch.cuda.synchronize()
        out["cuda_allocated"] = torch.cuda.memory_allocated()
        out["cuda_reserved"] = torch.cuda.memory_reserved()
    return out


def churn(model, feeds: dict, sessions: int = 200, warmup: int = 20, device: str = "cpu",
          specialize: str = "none", traced: bool = False) -> dict:
    """Create, run once and drop ``sessions`` sessions; the samples after ``warmup`` and at the end."""
    import rtxjit

    cuda = device == "cuda"
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    samples = {}
    try:
        for i in range(sessions):
            sess = rtxjit.InferenceSession(model, device=device, specialize=specialize)
            sess.run(None, feeds)
            if specialize != "none":
                sess.wait_for_specialization(60)
            del sess
            if i + 1 in (warmup, sessions):
                samples["warm" if i + 1 == warmup else "end"] = sample(traced, cuda)
    finally:
        if traced:
            tracemalloc.stop()
    warm, end = samples["warm"], samples["end"]
    growth = {k: end[k] - warm[k] for k in SLACK if k in warm}
    flat = all(end[k] <= warm[k] * 1.05 + SLACK[k] for k in growth) and end["sessions"] == 0
    return {"sessions": sessions, "warmup": warmup, "device": device, "specialize": specialize,
            "seconds": round(time.perf_counter() - t0, 2), "warm": warm, "end": end, "growth": growth,
            "slack": {k: SLACK[k] for k in growth}, "flat": flat}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("bert", "cnn"), default="bert")
    p.add_argument("--hidden", type=int, default=8, help="encoder width (bert) or channels (cnn)")
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--specialize", default="none", choices=("none", "lazy", "eager"))
    p.add_argument("--tracemalloc", action="store_true", help="also trace Python's heap (slower)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    from rtxjit import models

    if args.model == "bert":
        model = models.bert_encoder(hidden=args.hidden, heads=2, ffn=2 * args.hidden)
    else:
        model = models.resnet_cnn(size=8, width=args.hidden)
    feeds = models.demo_inputs(model, batch=1, seq=4)
    result = churn(model, feeds, args.sessions, args.warmup, args.device, args.specialize, args.tracemalloc)
    result["model"] = f"{args.model}(hidden={args.hidden})"
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if result["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
