"""What one serving replica does, without Ray: open the session, warm up, batch, run.

Start-up, in order (``ModelServer.__init__``):

1. Take the runtime cache's start-up lock (``startup_lock``: an flock on ``rtxjit-serve.lock`` in the
   cache directory, which works across the machines of a shared filesystem that supports locks, as
   NFSv4 does). Replicas of one model start one after another: the first imports, optimizes and
   compiles, and writes all of it into the cache before it lets go; each later one reads the
   optimized graph (and on a GPU the kernels and checked variants) instead of doing the same work
   again at the same moment. Replicas that each compiled everything at once is the start-up that
   users of other servers report (onnxruntime's TensorRT provider: 16 minutes for 4 instances).
   After ``lock_timeout_s`` a replica goes ahead without the lock (a warning says so).
2. Open the ``InferenceSession`` (an ONNX file, or an engine file) on this replica's device.
3. Warm up: run each of the ``warmup_bindings`` most frequent input-shape bindings that the runtime
   cache recorded for this model (earlier runs, any replica), so that the replica is fast when it
   reports ready. Inputs are synthetic: floats in [0.5, 1.5), integers 0 (valid indices), booleans
   true. A model with inputs read on the host (shape tensors) is not warmed up: the histogram keeps
   shapes, not values.
4. Decide whether requests may be concatenated (``batch_plan``): every input and output has the
   same named dynamic dim 0, no input is read on the host, and a batch of two random rows gives
   each row's own outputs (checked once: a model whose rows interact, e.g. a mean over dim 0,
   would otherwise answer one client with another's data). Otherwise requests run one by one.
5. Wait for the JIT to specialize the bindings of steps 3 and 4 (at most ``warmup_timeout_s``; on
   the GPU this writes the kernels and checked variants that the next replica loads), flush the
   cache writes, then let go of the lock.

``run_batch(requests)`` serves the requests that Ray Serve's ``@serve.batch`` gathered: those of
equal trailing shapes and types are concatenated along dim 0 into runs whose shapes fit one of the
session's optimization profiles (and at most ``max_batch`` requests), and the outputs are split
back by rows; a concatenated run that fails is run again request by request, so each request gets
its own answer or error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rtxjit.errors import InputError, ModelError, RtxjitError, UsageError
from rtxjit.ir.types import DType
from rtxjit.serve.metrics import Metrics
from rtxjit.serve.oip import InferRequest, ProtocolError
from rtxjit.session import InferenceSession

LOCK_NAME = "rtxjit-serve.lock"


@dataclass(frozen=True)
class ServeConfig:
    """What every replica is given. ``model``: an absolute path, the same on every node (a shared
    filesystem); ``engine``: it is an engine file (``rtxjit build``), else an ONNX model."""

    model: str
    engine: bool = False
    runtime_cache: Optional[str] = None
    device: Optional[str] = None
    specialize: Optional[str] = None
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    warmup_bindings: int = 8
    warmup_timeout_s: float = 600.0
    lock_timeout_s: float = 1800.0

    @property
    def name(self) -> str:
        """The model's name in the protocol's paths: the file's stem."""
        return Path(self.model).stem

    def __post_init__(self):
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise UsageError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")


@contextlib.contextmanager
def startup_lock(cache_dir: Optional[str], timeout_s: float):
    """An exclusive flock on ``cache_dir/rtxjit-serve.lock`` for the block; nothing without a cache
    directory or where no lock can be taken (the replica then starts unserialized)."""
    if cache_dir is None:
        yield
        return
    try:
        import fcntl

        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        handle = open(Path(cache_dir) / LOCK_NAME, "a+")
    except (ImportError, OSError):
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    warnings.warn(f"rtxjit serve: another replica held {cache_dir}/{LOCK_NAME} for over "
                                  f"{timeout_s:g} s; starting without waiting for it", RuntimeWarning)
                    break
                time.sleep(0.1)
            except OSError:  # a filesystem without locks
                break
        yield
    finally:
        handle.close()  # releases the lock


def open_session(config: ServeConfig) -> InferenceSession:
    from rtxjit.engine.engine import Engine

    if not os.path.isfile(config.model):
        raise ModelError(f"{'engine' if config.engine else 'model'} file '{config.model}' does not exist on "
                         f"{socket.gethostname()}: every node that runs a replica needs it at that path "
                         "(a shared filesystem)")
    model = Engine.load(config.model, device=config.device) if config.engine else config.model
    return InferenceSession(model, device=config.device, runtime_cache=config.runtime_cache,
                            specialize=config.specialize)


