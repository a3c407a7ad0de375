"""The command line, run as a subprocess on the built-in demo model."""

import subprocess
import sys

import onnx

from rtxjit.models import resnet_cnn


def _rtxjit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rtxjit", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_demo_reports_agreement_with_onnxruntime():
    r = _rtxjit("demo", "--model", "cnn", "--dtype", "float32", "--iterations", "1")
    assert r.returncode == 0, r.stderr
    assert "cnn" in r.stdout and "OK" in r.stdout and "per inference" in r.stdout


def test_run_and_inspect_a_model_file(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(resnet_cnn(), str(path))
    r = _rtxjit("run", "--onnx", str(path), "--shapes", "image:2x3x32x32", "--warmup", "0", "--iterations", "1")
    assert r.returncode == 0, r.stderr
    assert "output logits: shape [2, 10]" in r.stdout
    r = _rtxjit("inspect", "--onnx", str(path))
    assert r.returncode == 0 and r.stdout.startswith("graph resnet_cnn")


def test_a_bad_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    r = _rtxjit("inspect", "--onnx", str(path))
    assert r.returncode == 2 and "bad.onnx" in r.stderr and "Traceback" not in r.stderr
