"""MatMul and Conv kernels alone, through the whole rtxjit path (one-node ONNX model, passes, plan,
autotuning at the first run, CUDA graph from the second), against torch.matmul / conv2d (cuBLAS,
cuDNN with cudnn.benchmark) in fp16. Shapes are those of the benchmark models: resnet50 at batch
1 and 32, bert-base at 128 and 1024 tokens, vit_b_16's 197 tokens.

    PYTHONPATH=$PWD python benchmarks/bench_kernels.py [--legacy] [--only conv|matmul] [--out DIR]

``--legacy`` also times the templates as they were before tuning (64x64x32 tiles, 4 warps, row-major
tile order, flat Conv gather on the weight as stored, 1x1 Conv through the gather), emulated by
patching the lowering's choices. Each rtxjit time is the median of ``triton.testing.do_bench``
(L2 flushed between calls) over a replay of the plan's CUDA graph; the check is
``|out - ref| / |ref|`` against an fp32 torch reference. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
import torch
from onnx import helper

import rtxjit
import rtxjit.ops.conv as conv_ops
import rtxjit.ops.matmul as matmul_ops
from rtxjit.codegen.templates.matmul import tile_config

from rtxjit.plan import autotune

FP16 = onnx.TensorProto.FLOAT16

MATMULS = [  # (name, M, K, N)
    ("square4096", 4096, 4096, 4096),
    ("bert_b1_qkv", 128, 768, 2304), ("bert_b1_out", 128, 768, 768), ("bert_b1_ffn1", 128, 768, 3072),
    ("bert_b1_ffn2", 128, 3072, 768),
    ("bert_b8_qkv", 1024, 768, 2304), ("bert_b8_out", 1024, 768, 768), ("bert_b8_ffn1", 1024, 768, 3072),
    ("bert_b8_ffn2", 1024, 3072, 768),
    ("vit_qkv", 197, 768, 2304), ("vit_ffn1", 197, 768, 3072), ("vit_ffn2", 197, 3072, 768),
]
CONVS = [  # (name, C, HW, Cout, k, stride) at pad k//2; each at batch 32 and 1
    ("c256_56_3x3", 256, 56, 256, 3, 1),
    ("stem_7x7s2", 3, 224, 64, 7, 2),
    ("c64_56_3x3", 64, 56, 64, 3, 1), ("c128_28_3x3", 128, 28, 128, 3, 1),
    ("c256_14_3x3", 256, 14, 256, 3, 1), ("c512_7_3x3", 512, 7, 512, 3, 1),
    ("c128_56_3x3s2", 128, 56, 128, 3, 2),
    ("c64_56_1x1_256", 64, 56, 256, 1, 1), ("c256_56_1x1_64", 256, 56, 64, 1, 1),
    ("c1024_14_1x1_256", 1024, 14, 256, 1, 1), ("c512_7_1x1_2048", 512, 7, 2048, 1, 1),
    ("c256_56_1x1s2_512", 256, 56, 512, 1, 2),
]


def _model(nodes, inputs, inits, out_name):
    graph = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info(out_name, FP16, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def matmul_case(m, k, n, rng):
    a = torch.from_numpy(rng.uniform(-1, 1, (m, k)).astype(np.float16)).cuda()
    b = torch.from_numpy(rng.uniform(-1, 1, (k, n)).astype(np.float16)).cuda()
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info("a", FP16, [m, k]), helper.make_tensor_value_info("b", FP16, [k, n])],
                   [], "y")
    ref = (a.float() @ b.float())
    return model, {"a": a, "b": b}, ref, lambda: torch.matmul(a, b), 2.0 * m * n * k


def conv_case(batch, c, hw, cout, ksize, stride, rng):
    x = torch.from_numpy(rng.uniform(-1, 1, (batch, c, hw, hw)).astype(np.float16)).cuda()
    w = (rng.uniform(-1, 1, (cout, c, ksize, ksize)) / np.sqrt(c * ksize * ksize)).astype(np.float16)
    bias = rng.uniform(-1, 1, (cout,)).astype(np.float16)
    pad = ksize // 2
    attrs = dict(pads=[pad] * 4, strides=[stride] * 2)
    model = _model([helper.make_node("Conv", ["x", "w", "bias"], ["y"], **attrs)],
                   [helper.make_tensor_value_info("x", FP16, list(x.shape))],
                   [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(bias, "bias")], "y")
    wt, bt = torch.from_numpy(w).cuda(), torch.from_numpy(bias).cuda()
    ref = torch.nn.functional.conv2d(x.float(), wt.float(), bt.float(), stride, pad)
    oh = (hw + 2 * pad - ksize) // stride + 1
    flops = 2.0 * batch * oh * oh * cout * c * ksize * ksize
    return model, {"x": x}, ref, lambda: torch.nn.functional.conv2d(x, wt, bt, stride, pad), flops


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


class Legacy:
    """Patches the lowering back to the untuned templates' choices (see the module docstring)."""

    def __enter__(self):
        self.saved = (matmul_ops.tile_configs, matmul_ops.unit_strides, conv_ops._is_pointwise, conv_ops._weight,
                      conv_ops.TAP_MAJOR_MIN_CHANNELS)

        def legacy_configs(m, n, k, dtype, interpret, k_cap=None, **_):
            cfg = dict(tile_config(m, n, k, dtype, interpret), GROUP_M=1, EVEN_K=False)
            return [cfg]

        matmul_ops.tile_configs = legacy_configs
        matmul_ops.unit_strides = lambda **_: frozenset()
        conv_ops._is_pointwise = lambda *a: False
        conv_ops._weight = lambda ctx, w, index=1: w
        conv_ops.TAP_MAJOR_MIN_CHANNELS = 1 << 30
        return self

    def __exit__(self, *exc):
        (matmul_ops.tile_configs, matmul_ops.unit_strides, conv_ops._is_pointwise, conv_ops._weight,
         conv_ops.TAP_MAJOR_MIN_CHANNELS) = self.saved


