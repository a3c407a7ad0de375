"""What a warm start reads from the runtime cache: each binding's checked variant, with its kernels
as binaries (kernels/binaries.py).

When the specializer installs a binding's variant, it also records it (``save_variant``): per
step, which kernel served (generic or specialized), its source hash, its tile configuration, and
the binary entry of its compiled kernel. A later process that meets the same binding of the same
model on the same SM (``load_variant``) rebuilds the plan (kernel sources are regenerated from the
IR, never read back), checks that every step's source hash matches the record, loads the binaries
and serves the variant at once: no compile, no JIT dispatch, no second check (the record exists only
for a variant that passed the check against the generic kernels). A record that does not match is
ignored and the binding starts on generic kernels as usual.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

from rtxjit.cache.keys import cache_key, compiler_version, target_of
from rtxjit.exec.executor import Executable, Variant, bind_direct
from rtxjit.kernels.keys import GENERIC, SPECIALIZED, specialized_source
from rtxjit.kernels.keys import item_key, step_key  # noqa: F401 - binary keys, read here by aot and tests


def binding_id(key: tuple) -> list:
    """An executable's key (input names, shapes, dtypes, host-read values) as JSON."""
    out = []
    for item in key:
        name, a = item[0], item[1]
        if isinstance(a, bytes):
            out.append([name, "host", a.hex()])
        else:
            out.append([name, [int(d) for d in a], getattr(item[2], "short", str(item[2]))])
    return out


def _record_key(exe: Executable, model_key: str) -> str:
    return cache_key(target=target_of(exe.device), kind="variant", model=model_key, binding=binding_id(exe.key))


def save_binaries(kernels, exe: Executable, variant: Variant) -> Optional[list]:
    """Store the compiled kernels of ``variant`` (its direct launches bound) in the session's
    kernel store ``kernels`` (kernels/store.py); their binary keys, or None if some kernel
    cannot be stored."""
    if variant.direct is None:
        return None
    keys = []
    for (_, _, _, constexprs, step, _), kind, d in zip(variant.launches, variant.kinds, variant.direct):
        bkey = step_key(exe.device, exe.plan, step, kind, constexprs)
        if not kernels.put(bkey, d.kernel):
            return None
        keys.append(bkey)
    return keys


def save_variant(kernels, model_key: str, exe: Executable, variant: Variant) -> bool:
    """Record ``variant`` (checked, with its direct launches bound) in the runtime cache of the
    kernel store ``kernels`` for later processes: its kernels, and per step which one serves it;
    False if it cannot be."""
    if exe.key is None or kernels.cache is None:
        return False
    keys = save_binaries(kernels, exe, variant)
    if keys is None:
        return False
    steps = []
    for (_, _, _, constexprs, step, grid), kind, bkey in zip(variant.launches, variant.kinds, keys):
        src = step.kernel if kind == GENERIC else specialized_source(step)
        steps.append({"kind": kind, "source": src.key, "grid": list(grid), "constexprs": dict(constexprs),
                      "binary": bkey})
    kernels.cache.put_json(_record_key(exe, model_key), {"steps": steps})
    return True


def load_variant(kernels, model_key: str, exe: Executable) -> Optional[Variant]:
    """The recorded variant of ``exe``'s binding (in the runtime cache of the kernel store
    ``kernels``) with its kernels loaded from there, or None."""
    if exe.device.kind != "cuda" or exe.key is None or kernels.cache is None:
        return None
    record = kernels.cache.get_json(_record_key(exe, model_key))
    if record is None:
        return None
    try:
        steps = record["steps"]
        if len(steps) != len(exe.plan.steps):
            return None
        kinds, configs, loaded = [], {}, []
        for i, (rec, step) in enumerate(zip(steps, exe.plan.steps)):
            kind = rec["kind"]
            src = step.kernel if kind == GENERIC else specialized_source(step)
            if kind not in (GENERIC, SPECIALIZED) or rec["source"] != src.key:
                return None
            kinds.append(kind)
            configs[i] = (tuple(rec["grid"]), dict(rec["constexprs"]))
            loaded.append(kernels.find(rec["binary"]))
        if any(k is None for k in loaded):
            return None
        variant = exe.variant(kinds, configs, arena=exe.active.arena)  # the generic variant is dropped
        variant.direct = bind_direct(variant.launches, loaded)
        return variant if variant.direct is not None else None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        warnings.warn(f"rtxjit runtime cache: the recorded kernels of a binding cannot be used ({exc}); "
                      "it starts on generic kernels", RuntimeWarning)
        return None


