"""``rtxjit serve``: a model's replicas on Ray Serve, answering the Open Inference Protocol.

    rtxjit serve (--onnx m.onnx | --load-engine m.rtx) [--replicas N] [--host H] [--port P]
                 [--runtime-cache DIR] [--max-batch B] [--address RAY_ADDRESS] ...

Connects to a Ray cluster (``--address``; by default the one ``ray start`` began on this machine,
else a new local instance), deploys the replicas (``rtxjit.serve.deploy``), prints a ``ready`` line
once every replica has warmed up, and serves until interrupted (Ctrl-C or SIGTERM), then deletes
the deployment and disconnects. docs/serving.md has the routes and a cluster walk-through.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import urllib.request

from rtxjit import config
from rtxjit.errors import ModelError, RtxjitError, UsageError


def add_parser(sub, parents: list) -> None:
    """The ``serve`` subcommand's arguments (called by the parser in ``rtxjit.cli``)."""
    s = sub.add_parser("serve", parents=parents,
                       help="serve a model on Ray Serve over the Open Inference Protocol (KServe v2, as Triton)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", metavar="MODEL.onnx", help="the ONNX model (its stem names it in /v2/models/<name>)")
    src.add_argument("--load-engine", "--loadEngine", dest="load_engine", metavar="ENGINE",
                     help="an engine file written by 'rtxjit build'")
    s.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (each holds a session; 1)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP proxies listen on (127.0.0.1; 0.0.0.0 for other machines)")
    s.add_argument("--port", type=int, default=8000, metavar="P", help="HTTP port (8000, as Triton's)")
    s.add_argument("--runtime-cache", default=None, metavar="DIR",
                   help="a runtime cache directory that every replica shares (a shared filesystem on a cluster): "
                        "a replica started after another loads what that one compiled")
    s.add_argument("--max-batch", type=int, default=8, metavar="B",
                   help="at most B concurrent requests run as one batch (concatenated along dim 0 where the model "
                        "allows it; 1: one by one; 8)")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a replica waits for more requests to batch (5)")
    s.add_argument("--specialize", choices=["lazy", "eager", "none"], default=None,
                   help="when shape-specialized kernels replace the generic ones (as for 'run')")
    s.add_argument("--address", default=None, metavar="ADDR",
                   help="the Ray cluster (host:6379, ray://host:10001, 'auto'; 'local' starts a new instance); "
                        "default: RAY_ADDRESS, else the cluster 'ray start' began on this machine, else a new one")
    s.add_argument("--num-cpus", type=int, default=None, metavar="N",
                   help="CPUs of the local Ray instance this command starts (default: all)")
    s.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                   help="GPUs per replica (1 where the cluster has GPUs; a fraction packs replicas on a GPU)")
    s.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="CPUs per replica (1)")
    s.add_argument("--warmup-bindings", type=int, default=8, metavar="N",
                   help="input-shape bindings from the runtime cache's histogram that each replica runs "
                        "before it reports ready (8)")
    s.set_defaults(fn=cmd_serve)


def _stop(signum, frame):
    raise KeyboardInterrupt


def _cause(exc: BaseException) -> str:
    """The line of a Serve deployment failure that says what went wrong in the replica."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (errors or lines or [type(exc).__name__])[-1]


def _answers(url: str, timeout_s: float) -> bool:
    """Whether ``url`` answers 200 within ``timeout_s`` (Serve's proxy may take a moment after the
    deployment; a port another program holds never does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def cmd_serve(args) -> int:
    from rtxjit.serve.server import ServeConfig

    if args.replicas < 1:  # what can be checked here is, before Ray starts (seconds)
        raise UsageError(f"--replicas must be at least 1, got {args.replicas}")
    path = os.path.abspath(args.onnx or args.load_engine)
    if not os.path.isfile(path):
        raise ModelError(f"{'model' if args.onnx else 'engine'} file '{path}' does not exist")
    cache = args.runtime_cache or config.runtime_cache_dir()  # the replicas get RTXJIT_RUNTIME_CACHE too
    cache = os.path.abspath(cache) if cache else None
    serving = ServeConfig(model=path, engine=args.load_engine is not None, runtime_cache=cache,
                          device=args.device, specialize=args.specialize, max_batch=args.max_batch,
                          batch_wait_ms=args.batch_wait_ms, warmup_bindings=args.warmup_bindings)
    try:
        import ray

        from rtxjit.serve import deploy
    except ImportError as exc:
        raise UsageError(f"rtxjit serve needs Ray Serve ({exc}): pip install \"rtxjit[serve]\"") from None
    init = {"address": args.address, "include_dashboard": False}
    if args.num_cpus is not None:
        init["num_cpus"] = args.num_cpus
    ray.init(**init)
    signal.signal(signal.SIGTERM, _stop)
    collector = None
    try:
        print(f"rtxjit serve: deploying {args.replicas} replica(s) of '{serving.name}' ({path})"
              + (f", runtime cache {cache}" if cache else ""), flush=True)
        start = time.perf_counter()
        try:
            collector = deploy.deploy(serving, replicas=args.replicas, host=args.host, port=args.port,
                                      gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)
        except (RtxjitError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - Serve's failure carries the replica's traceback as text
            raise RtxjitError(f"the deployment of '{serving.name}' failed: {_cause(exc)}") from None
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        if not _answers(url + "/v2/health/live", 30.0):
            print(f"rtxjit serve: warning: {url} does not answer (is port {args.port} taken by another program?)",
                  file=sys.stderr, flush=True)
        print(f"rtxjit serve: ready in {time.perf_counter() - start:.1f} s: {url}/v2/models/{serving.name} "
              f"({args.replicas} replica(s); /v2/health/ready, /metrics); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("rtxjit serve: stopping", flush=True)
    finally:
        try:
            deploy.shutdown(serving, collector)
        finally:
            ray.shutdown()
    return 0
