"""Fuzz rtxjit's loaders (issue 8): mutated ONNX models, damaged engine files, damaged cache entries.

The property, per target:
- importer: ``InferenceSession(mutated model bytes, device="cpu")`` and ``run`` either give outputs
  (equal to onnxruntime's when onnxruntime accepts the same model) or raise an ``RtxjitError``;
- engine: ``Engine.load`` of a byte-flipped, truncated or zeroed engine file raises ``EngineError``,
  or (a change that hits nothing checked, such as a zip timestamp) loads an engine whose outputs equal
  the original's;
- cache: ``RuntimeCache.get`` of a damaged entry returns None with a RuntimeWarning, or the intact
  entry; it never raises.
Anything else is a "crash" (another exception type), a "wrong" result, or a "hang" (a case that runs
past the watchdog's limit).

    python tools/fuzz.py --examples 20000 --seconds 600     # JSON summary: benchmarks/results/fuzz.json

``tests/test_fuzz.py`` drives the same ``check_*`` functions through hypothesis with a small budget.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import rtxjit  # noqa: E402
from rtxjit import models  # noqa: E402
from rtxjit.errors import EngineError, RtxjitError  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fuzz.json"
MAX_FEED_ELEMENTS = 1 << 16  # larger declared inputs are not fed (the session is still built)
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2, np.dtype(np.float64): 1e-6}


# Findings in code outside the loaders (ops, codegen, executor), reported in issue 8 and not yet fixed:
# (exception type, text in "file:line: message") -> counted as "known", not "crash". Remove an entry
# once its bug is fixed; the list should shrink to nothing.
KNOWN_CRASHES: list = []  # none left: LayerNormalization scale/bias of a differing run-time dim is a ShapeError
# NaN propagation: rtxjit's max pooling keeps a NaN wherever it lies in the window (as torch and
# numpy do); onnxruntime only where it comes first. Cases where only NaN positions differ count as
# "nan", not "wrong".


KINDS = {
    "ok": "outputs (checked against onnxruntime where it accepts the model) or an intact load",
    "rejected": "an RtxjitError (EngineError for engines; a warned miss for cache entries)",
    "crash": "another exception type: a bug",
    "wrong": "outputs that differ from onnxruntime's and the onnx reference evaluator's: a bug",
    "hang": "no result within the watchdog's limit: a bug",
    "harness": "a fault of this script",
    "known": "a crash listed in KNOWN_CRASHES (reported, not yet fixed)",
    "nan": "only NaN positions differ from onnxruntime's (NaN propagation, reported)",
    "ort_differs": "rtxjit equals the onnx reference evaluator and onnxruntime differs",
}


@dataclass
class Outcome:
    kind: str  # one of KINDS
    detail: str = ""

    @property
    def bad(self) -> bool:
        return self.kind in ("crash", "wrong", "hang", "harness")


class Hang(BaseException):
    """Raised by the watchdog in the main thread when a case runs too long."""


@contextlib.contextmanager
def watchdog(seconds: float):
    """Raise Hang in the main thread after ``seconds`` (SIGALRM; a no-op off the main thread)."""
    def fire(signum, frame):
        raise Hang(f"no result after {seconds:g} s")

    try:
        old = signal.signal(signal.SIGALRM, fire)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _crash(exc: BaseException, what: str) -> Outcome:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
    detail = f"{what}: {type(exc).__name__} at {where}: {str(exc)[:300]}"
    for kind, file, text in KNOWN_CRASHES:
        if type(exc).__name__ == kind and file in where and text in str(exc):
            return Outcome("known", detail)
    return Outcome("crash", detail)


# --- base models ---------------------------------------------------------------------------------

_BASES: dict = {}


def base_models() -> dict:
    """Name -> ModelProto of the tiny demo models the mutations start from."""
    if not _BASES:
        _BASES["cnn"] = models.resnet_cnn(size=8, width=4)
        _BASES["encoder"] = models.bert_encoder(hidden=8, heads=2, ffn=16)
    return _BASES


# --- ModelProto mutations: each changes ``m`` in place and returns what it did --------------------

_TYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32,
          TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16,
          TensorProto.COMPLEX64, TensorProto.UINT64, 0, 99]


def _pick_node(m, rnd):
    return rnd.randrange(len(m.graph.node)) if m.graph.node else None


def mut_drop_node(m, rnd):
    i = _pick_node(m, rnd)
    if i is None:
        return "no node"
    n = m.graph.node[i]
    del m.graph.node[i]
    return f"dropped node {n.name or i} ({n.op_type})"


def _pick_entry(m, rnd, field: str):
    """(node, index) of a random entry of ``field`` ("attribute", "input") over nodes having one."""
    nodes = [n for n in m.graph.node if getattr(n, field)]
    if not nodes:
        return None, None
    n = rnd.choice(nodes)
    return n, rnd.randrange(len(getattr(n, field)))


def mut_drop_attr(m, rnd):
    n, j = _pick_entry(m, rnd, "attribute")
    if n is None:
        return "no attribute"
    name = n.attribute[j].name
    del n.attribute[j]
    return f"dropped attribute {name} of {n.op_type}"


def _bad_attr_value(a, rnd):
    """A replacement AttributeProto for ``a``: another type, or an out-of-range value."""
    choice = rnd.randrange(8)
    name = a.name
    if choice == 0:
        return onnx.helper.make_attribute(name, rnd.choice([0.5, -3.25, 1e30]))
    if choice == 1:
        return onnx.helper.make_attribute(name, rnd.choice(["", "bogus", "NCHW"]))
    if choice == 2:
        ints = [rnd.randint(-5, 5) for _ in range(rnd.randint(0, 6))]
        return onnx.helper.make_attribute(name, ints, attr_type=onnx.AttributeProto.INTS)
    if choice == 3:
        return onnx.helper.make_attribute(name, rnd.choice([-(10 ** 12), -100, -1, 0, 1, 7, 100, 10 ** 12]))
    if choice == 4:
        return onnx.helper.make_attribute(name, [rnd.choice([0, -1, 10 ** 12])] * rnd.randint(1, 4))
    if choice == 5:
        return onnx.helper.make_attribute(name, [0.5, 1.5])
    if choice == 6:
        return onnx.helper.make_attribute(name, onnx.numpy_helper.from_array(np.array([1.0, 2.0], np.float32)))
    out = onnx.AttributeProto()
    out.name = name
    out.type = rnd.choice([onnx.AttributeProto.UNDEFINED, onnx.AttributeProto.INT, onnx.AttributeProto.GRAPH])
    return out  # a type with no value set, or an unknown type


def mut_alter_attr(m, rnd):
    nodes = list(m.graph.node)
    if not nodes:
        return "no node"
    n = rnd.choice(nodes)
    if n.attribute and rnd.random() < 0.8:
        j = rnd.randrange(len(n.attribute))
        new = _bad_attr_value(n.attribute[j], rnd)
        n.attribute[j].CopyFrom(new)
        return f"attribute {new.name} of {n.op_type} -> {onnx.helper.printable_attribute(new)[:80]}"
    name = rnd.choice(["axis", "perm", "epsilon", "kernel_shape", "strides", "pads", "bogus", "transA", "group"])
    a = _bad_attr_value(onnx.helper.make_attribute(name, 0), rnd)
    n.attribute.append(a)
    return f"added attribute {name} to {n.op_type}"


def mut_init_dtype(m, rnd):
    inits = list(m.graph.initializer)
    if not inits:
        return "no initializer"
    t = rnd.choice(inits)
    t.data_type = rnd.choice(_TYPES)
    return f"initializer {t.name} dtype -> {t.data_type}"


def mut_init_shape(m, rnd):
    inits = list(m.graph.initializer)
    if not inits:
        return "no initializer"
    t = rnd.choice(inits)
    dims = list(t.dims)
    how = rnd.randrange(4)
    if how == 0 and dims:
        dims[rnd.randrange(len(dims))] += rnd.choice([-1, 1, 10 ** 12])
    elif how == 1:
        dims.append(1)
    elif how == 2 and dims:
        dims.pop()
    else:
        dims = [rnd.choice([-1, 0, 10 ** 12])]
    del t.dims[:]
    t.dims.extend(dims)
    return f"initializer {t.name} dims -> {dims}"


def mut_input_type(m, rnd):
    if not m.graph.input:
        return "no input"
    vi = rnd.choice(list(m.graph.input))
    tt = vi.type.tensor_type
    how = rnd.randrange(4)
    if how == 0:
        tt.elem_type = rnd.choice(_TYPES)
        return f"input {vi.name} elem_type -> {tt.elem_type}"
    if how == 1:
        tt.shape.dim.add().dim_value = 1
        return f"input {vi.name} rank +1"
    if how == 2 and tt.shape.dim:
        del tt.shape.dim[-1]
        return f"input {vi.name} rank -1"
    tt.ClearField("shape")
    return f"input {vi.name} shape removed"


def mut_dangling(m, rnd):
    n, j = _pick_entry(m, rnd, "input")
    if n is None:
        return "no node"
    n.input[j] = "dangling_" + str(rnd.randrange(100))
    return f"{n.op_type} input {j} -> dangling"


def mut_rename_graph_input(m, rnd):
    if not m.graph.input:
        return "no input"
    vi = rnd.choice(list(m.graph.input))
    old = vi.name
    vi.name = "renamed_" + old
    return f"graph input {old} renamed (consumers dangle)"


def mut_cycle(m, rnd):
    nodes = list(m.graph.node)
    if not nodes:
        return "no node"
    i = rnd.randrange(len(nodes))
    n = nodes[i]
    later = nodes[i:]
    src = rnd.choice(later)
    if not n.input or not src.output:
        return "no input"
    j = rnd.randrange(len(n.input))
    n.input[j] = rnd.choice(list(src.output))
    return f"{n.op_type} input {j} <- output of {src.op_type} (same or later node)"


def mut_huge_dim(m, rnd):
    if rnd.random() < 0.5 and m.graph.input:
        vi = rnd.choice(list(m.graph.input))
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            return "no dim"
        d = dims[rnd.randrange(len(dims))]
        d.dim_value = rnd.choice([10 ** 12, 2 ** 31, 2 ** 63 - 1, -1, 0])
        return f"input {vi.name} dim -> {d.dim_value}"
    consts = [t for t in m.graph.initializer if t.data_type == TensorProto.INT64]
    if not consts:
        return "no int64 constant"
    t = rnd.choice(consts)
    try:
        arr = onnx.numpy_helper.to_array(t).copy()
    except ValueError:
        return "int64 constant already damaged"
    if arr.size:
        arr.flat[rnd.randrange(arr.size)] = rnd.choice([10 ** 12, -(10 ** 12), 2 ** 62])
    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    return f"int64 constant {t.name} -> {arr.tolist()}"


def mut_duplicate_output(m, rnd):
    nodes = list(m.graph.node)
    if len(nodes) < 2:
        return "too few nodes"
    a, b = rnd.sample(nodes, 2)
    if rnd.random() < 0.3 and m.graph.output:
        m.graph.output.add().CopyFrom(m.graph.output[0])
        return "graph output listed twice"
    a.output[0] = b.output[0]
    return f"{a.op_type} output renamed to {b.op_type}'s"


def mut_unknown_op(m, rnd):
    i = _pick_node(m, rnd)
    if i is None:
        return "no node"
    n = m.graph.node[i]
    if rnd.random() < 0.5:
        n.op_type = rnd.choice(["NoSuchOp", "", "relu", "Loop", "If", "Scan"])
        return f"node {i} op_type -> {n.op_type!r}"
    n.domain = rnd.choice(["com.microsoft", "ai.onnx.ml", "x" * 5])
    return f"node {i} domain -> {n.domain}"


def mut_empty_graph(m, rnd):
    how = rnd.randrange(3)
    del m.graph.node[:]
    if how >= 1:
        del m.graph.initializer[:]
    if how == 2:
        del m.graph.input[:]
        del m.graph.output[:]
    return f"graph emptied ({how})"


def mut_opset(m, rnd):
    v = rnd.choice([0, 1, 12, 22, 99, -1])
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = v
    if rnd.random() < 0.2:
        del m.opset_import[:]
        return "opset_import removed"
    return f"opset -> {v}"


def mut_arity(m, rnd):
    nodes = list(m.graph.node)
    if not nodes:
        return "no node"
    n = rnd.choice(nodes)
    how = rnd.randrange(4)
    if how == 0 and n.input:
        del n.input[-1]
        return f"{n.op_type} lost its last input"
    if how == 1:
        n.input.append(rnd.choice([i.name for i in m.graph.input] + [""]))
        return f"{n.op_type} got an extra input"
    if how == 2:
        n.output.append(f"extra_out_{rnd.randrange(10)}")
        return f"{n.op_type} got an extra output"
    if n.input:
        other = rnd.choice(list(m.graph.input) or [None])
        if other is not None:
            n.input[rnd.randrange(len(n.input))] = other.name
            return f"{n.op_type} input -> graph input {other.name}"
    return "no change"


MODEL_MUTATIONS = {f.__name__[4:]: f for f in [
    mut_drop_node, mut_drop_attr, mut_alter_attr, mut_init_dtype, mut_init_shape, mut_input_type, mut_dangling,
    mut_rename_graph_input, mut_cycle, mut_huge_dim, mut_duplicate_output, mut_unknown_op, mut_empty_graph,
    mut_opset, mut_arity]}


def mutate_bytes(data: bytes, rnd) -> tuple:
    """(damaged bytes, what was done): bit flips, truncation, a zeroed range, or random garbage."""
    b = bytearray(data)
    how = rnd.randrange(5)
    if how == 0:
        k = rnd.choice([1, 1, 2, 4, 16])
        for _ in range(k):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        return bytes(b), f"{k} bit flips"
    if how == 1:
        n = rnd.randrange(len(b))
        return bytes(b[:n]), f"truncated to {n}"
    if how == 2:
        i = rnd.randrange(len(b))
        n = rnd.choice([1, 4, 16, 256, 4096])
        b[i:i + n] = bytes(len(b[i:i + n]))
        return bytes(b), f"zeroed {n} at {i}"
    if how == 3:
        i = rnd.randrange(len(b))
        b[i] = rnd.randrange(256)
        return bytes(b), f"byte {i} set"
    i = rnd.randrange(len(b))
    n = rnd.choice([1, 8, 64])
    b[i:i] = bytes(rnd.randrange(256) for _ in range(n))
    return bytes(b), f"inserted {n} at {i}"


# --- importer + session target ---------------------------------------------------------------------

def _feeds(session, rnd) -> dict:
    """Random non-zero feeds of the declared dtypes; symbolic dims get small values (None: too big)."""
    np_rng = np.random.default_rng(rnd.randrange(2 ** 32))
    symbols: dict = {}
    feeds = {}
    for v in session.graph.inputs:
        dims = [d if isinstance(d, int) else symbols.setdefault(d, rnd.choice([1, 2, 3])) for d in v.type.shape]
        if int(np.prod(dims, dtype=np.float64)) > MAX_FEED_ELEMENTS:
            return None
        dtype = v.type.dtype.to_numpy()
        if dtype is None:
            return None
        if dtype == np.bool_:
            x = np_rng.random(dims) < 0.5
        elif np.issubdtype(dtype, np.integer):
            x = np_rng.integers(1, 4, size=dims).astype(dtype)
        else:
            x = np_rng.standard_normal(dims)
            x = np.where(x == 0, 0.5, x).astype(dtype)
        feeds[v.name] = x
    return feeds


def _ort_outputs(data: bytes, feeds: dict):
    """onnxruntime's outputs for the same model and feeds, or None if it rejects either."""
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    except Exception:
        return None


