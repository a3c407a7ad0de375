"""Quantized models (issue 19) beside rtxjit fp16 of the same model: time and accuracy.

Cases (full size, for a GPU):
- ``resnet50_int8``: torchvision resnet50 (random weights), batch 32, INT8 QDQ from
  onnxruntime.quantization.quantize_static (uint8 activations, int8 per-channel weights);
- ``bert_fp8``: a bert-base-shaped encoder (12 layers, hidden 768, 12 heads, FFN 3072; torch's
  TransformerEncoderLayer on embeddings), seq 128, batch 8, FP8 Q/DQ from rtxjit.quant.calibrate;
- ``mlp_int4_b1`` / ``mlp_int4_b16``: a decoder MLP block (SwiGLU, hidden 4096, intermediate 11008),
  1 and 16 tokens, INT4 weight-only (com.microsoft MatMulNBits, block 32, from MatMulNBitsQuantizer).

Each: the quantized model run by rtxjit with ``precision="fp16"`` (what is not quantized runs in
fp16, as in the fp16 model it is compared with: attention, LayerNorm, the float products' outputs;
the INT4 weight-only MLP's activations), and the fp32 model run by rtxjit in fp16
(``precision="fp16"``), timed after warm-up and specialization (CUDA events on a GPU, wall clock on
the CPU); accuracy of both against the fp32 model run by onnxruntime on the same random inputs
(max relative error, and top-1 agreement for the classifier), the optimized graph's op counts and,
for the quantized model, ``fused_op_counts``: the quantized products rtxjit.quant.fuse made (every
resnet50 conv is one ``rtxjit.QLinearConv``: int8 in, int8 out) and the float products left. Every
case runs in its own try/except
(the error is recorded, the others go on) and stops timing at ``--time-limit`` seconds.
``--tiny`` runs small versions of the same cases on the CPU (Triton's interpreter), for a test.

    python benchmarks/bench_quant.py --out benchmarks/results/quant_h100        # on a GPU
    python benchmarks/bench_quant.py --tiny --out /tmp/quant_tiny                # CPU, ~1 min

Writes ``<out>/bench_quant.json`` and ``<out>/bench_quant.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # rtxjit from this checkout, installed or not

MIN_TIMED = 20  # timed runs even past the case's deadline (its wait for specialized kernels may reach it)
WARMUP = 10  # untimed runs first (on a GPU): run i's fp16 MLP timed 0.43 ms median against a 0.19 ms minimum
CASES = ("resnet50_int8", "bert_fp8", "mlp_int4_b1", "mlp_int4_b16")
FUSED_OPS = ("rtxjit.QLinearConv", "rtxjit.QLinearMatMul", "com.microsoft.MatMulNBits")
FLOAT_PRODUCTS = ("Conv", "MatMul", "Gemm")


def _export(module, example, names=("x",)) -> "onnx.ModelProto":
    import onnx
    import torch
    buf = io.BytesIO()  # no torch.no_grad(): it would take TransformerEncoder's fused fast path, which has no export
    torch.onnx.export(module.eval(), example, buf, input_names=list(names), output_names=["y"], opset_version=17,
                      dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def _resnet(tiny: bool):
    import torch

    if tiny:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
                                  torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        shape = (2, 3, 16, 16)
    else:
        import torchvision

        net, shape = torchvision.models.resnet50(), (32, 3, 224, 224)
    torch.manual_seed(0)
    return _export(net, torch.randn(shape)), {"x": shape}


def _encoder(tiny: bool):
    import torch

    d, heads, ffn, layers, shape = (32, 2, 64, 2, (2, 8, 32)) if tiny else (768, 12, 3072, 12, (8, 128, 768))
    layer = torch.nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True, activation="gelu")
    net = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return _export(net, torch.randn(shape)), {"x": shape}


class _SwiGLU:
    @staticmethod
    def module(hidden: int, inter: int):
        import torch

        class MLP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = torch.nn.Linear(hidden, inter, bias=False)
                self.up = torch.nn.Linear(hidden, inter, bias=False)
                self.down = torch.nn.Linear(inter, hidden, bias=False)

            def forward(self, x):
                return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

        return MLP()


def _mlp(tiny: bool, tokens: int):
    import torch

    hidden, inter = (64, 160) if tiny else (4096, 11008)
    shape = (1, tokens, hidden)
    return _export(_SwiGLU.module(hidden, inter), torch.randn(shape)), {"x": shape}


def _quantize(case: str, model, shapes: dict, tiny: bool):
    rng = np.random.default_rng(0)
    samples = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2 if tiny else 4)]
    if case == "resnet50_int8":
        import tempfile

        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(samples)

            def get_next(self):
                return next(self.it, None)

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
            onnx.save(model, src)
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True)
            return onnx.load(dst)
    if case == "bert_fp8":
        from rtxjit.quant.calibrate import fp8_qdq

        return fp8_qdq(model, samples)
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    q = MatMulNBitsQuantizer(copy, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, quant_format=QuantFormat.QOperator))
    q.process()
    return q.model.model


def _build(case: str, tiny: bool):
    if case == "resnet50_int8":
        return _resnet(tiny)
    if case == "bert_fp8":
        return _encoder(tiny)
    return _mlp(tiny, 1 if case.endswith("b1") else 16)


def _time(sess, feeds: dict, cuda: bool, iters: int, deadline: float) -> dict:
    import torch

    for _ in range(WARMUP if cuda else 0):  # untimed: the CUDA graph of the installed variant is captured in parts
        sess.run(None, feeds)
    times = []
    for _ in range(iters):
        if time.perf_counter() > deadline and len(times) >= MIN_TIMED:
            break
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            sess.run(None, feeds)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": len(times),
            "timer": "cuda_events" if cuda else "perf_counter"}


def _accuracy(out: np.ndarray, ref: np.ndarray, classifier: bool) -> dict:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    acc = {"rel_error": float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))}
    if classifier:
        acc["top1_agreement"] = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
    return acc


def run_case(case: str, tiny: bool, time_limit: float, iters: int) -> dict:
    import onnxruntime as ort
    import torch

    import rtxjit

    deadline = time.perf_counter() + time_limit
    cuda = torch.cuda.is_available() and not tiny
    device = "cuda" if cuda else "cpu"
    result: dict = {"case": case, "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)"}
    model, shapes = _build(case, tiny)
    quantized = _quantize(case, model, shapes, tiny)
    result["quantized_ops"] = sorted({n.op_type for n in quantized.graph.node} & {
        "QuantizeLinear", "DequantizeLinear", "MatMulNBits"})
    rng = np.random.default_rng(1)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    classifier = case.startswith("resnet")
    for label, sess_args in (("fp16", dict(model=model, precision="fp16")),
                             ("quantized", dict(model=quantized, precision="fp16"))):
        entry: dict = {}
        result[label] = entry
        try:
            t0 = time.perf_counter()
            sess = rtxjit.InferenceSession(sess_args.pop("model"), device=device, **sess_args)
            dev_feeds = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
            out = sess.run(None, dev_feeds)[0]
            entry["first_run_s"] = time.perf_counter() - t0
            if cuda:
                sess.wait_for_specialization(timeout=max(1.0, deadline - time.perf_counter()))
            out = sess.run(None, dev_feeds)[0]
            out = out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
            entry.update(_accuracy(out, ref, classifier))
            plan = sess.plan_for(dev_feeds)
            entry["kernels"] = sorted({s.kernel.name for s in plan.steps})
            entry["launches"] = len(plan.steps)
            stats = sess.jit_stats()  # which kernels serve (a rejected specialized variant leaves the fallback)
            entry["jit"] = {k: stats.get(k) for k in ("last_run", "specialized", "rejected", "failed", "pending")}
            entry["jit"]["errors"] = list(stats.get("errors") or [])[:3]
            # a product with a fused epilogue is an rtxjit.Epilogue node: counted as its anchor op
            entry["ops"] = dict(sorted(Counter(n.attrs.get("anchor", n.op) if n.op == "rtxjit.Epilogue" else n.op
                                               for n in sess.graph.nodes).items()))
            if label == "quantized":  # what fuse_quantized folded, and the float products left
                result["fused_op_counts"] = {op: entry["ops"].get(op, 0) for op in FUSED_OPS + FLOAT_PRODUCTS}
            entry.update(_time(sess, dev_feeds, cuda, iters, deadline))
        except Exception as exc:  # recorded, the other runs go on
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
    if "median_ms" in result["fp16"] and "median_ms" in result["quantized"]:
        result["speedup_vs_fp16"] = result["fp16"]["median_ms"] / result["quantized"]["median_ms"]
    return result


def _markdown(results: list, meta: dict) -> str:
    lines = [f"# bench_quant ({meta['mode']}, {meta['device']})", "",
             "Quantized model by rtxjit vs the fp32 model by rtxjit in fp16; errors vs the fp32 model by onnxruntime.",
             "", "| case | fp16 ms | quantized ms | speedup | fp16 rel err | quant rel err | quant top-1 | error |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    for r in results:
        fp16, q = r.get("fp16", {}), r.get("quantized", {})
        err = r.get("error") or q.get("error") or fp16.get("error") or ""
        lines.append(f"| {r['case']} | {f(fp16.get('median_ms'))} | {f(q.get('median_ms'))} | "
                     f"{f(r.get('speedup_vs_fp16'), '{:.2f}x')} | {f(fp16.get('rel_error'), '{:.2e}')} | "
                     f"{f(q.get('rel_error'), '{:.2e}')} | {f(q.get('top1_agreement'), '{:.2f}')} | "
                     f"{err.splitlines()[0][:120] if err else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for bench_quant.json and bench_quant.md")
    parser.add_argument("--tiny", action="store_true", help="small models on the CPU interpreter (a test)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per case (timing stops there)")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("RTXJIT_DEVICE", "cpu")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = []
    for case in args.cases:
        t0 = time.perf_counter()
        try:
            r = run_case(case, args.tiny, args.time_limit, 3 if args.tiny else args.iters)
        except Exception as exc:  # building or quantizing the model failed: recorded
            r = {"case": case, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        r["case_s"] = time.perf_counter() - t0
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}, default=str)[:1500], flush=True)
    import torch

    meta = {"mode": "tiny" if args.tiny else "full", "python": sys.version.split()[0], "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quant.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    (out / "bench_quant.md").write_text(_markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
