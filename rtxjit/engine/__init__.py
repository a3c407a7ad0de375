"""Engines: build, save, load and refit (engine.py); kernels compiled ahead of time for named SMs
(aot.py). Beside the session, on frontdoor, plan and exec."""
