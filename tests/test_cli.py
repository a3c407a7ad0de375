"""The command line, run as a subprocess on the built-in demo models; the roofline counts and the
progress bar in process."""

import io
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import rtxjit
from rtxjit.cli.build import Progress
from rtxjit.cli.profile import _profile_table
from rtxjit.exec import roofline
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn


def _rtxjit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rtxjit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line_error(r, *names):
    """A user error: status 1, one line on stderr naming each of ``names``, no traceback."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("build [")]
    assert len(lines) == 1 and lines[0].startswith("rtxjit: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """cnn.onnx, and two engines of it for sm_90 built on this (CPU-only) machine: full and stripped."""
    folder = tmp_path_factory.mktemp("cli")
    model = folder / "cnn.onnx"
    onnx.save(resnet_cnn(), str(model))
    full, stripped = folder / "cnn.rtx", folder / "cnn_stripped.rtx"
    runs = {"full": _rtxjit("build", "--onnx", model, "--sm", "90", "--save-engine", full),
            "stripped": _rtxjit("build", "--onnx", model, "--sm", "sm_90", "--strip-weights", "--no-kernels",
                                "--min-shapes", "image:1x3x32x32", "--opt-shapes", "image:2x3x32x32",
                                "--max-shapes", "image:8x3x32x32", "--save-engine", stripped)}
    return {"folder": folder, "model": model, "full": full, "stripped": stripped, "runs": runs}


def test_demo_reports_agreement_with_onnxruntime():
    r = _rtxjit("demo", "--model", "cnn", "--dtype", "float32", "--iterations", "1")
    assert r.returncode == 0, r.stderr
    assert "cnn" in r.stdout and "OK" in r.stdout and "per inference" in r.stdout


def test_run_and_inspect_a_model_file(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(resnet_cnn(), str(path))
    r = _rtxjit("run", "--onnx", path, "--shapes", "image:2x3x32x32", "--warmup", "0", "--iterations", "1",
                "--runtime-cache", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "output logits: shape [2, 10]" in r.stdout
    assert "latency: median" in r.stdout and "throughput:" in r.stdout and "inferences/s" in r.stdout
    r = _rtxjit("inspect", "--onnx", path)
    assert r.returncode == 0 and r.stdout.startswith("graph resnet_cnn")
    assert "BatchNormalization" in r.stdout  # the imported graph; --passes folds it into the convs
    r = _rtxjit("inspect", "--onnx", path, "--passes")
    assert r.returncode == 0 and r.stdout.startswith("graph resnet_cnn") and "BatchNormalization" not in r.stdout


def test_a_bad_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    _one_line_error(_rtxjit("inspect", "--onnx", path), "bad.onnx")


def test_build_without_a_gpu_for_named_targets(built):
    full, stripped = built["runs"]["full"], built["runs"]["stripped"]
    assert full.returncode == 0, full.stderr
    assert stripped.returncode == 0, stripped.stderr
    assert "targets: sm_90" in full.stdout and "stripped: no" in full.stdout
    assert "stripped: yes" in stripped.stdout
    # kernels compiled for sm_90 on this machine with no GPU (none with --no-kernels)
    assert re.search(r"compiled kernels: [1-9]\d* \(sm_90: [1-9]", full.stdout), full.stdout
    assert "compiled kernels: 0" in stripped.stdout and "kernels 10/" in full.stderr
    assert "profile 0: image [1..8, 3, 32, 32] opt [2, 3, 32, 32]" in stripped.stdout
    for line in ("engine: ", "size: ", "build time: "):
        assert line in full.stdout
    # the progress bar: plain lines when stderr is not a terminal
    assert "build [####################] 3/3 save" in full.stderr
    size = {k: built[k].stat().st_size for k in ("full", "stripped")}
    assert f"size: {size['full']:,} bytes" in full.stdout
    assert size["stripped"] < 0.2 * size["full"]
    assert rtxjit.Engine.load(built["full"], device="sm_90").targets == (90,)


def test_run_an_engine_at_its_profile_shapes(built):
    r = _rtxjit("run", "--load-engine", built["full"], "--warmup", "0", "--iterations", "1")
    assert r.returncode == 0, r.stderr
    assert "input image: shape [1, 3, 32, 32] float32" in r.stdout  # the default profile's opt shape
    assert "output logits: shape [1, 10]" in r.stdout and "latency: median" in r.stdout


def test_a_stripped_engine_names_its_missing_weights(built):
    names = [w.name for w in rtxjit.Engine.load(built["stripped"]).weights]
    r = _rtxjit("run", "--load-engine", built["stripped"], "--iterations", "1")
    _one_line_error(r, "weight-stripped", names[0], "--refit-onnx")


def test_profile_prints_a_row_per_launch(built):
    out = built["folder"] / "profile.json"
    r = _rtxjit("profile", "--load-engine", built["full"], "--warmup", "0", "--iterations", "1",
                "--export-profile", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#  node"))
    total = next(i for i, line in enumerate(lines) if line.split()[:1] == ["total"])
    assert "% roofline" in lines[header] and "share" in lines[header] and "time us" in lines[header]
    rows = lines[header + 1:total]
    doc = json.loads(out.read_text())
    assert len(rows) == len(doc["launches"]) > 5
    assert len({len(line) for line in lines[header:total + 1]}) == 1  # fixed columns
    assert [row.split()[0] for row in rows] == [str(i) for i in range(len(rows))]
    if torch.cuda.is_available():
        assert "machine: bandwidth" in r.stdout and rows[0].split()[-1].endswith("%")
    else:
        assert "needs a GPU" in r.stdout and rows[0].split()[-1] == "n/a"  # no roofline on the CPU
    kernels = {launch["kernel"] for launch in doc["launches"]}
    assert {"conv2d", "matmul"} <= kernels
    assert all(launch["bytes"] > 0 for launch in doc["launches"])


def test_inspect_an_engine_and_a_kernel(built):
    r = _rtxjit("inspect", "--load-engine", built["stripped"])
    assert r.returncode == 0, r.stderr
    assert "targets: sm_90" in r.stdout and "stripped: yes" in r.stdout and "format: rtxjit-engine" in r.stdout
    assert "\ngraph resnet_cnn" in r.stdout
    r = _rtxjit("inspect", "--load-engine", built["full"], "--kernel", "0")
    assert r.returncode == 0, r.stderr
    assert "# rtxjit kernel conv2d" in r.stdout and "\ndef conv2d(" in r.stdout and "tl.dot(" in r.stdout


def test_inspect_launches_are_the_launches_a_run_makes(built, capsys):
    """``inspect --launches`` lists the session's own plan (``InferenceSession.plan``): the kernels
    and grids that a run of those shapes launches."""
    from rtxjit.cli import main

    assert main(["inspect", "--onnx", str(built["model"]), "--launches", "--shapes", "image:2x3x32x32",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ") and "image [2, 3, 32, 32]" in lines[0]
    listed = [line.split(None, 3)[1:] for line in lines[1:]]
    sess = rtxjit.InferenceSession(str(built["model"]), device="cpu", specialize="none")
    plan = sess.plan_for({"image": np.ones((2, 3, 32, 32), np.float32)})
    assert listed == [[s.node, f"{s.kernel.name}:{s.kernel.short_key}", f"grid {list(s.grid)}"] for s in plan.steps]


@pytest.mark.parametrize("case", ["missing model", "missing engine", "shapes syntax", "shapes dims", "unknown input"])
def test_bad_input_is_one_line_naming_it(built, case):
    model, engine = built["model"], built["full"]
    args, names = {
        "missing model": (("run", "--onnx", model.with_name("nope.onnx")), ["nope.onnx"]),
        "missing engine": (("inspect", "--load-engine", engine.with_name("nope.rtx")), ["nope.rtx"]),
        "shapes syntax": (("run", "--onnx", model, "--shapes", "image2x3x32x32"), ["image2x3x32x32"]),
        "shapes dims": (("build", "--onnx", model, "--sm", "90", "--shapes", "image:2xAx32x32", "--save-engine",
                         engine.with_name("x.rtx")), ["image", "2xAx32x32"]),
        "unknown input": (("profile", "--load-engine", engine, "--shapes", "pixels:1x3x32x32"), ["pixels", "image"]),
    }[case]
    _one_line_error(_rtxjit(*args), *names)


# --- in process -------------------------------------------------------------------------------

def test_roofline_counts_come_from_each_launch():
    sess = rtxjit.InferenceSession(resnet_cnn())
    sess.run(None, demo_inputs(resnet_cnn(), batch=2))
    plan = sess.last_executable.plan
    by_kernel = {}
    for step, counts in zip(plan.steps, roofline.plan_counts(plan)):
        by_kernel.setdefault(step.kernel.name, []).append(counts)
    gemm = by_kernel["matmul"][0]  # [2, 32] x [32, 10] + bias: 2*M*N*K flops; out, a, w, bias bytes
    assert gemm.flops == 2 * 2 * 10 * 32 and gemm.operand == "fp32"
    assert gemm.bytes == 4 * (2 * 10 + 2 * 32 + 10 * 32 + 10)
    stem = by_kernel["conv2d"][0]  # 3 -> 16 channels, 3x3, 32x32 pixels, batch 2
    assert stem.flops == 2 * (2 * 32 * 32) * 16 * (3 * 3 * 3)
    assert all(c.flops == 0 for c in by_kernel["pool_max"] + by_kernel["reduce_mean"])
    machine = roofline.Machine("test", bandwidth=1e12, peak_fp16=1e15, peak_fp32=1e13)
    assert machine.floor(gemm) == max(gemm.bytes / 1e12, gemm.flops / 1e13)
    assert machine.floor(roofline.Counts(10**6, 10**12, "fp16")) == 1e-3


def test_attention_flops():
    sess = rtxjit.InferenceSession(bert_encoder())
    sess.run(None, demo_inputs(bert_encoder(), batch=2, seq=8))
    plan = sess.last_executable.plan
    (attn,) = [roofline.step_counts(plan, s) for s in plan.steps if s.kernel.name == "attention"]
    assert attn.flops == 2 * 8 * 8 * (16 + 16) * (2 * 4)  # per (batch, head): QK^T and PV


def test_profile_table_and_progress_lines():
    rows = [{"index": i, "node": n, "kernel": k, "variant": "generic", "seconds": s, "share": s / 0.003,
             "bytes": 1000 * (i + 1), "flops": 0, "floor_seconds": f, "roofline": None if f is None else f / s}
            for i, (n, k, s, f) in enumerate([("a", "matmul", 0.001, 5e-4),
                                              ("long_node_name", "pointwise", 0.002, 1e-3)])]
    lines = _profile_table(rows)
    assert len({len(line) for line in lines}) == 1
    assert lines[1].split()[-1] == "50.0%" and lines[-1].split()[-1] == "50.0%"
    stream = io.StringIO()
    progress = Progress(["import", "save"], stream)
    with progress.phase("import"):
        pass
    with pytest.raises(ValueError):
        with progress.phase("save"):
            raise ValueError
    assert stream.getvalue().startswith("build [##########..........] 1/2 import: ")
    assert stream.getvalue().count("\n") == 1


def test_random_feeds_follow_input_types():
    from rtxjit.cli.common import _input_shapes, _random_feeds

    sess = rtxjit.InferenceSession(bert_encoder())
    shapes = _input_shapes(sess, "hidden:2x5x64", "the model")
    assert shapes == {"hidden": (2, 5, 64), "mask": (2, 5)}  # N and S bound by the named input
    feeds = _random_feeds(sess, shapes)
    assert feeds["hidden"].dtype == np.float32 and np.all(feeds["hidden"] != 0)
