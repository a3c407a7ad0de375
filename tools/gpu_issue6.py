"""GPU run for issue 6: ``rtxjit profile`` of resnet50 and bert-base (torchvision / transformers
exports, fp16), and a weight-stripped resnet50 engine refitted from its ONNX file against the full
engine (outputs compared bit for bit). Writes OUT/profile_*.txt and OUT/refit.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = Path(os.environ.get("OUT", "."))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_jit import export_models

    tmp = Path(tempfile.mkdtemp(prefix="issue6-"))
    paths = export_models(tmp)
    shapes = {"resnet50": "image:1x3x224x224", "bert_base": "input_ids:1x128,attention_mask:1x128"}
    for name, shape in shapes.items():
        r = subprocess.run([sys.executable, "-m", "rtxjit", "profile", "--onnx", str(paths[name]), "--shapes", shape,
                            "--warmup", "3", "--iterations", "20"], capture_output=True, text=True, timeout=400)
        (out / f"profile_{name}.txt").write_text(r.stdout + ("\n" + r.stderr[-3000:] if r.returncode else ""))
        print(name, "profile rc", r.returncode, flush=True)
    import numpy as np
    import torch

    import rtxjit

    full = rtxjit.build(str(paths["resnet50"]), targets=["current"], kernels=True)
    full.save(tmp / "full.rtx")
    stripped = rtxjit.build(str(paths["resnet50"]), targets=["current"], kernels=True, strip_weights=True)
    stripped.save(tmp / "stripped.rtx")
    refitter = rtxjit.Refitter(rtxjit.Engine.load(tmp / "stripped.rtx"))
    refitter.refit_from_onnx(str(paths["resnet50"]))
    refitted = refitter.refit()
    image = torch.randn(2, 3, 224, 224, dtype=torch.float16, device="cuda")
    outs = []
    for engine in (rtxjit.Engine.load(tmp / "full.rtx"), refitted):
        sess = rtxjit.InferenceSession(engine, device="cuda", specialize="none")
        outs.append(sess.run(None, {"image": image})[0].cpu().numpy())
    report = {"full_bytes": (tmp / "full.rtx").stat().st_size, "stripped_bytes": (tmp / "stripped.rtx").stat().st_size,
              "bit_identical": bool(outs[0].tobytes() == outs[1].tobytes()),
              "max_abs": float(np.abs(outs[0].astype(np.float32)).max()), "device": torch.cuda.get_device_name()}
    report["reduction"] = 1 - report["stripped_bytes"] / report["full_bytes"]
    (out / "refit.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
