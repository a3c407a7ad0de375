"""The runtime cache: what one process learned, kept on disk for the next (see STYLE.md, "Caches").
Its keys and the versions inside them are in ``rtxjit/cache/keys.py``.

A directory, in the style of Triton's ``FileCacheManager``. An entry is

    <key>.json              metadata: schema, key, versions, the caller's meta, the sha256 and
                            size of every blob, and the sha256 of the record itself; written LAST:
                            its presence commits the entry
    <key>.<name>.<h>.bin    optional binary blobs (a cubin, its Triton metadata ...); <h> is the
                            first 16 hex digits of the blob's sha256, so the metadata of one writer
                            never meets the blobs of another writing the same key

Every file is written to a unique temp name in the same folder (pid + random) and moved into place
with ``os.replace``, which is atomic: a reader sees an old file or a new file, never part of one. A
process killed between its blob and metadata writes leaves orphan blobs and temp files, never a
visible entry (``prune`` removes such leftovers once they are old). There is no index file
(``entries()`` lists the metadata files), so two processes writing one cache at once lose nothing;
two writing the same key leave one writer's complete entry (the last ``os.replace`` wins). On load the key inside the metadata, the schema, Triton and
codegen versions and every blob's sha256 are checked; an entry that fails a check is skipped with a
warning naming the file and the fault, and the caller rebuilds it (its ``put`` overwrites the bad
entry). The checks also catch what a power loss can do without ``fsync`` (metadata that reached
the disk before its blobs).

Nothing here is executed: metadata is JSON, blobs are bytes (no pickle, marshal or shelve).

Single file. ``save(path)`` writes every valid entry into one zip file, atomically (temp + rename);
``load(path)`` checks each entry of such a file as ``get`` does and adds the good ones to the
directory. The directory is the live form; the zip is for shipping a warmed cache.

What is persisted today: autotune decisions (plan/autotune.py) and a histogram of the input
shapes each model was run with (``record_shapes``), optimized graphs and checked variants
(jit/warm.py). Compiled kernels, on a GPU, are written by the session's ``KernelStore``
(kernels/store.py): one entry per kernel, its metadata and its cubin as a blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from rtxjit.cache.keys import SCHEMA, canonical_json, codegen_version, triton_version
from rtxjit.errors import CacheError, UsageError

PARALLEL_READ_BYTES = 8 << 20  # an entry this large has its blobs read and checked by a thread pool
HISTOGRAM_CAP = 64  # distinct shape bindings kept per model (the least frequent are dropped)

_KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,128}")
_BLOB_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_TEMP_MARK = ".tmp."


# --- the store ----------------------------------------------------------------------------------

class CacheEntryError(CacheError):
    """An entry failed a check (internal: turned into a warning and a miss)."""


@contextlib.contextmanager
def replacing(path: Path):
    """Yields a unique temp path next to ``path``; renamed over ``path`` when the block succeeds,
    removed when it fails, so readers only ever see a whole file."""
    tmp = path.with_name(f"{path.name}{_TEMP_MARK}{os.getpid()}.{secrets.token_hex(6)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a unique temp file next to ``path``, then rename it over ``path``."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _read_blob(path: Path) -> bytearray:
    """A blob's bytes, writable (arrays made over them need no copy to become tensors)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        if f.readinto(data) != size:
            raise OSError(f"{path}: short read")
    return data


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise CacheError(f"runtime cache key {key!r} must be 1-128 characters of [0-9A-Za-z_-]")
    return key


