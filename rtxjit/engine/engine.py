"""Engines: the ahead-of-time build of a model, in one versioned, checked file.

An ``Engine`` is the optimized IR (after the pass pipeline, in the precision asked for), its
optimization profiles, metadata (versions, SM targets, precision), the weights (or none: a
weight-stripped engine) and, optionally, compiled kernel binaries (opaque here: name -> JSON meta +
bytes, filled by the compiler). ``build`` makes one, ``Engine.save`` writes it, ``Engine.load``
reads it back and checks it; ``engine.graph`` and ``engine.profiles`` are what a session runs.

File layout: ONE zip archive (members stored, not compressed), written to a temp file in the same
folder and renamed over the target (``os.replace``), so a reader sees a whole engine or none.

    engine.json           the metadata, the graph and the checksums (below); first member
    weights.safetensors   the weights (float constants of the graph, by value name); absent when stripped
    arrays.safetensors    the other arrays: non-weight constants (shape tensors, indices ...) and large
                          ndarray attributes (``rtxjit.ir.serialize`` keys); absent when there are none
    binaries/<name>       compiled kernels, one member each

``engine.json`` keys:

    format            "rtxjit-engine";  format_version: FORMAT_VERSION (an int)
    rtxjit_version, codegen_version, triton_version
                      rtxjit's version, the hash of its codegen sources (``runtime.cache.codegen_version``)
                      and the Triton version (read without importing triton) that built the engine
    targets           SM numbers the engine was built for (ints, sorted: [80, 90])
    precision         "fp16", "bf16" or null (the model's own types); optimized: whether the pass
                      pipeline ran (``refit_from_onnx`` replays the same import + passes)
    stripped          true when the file holds no weights; refittable: always true (below)
    graph             the graph document of ``rtxjit.ir.serialize.to_document`` (schema inside)
    profiles          one ``Profile.to_json()`` per optimization profile
    weights           [{name, dtype (IR short name), numpy_dtype, shape, nbytes, sha256}] for every
                      weight, also in a stripped file (sha256 of the array's C-order bytes)
    arrays            [{key, numpy_dtype, shape}] of arrays.safetensors' entries
    binaries          [{name, member, meta, size, sha256}]
    custom_ops        [{domain, name, version, fingerprint}] of the user-registered ops
                      (rtxjit.register_op) the graph runs, by the node version they resolve at; the
                      fingerprint hashes the op's kernel and hooks (absent in older engines: none)
    members           {member name: {size, sha256}} for every member but engine.json (which the zip's
                      CRC covers)

Safetensors has no bf16/fp8 numpy types: such arrays are stored as uint16/uint8 views and viewed
back by their recorded ``numpy_dtype``. Nothing is executed from the file: JSON, safetensors (read
by the safetensors library) and bytes only; no pickle.

Loading checks, each failure an ``EngineError`` naming the file and what does not fit: the zip is
readable (a truncated file is reported as such), every member's CRC, size and sha256, no member
missing or unlisted, the format version, the rtxjit and codegen versions (a different Triton
version is not an error: only the compiled binaries become unusable, ``engine.binaries_usable``
is False), the graph document and the arrays against it, the profiles against the graph.
Custom ops: each listed one must be registered before the load (an EngineError naming the op and
its domain); one whose fingerprint differs is a warning (the graph is kept; the engine's binaries
of the old kernel no longer match its source, so that kernel compiles again).

Devices and SM targets. The IR is portable: an engine runs on any GPU whose SM can run its
precision; a GPU whose SM has no binaries in the engine JIT-compiles its kernels. What is checked
is precision legality (bf16 needs sm_80, fp8 sm_89, also inside fused programs:
``passes.precision_legality.check_precision``): at build for every target (an
``UnsupportedOpError`` naming the op and the target), at load for the device's SM (an
``EngineError`` naming the op and the SM). ``load(path, device=...)``: None detects the device
(no check on the CPU), or a ``Device``, "cuda"/"cpu", an SM number or "sm_86".

Weights and refit. A *weight* is a float constant of the optimized graph that no node reads on
the host (host-read and integer constants, e.g. shape tensors, are not weights and stay in
arrays.safetensors even when stripped). Every engine is refittable: kernels take weights as
arguments, never baked in. ``build(strip_weights=True)`` drops the weights' data (the constants
keep their names and types; their ``const`` is a placeholder, see ``rtxjit.ir.serialize``) and the
file lists them with the sha256 of the original data. ``Refitter(engine)`` fills them:
``set_named_weights(name, array)`` (names are the optimized graph's: passes derive constants
from initializers, e.g. "Conv_3_w_bn" for a conv with batchnorm folded in, "w_fp16" for converted
ones; ``Refitter.weights()`` lists them), or ``refit_from_onnx(model)``, which re-runs the import
and the same passes on the model and takes every weight by name from the result, after checking
that the result's graph text (structure, names, types, attributes; not data) equals the engine's
and that its non-weight constants are equal: derived constants (folded batchnorm, fp16 copies,
merged matmul weights, transposed weights) come out exactly as a full build makes them.
``refit()`` installs the new data (in place) or fails naming every weight still missing.
Sessions made from ``engine.graph`` before a refit keep the data they uploaded.
Limit: a few passes read constant *values* to decide the structure (CSE merges constants with
equal bytes; fuse_attention / fuse_normalization move a scalar scale or epsilon into an
attribute). Such values are not weights; where new weights change them, ``refit_from_onnx``
reports the first differing line of the graph text (an error, never a wrong result).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rtxjit import passes
from rtxjit.errors import EngineError, ModelError, RtxjitError, UnsupportedOpError
from rtxjit.ir.graph import Graph
from rtxjit.ir.host import host_read_values
from rtxjit.ir.registry import get_op, qualified
from rtxjit.ir.rewrite import copy_graph
from rtxjit.ir.serialize import (dtype_name, from_document, is_missing, missing_constants, numpy_dtype,
                                 placeholder, shape_fits, to_document)
from rtxjit.cache.keys import canonical_json, codegen_version, triton_version
from rtxjit.frontdoor import optimized_graph
from rtxjit.passes.precision_legality import check_precision
from rtxjit.plan.profiles import Profile, resolve_profiles

FORMAT = "rtxjit-engine"
FORMAT_VERSION = 1
ENGINE_JSON = "engine.json"
WEIGHTS_MEMBER = "weights.safetensors"
ARRAYS_MEMBER = "arrays.safetensors"
BINARY_PREFIX = "binaries/"
LOWEST_SM, HIGHEST_SM = 50, 199
_SM_RE = re.compile(r"(?:sm_?)?(\d{2,3})")
_BINARY_NAME_RE = re.compile(r"[0-9A-Za-z_][0-9A-Za-z_.-]*(/[0-9A-Za-z_][0-9A-Za-z_.-]*)*")
_STORAGE = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8",  # safetensors lacks them
            "int4": "uint8", "uint4": "uint8", "int2": "uint8", "uint2": "uint8"}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same engine gives the same bytes


def current_versions() -> dict:
    from rtxjit import __version__

    return {"rtxjit": __version__, "codegen": codegen_version(), "triton": triton_version()}


# --- targets ------------------------------------------------------------------------------------

def parse_targets(targets) -> tuple:
    """SM numbers from "sm_90", "90", 90 or "current" (the GPU's SM), sorted and without repeats."""
    if isinstance(targets, (str, int)):
        targets = [targets]
    try:
        items = list(targets)
    except TypeError:
        raise EngineError(f"targets must be a list such as ['sm_80', 'sm_90'], got {targets!r}") from None
    if not items:
        raise EngineError("targets is empty: name at least one SM ('sm_80', 'sm_90', ...) or 'current'")
    sms = set()
    for t in items:
        if isinstance(t, str) and t.strip().lower() == "current":
            sms.add(_current_sm())
            continue
        m = _SM_RE.fullmatch(t.strip().lower()) if isinstance(t, str) else None
        sm = int(m.group(1)) if m else t if type(t) is int else None
        if sm is None or not LOWEST_SM <= sm <= HIGHEST_SM:
            raise EngineError(f"target {t!r} is not an SM: use 'sm_80', 'sm_86', 'sm_89', 'sm_90', 'sm_100', "
                              f"'sm_120' (or 80, '90', 'current')")
        sms.add(sm)
    return tuple(sorted(sms))


def _current_sm() -> int:
    from rtxjit.exec.device import detect

    device = detect(None)
    if device.sm is None:
        raise EngineError("target 'current' means the GPU's SM, but there is no GPU here "
                          f"({device}); name the targets instead, e.g. targets=['sm_90']")
    return device.sm


# --- weights ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightInfo:
    """A weight of an engine: a float constant of its graph, by name."""

    name: str
    dtype: str  # IR short name ("fp16")
    numpy_dtype: str  # what the IR holds it in ("float32" for bf16)
    shape: tuple
    nbytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "numpy_dtype": self.numpy_dtype, "shape": list(self.shape),
                "nbytes": self.nbytes, "sha256": self.sha256}

    def describe(self) -> str:
        return f"{self.numpy_dtype}{list(self.shape)}"


