"""Fuzzing (issue 8), the bounded CI part: mutated ONNX models, damaged engine files and cache entries
either give a correct result or an rtxjit error; never another exception type, a hang or a wrong
result. The checks live in tools/fuzz.py, whose long run (``python tools/fuzz.py``) uses many more
examples."""

import importlib.util
import random
import sys
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rtxjit
from rtxjit.errors import ModelError

_spec = importlib.util.spec_from_file_location("rtxjit_tools_fuzz", Path(__file__).parents[1] / "tools" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fuzz
_spec.loader.exec_module(fuzz)

CASE_TIMEOUT_S = 30
SEEDS = st.integers(0, 2 ** 31 - 1)
# derandomized: CI runs the same cases every time (no flaky runs); tools/fuzz.py explores at random
FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _check(run):
    """The outcome of one case under the watchdog; a hang fails the test."""
    try:
        with fuzz.watchdog(CASE_TIMEOUT_S):
            outcome, what = run()
    except fuzz.Hang:
        pytest.fail(f"a case ran past {CASE_TIMEOUT_S} s")
    assert not outcome.bad, f"{what}: {outcome.kind}: {outcome.detail}"
    return outcome


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("mutation", sorted(fuzz.MODEL_MUTATIONS) + ["bytes"])
@settings(FUZZ, max_examples=150)
@given(base=st.sampled_from(sorted(fuzz.base_models())), seed=SEEDS)
def test_mutated_model_gives_result_or_rtxjit_error(mutation, base, seed):
    _check(lambda: fuzz.check_model_mutation(base, mutation, seed))


@settings(FUZZ, max_examples=1000)
@given(seed=SEEDS)
def test_damaged_engine_file_raises_engine_error_or_loads_unchanged(folder, seed):
    _check(lambda: fuzz.check_engine(folder, seed))


@settings(FUZZ, max_examples=1000)
@given(seed=SEEDS)
def test_damaged_cache_entry_is_a_warned_miss_or_intact(folder, seed):
    _check(lambda: fuzz.check_cache(folder, seed))


# --- regressions: what the fuzzer found, each a clear error now ------------------------------------

def _model(mutate) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(fuzz.base_models()["cnn"])
    mutate(m)
    return m.SerializeToString()


def _bn(m):
    return next(n for n in m.graph.node if n.op_type == "BatchNormalization")


def test_initializer_data_that_does_not_fit_its_dtype_is_a_model_error():
    def mutate(m):
        m.graph.initializer[1].data_type = onnx.TensorProto.FLOAT16  # 4-byte floats read as 2-byte ones
    with pytest.raises(ModelError, match=r"tensor '.*': \d+ bytes of data, but shape"):
        rtxjit.InferenceSession(_model(mutate), device="cpu")


def test_initializer_shape_that_does_not_fit_its_data_is_a_model_error():
    def mutate(m):
        m.graph.initializer[1].dims[0] += 1
    with pytest.raises(ModelError, match=r"tensor '.*': \d+ bytes of data, but shape"):
        rtxjit.InferenceSession(_model(mutate), device="cpu")


def test_attribute_of_the_wrong_type_is_a_model_error_naming_it():
    def mutate(m):
        _bn(m).attribute[0].CopyFrom(onnx.helper.make_attribute("epsilon", [0.5, 1.5]))
    with pytest.raises(ModelError, match=r"BatchNormalization.*'epsilon' is of type FLOATS, expected FLOAT"):
        rtxjit.InferenceSession(_model(mutate), device="cpu")


def test_attribute_without_a_value_is_a_model_error_naming_it():
    def mutate(m):
        _bn(m).attribute[0].ClearField("f")
    with pytest.raises(ModelError, match=r"BatchNormalization.*'epsilon' has no value"):
        rtxjit.InferenceSession(_model(mutate), device="cpu")


def test_cache_metadata_with_a_changed_value_is_a_warned_miss(tmp_path):
    from rtxjit.cache.store import RuntimeCache

    cache = RuntimeCache(tmp_path)
    cache.put("k", {"tile": 32}, {"b": b"abc"})
    meta = tmp_path / "k.json"
    meta.write_text(meta.read_text().replace('"tile": 32', '"tile": 33'))  # still valid JSON
    with pytest.warns(RuntimeWarning, match="does not match its sha256"):
        assert cache.get("k") is None


def test_unmutated_models_match_onnxruntime():
    for name, m in fuzz.base_models().items():
        outcome = fuzz.check_model_bytes(m.SerializeToString(), random.Random(0))
        assert outcome.kind == "ok" and "equal" in outcome.detail, (name, outcome)
