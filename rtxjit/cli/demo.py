"""``rtxjit demo``: the built-in models against onnxruntime."""

from __future__ import annotations

import time

import numpy as np

from rtxjit.cli.common import _session, _time_runs


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
            per = float(np.median(_time_runs(sess, feeds, 1, args.iterations)))
            worst = max(worst, err / tol)
            status = "OK" if err <= tol else "MISMATCH"
            print(f"{name:8s} {np.dtype(dtype).name:8s} batch {args.batch}  on {sess.device}: "
                  f"rel. error vs onnxruntime {err:.2e} (tolerance {tol:.0e}) {status}; "
                  f"first run {first * 1e3:.1f} ms, then {per * 1e3:.2f} ms per inference")
    return 0 if worst <= 1 else 1