# --- the optimized graph -------------------------------------------------------------------------

CHUNK_BYTES = 32 << 20  # arrays are packed into blobs of about this size, read and checked in parallel


def model_identity(model) -> Optional[dict]:
    """What identifies a model's bytes without reading them: a file's resolved path, size and
    modification time in ns (as Python's .pyc files are checked against their source); the sha256
    of serialized bytes. None for an in-memory graph or proto (not cached)."""
    from pathlib import Path

    if isinstance(model, (str, Path)):
        path = Path(model)
        try:
            st = path.stat()
            return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            return None
    if isinstance(model, (bytes, bytearray)):
        import hashlib

        return {"sha256": hashlib.sha256(model).hexdigest()}
    return None


def _graph_key(identity: dict, options: dict) -> str:
    return cache_key(target="any", kind="graph", model=identity, options=options, compiler=compiler_version())


def load_graph(cache, identity: dict, options: dict) -> Optional[tuple]:
    """``(optimized graph, model key)`` recorded for this model and these options, or None."""
    import numpy as np

    from rtxjit.errors import ModelError
    from rtxjit.ir import serialize

    hit = cache.get(_graph_key(identity, options))
    if hit is None:
        return None
    meta, blobs = hit
    try:
        arrays = {}
        for key, (blob, offset, dtype, shape) in meta["arrays"].items():
            dt = serialize.numpy_dtype(dtype, f"array '{key}'")
            count = int(np.prod(shape, dtype=np.int64))
            arrays[key] = np.frombuffer(blobs[blob], dtype=dt, count=count, offset=offset).reshape(shape)
        return serialize.from_document(meta["graph"], arrays), meta["model_key"]
    except (KeyError, TypeError, ValueError, ModelError) as exc:
        warnings.warn(f"rtxjit runtime cache: a recorded optimized graph cannot be read ({exc}); "
                      "the model is imported again", RuntimeWarning)
        return None


def save_graph(cache, identity: dict, options: dict, graph, model_key: str) -> None:
    """Record the optimized graph (document + arrays packed into blobs) for later processes."""
    from rtxjit.ir import serialize

    doc, arrays = serialize.to_document(graph)
    blobs, index, chunk, size = {}, {}, [], 0

    def flush():
        nonlocal chunk, size
        if chunk:
            blobs[f"a{len(blobs)}"] = b"".join(chunk)
            chunk, size = [], 0

    for key, array in arrays.items():
        data = array.tobytes()  # C order
        if size and size + len(data) > CHUNK_BYTES:
            flush()
        index[key] = [f"a{len(blobs)}", size, serialize.dtype_name(array.dtype), list(array.shape)]
        chunk.append(data)
        size += len(data)
    flush()
    cache.put(_graph_key(identity, options), {"graph": doc, "arrays": index, "model_key": model_key}, blobs)


def save_graph_later(cache, identity: dict, options: dict, graph, model_key: str) -> threading.Thread:
    """``save_graph`` on a thread of its own (not a daemon: the record is written before the
    process exits), so the first inference does not wait for the write."""

    def work():
        try:
            save_graph(cache, identity, options, graph, model_key)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs a later start
            warnings.warn(f"rtxjit runtime cache {cache}: cannot record the optimized graph: {exc}", RuntimeWarning)

    thread = threading.Thread(target=work, name="rtxjit-cache-writer")
    thread.start()
    return thread