def _reference_outputs(data: bytes, feeds: dict):
    """The onnx package's reference evaluator's outputs (the arbiter when onnxruntime differs), or None."""
    try:
        from onnx.reference import ReferenceEvaluator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ReferenceEvaluator(onnx.load_from_string(data)).run(None, feeds)
    except Exception:
        return None


def _compare(got: list, want: list) -> str:
    """'' when rtxjit's outputs match onnxruntime's, else what differs."""
    if len(got) != len(want):
        return f"{len(got)} outputs, onnxruntime gives {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"output {i}: shape {a.shape}, onnxruntime {b.shape}"
        if a.dtype != b.dtype:
            return f"output {i}: dtype {a.dtype}, onnxruntime {b.dtype}"
        if a.dtype.kind in "fc":
            rtol = RTOL.get(a.dtype, 1e-4)
            b64 = b.astype(np.float64)
            scale = float(np.nanmax(np.abs(b64[np.isfinite(b64)]), initial=1.0))
            close = np.isclose(a.astype(np.float64), b64, rtol=rtol, atol=rtol * scale * 1e-1, equal_nan=True)
            if not close.all():
                if np.isnan(b64[~close]).all() or np.isnan(a[~close]).all():
                    return f"nan: output {i}: NaN at {int((~close).sum())} places in only one of rtxjit and onnxruntime"
                err = np.abs(a.astype(np.float64) - b64)[~close & ~np.isnan(b64)].max()
                return f"output {i}: max abs error {err:.3g} (scale {scale:.3g})"
        elif not np.array_equal(a, b):
            return f"output {i}: values differ"
    return ""


