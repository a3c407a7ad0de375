"""``rtxjit serve`` on Ray Serve: replicas of a ``ModelServer`` behind the Open Inference Protocol.

One Serve application per model, named after the model file's stem, at route prefix ``/``:

    GET  /v2/health/live, /v2/health/ready        {"live": true}, {"ready": true}
    GET  /v2                                       server metadata
    GET  /v2/models/<name>, /v2/models/<name>/ready
    POST /v2/models/<name>/infer                   JSON tensors (and Triton's binary extension)
    GET  /metrics                                  Prometheus text: every replica's counters

Every replica answers every route; Ray Serve's proxy sends each request to one of them, and only to
replicas whose constructor returned, i.e. that opened their session and warmed up (``server.py``),
so a replica answering ``/v2/health/ready`` is ready to infer. Infer requests go through
``@serve.batch`` (at most ``max_batch`` gathered for ``batch_wait_ms``) into one inference thread
per replica: a session runs one request at a time, and the event loop stays free to decode, encode
and answer health checks meanwhile.

``/metrics``: each replica sends its counters to one ``MetricsCollector`` actor (created here, its
handle bound into every replica) a moment after each request and at start; the replica that gets
the scrape asks the collector for all of them (``metrics.py`` says why).

Replicas are Ray actors in worker processes: each needs rtxjit in its Python environment, and the
model (and runtime cache) at the same path on its node. rtxjit's environment variables
(``RTXJIT_*``, ``TRITON_*``) of the process that deploys are set in the replicas too, and
``device="cpu"`` sets RTXJIT_DEVICE=cpu there (Triton's interpreter is chosen at import).

Ray and Ray Serve are imported by this module only: ``pip install "rtxjit[serve]"``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from rtxjit import __version__
from rtxjit.serve.metrics import MetricsCollector
from rtxjit.serve.oip import (HEADER_LENGTH, ProtocolError, decode_infer_request, encode_infer_response,
                              error_body, model_metadata)
from rtxjit.serve.server import ModelServer, ServeConfig

REPORT_EVERY_S = 0.2  # a replica sends its counters at most this often (and once after the last request)
JSON = "application/json"


def _json(doc: dict, status: int = 200) -> Response:
    import json

    return Response(json.dumps(doc), status_code=status, media_type=JSON)


def _error(exc: ProtocolError) -> Response:
    return Response(error_body(str(exc)), status_code=exc.status, media_type=JSON)


@serve.deployment(name="rtxjit")
class OipReplica:
    """One replica: a ModelServer and the protocol's routes."""

    def __init__(self, config: ServeConfig, collector):
        context = serve.get_replica_context()
        self.server = ModelServer(config, f"{socket.gethostname()}/{context.replica_tag}")
        self.metadata = model_metadata(self.server.name, self.server.inputs, self.server.outputs)
        self._collector = collector
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rtxjit-serve")
        self._batched.set_max_batch_size(config.max_batch)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_ms / 1e3)
        self._report_due = False
        self._last_report = time.monotonic()
        ray.get(collector.report.remote(self.server.metrics.snapshot()), timeout=60)

    # -- counters
    def _report_soon(self) -> None:
        if self._report_due:
            return
        self._report_due = True
        delay = max(0.0, self._last_report + REPORT_EVERY_S - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._report)

    def _report(self) -> None:
        self._report_due = False
        self._last_report = time.monotonic()
        self._collector.report.remote(self.server.metrics.snapshot())  # not awaited: counters are cumulative

    # -- routes
    async def __call__(self, request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        method = request.method
        try:
            if parts[:2] == ["v2", "models"] and len(parts) >= 3:
                return await self._model_route(request, parts[2], parts[3:], method)
            routes = {("v2", "health", "live"): lambda: _json({"live": True}),
                      ("v2", "health", "ready"): lambda: _json({"ready": True}),
                      ("v2",): lambda: _json({"name": "rtxjit", "version": __version__,
                                              "extensions": ["binary_tensor_data"]})}
            if tuple(parts) in routes:
                self._method(method, "GET", request)
                return routes[tuple(parts)]()
            if parts == ["metrics"]:
                self._method(method, "GET", request)
                return await self._metrics()
            raise ProtocolError(f"no route {method} {request.url.path}; this server answers /v2/health/live, "
                                f"/v2/health/ready, /v2/models/{self.server.name}[/ready|/infer] and /metrics",
                                status=404)
        except ProtocolError as exc:
            return _error(exc)

    @staticmethod
    def _method(method: str, allowed: str, request: Request) -> None:
        if method != allowed:
            raise ProtocolError(f"{request.url.path} takes {allowed}, not {method}", status=405)

    async def _model_route(self, request: Request, name: str, rest: list, method: str) -> Response:
        if name != self.server.name:
            raise ProtocolError(f"unknown model '{name}'; this server serves '{self.server.name}'", status=404)
        if rest == []:
            self._method(method, "GET", request)
            return _json(self.metadata)
        if rest == ["ready"]:
            self._method(method, "GET", request)
            return _json({"name": name, "ready": True})
        if rest == ["infer"]:
            self._method(method, "POST", request)
            return await self._infer(request)
        raise ProtocolError(f"no route {method} {request.url.path}", status=404)

    async def _infer(self, request: Request) -> Response:
        start = time.perf_counter()
        ok = False
        try:
            body = await request.body()
            length = request.headers.get(HEADER_LENGTH)
            try:
                header_length = None if length is None else int(length)
            except ValueError:
                raise ProtocolError(f"Inference-Header-Content-Length '{length}' is not an integer") from None
            decoded = decode_infer_request(body, self.server.inputs, self.server.outputs, header_length)
            result = await self._batched(decoded)
            if isinstance(result, ProtocolError):
                raise result
            content, headers = encode_infer_response(self.server.name, decoded, result)
            ok = True
            return Response(content, headers=headers)
        finally:
            self.server.metrics.request(time.perf_counter() - start, ok)
            self._report_soon()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.server.run_batch, requests)

    async def _metrics(self) -> Response:
        await self._collector.report.remote(self.server.metrics.snapshot())
        text = await self._collector.render.remote()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def replica_env(config: ServeConfig) -> dict:
    """Environment variables for the replicas' processes (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("RTXJIT_", "TRITON_"))}
    if config.device == "cpu":
        env["RTXJIT_DEVICE"] = "cpu"
    return env


def replica_resources(config: ServeConfig, gpus_per_replica: Optional[float], cpus_per_replica: float) -> dict:
    """Ray resources of one replica: a GPU (``gpus_per_replica``, default 1 where the cluster has
    GPUs and the device is not "cpu"; fractions pack replicas onto one GPU) and CPUs."""
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    options = {"num_cpus": cpus_per_replica}
    if gpus_per_replica > 0:
        options["num_gpus"] = gpus_per_replica
    return options


def deploy(config: ServeConfig, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
           gpus_per_replica: Optional[float] = None, cpus_per_replica: float = 1.0):
    """Start Serve's HTTP proxy on ``host:port`` (where Serve is not running yet) and deploy the
    model with ``replicas`` replicas; returns when every replica is ready. Ray must be initialized
    (``ray.init``). Returns the collector actor (``shutdown`` takes it)."""
    serve.start(http_options={"host": host, "port": port})
    collector = ray.remote(num_cpus=0)(MetricsCollector).remote()
    options = {**replica_resources(config, gpus_per_replica, cpus_per_replica),
               "runtime_env": {"env_vars": replica_env(config)}}
    app = OipReplica.options(num_replicas=replicas, ray_actor_options=options,
                             max_ongoing_requests=max(32, 4 * config.max_batch)).bind(config, collector)
    serve.run(app, name=config.name, route_prefix="/")
    return collector


def shutdown(config: ServeConfig, collector=None) -> None:
    """Delete the model's application; Serve itself too when no other application is left."""
    try:
        serve.delete(config.name)
        if not serve.status().applications:
            serve.shutdown()
    finally:
        if collector is not None:
            ray.kill(collector)
