"""Serving rtxjit models behind the Open Inference Protocol (KServe v2) on Ray Serve.

- ``oip.py``: the protocol's metadata, infer requests and responses (JSON and Triton's binary
  extension), decoded and encoded without Ray or a web server;
- ``metrics.py``: a replica's counters and their Prometheus text;
- ``server.py``: one replica's model without Ray: the session, the start-up lock on the shared
  runtime cache, the warm-up from the cache's shape histogram, batching by concatenation;
- ``deploy.py``: the Ray Serve deployment and its routes (imports Ray: ``pip install "rtxjit[serve]"``).

``rtxjit serve`` (``rtxjit/cli/serve.py``) deploys it; docs/serving.md tells how, on one machine or a
Ray cluster.
"""