def check_model_bytes(data: bytes, rnd, compare: bool = True) -> Outcome:
    """Build a session from ``data`` and run it; see the module docstring for the property."""
    stage = "InferenceSession"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess = rtxjit.InferenceSession(data, device="cpu")
            feeds = _feeds(sess, rnd)
            if feeds is None:
                return Outcome("ok", "built; declared inputs too large to feed")
            stage = "run"
            got = sess.run(None, feeds)
    except RtxjitError as exc:
        return Outcome("rejected", f"{type(exc).__name__}: {str(exc)[:200]}")
    except Hang:
        raise
    except BaseException as exc:  # noqa: BLE001 - every other type is the finding
        if isinstance(exc, KeyboardInterrupt):
            raise
        return _crash(exc, stage)
    if not compare:
        return Outcome("ok", "outputs")
    want = _ort_outputs(data, feeds)
    if want is None:
        return Outcome("ok", "outputs; onnxruntime rejects the model")
    diff = _compare(got, want)
    if diff and not _compare(got, _reference_outputs(data, feeds) or []):
        return Outcome("ort_differs", f"equals the onnx reference evaluator; onnxruntime differs ({diff})")
    if diff.startswith("nan: "):
        return Outcome("nan", diff[5:])
    return Outcome("wrong", diff) if diff else Outcome("ok", "outputs equal onnxruntime's")


