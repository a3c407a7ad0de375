"""Coverage-guided fuzzing of rtxjit's loaders with atheris (libFuzzer), beside tools/fuzz.py's
structured mutations (issue 8). Optional: ``pip install atheris`` (not a dependency of rtxjit).

libFuzzer mutates raw bytes, guided by the coverage of rtxjit's instrumented code; the property is
tools/fuzz.py's: a model gives outputs or an RtxjitError, an engine file loads (outputs equal the
original's) or raises EngineError. Anything else is raised, so libFuzzer stops and writes the input
as ``crash-<sha1>`` (replay it: ``python tools/fuzz_atheris.py TARGET crash-<sha1>``).

    python tools/fuzz_atheris.py importer -atheris_runs=20000 -max_total_time=300
    python tools/fuzz_atheris.py engine -max_total_time=300

The seed corpus (the demo models' bytes, the base engine's) is written to a temporary folder; its
inputs are the first ones run. The counts of a run are in libFuzzer's last ``#N DONE`` line.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["rtxjit"]):
    import fuzz  # noqa: E402 - tools/fuzz.py: the checks and base models
    import rtxjit  # noqa: E402, F401

TARGETS = ("importer", "engine")
_FOLDER = Path(tempfile.mkdtemp(prefix="rtxjit_atheris_"))


def importer(data: bytes) -> None:
    outcome = fuzz.check_model_bytes(data, fuzz.random.Random(0), compare=True)
    if outcome.bad:
        raise AssertionError(f"{outcome.kind}: {outcome.detail}")


def engine(data: bytes) -> None:
    path = _FOLDER / "case.rtxe"
    path.write_bytes(data)
    _, feeds, ref = fuzz.base_engine(_FOLDER)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = rtxjit.InferenceSession(rtxjit.Engine.load(path, device="cpu"), device="cpu").run(None, feeds)
    except rtxjit.EngineError:
        return
    if not (len(got) == len(ref) and all(fuzz.np.array_equal(a, b) for a, b in zip(got, ref))):
        raise AssertionError("a damaged engine loaded and gives other outputs")


def seeds(target: str) -> Path:
    folder = _FOLDER / f"corpus_{target}"
    folder.mkdir()
    if target == "importer":
        for name, model in fuzz.base_models().items():
            (folder / name).write_bytes(model.SerializeToString())
    else:
        (folder / "base").write_bytes(fuzz.base_engine(_FOLDER)[0])
    return folder


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: fuzz_atheris.py {{{','.join(TARGETS)}}} [libFuzzer flags] [crash file]")
    target = sys.argv.pop(1)
    one = globals()[target]
    argv = list(sys.argv)
    if not any(Path(a).is_file() for a in argv[1:]):  # a replay names a file; a run starts from the seeds
        argv.append(str(seeds(target)))
    atheris.Setup(argv, lambda data: one(bytes(data)))  # libFuzzer's -timeout limits each input
    atheris.Fuzz()


if __name__ == "__main__":
    main()
