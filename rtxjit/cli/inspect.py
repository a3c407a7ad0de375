"""``rtxjit inspect``: the graph, an engine's metadata, the plan's launches and a kernel's source."""

from __future__ import annotations

from pathlib import Path

from rtxjit.cli.common import (OWN_TYPES, _describe_profile, _input_shapes, _load_engine, _mb, _open,
                               _random_feeds)


def _engine_metadata(path: str) -> list:
    from rtxjit.engine.engine import current_versions, read_metadata
    from rtxjit.plan.profiles import Profile

    meta = read_metadata(path)
    now = current_versions()
    weights = meta.get("weights") or []
    weight_bytes = sum(int(w.get("nbytes", 0)) for w in weights if isinstance(w, dict))
    members = meta.get("members") or {}
    binaries = meta.get("binaries") or []

    def version(key: str, short: bool = False) -> str:
        found = str(meta.get(f"{key}_version"))
        shown = found[:12] if short else found
        return shown if found == now[key] else f"{shown} (this is {now[key][:12] if short else now[key]})"

    lines = [f"engine: {path}",
             f"  size: {_mb(Path(path).stat().st_size)}",
             f"  format: {meta.get('format')} version {meta.get('format_version')}",
             f"  built by: rtxjit {version('rtxjit')}, codegen {version('codegen', True)}, "
             f"triton {version('triton')}",
             f"  targets: {', '.join('sm_%s' % t for t in meta.get('targets') or [])}",
             f"  precision: {meta.get('precision') or OWN_TYPES}",
             f"  stripped: {'yes' if meta.get('stripped') else 'no'} ({len(weights)} weights, {weight_bytes:,} "
             f"bytes{' not stored' if meta.get('stripped') else ''}); refittable: "
             f"{'yes' if meta.get('refittable') else 'no'}",
             f"  compiled kernels: {len(binaries)} ({sum(int(b.get('size', 0)) for b in binaries):,} bytes)",
             "  members besides engine.json: " + (", ".join(f"{n} {int(m.get('size', 0)):,} bytes"
                                                          for n, m in sorted(members.items()) if isinstance(m, dict))
                                                 or "none")]
    for i, p in enumerate(meta.get("profiles") or []):
        lines.append(f"  profile {i}: {_describe_profile(Profile.from_json(p))}")
    return lines


def _pick_steps(plan, which: str) -> list:
    from rtxjit.errors import RtxjitError

    steps = plan.steps
    try:
        index = int(which)
    except ValueError:
        index = None
    if index is not None:
        if not -len(steps) <= index < len(steps):
            raise RtxjitError(f"--kernel {which}: the plan has {len(steps)} launches (0 to {len(steps) - 1}); "
                              "--launches lists them")
        return [index % len(steps)]
    found = [i for i, s in enumerate(steps)
             if which in (s.kernel.name, s.node, s.kernel.short_key, f"{s.kernel.name}:{s.kernel.short_key}")]
    if not found:
        names = sorted({s.kernel.name for s in steps})
        raise RtxjitError(f"--kernel '{which}' is no launch's index, kernel name, key or node; the kernels are "
                          f"{', '.join(names)} (--launches lists every launch)")
    return found


def cmd_inspect(args) -> int:
    from rtxjit.frontdoor import optimized_graph

    if args.kernel is None and not args.launches:
        if args.load_engine:
            for text in _engine_metadata(args.load_engine):
                print(text)
            print(_load_engine(args).ir)
            return 0
        optimize = bool(args.passes or args.precision)
        print(optimized_graph(args.onnx, optimize=optimize, precision=args.precision).graph)
        return 0
    sess, what = _open(args, specialize="none")  # the plan only: nothing runs
    shapes = _input_shapes(sess, args.shapes, what)
    plan = sess.plan(shapes, _random_feeds(sess, shapes))  # host-read inputs (shape tensors) get random values
    if args.launches:
        print(f"# {len(plan.steps)} launches of {what} for inputs "
              + ", ".join(f"{n} {list(s)}" for n, s in shapes.items()))
        wn = max(len(s.node) for s in plan.steps) if plan.steps else 0
        wk = max(len(s.kernel.name) for s in plan.steps) + 13 if plan.steps else 0
        for i, s in enumerate(plan.steps):
            kernel = f"{s.kernel.name}:{s.kernel.short_key}"
            print(f"{i:4d}  {s.node:<{wn}}  {kernel:<{wk}}  grid {list(s.grid)}")
        if args.kernel is None:
            return 0
    from rtxjit.exec.executor import specialized_source

    shown = {}
    for i in _pick_steps(plan, args.kernel):
        step = plan.steps[i]
        src = specialized_source(step) if args.specialized else step.kernel
        shown.setdefault(src.key, (src, []))[1].append(i)
    for src, indices in shown.values():
        for i in indices:
            step = plan.steps[i]
            cx = ", ".join(f"{k}={v}" for k, v in sorted(step.constexprs.items()))
            print(f"# launch {i} of {len(plan.steps)}: node '{step.node}', grid {list(step.grid)}, {cx}")
        kind = "specialized for these sizes" if args.specialized else "generic over sizes; --specialized shows " \
            "the kernel specialized for these sizes"
        print(f"# inputs {', '.join(f'{n} {list(s)}' for n, s in shapes.items())}; source {kind}")
        print(src.text)
    return 0