def check_model_mutation(base: str, mutation: str, seed: int, compare: bool = True) -> tuple:
    """(Outcome, description) of one mutation of one base model."""
    rnd = random.Random(seed)
    m = copy.deepcopy(base_models()[base])
    if mutation == "bytes":
        data, what = mutate_bytes(m.SerializeToString(), rnd)
    else:
        what = MODEL_MUTATIONS[mutation](m, rnd)
        if rnd.random() < 0.25:  # sometimes a second mutation on top
            second = rnd.choice(sorted(MODEL_MUTATIONS))
            what += "; " + MODEL_MUTATIONS[second](m, rnd)
        data = m.SerializeToString()
    return check_model_bytes(data, rnd, compare), f"{base}/{mutation}/{seed}: {what}"


# --- engine target ---------------------------------------------------------------------------------

_ENGINE: dict = {}


def base_engine(folder: Path) -> tuple:
    """(engine file bytes, feeds, reference outputs) of a tiny engine built once per process."""
    if not _ENGINE:
        model = models.bert_encoder(hidden=8, heads=2, ffn=16)
        path = Path(folder) / "base.rtxe"
        rtxjit.build(model, targets=["sm_90"]).save(path)
        feeds = models.demo_inputs(model, batch=1, seq=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = rtxjit.Engine.load(path, device="cpu")
            ref = rtxjit.InferenceSession(engine, device="cpu").run(None, feeds)
        _ENGINE.update(data=path.read_bytes(), feeds=feeds, ref=ref)
    return _ENGINE["data"], _ENGINE["feeds"], _ENGINE["ref"]


def check_engine(folder: Path, seed: int) -> tuple:
    """(Outcome, description) of loading one damaged copy of the base engine."""
    rnd = random.Random(seed)
    data, feeds, ref = base_engine(folder)
    bad, what = mutate_bytes(data, rnd)
    path = Path(folder) / f"case_{seed}.rtxe"
    path.write_bytes(bad)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = rtxjit.Engine.load(path, device="cpu")
            got = rtxjit.InferenceSession(engine, device="cpu").run(None, feeds)
    except EngineError as exc:
        return Outcome("rejected", str(exc)[:200]), what
    except RtxjitError as exc:
        return Outcome("crash", f"{type(exc).__name__} (not EngineError): {str(exc)[:200]}"), what
    except Hang:
        raise
    except Exception as exc:  # noqa: BLE001
        return _crash(exc, "Engine.load"), what
    finally:
        path.unlink(missing_ok=True)
    same = len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref))
    if not same:
        return Outcome("wrong", "a damaged engine loaded and gives other outputs"), what
    return Outcome("ok", "loaded; outputs equal the original's"), what


