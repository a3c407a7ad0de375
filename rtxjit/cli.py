"""The ``rtxjit`` command line: ``demo``, ``run`` and ``inspect``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _session(model, device):
    import rtxjit

    return rtxjit.InferenceSession(model, device=device)


def _time_runs(sess, feeds: dict, warmup: int, iterations: int) -> float:
    """Median seconds per inference, after warm-up (the first run builds the plan and kernels)."""
    import torch

    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(iterations):
        if sess.device.kind == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sess.run(None, feeds)
        if sess.device.kind == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cmd_demo(args) -> int:
    import onnxruntime as ort

    from rtxjit.models import DEMO_MODELS, demo_inputs

    names = list(DEMO_MODELS) if args.model == "all" else [args.model]
    worst = 0.0
    for name in names:
        for dtype in (np.float32, np.float16) if args.dtype == "both" else (np.dtype(args.dtype),):
            model = DEMO_MODELS[name](dtype=dtype)
            feeds = demo_inputs(model, batch=args.batch)
            ref_model = DEMO_MODELS[name](dtype=np.float32)
            ref = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, {k: v.astype(np.float32) for k, v in feeds.items()})[0]
            sess = _session(model, args.device)
            t0 = time.perf_counter()
            out = sess.run(None, feeds)[0]
            first = time.perf_counter() - t0
            err = float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())
            tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-2
            per = _time_runs(sess, feeds, 1, args.iterations)
            worst = max(worst, err / tol)
            status = "OK" if err <= tol else "MISMATCH"
            print(f"{name:8s} {np.dtype(dtype).name:8s} batch {args.batch}  on {sess.device}: "
                  f"rel. error vs onnxruntime {err:.2e} (tolerance {tol:.0e}) {status}; "
                  f"first run {first * 1e3:.1f} ms, then {per * 1e3:.2f} ms per inference")
    return 0 if worst <= 1 else 1


def _parse_shapes(text: str) -> dict:
    shapes = {}
    for part in filter(None, (text or "").split(",")):
        name, _, dims = part.rpartition(":")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def cmd_run(args) -> int:
    sess = _session(args.onnx, args.device)
    shapes = _parse_shapes(args.shapes)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        dims = shapes.get(i.name) or tuple(d if isinstance(d, int) else 1 for d in i.shape)
        dt = i.dtype.to_numpy()
        feeds[i.name] = (rng.standard_normal(dims) if dt.kind == "f" else rng.integers(0, 2, dims)).astype(dt)
    per = _time_runs(sess, feeds, args.warmup, args.iterations)
    for o, v in zip(sess.get_outputs(), sess.run(None, feeds)):
        print(f"output {o.name}: shape {list(v.shape)} {v.dtype} mean {float(np.mean(v)):.6g}")
    print(f"{per * 1e3:.3f} ms per inference (median of {args.iterations}) on {sess.device}")
    return 0


def cmd_inspect(args) -> int:
    sess = _session(args.onnx, args.device)
    print(sess.graph)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rtxjit", description="JIT inference compiler: ONNX -> Triton kernels")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="cuda, or cpu (Triton's interpreter); default: a GPU if torch sees one")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", parents=[common], help="run the built-in models and compare with onnxruntime")
    d.add_argument("--model", choices=["cnn", "encoder", "all"], default="all")
    d.add_argument("--dtype", choices=["float32", "float16", "both"], default="both")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--iterations", type=int, default=3)
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("run", parents=[common], help="run a model on random inputs and time it")
    r.add_argument("--onnx", required=True)
    r.add_argument("--shapes", default="", help="name:1x3x224x224,other:1x128")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--iterations", type=int, default=10)
    r.set_defaults(fn=cmd_run)
    i = sub.add_parser("inspect", parents=[common], help="print the model's IR")
    i.add_argument("--onnx", required=True)
    i.set_defaults(fn=cmd_inspect)
    args = p.parse_args(argv)
    from rtxjit.errors import RtxjitError  # importing rtxjit first readies Triton (see rtxjit.config)

    try:
        return args.fn(args)
    except RtxjitError as exc:
        print(f"rtxjit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
