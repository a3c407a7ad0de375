"""The whole pipeline (``rtxjit.passes.optimize``) and its use by ``InferenceSession``."""

import numpy as np
import onnxruntime as ort
import pytest

import rtxjit
from rtxjit.onnx.importer import import_model
from rtxjit.models import bert_encoder, demo_inputs, resnet_cnn
from rtxjit.passes import PIPELINE, optimize
from tests.oprunner import rel_error
from tests.passes.helpers import ops, run

MODELS = {"cnn": resnet_cnn, "encoder": bert_encoder}
TOL = {np.float32: 1e-4, np.float16: 1e-2}


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_demo_model_matches_onnxruntime_after_the_pipeline(name, dtype):
    small = {"size": 16} if name == "cnn" else {}
    model = MODELS[name](dtype=dtype, **small)
    feeds = demo_inputs(model, batch=2, seq=8)
    graph, timings = optimize(import_model(model), verify=True)
    assert [t.name for t in timings] == [name for name, _ in PIPELINE]
    got = run(graph, feeds)[0]
    fp32 = MODELS[name](dtype=np.float32, **small)  # the same seeded weights (onnxruntime's CPU fp16 is partial)
    ref = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    want = ref.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})[0]
    assert rel_error(got, want) <= TOL[dtype]


def test_resnet_batchnorms_are_folded_away():
    before = import_model(resnet_cnn())
    after, _ = optimize(before)
    assert ops(before)["BatchNormalization"] == 6 and "BatchNormalization" not in ops(after)
    convs = [n for n in after.nodes if "Conv" in (n.op, n.attrs.get("anchor"))]
    assert len(convs) == ops(before)["Conv"]  # each Conv stays, alone or with its fused epilogue


def test_optimize_leaves_its_input_graph_alone():
    before = import_model(resnet_cnn())
    text = str(before)
    optimize(before)
    assert str(before) == text


def test_session_optimizes_unless_told_not_to(tmp_path, monkeypatch):
    model = resnet_cnn(size=8)
    monkeypatch.setenv("RTXJIT_DUMP_PASSES", str(tmp_path))
    sess = rtxjit.InferenceSession(model)
    assert "BatchNormalization" not in ops(sess.graph)
    assert [t.name for t in sess.pass_timings] == [name for name, _ in PIPELINE]
    step = [name for name, _ in PIPELINE].index("fold_batchnorm") + 1  # dumps are numbered by pipeline step
    assert (tmp_path / f"01_{step:02d}_fold_batchnorm.txt").is_file()
    plain = rtxjit.InferenceSession(model, optimize=False)
    assert ops(plain.graph)["BatchNormalization"] == 6 and plain.pass_timings == []
