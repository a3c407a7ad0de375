"""GPU probe: per-launch cost of Triton's JIT dispatch against rtxjit's direct launches, and the
CUDA-graph capture time of a variant, on the demo BERT encoder (fp16). Prints JSON."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

import rtxjit
from rtxjit.exec.executor import launch_all, launch_direct
from rtxjit.models import bert_encoder, demo_inputs


def main() -> None:
    model = bert_encoder(dtype=np.float16)
    sess = rtxjit.InferenceSession(model, device="cuda", specialize="eager")
    feeds = demo_inputs(model, batch=1, seq=128)
    sess.run(None, feeds)
    exe = sess.last_executable
    v = exe.active
    tensors = {k: torch.from_numpy(x).cuda().reshape(-1) for k, x in feeds.items()}
    bufs = exe.fresh_buffers(tensors)
    out = {"launches": len(v.launches), "direct": v.direct is not None}
    for name, fn in (("jit", lambda: launch_all(v.launches, bufs)), ("direct", lambda: launch_direct(v.direct, bufs))):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        out[f"{name}_cpu_ms"] = float(np.median(times) * 1e3)
        out[f"{name}_us_per_launch"] = float(np.median(times) * 1e6 / len(v.launches))
    caps = []
    for _ in range(5):
        v.graph, v.parts, v.captured, v.graph_bufs = None, [], 0, {}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        exe.capture(v, tensors)
        caps.append(time.perf_counter() - t0)
    out["capture_ms"] = float(np.median(caps) * 1e3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
