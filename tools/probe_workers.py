"""GPU probe: GPU memory held by the process tree while a lazy session specializes in the background
(compile workers must not create CUDA contexts)."""
import subprocess, time
import torch
import rtxjit
from rtxjit.models import bert_encoder, demo_inputs

def used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0])

def main():
    base = used_mib()
    model = bert_encoder()
    sess = rtxjit.InferenceSession(model, device="cuda", specialize="lazy")
    feeds = demo_inputs(model, batch=2, seq=40)
    sess.run(None, feeds)
    peak = used_mib()
    for _ in range(200):
        time.sleep(0.05)
        peak = max(peak, used_mib())
        if sess.jit_stats()["pending"] == 0:
            break
    sess.wait_for_specialization(600)
    procs = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                           capture_output=True, text=True).stdout.strip().splitlines()
    print(f"base {base} MiB, peak while specializing {peak} MiB, processes on GPU: {len(procs)} {procs}")
    print(sess.jit_stats()["specialized"], sess.jit_stats()["failed"], sess.jit_stats()["errors"])


if __name__ == "__main__":
    main()