def synthetic_feeds(session: InferenceSession, shapes: dict, rng: np.random.Generator) -> dict:
    """Inputs of these shapes for warm-up and checks: floats in [0.5, 1.5), integers 0, booleans true."""
    feeds = {}
    for arg in session.get_inputs():
        shape = tuple(shapes[arg.name])
        if arg.dtype.is_float:
            values = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
            feeds[arg.name] = (torch.from_numpy(values).to(torch.bfloat16) if arg.dtype is DType.BF16
                               else values.astype(arg.dtype.value[2]))
        elif arg.dtype is DType.BOOL:
            feeds[arg.name] = np.ones(shape, dtype=bool)
        else:
            feeds[arg.name] = np.zeros(shape, dtype=arg.dtype.value[2])
    return feeds


def warm_up(session: InferenceSession, bindings: int) -> int:
    """Run the runtime cache's most frequent recorded bindings; how many ran (see the module doc).
    The caller waits for their specialization (``session.wait_for_specialization``)."""
    if session.host_inputs:
        return 0
    names = {a.name for a in session.get_inputs()}
    rng = np.random.default_rng(0)
    done = 0
    for shapes, _count in session.recorded_shapes(bindings):
        if set(shapes) != names:
            continue
        try:
            session.run(None, synthetic_feeds(session, shapes, rng))
        except InputError:  # outside this session's profiles (another deployment's binding)
            continue
        done += 1
    return done