def run_rtxjit(model, feeds, ref):
    t0 = time.perf_counter()
    sess = rtxjit.InferenceSession(model, device="cuda")
    (y,) = sess.run(None, feeds)  # first run: autotuning
    setup = time.perf_counter() - t0
    sess.run(None, feeds)  # second run: CUDA graph capture
    exe = next(iter(sess._executables.values()))
    rel = float((y.float() - ref).norm() / ref.norm())
    steps = exe.plan.steps
    tuned = []
    for i, step in enumerate(steps):
        launch_cfg = exe.active.launches[i][3]
        tuned.append({"kernel": step.kernel.name, "chosen": launch_cfg,
                      "timings": [(c, t) for c, t in autotune.timings(step.tune_key)] if step.choices else []})
    ms = bench(lambda: [g.replay() for g in exe.active.graph]) if exe.active.graph is not None else bench(lambda: sess.run(None, feeds))
    return ms, rel, setup, tuned


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--legacy", action="store_true")
    ap.add_argument("--only", choices=["conv", "matmul"])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(0)
    cases = []
    if args.only != "conv":
        cases += [(name, lambda m=m, k=k, n=n: matmul_case(m, k, n, rng)) for name, m, k, n in MATMULS]
    if args.only != "matmul":
        for batch in (32, 1):
            cases += [(f"{name}_b{batch}", lambda b=batch, c=c, hw=hw, co=co, ks=ks, s=s: conv_case(b, c, hw, co, ks, s, rng))
                      for name, c, hw, co, ks, s in CONVS]
    rows = []
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}", flush=True)
    print(f"{'case':28s} {'torch':>7s} {'before':>7s} {'after':>7s} {'after/torch':>11s} {'heur':>7s}  "
          f"rel_err  chosen", flush=True)
    for name, make in cases:
        model, feeds, ref, torch_fn, flops = make()
        row = {"case": name, "flops": flops}
        try:
            row["torch_ms"] = bench(torch_fn)
            if args.legacy:
                os.environ["RTXJIT_AUTOTUNE"] = "0"
                with Legacy():
                    row["before_ms"], row["before_rel_err"], _, _ = run_rtxjit(model, feeds, ref)
                os.environ["RTXJIT_AUTOTUNE"] = "1"
            row["after_ms"], row["rel_err"], row["setup_s"], row["launches"] = run_rtxjit(model, feeds, ref)
        except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{name:28s} ERROR {row['error'][:300]}", flush=True)
            rows.append(row)
            continue
        tf = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
        main_launch = max(row["launches"], key=lambda l: len(l["timings"]))
        timings = main_launch["timings"]
        heur = tf(timings[0][1]) if timings else float("nan")
        ch = main_launch["chosen"]
        chosen = f"{main_launch['kernel']} {ch.get('BLOCK_M')}x{ch.get('BLOCK_N')}x{ch.get('BLOCK_K')}/w{ch.get('num_warps')}/s{ch.get('num_stages')}"
        before = tf(row["before_ms"]) if "before_ms" in row else float("nan")
        print(f"{name:28s} {tf(row['torch_ms']):7.1f} {before:7.1f} {tf(row['after_ms']):7.1f} "
              f"{row['torch_ms'] / row['after_ms']:11.2f} {heur:7.1f}  {row['rel_err']:.1e}  {chosen}"
              f"  (setup {row['setup_s']:.1f}s)", flush=True)
        rows.append(row)
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump({"device": dev, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
        f.write(f"# MatMul / Conv kernels, fp16, {dev} (TFLOP/s; after/torch = speed relative to torch)\n\n")
        f.write("| case | torch | before | after | after/torch | heuristic pick (autotuner timing, warm L2, not comparable) | rel err |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            if "error" in r:
                f.write(f"| {r['case']} | error: {r['error'][:80]} | | | | | |\n")
                continue
            tf = lambda ms: r["flops"] / (ms * 1e-3) / 1e12  # noqa: E731
            t = max(r["launches"], key=lambda l: len(l["timings"]))["timings"]
            f.write(f"| {r['case']} | {tf(r['torch_ms']):.1f} | "
                    f"{tf(r['before_ms']) if 'before_ms' in r else float('nan'):.1f} | {tf(r['after_ms']):.1f} | "
                    f"{r['torch_ms'] / r['after_ms']:.2f} | {tf(t[0][1]) if t else float('nan'):.1f} | "
                    f"{r['rel_err']:.1e} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
