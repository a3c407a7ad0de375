"""The command line as a trtexec user types it (issue 20): trtexec's flag spellings beside rtxjit's,
min/opt/max shapes for ``run``, a warning naming each dynamic dim that nobody set, ``--version``,
and ``demo --save-onnx``. A one-MatMul model keeps each run to milliseconds under the interpreter."""

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.cli import main


def _rtxjit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rtxjit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """y = Relu(x @ w): x is [batch, 8], batch dynamic."""
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path_factory.mktemp("trtexec") / "m.onnx"
    onnx.save(m, str(path))
    return path


def test_a_trtexec_command_line_builds_and_runs_an_engine(model):
    """The issue's two lines, as typed (no --sm on this machine without a GPU: a portable engine)."""
    engine = model.with_name("m.rtx")
    b = _rtxjit("build", f"--onnx={model}", f"--saveEngine={engine}", "--minShapes=x:1x8", "--optShapes=x:4x8",
                "--maxShapes=x:16x8")
    assert b.returncode == 0, b.stderr
    assert "profile 0: x [1..16, 8] opt [4, 8]" in b.stdout
    assert "no GPU here and no --sm: building a portable engine" in b.stderr or "targets: sm_" in b.stdout
    assert rtxjit.Engine.load(engine).profiles[0].shapes["x"] == ((1, 8), (4, 8), (16, 8))
    r = _rtxjit("run", "--loadEngine", engine, "--shapes", "x:3x8", "--warmUp", "200", "--duration", "1",
                "--avgRuns", "2", "--iterations", "2")
    assert r.returncode == 0, r.stderr
    assert "input x: shape [3, 8] float32" in r.stdout and "output y: shape [3, 4]" in r.stdout
    m = re.search(r"over (\d+) iterations in ([\d.]+) s \((\d+) warm-up in >= 200 ms\)", r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) >= 2 and float(m.group(2)) >= 1.0 and int(m.group(3)) >= 2
    assert re.search(r"average over 2 consecutive runs: min [\d.]+ ms, median [\d.]+ ms, max [\d.]+ ms", r.stdout)
    assert "warning" not in r.stderr  # every dim is set


def test_run_takes_an_optimization_profile(model, capsys):
    assert main(["run", "--onnx", str(model), "--minShapes", "x:2x8", "--optShapes", "x:5x8", "--maxShapes", "x:6x8",
                 "--warmup", "0", "--iterations", "1"]) == 0
    out = capsys.readouterr()
    assert "input x: shape [5, 8]" in out.out and "warning" not in out.err  # the opt shape, chosen
    # a shape outside the profile is the session's error, naming the input and its range
    assert main(["run", "--onnx", str(model), "--minShapes", "x:2x8", "--optShapes", "x:5x8", "--maxShapes", "x:6x8",
                 "--shapes", "x:9x8", "--warmup", "0", "--iterations", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rtxjit: error: ") and "'x'" in err and "9" in err
    # an engine keeps the profiles it was built with
    assert main(["build", "--onnx", str(model), "--sm", "90", "--no-kernels", "--saveEngine",
                 str(model.with_name("e.rtx"))]) == 0
    capsys.readouterr()
    assert main(["run", "--loadEngine", str(model.with_name("e.rtx")), "--optShapes", "x:5x8"]) == 1
    err = capsys.readouterr().err
    assert "--min-shapes/--opt-shapes/--max-shapes apply to --onnx" in err and "e.rtx" in err


def test_an_unset_dynamic_dim_is_a_warning_naming_it(model, capsys):
    assert main(["run", "--onnx", str(model), "--warmup", "0", "--iterations", "1"]) == 0
    out = capsys.readouterr()
    assert "input x: shape [1, 8]" in out.out
    warning = [line for line in out.err.splitlines() if line.startswith("rtxjit: warning:")]
    assert len(warning) == 1, out.err
    assert "input 'x'" in warning[0] and "dim 0 ('batch')" in warning[0] and "--shapes x:batchx8" in warning[0]
    assert main(["build", "--onnx", str(model), "--sm", "90", "--no-kernels", "--save-engine",
                 str(model.with_name("d.rtx"))]) == 0
    err = capsys.readouterr().err
    assert "input 'x': dynamic dim 0 ('batch')" in err and "accepts 1..4096" in err and "--optShapes" in err


def test_version_names_rtxjit_triton_and_torch():
    r = _rtxjit("--version", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"rtxjit {rtxjit.__version__}"
    assert any(re.fullmatch(r"triton \d+\.\d+.*", line) for line in lines)
    assert any(re.fullmatch(r"torch \d+\.\d+.*", line) for line in lines)


def test_demo_writes_its_models(tmp_path, capsys):
    assert main(["demo", "--save-onnx", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    for name in ("cnn", "encoder"):
        path = tmp_path / "models" / f"{name}.onnx"
        assert f"wrote {path}" in out
        onnx.checker.check_model(onnx.load(str(path)))
    assert "image [N, 3, 32, 32]" in out


@pytest.mark.parametrize("argv", [["run", "--warmUp", "-5"], ["run", "--duration", "x"], ["run", "--avgRuns", "0"]])
def test_bad_trtexec_numbers_are_usage_errors(model, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([argv[0], "--onnx", str(model), *argv[1:]])
    assert exc.value.code == 2
    assert argv[1] in capsys.readouterr().err
