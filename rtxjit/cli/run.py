"""``rtxjit run``: a model or engine on random inputs, timed in the steady state."""

from __future__ import annotations

import time

import numpy as np

from rtxjit.cli.common import (_input_shapes, _jit_line, _numpy, _open, _random_feeds, _settle, _time_runs,
                               _warm_up)


def _window_averages(times: list, runs: int) -> list:
    """The mean of each ``runs`` consecutive timed inferences (trtexec's ``--avgRuns``); a partial
    last window is left out."""
    return [float(np.mean(times[i:i + runs])) for i in range(0, len(times) - runs + 1, runs)]


def cmd_run(args) -> int:
    sess, what = _open(args)
    shapes = _input_shapes(sess, args.shapes, what)
    feeds = _random_feeds(sess, shapes)
    for name, x in feeds.items():
        print(f"input {name}: shape {list(x.shape)} {str(x.dtype).replace('torch.', '')}")
    first = time.perf_counter()
    outputs = sess.run(None, feeds)
    first = time.perf_counter() - first
    warmed = _warm_up(sess, feeds, args.warmup, args.warm_up_ms)
    _settle(sess, feeds)
    times = _time_runs(sess, feeds, 0, args.iterations, args.duration)
    for o, v in zip(sess.get_outputs(), outputs):
        v = _numpy(v)
        print(f"output {o.name}: shape {list(v.shape)} {v.dtype} mean {float(np.mean(v)):.6g}")
    median = float(np.median(times))
    warm = f"{warmed} warm-up" + (f" in >= {args.warm_up_ms:g} ms" if args.warm_up_ms else "")
    print(f"first run: {first * 1e3:.3f} ms (builds the plan, loads kernels)")
    print(f"latency: median {median * 1e3:.3f} ms, mean {float(np.mean(times)) * 1e3:.3f} ms, min "
          f"{min(times) * 1e3:.3f} ms, max {max(times) * 1e3:.3f} ms over {len(times)} iterations "
          f"in {sum(times):.3f} s ({warm}) on {sess.device}")
    if args.avg_runs:
        windows = _window_averages(times, args.avg_runs)
        if windows:
            print(f"average over {args.avg_runs} consecutive runs: min {min(windows) * 1e3:.3f} ms, median "
                  f"{float(np.median(windows)) * 1e3:.3f} ms, max {max(windows) * 1e3:.3f} ms "
                  f"({len(windows)} windows)")
        else:
            print(f"average over {args.avg_runs} consecutive runs: n/a (only {len(times)} iterations ran)")
    print(f"throughput: {1.0 / median:.2f} inferences/s")
    print(f"launches per inference: {sess.launches_per_inference}")
    print(_jit_line(sess))
    return 0