# --- runtime cache target --------------------------------------------------------------------------

def check_cache(folder: Path, seed: int) -> tuple:
    """(Outcome, description) of ``get`` on a cache entry with one damaged file."""
    from rtxjit.cache.store import RuntimeCache

    rnd = random.Random(seed)
    root = Path(folder) / f"cache_{seed}"
    cache = RuntimeCache(root)
    key = f"k{seed}"
    meta = {"kernel": "fused_add_relu", "grid": [rnd.randrange(1, 99), 1, 1], "tile": rnd.choice([16, 32, 64]),
            "ok": True, "scale": 0.5}
    blobs = {"b": bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 17, 300]))), "src": b"def k(): pass\n"}
    cache.put(key, meta, blobs)
    files = sorted(p for p in root.iterdir() if p.name.startswith(key))
    target = rnd.choice(files)
    bad, what = mutate_bytes(target.read_bytes(), rnd) if target.stat().st_size else (b"x", "filled")
    target.write_bytes(bad)
    what = f"{target.name}: {what}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = RuntimeCache(root).get(key)
    except Hang:
        raise
    except Exception as exc:  # noqa: BLE001
        return _crash(exc, "RuntimeCache.get"), what
    finally:
        for p in root.iterdir():
            p.unlink()
        root.rmdir()
    if got is None:
        if not any(issubclass(w.category, RuntimeWarning) for w in caught):
            return Outcome("wrong", "a damaged entry was a silent miss (no RuntimeWarning)"), what
        return Outcome("rejected", "miss with a warning"), what
    got_meta, got_blobs = got
    if got_meta != meta or {k: bytes(v) for k, v in got_blobs.items()} != blobs:
        return Outcome("wrong", f"a damaged entry came back altered: meta {got_meta}"), what
    return Outcome("ok", "the intact entry"), what