def array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def weight_values(graph: Graph) -> list:
    """The weights of ``graph``: float constants that no plan reads on the host, by name."""
    host = host_read_values(graph)
    return sorted((v for v in graph.constants() if v.type.dtype.is_float and v.name not in host),
                  key=lambda v: v.name)


def _weight_info(v) -> WeightInfo:
    return WeightInfo(v.name, v.type.dtype.short, v.const.dtype.name, tuple(int(d) for d in v.const.shape),
                      int(v.const.nbytes), array_sha256(v.const))


# --- the engine ---------------------------------------------------------------------------------

class Engine:
    """An optimized model ready to run: see the module docstring. ``build`` and ``Engine.load``
    make one; ``graph`` (raises EngineError while weights are missing) and ``profiles`` feed a
    session; ``binaries`` maps a kernel name to ``{"meta": dict, "data": bytes}``."""

    def __init__(self, graph: Graph, profiles: list, targets: tuple, precision: Optional[str] = None,
                 optimized: bool = True, weights: Optional[list] = None, binaries: Optional[dict] = None,
                 versions: Optional[dict] = None, path: Optional[Path] = None):
        self._graph = graph
        self.profiles = list(profiles)
        self.targets = tuple(targets)
        self.precision = precision
        self.optimized = optimized
        self._weights = {w.name: w for w in (weights if weights is not None else
                                             [_weight_info(v) for v in weight_values(graph)])}
        self.binaries = dict(binaries or {})
        self.versions = dict(versions or current_versions())
        self.binaries_usable = self.versions.get("triton") == triton_version()
        self.path = path
        self.device_sm: Optional[int] = None

    def __repr__(self) -> str:
        where = f" from '{self.path}'" if self.path else ""
        return (f"Engine({self._graph.name}{where}, targets={['sm_%d' % t for t in self.targets]}, "
                f"precision={self.precision}, weights={len(self._weights)}, "
                f"missing={len(self.missing_weights())}, binaries={len(self.binaries)})")

    def _where(self) -> str:
        return f"engine file '{self.path}'" if self.path else f"engine '{self._graph.name}'"

    # -- what a session uses
    @property
    def graph(self) -> Graph:
        """The optimized graph with its weights; an EngineError naming every missing weight if the
        engine is weight-stripped and not refitted."""
        missing = self.missing_weights()
        if missing:
            raise EngineError(f"{self._where()} is weight-stripped: weights {', '.join(missing)} have no data; "
                              "refit them first (rtxjit.Refitter(engine).refit_from_onnx(model) or "
                              ".set_named_weights(name, array), then .refit())")
        return self._graph

    @property
    def ir(self) -> Graph:
        """The optimized graph as it is: constants whose data is missing hold placeholders (for
        inspection and type-level checks; ``graph`` is what runs)."""
        return self._graph

    # -- weights
    @property
    def weights(self) -> list:
        """``WeightInfo`` of every weight, by name (sha256 of the data the engine was built with)."""
        return [self._weights[n] for n in sorted(self._weights)]

    def missing_weights(self) -> list:
        """Names of the constants that have no data (the weights of a stripped engine), sorted."""
        return missing_constants(self._graph)

    @property
    def stripped(self) -> bool:
        """Whether some weight has no data (a weight-stripped engine, not refitted)."""
        return bool(missing_constants(self._graph))

    @property
    def refittable(self) -> bool:
        return True

    def has_binaries_for(self, sm: int) -> bool:
        return self.binaries_usable and sm in self.targets and bool(self.binaries)

    # -- device
    def check_device(self, device=None) -> Optional[int]:
        """The SM of ``device`` (see the module docstring) after checking that the engine's
        precision can run there (EngineError naming the op and the SM); None on the CPU."""
        sm = _device_sm(device)
        if sm is not None:
            try:
                check_precision(self._graph, sm)
            except UnsupportedOpError as exc:
                raise EngineError(f"{self._where()} cannot run on sm_{sm} (built for "
                                  f"{', '.join('sm_%d' % t for t in self.targets)}): {exc}") from None
        self.device_sm = sm
        return sm

    # -- file
    def save(self, path, strip_weights: Optional[bool] = None) -> Path:
        """Write the engine to ``path`` (one zip file, atomically). ``strip_weights``: None writes
        the weights the engine has (none when it is stripped); True leaves them out; False needs
        them all. Returns the path."""
        path = Path(path)
        missing = self.missing_weights()
        strip = bool(missing) if strip_weights is None else bool(strip_weights)
        if missing and not strip:
            raise EngineError(f"cannot save engine '{self._graph.name}' with weights: {', '.join(missing)} "
                              "have no data (refit them, or save with strip_weights=True)")
        others = [n for n in missing if n not in self._weights]
        if others:
            raise EngineError(f"cannot save engine '{self._graph.name}': constants {others} have no data and "
                              "are not weights")
        try:
            doc, arrays = to_document(self._graph)
        except ModelError as exc:
            raise EngineError(f"cannot save engine '{self._graph.name}': {exc}") from None
        weights = {n: arrays.pop(n) for n in list(self._weights) if n in arrays}
        consts = {v.name: v for v in self._graph.constants()}
        infos = [_weight_info(consts[n]) if n in weights else self._weights[n] for n in sorted(self._weights)]
        members = {}
        if not strip:
            members[WEIGHTS_MEMBER] = _safetensors({n: weights[n] for n in sorted(weights)}, WEIGHTS_MEMBER)
        if arrays:
            members[ARRAYS_MEMBER] = _safetensors(arrays, ARRAYS_MEMBER)
        binaries = []
        for name in sorted(self.binaries):
            member, meta, data = self._binary(name)
            members[member] = data
            binaries.append({"name": name, "member": member, "meta": meta, "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()})
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "rtxjit_version": self.versions["rtxjit"], "codegen_version": self.versions["codegen"],
            "triton_version": self.versions["triton"],
            "targets": list(self.targets), "precision": self.precision, "optimized": self.optimized,
            "stripped": strip, "refittable": True,
            "graph": doc,
            "profiles": [p.to_json() for p in self.profiles],
            "weights": [w.to_json() for w in infos],
            "arrays": [{"key": k, "numpy_dtype": a.dtype.name, "shape": [int(d) for d in a.shape]}
                       for k, a in sorted(arrays.items())],
            "binaries": binaries,
            "custom_ops": custom_ops(self._graph),
            "members": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                        for n, d in sorted(members.items())},
        }
        try:
            text = json.dumps(meta, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
        except (TypeError, ValueError) as exc:
            raise EngineError(f"cannot save engine '{self._graph.name}': metadata is not JSON: {exc}") from None
        _write_zip(path, [(ENGINE_JSON, text.encode())] + sorted(members.items()))
        return path

    def _binary(self, name) -> tuple:
        if not isinstance(name, str) or len(name) > 200 or not _BINARY_NAME_RE.fullmatch(name):
            raise EngineError(f"binary name {name!r} must be 1-200 characters of [0-9A-Za-z_.-] in '/'-separated "
                              "parts, none starting with '.'")
        entry = self.binaries[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), (bytes, bytearray)):
            raise EngineError(f"binary '{name}' must be a dict with 'meta' (JSON data) and 'data' (bytes)")
        meta = entry.get("meta", {})
        try:
            canonical_json(meta)
        except (TypeError, ValueError) as exc:
            raise EngineError(f"binary '{name}': meta is not JSON data: {exc}") from None
        return BINARY_PREFIX + name, meta, bytes(entry["data"])

    @classmethod
    def load(cls, path, device=None) -> "Engine":
        """Read and check an engine file (see the module docstring); ``device`` as in ``check_device``."""
        path = Path(path)
        members = _read_zip(path)
        meta = _parse_meta(path, members)
        where = f"engine file '{path}'"
        versions = _check_versions(where, meta)
        _check_members(where, meta, members)
        stripped = _get(meta, "stripped", bool, where)
        arrays = _read_arrays(where, meta, members)
        weights_info = [_read_weight_info(where, i, w) for i, w in enumerate(_get(meta, "weights", list, where))]
        if stripped:
            weights = {}
        else:
            expected = {w.name: (w.numpy_dtype, list(w.shape)) for w in weights_info}
            weights = _unpack(where, WEIGHTS_MEMBER, members[WEIGHTS_MEMBER], expected)
        _check_custom_ops(where, meta)
        clash = set(weights) & set(arrays)
        if clash:
            raise EngineError(f"{where}: keys {sorted(clash)} are in both {WEIGHTS_MEMBER} and {ARRAYS_MEMBER}")
        try:
            graph = from_document(_get(meta, "graph", dict, where), {**arrays, **weights},
                                  weights="absent" if stripped else "required")
        except ModelError as exc:
            raise EngineError(f"{where}: {exc}") from None
        _check_weights(where, graph, weights_info, stripped)
        profiles = _read_profiles(where, meta, graph)
        targets = _get(meta, "targets", list, where)
        if not targets or not all(type(t) is int and LOWEST_SM <= t <= HIGHEST_SM for t in targets):
            raise EngineError(f"{where}: 'targets' must be a non-empty list of SM numbers, got {targets!r:.80}")
        precision = meta.get("precision")
        if precision not in (None, "fp16", "bf16"):
            raise EngineError(f"{where}: 'precision' must be null, 'fp16' or 'bf16', got {precision!r:.40}")
        engine = cls(graph, profiles, tuple(targets), precision, _get(meta, "optimized", bool, where),
                     weights_info, _read_binaries(where, meta, members), versions, path)
        engine.check_device(device)
        return engine


