"""``rtxjit profile``: every kernel launch timed alone, against its roofline floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rtxjit.cli.common import _input_shapes, _open, _random_feeds, _settle, _si, _time_runs, _warm_up


PROFILE_COLUMNS = ("#", "node", "kernel", "variant", "time us", "share", "bytes", "flops", "floor us",
                   "% roofline")


def _profile_rows(plan, kinds: list, times: list, machine) -> list:
    from rtxjit.exec import roofline

    total = sum(times) or 1.0
    rows = []
    for i, (step, kind, seconds) in enumerate(zip(plan.steps, kinds, times)):
        counts = roofline.step_counts(plan, step)
        floor = machine.floor(counts) if machine is not None else None
        rows.append({"index": i, "node": step.node, "kernel": step.kernel.name, "key": step.kernel.short_key,
                     "variant": kind, "seconds": seconds, "share": seconds / total, "bytes": counts.bytes,
                     "flops": counts.flops, "operand": counts.operand, "floor_seconds": floor,
                     "roofline": None if floor is None or seconds <= 0 else floor / seconds})
    return rows


def _profile_table(rows: list) -> list:
    """Lines of the table: fixed column order, widths from the longest node and kernel names."""
    wn = max([len("node")] + [len(r["node"]) for r in rows])
    wk = max([len("kernel")] + [len(r["kernel"]) for r in rows])
    widths = (4, wn, wk, 11, 11, 7, 9, 9, 10, 10)
    left = {1, 2, 3}

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    def na(x, fmt) -> str:
        return "n/a" if x is None else fmt(x)

    out = [line(PROFILE_COLUMNS)]
    for r in rows:
        out.append(line((str(r["index"]), r["node"], r["kernel"], r["variant"], f"{r['seconds'] * 1e6:.2f}",
                         f"{r['share'] * 100:.1f}%", _si(r["bytes"]), _si(r["flops"]),
                         na(r["floor_seconds"], lambda x: f"{x * 1e6:.2f}"),
                         na(r["roofline"], lambda x: f"{x * 100:.1f}%"))))
    total = sum(r["seconds"] for r in rows)
    floors = [r["floor_seconds"] for r in rows]
    floor = None if any(f is None for f in floors) else sum(floors)
    out.append(line(("", "total", "", "", f"{total * 1e6:.2f}", "100.0%", _si(sum(r["bytes"] for r in rows)),
                     _si(sum(r["flops"] for r in rows)), na(floor, lambda x: f"{x * 1e6:.2f}"),
                     na(None if floor is None or total <= 0 else floor / total, lambda x: f"{x * 100:.1f}%"))))
    return out


def cmd_profile(args) -> int:
    from rtxjit.exec import roofline

    sess, what = _open(args)
    shapes = _input_shapes(sess, args.shapes, what)
    feeds = _random_feeds(sess, shapes)
    _warm_up(sess, feeds, max(1, args.warmup), args.warm_up_ms)
    _settle(sess, feeds)
    plan, kinds, times = sess.time_launches(feeds, args.iterations, warmup=1)
    end_to_end = float(np.median(_time_runs(sess, feeds, 0, args.iterations)))
    machine = roofline.measure_machine() if sess.device.kind == "cuda" else None
    rows = _profile_rows(plan, kinds, times, machine)
    shape_text = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    print(f"profile of {what} on {sess.device}: {len(rows)} launches, inputs {shape_text}; median of "
          f"{args.iterations} iterations, each launch timed alone "
          f"({'CUDA events' if machine is not None else 'wall time under the interpreter'})")
    if machine is not None:
        print(f"machine: bandwidth {machine.bandwidth / 1e9:.1f} GB/s (device copy), peak "
              f"{machine.peak_fp16 / 1e12:.1f} TFLOP/s fp16, {machine.peak_fp32 / 1e12:.1f} TFLOP/s fp32 "
              "(torch.matmul)")
        print("roofline: floor = max(bytes / bandwidth, flops / peak), bytes and flops counted from each launch's "
              "buffers and sizes (rtxjit/exec/roofline.py); % roofline = floor / time (100% = at the floor)")
    else:
        print("roofline: n/a on the CPU: the % roofline column needs a GPU (measured bandwidth and peak); "
              "times are the Triton interpreter's wall times")
    for text in _profile_table(rows):
        print(text)
    print(f"end to end: {end_to_end * 1e3:.4f} ms per inference (median of {args.iterations} session runs)")
    if args.export_profile:
        doc = {"source": what, "device": str(sess.device), "inputs": {n: list(s) for n, s in shapes.items()},
               "iterations": args.iterations, "end_to_end_seconds": end_to_end,
               "machine": None if machine is None else {"name": machine.name, "bandwidth": machine.bandwidth,
                                                        "peak_fp16": machine.peak_fp16,
                                                        "peak_fp32": machine.peak_fp32},
               "launches": rows}
        Path(args.export_profile).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"profile written to {args.export_profile}")
    return 0
