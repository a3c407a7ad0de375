"""GPU probe behind exec/compiler.py's design: cold/warm first-result time of bert-base fp16, and whether Triton compiles
in threads overlap (GIL) and disturb a hot loop."""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/out"))
ONNX = Path("/tmp/bert_dyn.onnx")


def export():
    import torch
    sys.path.insert(0, "benchmarks")
    from bench_models import _bert, export_onnx
    model, inputs = _bert(1, 128, "cuda")
    with torch.no_grad():
        torch.onnx.export(model, tuple(inputs.values()), str(ONNX), input_names=list(inputs),
                          output_names=["last_hidden_state", "pooler_output"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "B", 1: "S"}, "attention_mask": {0: "B", 1: "S"}})


CHILD = r'''
import os, sys, time, json, threading
t0 = time.perf_counter()
import torch, triton
import rtxjit
from rtxjit.exec.executor import Executable
t_import = time.perf_counter() - t0
counts = {"miss": 0, "hit": 0}
def listener(**kw):
    counts["hit" if kw.get("cache_hit") else "miss"] += 1
triton.knobs.compilation.listener = listener
mode = sys.argv[1]
ids = torch.randint(0, 30000, (1, 128), device="cuda")
mask = torch.ones(1, 128, dtype=torch.int64, device="cuda")
t1 = time.perf_counter()
sess = rtxjit.InferenceSession("/tmp/bert_dyn.onnx", device="cuda")
t_session = time.perf_counter() - t1
res = {"mode": mode, "import_s": t_import, "session_s": t_session, "pass_s": sum(p.seconds for p in sess.pass_timings)}
if mode == "threads":
    from concurrent.futures import ThreadPoolExecutor
    from rtxjit.codegen.source import load_kernel
    from rtxjit.plan.plan import PlanBuilder
    tensors, types, host = sess._bind({"input_ids": ids, "attention_mask": mask})
    plan = PlanBuilder(sess.graph, sess.device, frozenset(sess._const_tensors)).build(types, host)
    exe = Executable(plan, sess.device, sess._const_tensors, plan_consts=sess._plan_consts)
    bufs = {idx: tensors[n] for n, idx in exe.inputs.items()}
    for i, numel, dt in exe.per_run:
        bufs[i] = torch.empty(numel, dtype=dt, device="cuda")
    seen = {}
    for launcher, args, slots, cx, step in exe.launches:
        args = [bufs[a.index] if j in slots else a for j, a in enumerate(args)]
        seen.setdefault((step.kernel.key, tuple(sorted(cx.items()))), (step, args, cx))
    # hot loop: a tiny kernel timed while compiling
    x = torch.randn(1 << 16, device="cuda")
    lat = []
    stop = threading.Event()
    def hot():
        while not stop.is_set():
            s = time.perf_counter(); y = x * 2; torch.cuda.synchronize(); lat.append(time.perf_counter() - s)
            time.sleep(0.001)
    base = []
    for _ in range(200):
        s = time.perf_counter(); y = x * 2; torch.cuda.synchronize(); base.append(time.perf_counter() - s)
    th = threading.Thread(target=hot); th.start()
    t2 = time.perf_counter()
    def warm(item):
        step, args, cx = item
        fn = load_kernel(step.kernel, False)
        fn.warmup(*args, grid=step.grid, **cx)
    with ThreadPoolExecutor(int(sys.argv[2])) as pool:
        list(pool.map(warm, seen.values()))
    res["parallel_compile_s"] = time.perf_counter() - t2
    stop.set(); th.join()
    lat.sort(); base.sort()
    res["distinct_kernels"] = len(seen)
    res["hot_ms_base_p50_p99"] = [1e3 * base[len(base) // 2], 1e3 * base[int(len(base) * .99)]]
    res["hot_ms_during_p50_p99_max"] = [1e3 * lat[len(lat) // 2], 1e3 * lat[int(len(lat) * .99)], 1e3 * lat[-1]]
t3 = time.perf_counter()
out = sess.run(None, {"input_ids": ids, "attention_mask": mask})
torch.cuda.synchronize()
res["first_run_s"] = time.perf_counter() - t3
res["to_first_result_s"] = time.perf_counter() - t1
t4 = time.perf_counter()
sess.run(None, {"input_ids": ids, "attention_mask": mask}); torch.cuda.synchronize()
res["second_run_s"] = time.perf_counter() - t4
res["compiles"] = dict(counts)
print("RESULT " + json.dumps(res))
'''


def child(args, cache, env_extra=None):
    env = dict(os.environ, TRITON_CACHE_DIR=cache, RTXJIT_AUTOTUNE="0", **(env_extra or {}))
    p = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=400)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
        return {"args": args, "error": p.stderr[-3000:]}
    return json.loads(line[0][7:])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter(); ONNX.exists() or export(); results = [{"export_s": time.perf_counter() - t}]
    c1 = tempfile.mkdtemp(); c2 = tempfile.mkdtemp(); c3 = tempfile.mkdtemp()
    for args, cache in ((["serial"], c1), (["serial"], c1), (["threads", "8"], c2), (["threads", "1"], c3)):
        r = child(args, cache); results.append(r); print(json.dumps(r), flush=True)
    (OUT / "probe.json").write_text(json.dumps(results, indent=1))


main()
