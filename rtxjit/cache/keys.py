"""Runtime cache keys and the versions inside them (the store is ``rtxjit/cache/store.py``).

Keys. ``cache_key(target=..., **components)`` is the sha256 of canonical JSON (sorted keys, no
``str()`` of containers) over the schema version, a hash of rtxjit's codegen sources, the Triton
version, the target ("cuda:90", "interpreter") and the caller's components (rendered source key,
specialization, launch options ...). ``explain_key`` prints a hash per component, so that a miss
can be explained by diffing two outputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from rtxjit.errors import UsageError
from rtxjit.ir import registry

SCHEMA = 2  # 2: the metadata carries a sha256 of its own record (a flipped byte in it is caught)


def canonical_json(obj) -> str:
    """One text per value: sorted keys, no spaces, ASCII. Lists and tuples are JSON arrays; any
    other non-JSON type (a set, bytes, an object) is an error rather than its ``str()``."""

    def reject(o):
        raise UsageError(f"cache key component of type {type(o).__name__} is not JSON; pass ints, floats, "
                        "strings, bools, None, lists or dicts (hash bytes first)")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=reject)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def codegen_version() -> str:
    """sha256 over rtxjit/codegen/**/*.py (relative paths and contents), once per process."""
    return _tree_hash("codegen")


def compiler_version() -> str:
    """sha256 over the code that turns a model into an optimized graph (rtxjit/ir, ops, onnx, passes):
    ops' inference and references shape the optimized graph too (they moved out of ir/, and a
    recorded graph must not outlive a change to them). The fingerprints of the ops users registered
    (rtxjit.register_op) count too, read at each call: they change at run time."""
    custom = [[d.name, d.since, d.fingerprint] for d in registry.custom_ops()]
    if not custom:
        return _compiler_tree()
    return _sha(canonical_json({"tree": _compiler_tree(), "custom_ops": custom}))


@functools.lru_cache(maxsize=None)
def _compiler_tree() -> str:
    return _tree_hash("ir", "ops", "onnx", "passes")


def _tree_hash(*folders: str) -> str:
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for folder in folders:
        root = package / folder
        for p in sorted(root.rglob("*.py")):
            h.update(p.relative_to(package).as_posix().encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    """The installed Triton's version, read without importing triton (its import has side effects)."""
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "none"


def target_of(device) -> str:
    """The target component of a key: "cuda:90" on an sm_90 GPU, "interpreter" on the CPU."""
    return f"cuda:{device.sm}" if device.kind == "cuda" else "interpreter"


def _key_parts(target: str, components: dict) -> dict:
    overlap = {"schema", "codegen", "triton", "target"} & set(components)
    if overlap:
        raise UsageError(f"cache key components {sorted(overlap)} are reserved")
    return {"schema": SCHEMA, "codegen": codegen_version(), "triton": triton_version(), "target": target,
            **components}


def cache_key(*, target: str, **components) -> str:
    """sha256 (hex) of the canonical JSON of the versions, ``target`` and ``components``."""
    return _sha(canonical_json(_key_parts(target, components)))


def explain_key(*, target: str, file=None, **components) -> list:
    """One line per component of ``cache_key(target=..., **components)``: a short hash of its
    canonical JSON, its name and (shortened) value; printed to ``file`` when given. Two runs that
    miss each other's entries differ in the lines whose hashes differ."""
    parts = _key_parts(target, components)
    lines = [f"key {cache_key(target=target, **components)}"]
    for name in sorted(parts):
        text = canonical_json(parts[name])
        shown = text if len(text) <= 60 else text[:57] + "..."
        lines.append(f"[{_sha(text)[:16]}] {name}: {shown}")
    if file is not None:
        print("\n".join(lines), file=file)
    return lines


def model_key(graph) -> str:
    """A model's identity for per-model records (the shape histogram): a hash of the imported
    graph's text form, i.e. its structure, names and types (not its weights)."""
    return _sha(canonical_json({"schema": SCHEMA, "graph": str(graph)}))
