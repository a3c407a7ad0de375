"""The runtime cache: keys, the directory store and its checks, atomic and concurrent writes, the
single-file form, persisted autotune decisions and the histogram of input shapes."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import signal
import time
import zipfile
from pathlib import Path

import pytest

import rtxjit
from rtxjit.cache import store as cache_mod
from rtxjit.cache.keys import cache_key, canonical_json, explain_key
from rtxjit.cache.store import RuntimeCache
from rtxjit.models import demo_inputs, resnet_cnn
from rtxjit.plan import autotune

BLOBS = {"cubin": bytes(range(256)) * 8, "asm": b"// ptx\n"}


def _entry(c: RuntimeCache, key: str) -> Path:
    return c.path / f"{key}.json"


def _blob_file(c: RuntimeCache, key: str, name: str) -> Path:
    (p,) = c.path.glob(f"{key}.{name}.*.bin")
    return p


# --- keys ---------------------------------------------------------------------------------------

def test_cache_key_is_canonical_and_covers_every_component():
    k = cache_key(target="cuda:90", source="abc", spec={"dtype": "fp16", "shape": [1, 2]})
    assert re.fullmatch(r"[0-9a-f]{64}", k)
    assert k == cache_key(spec={"shape": (1, 2), "dtype": "fp16"}, source="abc", target="cuda:90")
    assert k != cache_key(target="cuda:80", source="abc", spec={"dtype": "fp16", "shape": [1, 2]})
    assert k != cache_key(target="cuda:90", source="abd", spec={"dtype": "fp16", "shape": [1, 2]})
    assert canonical_json({"b": [1, 2], "a": None}) == '{"a":null,"b":[1,2]}'
    with pytest.raises(TypeError, match="not JSON"):
        cache_key(target="cuda:90", spec={1, 2})
    with pytest.raises(TypeError, match="reserved"):
        cache_key(target="cuda:90", triton="2.0")


def test_explain_key_prints_one_hash_per_component():
    out = io.StringIO()
    a = explain_key(target="cuda:90", source="abc", launch={"num_warps": 4}, file=out)
    b = explain_key(target="cuda:90", source="abc", launch={"num_warps": 8})
    assert out.getvalue().splitlines() == a
    assert a[0] == "key " + cache_key(target="cuda:90", source="abc", launch={"num_warps": 4})
    names = [line.split("] ")[1].split(":")[0] for line in a[1:]]
    assert names == ["codegen", "launch", "schema", "source", "target", "triton"]
    differing = [x.split("] ")[1].split(":")[0] for x, y in zip(a[1:], b[1:]) if x != y]
    assert differing == ["launch"]


# --- the store ----------------------------------------------------------------------------------

def test_round_trip_of_entries_blobs_and_records(tmp_path):
    c = RuntimeCache(tmp_path / "rc")
    key = cache_key(target="interpreter", source="k1")
    c.put(key, {"name": "matmul", "num_warps": 4}, BLOBS)
    c.put_json("note", {"a": [1, 2.5, None]})
    again = RuntimeCache(tmp_path / "rc")  # another session or process opening the same directory
    assert again.get(key) == ({"name": "matmul", "num_warps": 4}, BLOBS)
    assert again.get_json("note") == {"a": [1, 2.5, None]}
    assert again.get("absent") is None and again.get_json("absent") is None
    assert again.entries() == sorted([key, "note"])
    again.delete("note")
    assert again.entries() == [key]
    with pytest.raises(ValueError):
        c.put("../escape", {}, {})
    with pytest.raises(ValueError):
        c.put("k", {}, {"a.b": b""})


def _corrupt_blob(c, key):
    p = _blob_file(c, key, "cubin")
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01
    p.write_bytes(bytes(data))
    return "sha256"


def _truncate_meta(c, key):
    p = _entry(c, key)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "not valid JSON"


def _edit_meta(field, value, message):
    def edit(c, key):
        record = json.loads(_entry(c, key).read_text())
        record[field] = value
        _entry(c, key).write_text(json.dumps(record))
        return message
    return edit


def _missing_blob(c, key):
    _blob_file(c, key, "asm").unlink()
    return "cannot be read"


@pytest.mark.parametrize("damage", [
    _corrupt_blob, _truncate_meta, _missing_blob,
    _edit_meta("schema", 0, "schema 0"),
    _edit_meta("triton", "0.0.1", "Triton '0.0.1'"),
    _edit_meta("codegen", "0" * 64, "codegen"),
], ids=["flipped-blob-byte", "truncated-metadata", "missing-blob", "schema", "triton-version", "codegen-version"])
def test_a_damaged_entry_is_skipped_with_a_warning_and_rebuilt(tmp_path, damage):
    c = RuntimeCache(tmp_path)
    key = cache_key(target="interpreter", source="k")
    c.put(key, {"n": 1}, BLOBS)
    message = damage(c, key)
    with pytest.warns(RuntimeWarning) as record:
        assert c.get(key) is None
    text = str(record[0].message)
    assert message in text and f"{key}.json" in text
    c.put(key, {"n": 1}, BLOBS)  # the caller rebuilds: the new entry replaces the bad one
    assert c.get(key) == ({"n": 1}, BLOBS)


def test_metadata_whose_key_does_not_match_its_file_is_skipped(tmp_path):
    c = RuntimeCache(tmp_path)
    c.put("aaa", {"n": 1}, BLOBS)
    _entry(c, "bbb").write_bytes(_entry(c, "aaa").read_bytes())
    with pytest.warns(RuntimeWarning, match="names key 'aaa'"):
        assert c.get("bbb") is None
    assert c.get("aaa") == ({"n": 1}, BLOBS)


def test_a_crash_between_blobs_and_metadata_leaves_no_entry(tmp_path, monkeypatch):
    c = RuntimeCache(tmp_path)
    c.put("kept", {"n": 0}, BLOBS)

    def crash(self, key, text):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(RuntimeCache, "_write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        c.put("lost", {"n": 1}, BLOBS)
    monkeypatch.undo()
    assert list(tmp_path.glob("lost.cubin.*.bin"))  # the blobs were written ...
    assert c.entries() == ["kept"]  # ... but without the metadata there is no entry
    assert c.get("lost") is None
    assert not list(tmp_path.glob(f"*{cache_mod._TEMP_MARK}*"))  # a failed write cleans its temp file
    assert c.prune(older_than_s=3600) == 0  # young leftovers may belong to a live writer
    assert c.prune(older_than_s=-1) == 2 and c.get("kept") == ({"n": 0}, BLOBS)


def test_same_key_rewritten_with_other_bytes_stays_consistent(tmp_path):
    c = RuntimeCache(tmp_path)
    c.put("k", {"v": 1}, {"cubin": b"one"})
    c.put("k", {"v": 2}, {"cubin": b"two"})
    assert c.get("k") == ({"v": 2}, {"cubin": b"two"})
    assert c.prune(older_than_s=-1) == 1  # the blob that no metadata names any more
    assert c.get("k") == ({"v": 2}, {"cubin": b"two"})


# --- two processes ------------------------------------------------------------------------------

def _write_entries(path: str, prefix: str, n: int, go) -> None:
    c = RuntimeCache(path)
    go.wait(60)  # a barrier: both writers start together, once both have imported rtxjit
    for i in range(n):
        c.put(f"{prefix}{i}", {"i": i, "by": prefix}, {"cubin": os.urandom(20000), "meta": prefix.encode() * i})
        c.put("shared", {"by": prefix}, {"cubin": prefix.encode() * 1000})  # both write one key, too


def _write_then_die(path: str, ready: str) -> None:
    c = RuntimeCache(path)
    c.put("early0", {"n": 0}, BLOBS)
    c.put("early1", {"n": 1}, BLOBS)

    def hang(self, key, text):  # half the metadata reaches its temp file, then the process is killed
        with open(self.path / f"{key}.json{cache_mod._TEMP_MARK}{os.getpid()}.x", "wb") as f:
            f.write(text[: len(text) // 2])
        Path(ready).touch()
        time.sleep(60)

    RuntimeCache._write_meta = hang
    c.put("doomed", {"n": 2}, BLOBS)


def test_two_processes_writing_one_cache_lose_nothing_and_a_killed_writer_breaks_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    path, ready = str(tmp_path / "rc"), str(tmp_path / "ready")
    RuntimeCache(path)
    go = ctx.Barrier(2)
    writers = [ctx.Process(target=_write_entries, args=(path, p, 30, go)) for p in ("a", "b")]
    victim = ctx.Process(target=_write_then_die, args=(path, ready))
    for p in writers + [victim]:
        p.start()
    deadline = time.time() + 60
    while not os.path.exists(ready) and time.time() < deadline and victim.is_alive():
        time.sleep(0.05)
    assert os.path.exists(ready), "the victim never reached its metadata write"
    os.kill(victim.pid, signal.SIGKILL)
    for p in writers + [victim]:
        p.join(60)
    assert [p.exitcode for p in writers] == [0, 0] and victim.exitcode == -signal.SIGKILL

    c = RuntimeCache(path)
    expected = sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)] + ["early0", "early1", "shared"])
    assert c.entries() == expected  # the doomed entry never appeared; its temp file is not an entry
    for prefix in "ab":
        for i in range(30):
            meta, blobs = c.get(f"{prefix}{i}")
            assert meta == {"i": i, "by": prefix} and len(blobs["cubin"]) == 20000
    meta, blobs = c.get("shared")
    assert blobs["cubin"] == meta["by"].encode() * 1000  # one writer's whole entry, never a mixture
    assert c.get("early1") == ({"n": 1}, BLOBS) and c.get("doomed") is None
    assert list(Path(path).glob(f"doomed.json{cache_mod._TEMP_MARK}*"))


# --- the single-file form -----------------------------------------------------------------------

def test_save_and_load_a_single_file(tmp_path):
    c = RuntimeCache(tmp_path / "a")
    c.put("k1", {"n": 1}, BLOBS)
    c.put_json("k2", [1, 2])
    _entry(c, "bad").write_text("{trunc")
    with pytest.warns(RuntimeWarning, match="bad.json"):
        assert c.save(tmp_path / "cache.zip") == 2
    assert not list(tmp_path.glob(f"*{cache_mod._TEMP_MARK}*"))
    d = RuntimeCache(tmp_path / "b")
    assert d.load(tmp_path / "cache.zip") == 2
    assert d.get("k1") == ({"n": 1}, BLOBS) and d.get_json("k2") == [1, 2]

    # a damaged member is skipped, the others load; a file that is no zip loads nothing
    with zipfile.ZipFile(tmp_path / "cache.zip") as src, zipfile.ZipFile(tmp_path / "bad.zip", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.startswith("k1.cubin"):
                data = data[:-1] + b"\x00"
            dst.writestr(info.filename, data)
    e = RuntimeCache(tmp_path / "e")
    with pytest.warns(RuntimeWarning, match="k1.json.*sha256"):
        assert e.load(tmp_path / "bad.zip") == 1
    assert e.entries() == ["k2"]
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.warns(RuntimeWarning, match="nothing loaded"):
        assert e.load(tmp_path / "junk.zip") == 0


# --- autotune decisions -------------------------------------------------------------------------

def test_autotune_decisions_are_read_from_and_written_to_the_cache(tmp_path, monkeypatch):
    autotune.forget()
    c = RuntimeCache(tmp_path)
    key = autotune.tune_key("src-fake", 90, 300, 500, 64)
    other_sm = autotune.tune_key("src-fake", 80, 300, 500, 64)
    choices = [((1,), {"BLOCK_M": 16, "EVEN_K": True}), ((2,), {"BLOCK_M": 64, "EVEN_K": True})]
    timed = []
    monkeypatch.setattr(autotune, "time_ms", lambda fn, **kw: (fn(), 2.0 - len(timed))[1])
    try:
        assert autotune.attach(c, [key, other_sm]) == 0
        assert autotune.choose(key, choices, timed.append) == 1 and timed == [0, 1]
        record = c.get_json(autotune.cache_entry_key(key))
        assert record["chosen"] == {"BLOCK_M": 64, "EVEN_K": True} and record["tune_key"] == list(key)
        assert autotune.cache_entry_key(key) != autotune.cache_entry_key(other_sm)

        autotune.forget()  # a new process: nothing in memory, the decision comes from the cache
        assert autotune.attach(RuntimeCache(tmp_path), [key, other_sm]) == 1
        assert autotune.choose(key, choices, lambda i: pytest.fail("timed again")) == 1

        # a stored choice that matches none of the launch's choices is ignored, timed and replaced
        autotune.forget()
        autotune.attach(c, [key])
        new_choices = [((1,), {"BLOCK_M": 32}), ((2,), {"BLOCK_M": 128})]
        timed.clear()
        assert autotune.choose(key, new_choices, timed.append) == 1 and timed == [0, 1]
        assert c.get_json(autotune.cache_entry_key(key))["chosen"] == {"BLOCK_M": 128}

        # a record whose tune key does not match is not trusted
        autotune.forget()
        c.put_json(autotune.cache_entry_key(key), {"tune_key": ["other"], "chosen": {"BLOCK_M": 128}})
        assert autotune.attach(c, [key]) == 0
    finally:
        autotune.forget()


# --- sessions: the histogram of input shapes ----------------------------------------------------

def test_shape_histogram_counts_bindings_across_sessions(tmp_path):
    model = resnet_cnn(size=8, width=4)
    path = tmp_path / "rc"
    first = rtxjit.InferenceSession(model, device="cpu", runtime_cache=str(path))
    for batch in (1, 2, 1):  # the second batch-1 run reuses its binding: not counted again
        first.run(None, demo_inputs(model, batch=batch))
    second = rtxjit.InferenceSession(model, device="cpu", runtime_cache=RuntimeCache(path))
    second.run(None, demo_inputs(model, batch=1))
    assert second._model_key == first._model_key
    top = RuntimeCache(path).most_frequent_shapes(first._model_key, 5)
    assert top == [({"image": (1, 3, 8, 8)}, 2), ({"image": (2, 3, 8, 8)}, 1)]
    assert RuntimeCache(path).most_frequent_shapes(first._model_key, 1) == top[:1]
    assert rtxjit.InferenceSession(model, device="cpu").runtime_cache is None


def test_histogram_records_survive_damage_and_are_capped(tmp_path):
    c = RuntimeCache(tmp_path)
    for i in range(cache_mod.HISTOGRAM_CAP + 5):
        c.record_shapes("m", {"x": (i,)})
    c.record_shapes("m", {"x": (3,)})
    shapes = c.most_frequent_shapes("m", 1000)
    assert len(shapes) == cache_mod.HISTOGRAM_CAP and shapes[0] == ({"x": (3,)}, 2)
    _entry(c, "shapes-m").write_text("{")
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        c.record_shapes("m", {"x": (7,)})  # a damaged record starts again rather than failing the run
    assert c.most_frequent_shapes("m") == [({"x": (7,)}, 1)]


# --- nothing executes from the cache ------------------------------------------------------------

def test_the_cache_module_never_unpickles():
    text = Path(cache_mod.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(pickle|marshal|shelve|cPickle|dill)\b", text, re.M)
    assert not re.search(r"\b(eval|exec)\(", text)