def build(model, targets=("current",), profiles=None, precision: Optional[str] = None, strip_weights: bool = False,
          optimize: bool = True, kernels: bool = False, progress=None) -> Engine:
    """An engine of ``model`` (an ONNX path, bytes or ModelProto, or an rtxjit Graph): imported,
    optimized by the pass pipeline (``precision`` "fp16"/"bf16" converts fp32 to it), checked for
    precision legality on every SM of ``targets`` (an UnsupportedOpError naming the op and the
    target), with ``profiles`` resolved against its inputs. ``strip_weights`` keeps no weight
    data (the engine lists the weights; refit with ``Refitter``). No GPU is needed unless a target
    is "current". ``kernels`` also compiles the engine's kernels for every target (engine/aot.py;
    no GPU needed), calling ``progress(done, total, what)`` after each."""
    sms = parse_targets(targets)
    graph = _optimized(model, precision, optimize, sms)
    resolved = resolve_profiles(profiles, graph)
    short = passes.precision_dtype(precision).short if precision is not None else None
    engine = Engine(graph, resolved, sms, short, bool(optimize))
    if kernels:  # before stripping: a lowering may read weights (a pre-transposed conv weight)
        from rtxjit.engine import aot

        engine.build_report = aot.compile_kernels(engine, progress=progress)
    if strip_weights:
        for v in weight_values(graph):
            v.const = placeholder(v.type.dtype)
    return engine