# --- the long run ----------------------------------------------------------------------------------

def _cases(target: str, rnd, folder: Path):
    """An endless stream of (name, callable -> (Outcome, description)) for one target; the name
    replays the case (``check_model_mutation(base, mutation, seed)``, ``check_engine(folder, seed)``)."""
    mutations = sorted(MODEL_MUTATIONS) + ["bytes"]
    while True:
        seed = rnd.randrange(2 ** 31)
        if target == "importer":
            base, mutation = rnd.choice(sorted(base_models())), rnd.choice(mutations)
            yield f"{base}/{mutation}/{seed}", lambda: check_model_mutation(base, mutation, seed)
        elif target == "engine":
            yield f"engine/{seed}", lambda: check_engine(folder, seed)
        else:
            yield f"cache/{seed}", lambda: check_cache(folder, seed)


def run(targets: list, examples: int, seconds: float, timeout: float, seed: int) -> dict:
    rnd = random.Random(seed)
    summary = {"seed": seed, "examples_per_target": examples, "seconds": seconds, "case_timeout_s": timeout,
               "targets": {}}
    deadline = time.perf_counter() + seconds
    with tempfile.TemporaryDirectory(prefix="rtxjit-fuzz-") as tmp:
        for index, target in enumerate(targets):  # time left is shared by the targets still to run
            per_target_s = (deadline - time.perf_counter()) / (len(targets) - index)
            counts = {"cases": 0, **{kind: 0 for kind in KINDS}}
            findings = []
            start = time.perf_counter()
            for name, case in _cases(target, rnd, Path(tmp)):
                if counts["cases"] >= examples or time.perf_counter() - start > per_target_s:
                    break
                try:
                    with watchdog(timeout):
                        outcome, what = case()
                except Hang as exc:
                    outcome, what = Outcome("hang", str(exc)), name
                except Exception as exc:  # noqa: BLE001 - a fault of this script, not of rtxjit
                    outcome, what = _crash(exc, "harness"), "harness"
                    outcome.kind = "harness"
                counts["cases"] += 1
                counts[outcome.kind] += 1
                if outcome.bad or outcome.kind in ("known", "nan", "ort_differs"):
                    findings.append({"kind": outcome.kind, "case": what, "detail": outcome.detail})
                    print(f"  [{target}] {outcome.kind}: {what} -> {outcome.detail}", flush=True)
            counts["seconds"] = round(time.perf_counter() - start, 1)
            summary["targets"][target] = {**counts, "findings": findings[:200]}
            print(f"{target}: {json.dumps(counts)}", flush=True)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="cases per target at most")
    ap.add_argument("--seconds", type=float, default=600,
                    help="total time; each target gets an even share of what the ones before it left")
    ap.add_argument("--timeout", type=float, default=60, help="per-case limit before a case counts as a hang")
    ap.add_argument("--targets", default="engine,cache,importer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    summary = run(args.targets.split(","), args.examples, args.seconds, args.timeout, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    bad = sum(t["crash"] + t["wrong"] + t["hang"] for t in summary["targets"].values())
    print(f"wrote {args.out}; {bad} findings")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
