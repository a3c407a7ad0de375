"""Where the time of a zoo model goes on a GPU: per-launch times (each launch alone, CUDA events),
the JIT's counters, and for every Softmax left unfused the ops around it.

    python tools/probe_zoo.py bert [--tiny]
"""

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rtxjit  # noqa: E402,F401  (before transformers)
import torch  # noqa: E402

from rtxjit.exec import roofline  # noqa: E402
from tests.zoo import archs  # noqa: E402


def main(name: str, tiny: bool) -> None:
    cuda = torch.cuda.is_available() and not tiny
    dev, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    model, make_feeds = archs.build(name, "tiny" if tiny else "full")
    model = model.to(dev, dtype)
    feeds = make_feeds("left", 4, 16 if tiny else 128)
    feeds = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in feeds.items()}
    path = str(Path(tempfile.mkdtemp()) / "m.onnx")
    archs.export(name, model, feeds, False, path)
    sess = rtxjit.InferenceSession(path, specialize="eager" if cuda else None)
    sfeeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    sess.run(None, sfeeds)
    print("jit", {k: v for k, v in sess.jit_stats().items() if not isinstance(v, (dict, list))})
    for n in sess.graph.nodes:
        if n.op == "Softmax":
            x = n.inputs[0].producer
            back = []
            while x is not None and len(back) < 6:
                back.append(f"{x.op}{list(x.outputs[0].type.shape)}{x.outputs[0].type.dtype.short}")
                x = x.inputs[0].producer if x.inputs and x.inputs[0] is not None else None
            print("unfused softmax", n.name, "<-", " <- ".join(back))
            break
    exe = sess.last_executable
    flat = {k: v.reshape(-1).contiguous() for k, v in sfeeds.items()}
    times = roofline.time_launches(exe, flat, 20, warmup=2)
    kinds = list(exe.active.kinds)
    by_kernel = Counter()
    for step, kind, t in zip(exe.plan.steps, kinds, times):
        by_kernel[(step.kernel.name, kind)] += t
    print("launches", len(times), "sum of launches ms", round(sum(times) * 1e3, 3))
    for (k, kind), t in by_kernel.most_common(12):
        print(f"  {k:28s} {kind:12s} {t * 1e3:8.3f} ms")
    rows = sorted(zip(times, exe.plan.steps, kinds), key=lambda r: -r[0])[:8]
    for t, step, kind in rows:
        print(f"  top {t * 1e3:7.3f} ms {step.kernel.name} {kind} node {step.node}")
    for _ in range(5):
        sess.run(None, sfeeds)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        sess.run(None, sfeeds)
    if cuda:
        torch.cuda.synchronize()
    print("end to end ms", round((time.perf_counter() - t) / 50 * 1e3, 3))


if __name__ == "__main__":
    main(sys.argv[1], "--tiny" in sys.argv)