def _optimized(model, precision, optimize: bool, targets: tuple = ()) -> Graph:
    """The graph of ``model`` through the front door (import, passes, legality on ``targets``);
    always a graph of its own, never the caller's Graph object (a build strips weights from it)."""
    graph = optimized_graph(model, optimize=optimize, precision=precision, targets=targets).graph
    return copy_graph(graph) if graph is model else graph


def _device_sm(device) -> Optional[int]:
    from rtxjit.exec.device import Device, detect

    if device is None:
        try:
            return detect(None).sm
        except RtxjitError:
            return None
    if isinstance(device, Device):
        return device.sm
    if type(device) is int:
        return parse_targets([device])[0]
    if isinstance(device, str):
        if device.strip().lower() in ("cuda", "gpu", "cpu"):
            return detect(device.strip().lower()).sm
        return parse_targets([device])[0]
    raise EngineError(f"device {device!r}: expected None, a Device, 'cuda', 'cpu', an SM number or 'sm_86'")


# --- refit --------------------------------------------------------------------------------------

class Refitter:
    """Gives an engine (stripped or not) new weight data, by name; see the module docstring.

    ``set_named_weights(name, array)`` and ``refit_from_onnx(model)`` stage data; ``missing()``
    lists weights with no data, staged or in the engine; ``refit()`` installs the staged data into
    the engine (in place) and returns it, or raises an EngineError naming every missing weight."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._staged: dict = {}

    def weights(self) -> list:
        """Names of the engine's weights."""
        return sorted(self.engine._weights)

    def set_named_weights(self, name: str, array) -> None:
        info = self.engine._weights.get(name)
        if info is None:
            close = difflib.get_close_matches(str(name), list(self.engine._weights), n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise EngineError(f"{self.engine._where()} has no weight named '{name}'{hint} "
                              f"(Refitter.weights() lists all {len(self.engine._weights)})")
        a = np.asarray(array)
        got = f"{a.dtype.name}{list(a.shape)}"
        if a.dtype.name != info.numpy_dtype or not (tuple(a.shape) == info.shape or shape_fits(info.shape, a.shape)):
            raise EngineError(f"weight '{name}': expected {info.describe()} ({info.dtype} in the graph), got {got}")
        self._staged[name] = np.array(a, copy=True, order="C").reshape(info.shape)

    def refit_from_onnx(self, model) -> list:
        """Stage every weight from ``model`` (ONNX path, bytes or ModelProto; or an rtxjit Graph): it is
        imported and optimized as the engine was, then checked to give the engine's graph. Returns
        the names staged."""
        engine = self.engine
        where = f"model '{model}'" if isinstance(model, (str, os.PathLike)) else "the model"
        graph = _optimized(model, engine.precision, engine.optimized)
        ours, theirs = str(engine.ir).splitlines(), str(graph).splitlines()
        if ours != theirs:
            i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            a = ours[i] if i < len(ours) else "<end>"
            b = theirs[i] if i < len(theirs) else "<end>"
            raise EngineError(f"{where} does not give this engine's graph after import and passes (refit needs the "
                              f"model the engine was built from, with new weights only); first difference, line "
                              f"{i + 1}: the engine has '{a[:200]}', the model gives '{b[:200]}'")
        theirs_consts = {v.name: v for v in graph.constants()}
        differ = [v.name for v in engine.ir.constants() if v.name not in engine._weights and not is_missing(v.const)
                  and not _same_array(v.const, theirs_consts[v.name].const)]
        if differ:
            raise EngineError(f"{where}: constants {differ} are not weights (they fix shapes, indices or host "
                              "values) and differ from the engine's; rebuild the engine instead of refitting")
        names = sorted(engine._weights)
        for name in names:
            self.set_named_weights(name, theirs_consts[name].const)
        return names

    def missing(self) -> list:
        return [n for n in self.engine.missing_weights() if n not in self._staged]

    def refit(self) -> Engine:
        missing = self.missing()
        if missing:
            raise EngineError(f"cannot refit {self.engine._where()}: no data for weights {', '.join(missing)} "
                              "(set them with set_named_weights or refit_from_onnx)")
        consts = {v.name: v for v in self.engine.ir.constants()}
        for name, a in self._staged.items():
            consts[name].const = a
        self._staged = {}
        return self.engine


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == \
        np.ascontiguousarray(b).tobytes()


# --- the zip file -------------------------------------------------------------------------------

def _safetensors(arrays: dict, member: str) -> bytes:
    from safetensors.numpy import save

    if "__metadata__" in arrays:
        raise EngineError(f"{member}: an array named '__metadata__' cannot be stored (safetensors reserves it)")
    stored = {}
    for k, a in arrays.items():
        a = a if a.flags.c_contiguous else np.array(a, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        name = dtype_name(a.dtype, f"{member}: array '{k}'")
        stored[k] = a.view(_STORAGE[name]) if name in _STORAGE else a
    return save(stored)


def _unpack(where: str, member: str, data: bytes, expected: dict) -> dict:
    """The arrays of a safetensors member, each viewed as its recorded dtype; ``expected`` maps a
    key to (numpy dtype name, shape) and must list exactly the member's keys."""
    from safetensors.numpy import load

    try:
        stored = load(data)
    except Exception as exc:  # the library's own error types
        raise EngineError(f"{where}: member '{member}' is not a readable safetensors file: {exc}") from None
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise EngineError(f"{where}: member '{member}' does not hold the arrays engine.json lists "
                          f"(missing {missing[:5]}, unlisted {extra[:5]})")
    out = {}
    for k, a in stored.items():
        name, shape = expected[k]
        try:
            dt = numpy_dtype(name, f"{where}: array '{k}'")
        except ModelError as exc:
            raise EngineError(str(exc)) from None
        if name in _STORAGE:
            if a.dtype.name != _STORAGE[name]:
                raise EngineError(f"{where}: array '{k}' in '{member}' is {a.dtype.name}, expected {_STORAGE[name]} "
                                  f"(storage of {name})")
            a = a.view(dt)
        if a.dtype != dt or list(a.shape) != list(shape):
            raise EngineError(f"{where}: array '{k}' in '{member}' is {a.dtype.name}{list(a.shape)}, engine.json "
                              f"says {name}{list(shape)}")
        out[k] = a
    return out


def _write_zip(path: Path, members: list) -> None:
    """Members into a zip next to ``path`` under a temp name, synced, then renamed over ``path``."""
    if not path.parent.is_dir():
        raise EngineError(f"cannot save engine to '{path}': folder '{path.parent}' does not exist")
    from rtxjit.cache.store import replacing

    with replacing(path) as tmp, open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                z.writestr(info, data)
        f.flush()
        os.fsync(f.fileno())


def _read_zip(path: Path) -> dict:
    """Member name -> bytes; every way a file can be unreadable is an EngineError naming it."""
    if not path.is_file():
        raise EngineError(f"engine file '{path}' does not exist")
    where = f"engine file '{path}'"
    bad = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error, zlib.error,
           NotImplementedError, KeyError, IndexError, RuntimeError)  # RuntimeError: a flag bit zipfile refuses
    try:
        z = zipfile.ZipFile(path)
    except bad as exc:
        raise EngineError(f"{where} is not a readable engine (truncated or not an engine file?): "
                          f"{type(exc).__name__}: {exc}") from None
    out = {}
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise EngineError(f"{where}: members {dups} appear more than once")
        for info in infos:
            if info.flag_bits & 0x1:
                raise EngineError(f"{where}: member '{info.filename}' is marked encrypted; engine members are "
                                  "plain (the file is corrupt)")
            if info.compress_type != zipfile.ZIP_STORED:
                raise EngineError(f"{where}: member '{info.filename}' is compressed (method {info.compress_type}); "
                                  "engine members are stored")
            try:
                out[info.filename] = z.read(info)
            except bad as exc:
                raise EngineError(f"{where}: member '{info.filename}' is corrupt or truncated: "
                                  f"{type(exc).__name__}: {exc}") from None
    if ENGINE_JSON not in out:
        raise EngineError(f"{where} has no '{ENGINE_JSON}' member: not an rtxjit engine")
    return out


def _parse_meta(path: Path, members: dict) -> dict:
    where = f"engine file '{path}'"

    def no_constants(name):
        raise EngineError(f"non-JSON constant {name}")

    try:
        meta = json.loads(members[ENGINE_JSON].decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EngineError(f"{where}: member '{ENGINE_JSON}' is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EngineError(f"{where}: '{ENGINE_JSON}' does not describe an rtxjit engine (format "
                          f"{meta.get('format') if isinstance(meta, dict) else None!r:.40}, expected '{FORMAT}')")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineError(f"{where}: engine format version {version!r:.20}, this rtxjit reads version "
                          f"{FORMAT_VERSION}; rebuild the engine")
    return meta


def read_metadata(path) -> dict:
    """``engine.json`` of an engine file, after the zip and format checks only (for inspection of
    engines that another version built)."""
    path = Path(path)
    return _parse_meta(path, _read_zip(path))


def _get(meta: dict, key: str, kind, where: str):
    if key not in meta:
        raise EngineError(f"{where}: engine.json has no '{key}'")
    if type(meta[key]) is not kind:
        raise EngineError(f"{where}: engine.json '{key}' must be {kind.__name__}, got {type(meta[key]).__name__}")
    return meta[key]


def _check_versions(where: str, meta: dict) -> dict:
    current = current_versions()
    found = {k: _get(meta, f"{k}_version", str, where) for k in ("rtxjit", "codegen", "triton")}
    if found["rtxjit"] != current["rtxjit"]:
        raise EngineError(f"{where}: built by rtxjit {found['rtxjit']}, this is rtxjit {current['rtxjit']} "
                          f"(expected {current['rtxjit']}, found {found['rtxjit']}); rebuild the engine")
    if found["codegen"] != current["codegen"]:
        raise EngineError(f"{where}: codegen version mismatch: expected {current['codegen'][:16]}..., found "
                          f"{found['codegen'][:16]}... (rtxjit's kernel generator changed); rebuild the engine")
    return found


def custom_ops(graph: Graph) -> list:
    """The user-registered ops ``graph`` runs (``custom_ops`` of engine.json), sorted."""
    found = {}
    for node in graph.nodes:
        d = get_op(node.op, f"node '{node.name}'", node.version)
        if d.fingerprint is not None:
            found[(d.domain, d.op_type, node.version)] = d.fingerprint
    return [{"domain": dom, "name": name, "version": v, "fingerprint": fp}
            for (dom, name, v), fp in sorted(found.items())]


def _check_custom_ops(where: str, meta: dict) -> None:
    listed = meta.get("custom_ops", [])
    if not isinstance(listed, list):
        raise EngineError(f"{where}: engine.json 'custom_ops' must be a list")
    for entry in listed:
        if not isinstance(entry, dict) or not {"domain", "name", "version", "fingerprint"} <= set(entry):
            raise EngineError(f"{where}: engine.json 'custom_ops' entry {entry!r:.80} lacks domain, name, "
                              "version or fingerprint")
        domain, name, version = entry["domain"], entry["name"], entry["version"]
        try:
            d = get_op(qualified(domain, name), "", version)
        except UnsupportedOpError:
            d = None
        if d is None or d.fingerprint is None:
            raise EngineError(f"{where}: the engine runs custom op '{name}' of domain '{domain}' (version "
                              f"{version}), which is not registered: call rtxjit.register_op('{domain}', "
                              f"'{name}', ...) before loading the engine")
        if d.fingerprint != entry["fingerprint"]:
            warnings.warn(f"{where}: custom op '{name}' of domain '{domain}' (version {version}) changed since "
                          "the engine was built (its kernel or hooks differ): the registered one runs, and its "
                          "kernel compiles again", RuntimeWarning, stacklevel=3)


def _check_members(where: str, meta: dict, members: dict) -> None:
    listed = _get(meta, "members", dict, where)
    for name, entry in listed.items():
        if name not in members:
            raise EngineError(f"{where}: member '{name}' listed in engine.json is missing")
        data = members[name]
        if not isinstance(entry, dict) or entry.get("size") != len(data) or \
                entry.get("sha256") != hashlib.sha256(data).hexdigest():
            raise EngineError(f"{where}: member '{name}' was altered (its size or sha256 does not match engine.json)")
    extra = sorted(set(members) - set(listed) - {ENGINE_JSON})
    if extra:
        raise EngineError(f"{where}: members {extra} are not listed in engine.json")
    stripped = _get(meta, "stripped", bool, where)
    if stripped and WEIGHTS_MEMBER in members:
        raise EngineError(f"{where}: engine.json says the engine is stripped, yet it has a '{WEIGHTS_MEMBER}' member")
    if not stripped and WEIGHTS_MEMBER not in members:
        raise EngineError(f"{where}: member '{WEIGHTS_MEMBER}' is missing (engine.json says the engine has weights)")


def _read_arrays(where: str, meta: dict, members: dict) -> dict:
    listing = _get(meta, "arrays", list, where)
    expected = {}
    for i, e in enumerate(listing):
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not isinstance(e.get("numpy_dtype"), str) \
                or not isinstance(e.get("shape"), list):
            raise EngineError(f"{where}: engine.json 'arrays' entry {i} needs key, numpy_dtype and shape")
        expected[e["key"]] = (e["numpy_dtype"], e["shape"])
    if ARRAYS_MEMBER not in members:
        if expected:
            raise EngineError(f"{where}: member '{ARRAYS_MEMBER}' is missing")
        return {}
    return _unpack(where, ARRAYS_MEMBER, members[ARRAYS_MEMBER], expected)


def _read_weight_info(where: str, i: int, w) -> WeightInfo:
    try:
        info = WeightInfo(w["name"], w["dtype"], w["numpy_dtype"], tuple(w["shape"]), w["nbytes"], w["sha256"])
        ok = isinstance(info.name, str) and isinstance(info.sha256, str) and type(info.nbytes) is int and \
            all(type(d) is int for d in info.shape) and isinstance(info.dtype, str)
        numpy_dtype(info.numpy_dtype, where)
    except (KeyError, TypeError, ModelError):
        ok = False
    if not ok:
        raise EngineError(f"{where}: engine.json 'weights' entry {i} is malformed: {w!r:.120}")
    return info


def _check_weights(where: str, graph: Graph, infos: list, stripped: bool) -> None:
    """The weight list of engine.json against the graph: the same names, dtypes and shapes."""
    consts = {v.name: v for v in graph.constants()}
    actual = {v.name for v in weight_values(graph)}
    listed = {w.name for w in infos}
    if actual != listed:
        raise EngineError(f"{where}: engine.json lists weights that are not the graph's (unlisted "
                          f"{sorted(actual - listed)[:5]}, not in the graph {sorted(listed - actual)[:5]})")
    for w in infos:
        v = consts[w.name]
        held = None if is_missing(v.const) else (v.const.dtype.name, tuple(v.const.shape))
        if w.dtype != v.type.dtype.short or not shape_fits(w.shape, v.type.shape) or \
                (held is not None and held != (w.numpy_dtype, w.shape)):
            raise EngineError(f"{where}: weight '{w.name}' is listed as {w.dtype} {w.describe()}, the graph has "
                              f"{v.type}" + (f" held as {held[0]}{list(held[1])}" if held else ""))
    others = [n for n in missing_constants(graph) if n not in listed]
    if others:
        raise EngineError(f"{where}: the data of constants {others[:5]} is missing (they are not weights)")


def _read_profiles(where: str, meta: dict, graph: Graph) -> list:
    try:
        profiles = [Profile.from_json(p) for p in _get(meta, "profiles", list, where)]
        return resolve_profiles(profiles, graph)
    except (RtxjitError, TypeError, AttributeError) as exc:
        raise EngineError(f"{where}: optimization profiles: {exc}") from None


def _read_binaries(where: str, meta: dict, members: dict) -> dict:
    out = {}
    for i, b in enumerate(_get(meta, "binaries", list, where)):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not _BINARY_NAME_RE.fullmatch(b["name"]) \
                or b.get("member") != BINARY_PREFIX + b["name"] or not isinstance(b.get("meta"), dict):
            raise EngineError(f"{where}: engine.json 'binaries' entry {i} is malformed: {b!r:.120}")
        data = members.get(b["member"])
        if data is None or b.get("sha256") != hashlib.sha256(data).hexdigest():
            raise EngineError(f"{where}: binary '{b['name']}' (member '{b['member']}') is missing or altered")
        out[b["name"]] = {"meta": b["meta"], "data": data}
    return out
