"""Engine size and build time against the number of SM targets (the seed's figures 2 and 3), and
the weight-stripped engine against the full one, for a ResNet-50-style model (rtxjit.models
``resnet50_like``: ResNet-50's architecture and 25.6M weights, seeded random).

Runs on a machine with no GPU: kernels are compiled ahead of time for named targets. Per row, one
``rtxjit.build(..., kernels=True)`` for 1, 2 and 3 targets: build time (import + passes + kernel
compiles), kernels compiled, engine file size. Then a stripped engine (no weights, same kernels),
refitted from the ONNX file; its outputs are compared bit for bit with the full engine's (Triton's
interpreter on the CPU, at a small image size, or the GPU with ``--device cuda``).

    python benchmarks/bench_engine.py [--fp16] [--size 224] [--check-size 32] [--device cpu]
Writes benchmarks/results/bench_engine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_SETS = (["sm_90"], ["sm_89", "sm_90"], ["sm_80", "sm_89", "sm_90"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fp16", action="store_true", help="build with precision fp16 (weights stored in fp16)")
    p.add_argument("--size", type=int, default=224, help="image size of the profile (opt = max)")
    p.add_argument("--check-size", type=int, default=32, help="image size of the refit output check")
    p.add_argument("--device", default=None, help="where the refit check runs (cpu: the interpreter)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    import onnx

    import rtxjit  # before triton: on a machine with no GPU it turns Triton's interpreter on
    import triton
    from rtxjit.models import demo_inputs, resnet50_like

    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    onnx_path = tmp / "resnet50_like.onnx"
    onnx.save(resnet50_like(size="S"), str(onnx_path))  # square images of any size
    precision = "fp16" if args.fp16 else None
    profile = {"image": [(1, 3, args.size, args.size), (1, 3, args.size, args.size), (8, 3, args.size, args.size)]}
    rows = []
    for i, targets in enumerate(TARGET_SETS):
        os.environ["TRITON_CACHE_DIR"] = str(tmp / f"triton-{i}")  # every kernel compiled, none from a cache
        start = time.perf_counter()
        engine = rtxjit.build(str(onnx_path), targets=targets, profiles=profile, precision=precision, kernels=True)
        built = time.perf_counter() - start
        path = engine.save(tmp / f"full_{len(targets)}.rtx")
        rows.append({"targets": targets, "build_s": round(built, 2), "kernels": len(engine.binaries),
                     "compile_s": round(engine.build_report["seconds"], 2),
                     "size_bytes": Path(path).stat().st_size,
                     "kernel_bytes": sum(len(b["data"]) for b in engine.binaries.values())})
        print(json.dumps(rows[-1]), flush=True)
    # stripped vs full, one target (the table's first row)
    os.environ["TRITON_CACHE_DIR"] = str(tmp / "triton-stripped")
    start = time.perf_counter()
    stripped = rtxjit.build(str(onnx_path), targets=TARGET_SETS[0], profiles=profile, precision=precision,
                            kernels=True, strip_weights=True)
    stripped_s = time.perf_counter() - start
    stripped_path = stripped.save(tmp / "stripped.rtx")
    full_path = tmp / "full_1.rtx"
    sizes = {"full": full_path.stat().st_size, "stripped": Path(stripped_path).stat().st_size}
    refitter = rtxjit.Refitter(rtxjit.Engine.load(stripped_path, device="cpu"))
    refitter.refit_from_onnx(str(onnx_path))
    refitted = refitter.refit()
    full = rtxjit.Engine.load(full_path, device="cpu")
    feeds = demo_inputs(resnet50_like(size=args.check_size), batch=1)
    if args.fp16:
        feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    outs = []
    for engine in (full, refitted):
        sess = rtxjit.InferenceSession(engine, device=args.device,
                                       profiles={"image": [(1, 3, args.check_size, args.check_size)] * 3})
        outs.append(sess.run(None, feeds)[0])
    identical = bool(np.array_equal(outs[0], outs[1]) and outs[0].tobytes() == outs[1].tobytes())
    report = {"model": "resnet50_like (ResNet-50 architecture, 25.6M weights)", "precision": precision or "fp32",
              "triton": triton.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU used "
              "for the builds", "profile": profile, "rows": rows,
              "stripped": {"build_s": round(stripped_s, 2), "size_bytes": sizes["stripped"],
                           "full_size_bytes": sizes["full"],
                           "reduction": round(1 - sizes["stripped"] / sizes["full"], 4),
                           "refit_outputs_bit_identical": identical, "check": f"1x3x{args.check_size}x"
                           f"{args.check_size} on {sess.device}"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_engine.json").write_text(json.dumps(report, indent=1))
    (out / "bench_engine.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if identical else 1


def markdown(r: dict) -> str:
    lines = [f"# Engine size and build time ({r['model']}, {r['precision']})", "",
             f"Built on {r['machine']}; Triton {r['triton']}. Every kernel of the profile (generic kernels at min/opt/max, "
             "specialized ones at opt) compiled ahead of time per target.", "",
             "| targets | build s | kernels compiled | compile s | engine MB | of which kernels MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {', '.join(row['targets'])} | {row['build_s']:.1f} | {row['kernels']} | {row['compile_s']:.1f} | "
                     f"{row['size_bytes'] / 1e6:.1f} | {row['kernel_bytes'] / 1e6:.2f} |")
    s = r["stripped"]
    lines += ["", "## Weight-stripped", "",
              f"- full engine (1 target): {s['full_size_bytes'] / 1e6:.1f} MB; stripped: {s['size_bytes'] / 1e6:.2f} MB "
              f"({100 * s['reduction']:.1f}% smaller)",
              f"- refitted from the ONNX file, outputs bit-identical to the full engine's: "
              f"{s['refit_outputs_bit_identical']} ({s['check']})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
