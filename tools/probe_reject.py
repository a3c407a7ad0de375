"""GPU probe: which specialized kernels the check rejects on a bert-sized demo encoder (fp16), and
by how much each differs from its generic kernel when run alone."""

from __future__ import annotations

import json
import warnings

import numpy as np

import rtxjit
from rtxjit.exec.executor import GENERIC, SPECIALIZED
from rtxjit.jit import specializer as jit
from rtxjit.models import bert_encoder, demo_inputs


def main() -> None:
    out = []
    for hidden, heads, seq, batch in ((768, 12, 128, 8), (256, 4, 64, 2)):
        model = bert_encoder(dtype=np.float16, hidden=hidden, heads=heads, ffn=4 * hidden)
        sess = rtxjit.InferenceSession(model, device="cuda", specialize="none")
        feeds = demo_inputs(model, batch=batch, seq=seq)
        sess.run(None, feeds)
        exe = sess.last_executable
        import torch

        tensors = {k: torch.from_numpy(v).cuda().reshape(-1) for k, v in feeds.items()}
        from rtxjit.exec import compiler

        compiler.prepare_specialized(exe, background=False, tuned=True)
        n = len(exe.plan.steps)
        ref = jit._run(exe, exe.variant([GENERIC] * n), tensors)
        rows = []
        for i, step in enumerate(exe.plan.steps):
            for c, cfg in enumerate(step.choices or [(step.grid, step.constexprs)]):
                kinds = [GENERIC] * n
                kinds[i] = SPECIALIZED
                got = jit._run(exe, exe.variant(kinds, {i: cfg}), tensors)
                why = jit._mismatch(ref, got)
                if why:
                    rows.append({"step": i, "kernel": step.kernel.name, "node": step.node, "config": str(cfg[1]),
                                 "why": why})
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s2 = rtxjit.InferenceSession(model, device="cuda", specialize="eager")
            s2.run(None, feeds)
        out.append({"hidden": hidden, "mismatches": rows, "rejected": s2.jit_stats()["rejected"],
                    "warnings": [str(x.message)[:200] for x in w if "rtxjit" in str(x.message)][:6]})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
