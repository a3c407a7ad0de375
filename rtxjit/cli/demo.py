"""``rtxjit demo``: the built-in models against onnxruntime."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rtxjit.cli.common import _session, _time_runs


def _save_onnx(folder: str, names: list) -> int:
    """Write the demo models (fp32) as ``folder/<name>.onnx``: files for the README's examples."""
    import onnx

    from rtxjit.models import DEMO_MODELS

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        model = DEMO_MODELS[name](dtype=np.float32)
        path = out / f"{name}.onnx"
        onnx.save(model, str(path))
        dims = {vi.name: [d.dim_param or str(d.dim_value) for d in vi.type.tensor_type.shape.dim]
                for vi in model.graph.input}
        inputs = ", ".join(f"{name} [{', '.join(shape)}]" for name, shape in dims.items())
        print(f"wrote {path} (inputs {inputs})")
    return 0


def cmd_demo(args) -> int:
    from rtxjit.models import DEMO_MODELS, demo_inputs

    names = list(DEMO_MODELS) if args.model == "all" else [args.model]
    if args.save_onnx is not None:
        return _save_onnx(args.save_onnx, names)
    import onnxruntime as ort

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