def _record_digest(record: dict):
    """sha256 of a metadata record's canonical JSON, its own "sha256" field left out; None when the
    record holds what JSON cannot (NaN, read from a damaged file)."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _verify(key: str, meta_bytes: bytes, read_blob, check_versions: bool = True) -> tuple:
    """The (meta, blobs) of an entry whose metadata file holds ``meta_bytes``; ``read_blob(name,
    sha256)`` returns a blob's bytes. Raises CacheEntryError saying what is wrong."""
    try:
        record = json.loads(meta_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CacheEntryError(f"metadata is not valid JSON (truncated?): {exc}") from None
    if not isinstance(record, dict):
        raise CacheEntryError("metadata is not a JSON object")
    if record.get("schema") != SCHEMA:
        raise CacheEntryError(f"schema {record.get('schema')!r}, expected {SCHEMA}")
    if record.get("key") != key:
        raise CacheEntryError(f"metadata names key {record.get('key')!r}, not its file's key {key!r}")
    if check_versions:
        if record.get("triton") != triton_version():
            raise CacheEntryError(f"written by Triton {record.get('triton')!r}, this is {triton_version()!r}")
        if record.get("codegen") != codegen_version():
            raise CacheEntryError("written by another version of rtxjit's codegen "
                                  f"({str(record.get('codegen'))[:12]}, this is {codegen_version()[:12]})")
    if record.get("sha256") != _record_digest(record):
        raise CacheEntryError("metadata does not match its sha256 (corrupt)")
    meta, listed = record.get("meta"), record.get("blobs")
    if not isinstance(meta, dict) or not isinstance(listed, dict):
        raise CacheEntryError("metadata lacks its 'meta' or 'blobs' object")
    for name, info in sorted(listed.items()):
        sha = info.get("sha256") if isinstance(info, dict) else None
        if not _BLOB_RE.fullmatch(name) or not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise CacheEntryError(f"bad blob entry {name!r}")

    def fetch(name: str):
        info = listed[name]
        try:
            data = read_blob(name, info["sha256"])
        except (OSError, KeyError) as exc:
            return CacheEntryError(f"blob '{name}' cannot be read: {exc}")
        if len(data) != info.get("size"):
            return CacheEntryError(f"blob '{name}' has {len(data)} bytes, metadata says {info.get('size')}")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            return CacheEntryError(f"blob '{name}' does not match its sha256 (corrupt)")
        return data

    names = sorted(listed)
    total = sum(info.get("size", 0) for info in listed.values() if isinstance(info.get("size"), int))
    if len(names) > 1 and total >= PARALLEL_READ_BYTES:  # reading and hashing release the GIL
        with ThreadPoolExecutor(min(8, len(names)), thread_name_prefix="rtxjit-cache-read") as pool:
            fetched = list(pool.map(fetch, names))
    else:
        fetched = [fetch(n) for n in names]
    for data in fetched:
        if isinstance(data, CacheEntryError):
            raise data
    return meta, dict(zip(names, fetched))


class RuntimeCache:
    """A directory of cache entries shared by sessions and processes (see the module docstring).

    ``put(key, meta, blobs)`` / ``get(key)`` store and fetch an entry; ``put_json`` / ``get_json``
    a small JSON record; ``record_shapes`` / ``most_frequent_shapes`` the per-model histogram of
    input shapes; ``save(path)`` / ``load(path)`` the single-file (zip) form.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RuntimeCache({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RuntimeCache) and other.path.resolve() == self.path.resolve()

    __hash__ = object.__hash__

    # -- entries
    def _meta_path(self, key: str) -> Path:
        return self.path / f"{key}.json"

    def _blob_path(self, key: str, name: str, sha: str) -> Path:
        return self.path / f"{key}.{name}.{sha[:16]}.bin"

    def put(self, key: str, meta: dict, blobs: Optional[dict] = None) -> None:
        """Store an entry: the blobs first, then the metadata that commits them."""
        _check_key(key)
        blobs = dict(blobs or {})
        for name, data in blobs.items():
            if not isinstance(name, str) or not _BLOB_RE.fullmatch(name):
                raise CacheError(f"blob name {name!r} must be 1-64 characters of [0-9A-Za-z_-]")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise UsageError(f"blob '{name}' must be bytes, not {type(data).__name__}")
        listed = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in sorted(blobs.items())}
        record = {"schema": SCHEMA, "key": key, "triton": triton_version(), "codegen": codegen_version(),
                  "meta": meta, "blobs": listed}
        json.dumps(record, allow_nan=False)  # meta must be JSON: TypeError or ValueError otherwise
        record["sha256"] = _record_digest(record)
        text = json.dumps(record, sort_keys=True, indent=1, allow_nan=False).encode()
        for name, data in sorted(blobs.items()):
            _atomic_write(self._blob_path(key, name, listed[name]["sha256"]), bytes(data))
        self._write_meta(key, text)

    def _write_meta(self, key: str, text: bytes) -> None:
        _atomic_write(self._meta_path(key), text)

    def get(self, key: str, check_versions: bool = True):
        """``(meta, blobs)`` of a committed, intact entry, else None (with a warning if the entry
        exists but fails a check). ``check_versions=False`` accepts entries of another Triton or
        codegen version, for records that do not depend on them (the shape histogram)."""
        hit = self._read(key, check_versions)
        return None if hit is None else hit[1:]

    def _read(self, key: str, check_versions: bool):
        """``(metadata bytes, meta, blobs)`` of an intact entry, else None (see ``get``)."""
        _check_key(key)
        path = self._meta_path(key)
        for attempt in range(2):
            try:
                meta_bytes = path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                self._warn(path, f"cannot be read: {exc}")
                return None
            try:
                meta, blobs = _verify(key, meta_bytes, lambda n, h: _read_blob(self._blob_path(key, n, h)),
                                      check_versions)
                return meta_bytes, meta, blobs
            except CacheEntryError as exc:
                if attempt == 0 and self._changed(path, meta_bytes):
                    continue  # another process replaced the entry while we read it: read it again
                self._warn(path, str(exc))
                return None
        return None

    @staticmethod
    def _changed(path: Path, meta_bytes: bytes) -> bool:
        try:
            return path.read_bytes() != meta_bytes
        except OSError:
            return True

    @staticmethod
    def _warn(path: Path, what: str) -> None:
        warnings.warn(f"rtxjit runtime cache: skipping {path}: {what}; it will be rebuilt", RuntimeWarning,
                      stacklevel=3)

    def put_json(self, key: str, obj) -> None:
        """Store a small JSON record (no blobs)."""
        self.put(key, {"record": obj})

    def get_json(self, key: str, check_versions: bool = True):
        """The record stored by ``put_json``, or None."""
        hit = self.get(key, check_versions)
        if hit is None:
            return None
        if "record" not in hit[0]:
            self._warn(self._meta_path(key), "is not a JSON record")
            return None
        return hit[0]["record"]

    def entries(self) -> list:
        """The keys of committed entries (metadata files present; not checked), sorted."""
        keys = []
        for p in self.path.iterdir():
            if p.suffix == ".json" and _TEMP_MARK not in p.name and _KEY_RE.fullmatch(p.stem):
                keys.append(p.stem)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove an entry: its metadata first (the entry disappears at once), then its blobs."""
        _check_key(key)
        for p in [self._meta_path(key)] + sorted(self.path.glob(f"{key}.*.bin")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def prune(self, older_than_s: float = 3600.0) -> int:
        """Remove leftovers older than ``older_than_s``: temp files of writers that died, and blobs
        that no committed entry names (a crash before the commit, or a key rewritten with other
        bytes). Young ones may belong to a writer still at work and are kept. Returns the count."""
        referenced = set()
        for key in self.entries():
            try:
                record = json.loads(self._meta_path(key).read_bytes())
                for name, info in record["blobs"].items():
                    referenced.add(self._blob_path(key, name, info["sha256"]).name)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        removed, now = 0, time.time()
        for p in self.path.iterdir():
            leftover = _TEMP_MARK in p.name or (p.suffix == ".bin" and p.name not in referenced)
            try:
                if leftover and now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    # -- histogram of input shapes
    def _histogram_key(self, model_key: str) -> str:
        return "shapes-" + _check_key(model_key)[:64]

    def record_shapes(self, model_key: str, shapes: dict) -> None:
        """Count one binding of input shapes (``{input name: dims}``) for a model.

        Read, merge, write with an atomic replace, under an advisory lock on the record's lock
        file (flock: between processes, and between sessions of one process that share the
        directory): two writers at one instant used to drop each other's bindings (last writer
        wins; seen in the concurrency test under load). Where no lock can be taken the merge goes
        ahead unlocked, which a histogram of hints can afford. At most HISTOGRAM_CAP bindings are kept.
        """
        entry = canonical_json({n: [int(d) for d in dims] for n, dims in shapes.items()})
        key = self._histogram_key(model_key)
        with self._locked(key):
            counts = self._histogram(key)
            counts[entry] = counts.get(entry, 0) + 1
            kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:HISTOGRAM_CAP]
            self.put_json(key, {"model": model_key, "counts": dict(kept)})

    @contextlib.contextmanager
    def _locked(self, key: str):
        """An exclusive flock on ``<meta path>.lock`` for the block (nothing where fcntl or the file
        is not available: the caller's merge then runs unlocked)."""
        try:
            import fcntl

            lock_path = self._meta_path(key).with_suffix(".lock")
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+")
        except (ImportError, OSError):
            yield
            return
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:
                pass
            yield
        finally:
            handle.close()  # closing releases the lock

    def _histogram(self, key: str) -> dict:
        record = self.get_json(key, check_versions=False)
        counts = record.get("counts") if isinstance(record, dict) else None
        if not isinstance(counts, dict):
            return {}
        return {k: v for k, v in counts.items() if isinstance(k, str) and isinstance(v, int) and v > 0}

    def most_frequent_shapes(self, model_key: str, n: int = 8) -> list:
        """The ``n`` most often seen bindings of a model as ``[({input: (dims)}, count)]``, most
        frequent first (ties in a fixed order)."""
        out = []
        for text, count in sorted(self._histogram(self._histogram_key(model_key)).items(),
                                  key=lambda kv: (-kv[1], kv[0])):
            try:
                shapes = {name: tuple(int(d) for d in dims) for name, dims in json.loads(text).items()}
            except (ValueError, TypeError, AttributeError):
                continue  # an entry we did not write: skip it
            out.append((shapes, count))
            if len(out) == n:
                break
        return out

    # -- the single-file form
    def save(self, path) -> int:
        """Write every intact entry into one zip file at ``path``, atomically; returns the count."""
        count = 0
        with replacing(Path(path)) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key in self.entries():
                hit = self._read(key, check_versions=False)
                if hit is None:
                    continue
                meta_bytes, _, blobs = hit
                for name, data in sorted(blobs.items()):
                    zf.writestr(self._blob_path(key, name, hashlib.sha256(data).hexdigest()).name, data)
                zf.writestr(f"{key}.json", meta_bytes)
                count += 1
        return count

    def load(self, path) -> int:
        """Add the intact entries of a zip file written by ``save`` to this directory (entries of
        another Triton or codegen version included: ``get`` skips them). Returns the count; a
        corrupt file or entry is skipped with a warning."""
        path = Path(path)
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            warnings.warn(f"rtxjit runtime cache: cannot read {path}: {exc}; nothing loaded", RuntimeWarning,
                          stacklevel=2)
            return 0
        count = 0
        with zf:
            names = set(zf.namelist())
            for member in sorted(names):
                key = member[:-len(".json")]
                if not member.endswith(".json") or not _KEY_RE.fullmatch(key):
                    continue
                try:
                    meta_bytes = zf.read(member)
                    meta, blobs = _verify(key, meta_bytes, lambda n, h: zf.read(self._blob_path(key, n, h).name),
                                          check_versions=False)
                except (CacheEntryError, zipfile.BadZipFile, zlib.error) as exc:
                    warnings.warn(f"rtxjit runtime cache: skipping {path}:{member}: {exc}", RuntimeWarning,
                                  stacklevel=2)
                    continue
                for name, data in sorted(blobs.items()):
                    _atomic_write(self._blob_path(key, name, hashlib.sha256(data).hexdigest()), data)
                self._write_meta(key, meta_bytes)
                count += 1
        return count


def open_cache(value) -> Optional[RuntimeCache]:
    """A session's ``runtime_cache`` argument: a RuntimeCache, a directory path, or None (then
    RTXJIT_RUNTIME_CACHE names the directory, if set)."""
    if isinstance(value, RuntimeCache):
        return value
    if value is None:
        from rtxjit import config

        value = config.runtime_cache_dir()
        if value is None:
            return None
    if isinstance(value, (str, os.PathLike)):
        return RuntimeCache(value)
    raise UsageError(f"runtime_cache must be a RuntimeCache or a directory path, not {type(value).__name__}")