def batch_plan(session: InferenceSession, base_shapes: Optional[dict]) -> tuple:
    """``(symbol, None)`` when requests may be concatenated along dim 0 (the shared symbol), else
    ``(None, reason)``; ``base_shapes`` (a binding, e.g. the most frequent recorded one; None: the
    first profile's opt shapes) gives the other dims of the check that rows stay independent."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if session.host_inputs:
        return None, f"inputs {session.host_inputs} are read on the host (their values choose the plan)"
    firsts = {a.shape[0] if a.shape else None for a in inputs}
    symbol = firsts.pop() if len(firsts) == 1 else None
    if not isinstance(symbol, str) or symbol == "?":
        return None, "the inputs do not share a named dynamic dim 0"
    for o in outputs:  # "(N)" is how the IR writes a product of the one dim N (e.g. after a Flatten)
        if not o.shape or o.shape[0] not in (symbol, f"({symbol})"):
            return None, f"output '{o.name}' has no dim 0 '{symbol}'"
    if base_shapes is None:
        base_shapes = {a.name: session.profiles[0].opt(a.name) for a in inputs}
    rng = np.random.default_rng(1)
    try:
        pair = synthetic_feeds(session, {n: (2,) + tuple(s[1:]) for n, s in base_shapes.items()}, rng)
        together = session.run(None, pair)
        alone = [session.run(None, {n: x[i:i + 1] for n, x in pair.items()}) for i in range(2)]
    except InputError as exc:
        return None, f"a batch of 2 cannot be checked ({exc})"
    for k, o in enumerate(outputs):
        for i in range(2):
            got, want = _numpy(together[k][i:i + 1]), _numpy(alone[i][k])
            if got.shape != want.shape or not _close(got, want, o.dtype):
                return None, (f"rows are not independent: output '{o.name}' of row {i} in a batch of 2 differs "
                              "from the row run alone")
    return symbol, None


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _close(a: np.ndarray, b: np.ndarray, dtype: DType) -> bool:
    if not dtype.is_float:
        return bool(np.array_equal(a, b))
    rtol = 1e-3 if dtype in (DType.FP32, DType.FP64) else 2e-2
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = float(np.nanmax(np.abs(b))) if b.size and not np.all(np.isnan(b)) else 0.0
    return bool(np.allclose(a, b, rtol=rtol, atol=rtol * scale + 1e-6, equal_nan=True))


class ModelServer:
    """One replica's model: its session, warm-up and batching (see the module docstring)."""

    def __init__(self, config: ServeConfig, replica: str = "0"):
        start = time.perf_counter()
        self.config = config
        self.name = config.name
        with startup_lock(config.runtime_cache, config.lock_timeout_s):
            self.session = open_session(config)
            self.warmed = warm_up(self.session, config.warmup_bindings)
            if config.max_batch > 1:
                recorded = self.session.recorded_shapes(1)
                self.batch_symbol, self.no_batch_reason = batch_plan(self.session,
                                                                     recorded[0][0] if recorded else None)
            else:
                self.batch_symbol, self.no_batch_reason = None, "--max-batch is 1"
            # the check's bindings too: a replica that starts next finds them all in the cache
            self.session.wait_for_specialization(config.warmup_timeout_s)
            self.session.flush_runtime_cache(config.lock_timeout_s)
        self.inputs, self.outputs = self.session.get_inputs(), self.session.get_outputs()
        self._dtype_of = {o.name: o.dtype for o in self.outputs}
        self.metrics = Metrics(self.name, replica)
        self.startup_s = time.perf_counter() - start
        self.refresh_stats()

    def refresh_stats(self) -> None:
        """Copy the session's counters into the metrics (after each run and at start)."""
        stats = self.session.jit_stats()
        self.metrics.session_stats = {"compiles": stats["compiles"], "cache_hits": stats["cache_hits"],
                                      "graph_from_cache": int(self.session.graph_from_cache),
                                      "warmup_bindings": self.warmed, "startup_seconds": self.startup_s}

    # -- running
    def run_batch(self, requests: list) -> list:
        """Each request's ``[(name, DType, value)]`` outputs, or its ProtocolError."""
        results: list = [None] * len(requests)
        groups: dict = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._group_key(r), []).append(i)
        for key, members in groups.items():
            if key is None or len(members) == 1:
                for i in members:
                    results[i] = self._run_one(requests[i])
                continue
            for chunk in self._chunks(members, requests):
                if len(chunk) == 1:
                    results[chunk[0]] = self._run_one(requests[chunk[0]])
                else:
                    self._run_concatenated(chunk, requests, results)
        self.refresh_stats()
        return results

    def _group_key(self, r: InferRequest):
        """Requests of one key may be concatenated; None: this one runs alone."""
        if self.batch_symbol is None or any(len(x.shape) == 0 for x in r.feeds.values()):
            return None
        rows = {int(x.shape[0]) for x in r.feeds.values()}
        if len(rows) != 1:
            return None  # the session names the mismatch when it runs alone
        return tuple((n, tuple(x.shape[1:]), str(x.dtype)) for n, x in r.feeds.items())

    def _fits(self, rows: int, r: InferRequest) -> bool:
        shapes = {n: (rows,) + tuple(x.shape[1:]) for n, x in r.feeds.items()}
        return any(all(p.contains(n, s) for n, s in shapes.items()) for p in self.session.profiles)

    def _chunks(self, members: list, requests: list) -> list:
        chunks, current, rows = [], [], 0
        for i in members:
            r = requests[i]
            if current and (len(current) >= self.config.max_batch or not self._fits(rows + r.rows, r)):
                chunks.append(current)
                current, rows = [], 0
            current.append(i)
            rows += r.rows
        chunks.append(current)
        return chunks

    def _run_concatenated(self, chunk: list, requests: list, results: list) -> None:
        first = requests[chunk[0]]
        feeds = {}
        for name, x in first.feeds.items():
            parts = [requests[i].feeds[name] for i in chunk]
            feeds[name] = torch.cat(parts) if isinstance(x, torch.Tensor) else np.concatenate(parts)
        total = sum(requests[i].rows for i in chunk)
        try:
            values = self.session.run(None, feeds)
        except Exception:  # noqa: BLE001 - run again one by one: each request gets its own answer or error
            values = None
        if values is None or any(len(v.shape) == 0 or int(v.shape[0]) != total for v in values):
            for i in chunk:  # each request gets its own answer or error
                results[i] = self._run_one(requests[i])
            return
        self.metrics.batch(len(chunk))
        named = dict(zip((o.name for o in self.outputs), values))
        start = 0
        for i in chunk:
            r = requests[i]
            stop = start + r.rows
            names = r.outputs or list(named)
            results[i] = [(n, self._dtype_of[n], named[n][start:stop]) for n in names]
            start = stop

    def _run_one(self, r: InferRequest):
        names = r.outputs or [o.name for o in self.outputs]
        try:
            values = self.session.run(names, r.feeds)
        except InputError as exc:
            return ProtocolError(str(exc), status=400)
        except RtxjitError as exc:
            return ProtocolError(f"{type(exc).__name__}: {exc}", status=500)
        except Exception as exc:  # noqa: BLE001 - one request's failure is answered, the replica serves on
            return ProtocolError(f"internal error: {type(exc).__name__}: {exc}", status=500)
        self.metrics.batch(1)
        return [(n, self._dtype_of[n], v) for n, v in zip(names, values)]
