"""A replica's counters and their Prometheus text (``GET /metrics``), without Ray.

Each replica counts in a ``Metrics`` and sends a ``snapshot()`` (a JSON-able dict, cumulative, so a
lost or late one costs nothing but freshness) to one ``MetricsCollector`` of the deployment, which
keeps the latest per replica and renders them all: a series per replica (label ``replica``), as
Prometheus scrapes a Triton server per pod; sums across replicas are PromQL's (``sum by (model)``).
Ray Serve routes an HTTP request to any one replica, so no replica could answer for the others.

    rtxjit_requests_total{status="success"|"failure"}   infer requests answered
    rtxjit_request_duration_seconds                      histogram, decode to encode
    rtxjit_batches_total, rtxjit_batched_requests_total  runs, and the requests they served
    rtxjit_compiles_total, rtxjit_cache_hits_total       the session's kernel compiles and cache loads
    rtxjit_graph_from_cache                              1: the optimized graph came from the runtime cache
    rtxjit_warmup_bindings                               shape bindings run before the replica was ready
    rtxjit_startup_seconds                               session + warm-up
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name -> (type, help); the order of /metrics
FAMILIES = {
    "rtxjit_requests_total": ("counter", "Infer requests answered, by status."),
    "rtxjit_request_duration_seconds": ("histogram", "Infer request latency in the replica (decode to encode)."),
    "rtxjit_batches_total": ("counter", "Session runs serving infer requests."),
    "rtxjit_batched_requests_total": ("counter", "Infer requests served by those runs (more than runs: batching)."),
    "rtxjit_compiles_total": ("counter", "Kernels the replica's session compiled."),
    "rtxjit_cache_hits_total": ("counter", "Kernels the replica's session loaded from its engine or runtime cache."),
    "rtxjit_graph_from_cache": ("gauge", "1 if the optimized graph was read from the runtime cache."),
    "rtxjit_warmup_bindings": ("gauge", "Input-shape bindings run before the replica reported ready."),
    "rtxjit_startup_seconds": ("gauge", "Seconds from the replica's start to ready (session and warm-up)."),
}


class Metrics:
    """One replica's counters (thread-safe: the event loop and the inference thread both count)."""

    def __init__(self, model: str, replica: str):
        self.model, self.replica = model, replica
        self._lock = threading.Lock()
        self._success = self._failure = self._batches = self._batched = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0
        self.session_stats: dict = {}  # filled by the server: compiles, cache hits, graph_from_cache ...

    def request(self, seconds: float, ok: bool) -> None:
        with self._lock:
            if ok:
                self._success += 1
            else:
                self._failure += 1
            self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._sum += seconds

    def batch(self, requests: int) -> None:
        with self._lock:
            self._batches += 1
            self._batched += requests

    def snapshot(self) -> dict:
        with self._lock:
            return {"model": self.model, "replica": self.replica, "success": self._success,
                    "failure": self._failure, "buckets": list(self._buckets), "sum": self._sum,
                    "batches": self._batches, "batched": self._batched, **self.session_stats}


def _labels(snap: dict, **extra) -> str:
    pairs = {"model": snap["model"], "replica": snap["replica"], **extra}
    text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs.items())
    return "{" + text + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _samples(snap: dict) -> dict:
    """family -> [(suffix, labels, value)] of one replica's snapshot."""
    out = {
        "rtxjit_requests_total": [("", _labels(snap, status="success"), snap["success"]),
                                  ("", _labels(snap, status="failure"), snap["failure"])],
        "rtxjit_batches_total": [("", _labels(snap), snap["batches"])],
        "rtxjit_batched_requests_total": [("", _labels(snap), snap["batched"])],
    }
    hist, total = [], 0
    for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), snap["buckets"]):
        total += count
        hist.append(("_bucket", _labels(snap, le="+Inf" if bound == float("inf") else repr(bound)), total))
    hist += [("_sum", _labels(snap), snap["sum"]), ("_count", _labels(snap), total)]
    out["rtxjit_request_duration_seconds"] = hist
    for family, key in (("rtxjit_compiles_total", "compiles"), ("rtxjit_cache_hits_total", "cache_hits"),
                        ("rtxjit_graph_from_cache", "graph_from_cache"), ("rtxjit_warmup_bindings", "warmup_bindings"),
                        ("rtxjit_startup_seconds", "startup_seconds")):
        if key in snap:
            out[family] = [("", _labels(snap), snap[key])]
    return out


def render_prometheus(snapshots: list) -> str:
    """Prometheus' text format (version 0.0.4) of the replicas' snapshots, one series each."""
    per_replica = [_samples(s) for s in sorted(snapshots, key=lambda s: s["replica"])]
    lines = []
    for family, (kind, text) in FAMILIES.items():
        rows = [row for samples in per_replica for row in samples.get(family, ())]
        if not rows:
            continue
        lines += [f"# HELP {family} {text}", f"# TYPE {family} {kind}"]
        lines += [f"{family}{suffix}{labels} {_number(value)}" for suffix, labels, value in rows]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class MetricsCollector:
    """The latest snapshot of every replica of a deployment (a Ray actor there; plain here)."""

    def __init__(self):
        self._latest: dict = {}

    def report(self, snapshot: dict) -> None:
        self._latest[snapshot["replica"]] = snapshot

    def snapshots(self) -> list:
        return list(self._latest.values())

    def render(self) -> str:
        return render_prometheus(self.snapshots())
