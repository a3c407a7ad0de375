"""The ``rtxjit`` command line, in the spirit of ``trtexec`` / ``tensorrt_rtx``.

    rtxjit build   --onnx m.onnx [--shapes x:8x3x224x224 | --min-shapes .. --opt-shapes .. --max-shapes ..]
                   [--fp16 | --bf16] [--sm 89,90 | --sm current] [--strip-weights] [--no-kernels] --save-engine m.rtx
    rtxjit run     (--onnx m.onnx | --load-engine m.rtx [--refit-onnx m.onnx]) [--shapes ..] [--fp16 | --bf16]
                   [--runtime-cache DIR] [--specialize lazy|eager|none] [--warmup N] [--iterations N]
                   [--device cuda|cpu]
    rtxjit profile (same model flags as run) [--export-profile FILE.json]
    rtxjit inspect (--onnx m.onnx | --load-engine m.rtx) [--passes] [--launches] [--kernel INDEX|NAME]
                   [--specialized] [--shapes ..]
    rtxjit demo    (the built-in models against onnxruntime) [--save-onnx DIR: write them, run nothing]
    rtxjit ops     [--markdown] [--output FILE]   (the supported ops; docs/ops.md is the markdown)
    rtxjit serve   (--onnx m.onnx | --load-engine m.rtx) [--replicas N] [--port P] [--runtime-cache DIR]
                   [--max-batch B] [--address RAY]   (Ray Serve, KServe v2 protocol; docs/serving.md)
    rtxjit --version

trtexec's spellings work beside these: ``--saveEngine``, ``--loadEngine``, ``--minShapes``,
``--optShapes``, ``--maxShapes`` (``run`` and ``profile`` take a profile too, for ``--onnx``), and
``run``'s ``--warmUp MS`` (untimed runs for at least MS milliseconds), ``--duration S`` (timed runs
for at least S seconds, and at least ``--iterations``) and ``--avgRuns N`` (the averages of N
consecutive runs). Without ``--sm`` and without a GPU, ``build`` makes a portable engine (the common
SMs, no compiled kernels).

``build`` needs no GPU when ``--sm`` names the targets (the default, ``current``, is the GPU's SM)
and prints a progress line per phase on stderr (import, passes and checks, save; a bar redrawn in
place on a terminal). ``--shapes`` takes trtexec's syntax (``name:1x3x224x224,other:1x128``); for
``build`` it fixes those inputs' shapes (min = opt = max). ``run``, ``profile`` and ``inspect
--kernel`` feed random non-zero inputs of each input's type (integers 0 or 1, safe as indices and
flags); an input that ``--shapes`` leaves out takes its symbolic dims from the inputs it names,
else the shape its first optimization profile is tuned for (``opt``; for an engine, the profile it
was built with). ``run`` and ``profile`` time the steady state: after the warm-up they wait for
the background specializer (``--specialize``) to serve its kernels. A dynamic dim that neither
``--shapes`` nor a chosen profile sets is a warning naming the input, the dim and its symbol (for
``build``: the engine's profile keeps the default range there).

``profile`` times every kernel launch of the plan alone (CUDA events on a GPU, wall time under the
CPU interpreter) and prints, per launch, its node, kernel, which variant served it, time, share of
the total, bytes and flops, and on a GPU the roofline floor and the percentage of it reached
(``rtxjit.exec.roofline`` says how each is counted). ``inspect`` prints the imported graph
(``--passes``: after the pass pipeline; an engine's metadata and optimized graph), or with
``--launches`` / ``--kernel`` the plan's launches and a kernel's generated Triton source for the
given shapes (built without running it), so ``--kernel 3 > k.py`` gives a Python file.

Errors that a user can fix (a missing or malformed file, a bad ``--shapes``, an unknown input, an
input outside the engine's profiles, a weight-stripped engine) print one line, ``rtxjit: error:
...``, naming the file, input or weight, and exit with status 1; command-line usage errors exit with
status 2 (argparse's).

Each subcommand is a module of this package (``build``, ``run``, ``profile``, ``inspect``, ``demo``, ``ops``;
``common`` holds what they share); the parser and ``main`` are here.
"""

from __future__ import annotations

import argparse
import sys

from rtxjit.cli.build import cmd_build
from rtxjit.cli.common import _one_line
from rtxjit.cli.demo import cmd_demo
from rtxjit.cli.inspect import cmd_inspect
from rtxjit.cli.ops import cmd_ops
from rtxjit.cli.profile import cmd_profile
from rtxjit.cli.run import cmd_run
from rtxjit.cli.serve import add_parser as _add_serve


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def _amount(unit: str):
    """A number >= 0 of ``unit`` (ms for ``--warmUp``, s for ``--duration``, as trtexec counts them)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number of {unit}") from None
        if not value >= 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} {unit} is below 0")
        return value

    return parse


def versions() -> str:
    """``rtxjit --version``: rtxjit's version and those of what it runs on (read from the installed
    packages' metadata, so nothing is imported for it)."""
    import platform
    from importlib import metadata

    from rtxjit import __version__

    lines = [f"rtxjit {__version__}"]
    for package in ("triton", "torch", "onnx", "numpy"):
        try:
            lines.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    lines.append(f"python {platform.python_version()}")
    return "\n".join(lines)


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of rtxjit, triton, torch, onnx, numpy and python, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def _model_args(p, engine: bool = True) -> None:
    if engine:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--onnx", metavar="MODEL.onnx", help="the ONNX model")
        src.add_argument("--load-engine", "--loadEngine", dest="load_engine", metavar="ENGINE",
                         help="an engine file written by 'rtxjit build'")
    else:
        p.add_argument("--onnx", metavar="MODEL.onnx", required=True, help="the ONNX model")


def _precision_args(p, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                   help=f"convert the model's fp32 values to fp16 ({what})")
    g.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                   help=f"convert the model's fp32 values to bf16 ({what})")


def _shapes_arg(p) -> None:
    p.add_argument("--shapes", default="", metavar="SHAPES",
                   help="input shapes, trtexec's syntax: name:1x3x224x224,other:1x128 (default: the profile's opt "
                        "shapes)")


def _range_args(p, what: str) -> None:
    """--min/opt/max-shapes, with trtexec's spellings."""
    for kind, camel, text in (("min", "minShapes", "smallest shapes"), ("opt", "optShapes", "shapes to tune for"),
                              ("max", "maxShapes", "largest shapes")):
        p.add_argument(f"--{kind}-shapes", f"--{camel}", dest=f"{kind}_shapes", default="", metavar="SHAPES",
                       help=f"optimization profile: {text}{what}")


def _model_run_args(p) -> None:
    """What ``run`` and ``profile`` share: a model or engine, its shapes and profile ranges (--onnx),
    precision (--onnx) and the run options."""
    _model_args(p)
    _shapes_arg(p)
    _range_args(p, " (--onnx only; an engine keeps its own)")
    _precision_args(p, "--onnx only")
    _run_args(p)


def _run_args(p) -> None:
    p.add_argument("--runtime-cache", default=None, metavar="DIR", help="keep compiled kernels across processes")
    p.add_argument("--specialize", choices=["lazy", "eager", "none"], default=None,
                   help="when shape-specialized kernels replace the generic ones (default: lazy on a GPU, none on "
                        "the CPU); timing starts once they serve")
    p.add_argument("--refit-onnx", default=None, metavar="MODEL.onnx",
                   help="a weight-stripped engine's weights, from the model it was built from")


def _timing_args(p, warmup: int, iterations: int, trtexec: bool = True) -> None:
    p.add_argument("--warmup", type=_count(0), default=warmup, metavar="N", help=f"untimed runs first ({warmup})")
    p.add_argument("--warmUp", dest="warm_up_ms", type=_amount("ms"), default=0.0, metavar="MS",
                   help="trtexec's: untimed runs for at least MS milliseconds (besides --warmup N)")
    p.add_argument("--iterations", type=_count(1), default=iterations, metavar="N",
                   help=f"timed runs (at least); the median is reported ({iterations})")
    if trtexec:
        p.add_argument("--duration", type=_amount("s"), default=0.0, metavar="S",
                       help="trtexec's: time runs for at least S seconds (and at least --iterations runs)")
        p.add_argument("--avgRuns", dest="avg_runs", type=_count(1), default=None, metavar="N",
                       help="trtexec's: also report the averages of N consecutive timed runs")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtxjit", description="JIT inference compiler: ONNX -> Triton kernels. "
                                "Build engines ahead of time, run, profile and inspect them (trtexec-style flags).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="cuda, or cpu (Triton's interpreter); default: a GPU if torch sees one")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an engine ahead of time (no GPU needed with --sm)")
    _model_args(b, engine=False)
    _shapes_arg(b)
    _range_args(b, "")
    _precision_args(b, "precision legality is checked for every target")
    b.add_argument("--sm", default=None, metavar="SMS",
                   help="SM targets: 80,86,89,90,120 (or sm_90), or 'current' (the GPU's; the default)")
    b.add_argument("--strip-weights", action="store_true", help="store no weights (refit them later)")
    b.add_argument("--no-kernels", action="store_true",
                   help="store no compiled kernels (the GPU compiles them at first use); by default every "
                        "kernel of the profiles is compiled for each target, no GPU needed")
    b.add_argument("--save-engine", "--saveEngine", dest="save_engine", required=True, metavar="ENGINE",
                   help="where to write the engine")
    b.set_defaults(fn=cmd_build)

    r = sub.add_parser("run", parents=[common], help="run a model or engine on random inputs and time it")
    _model_run_args(r)
    _timing_args(r, 2, 10)
    r.set_defaults(fn=cmd_run)

    f = sub.add_parser("profile", parents=[common], help="time every kernel launch against its roofline floor")
    _model_run_args(f)
    f.add_argument("--export-profile", default=None, metavar="FILE.json", help="also write the table as JSON")
    _timing_args(f, 2, 10, trtexec=False)
    f.set_defaults(fn=cmd_profile)

    i = sub.add_parser("inspect", parents=[common],
                       help="print the graph (after passes for an engine), or launches and kernel sources")
    _model_args(i)
    _shapes_arg(i)
    _precision_args(i, "--onnx only; implies --passes")
    i.add_argument("--passes", action="store_true", help="the graph after the pass pipeline (an engine's always is)")
    i.add_argument("--launches", action="store_true", help="list the kernel launches of the plan for --shapes")
    i.add_argument("--kernel", default=None, metavar="INDEX|NAME",
                   help="print the generated Triton source of a launch (by index, kernel name, key or node)")
    i.add_argument("--specialized", action="store_true",
                   help="with --kernel: the source specialized for these sizes, not the generic one")
    i.add_argument("--refit-onnx", default=None, metavar="MODEL.onnx",
                   help="a weight-stripped engine's weights (needed for --kernel/--launches)")
    i.set_defaults(fn=cmd_inspect)

    d = sub.add_parser("demo", parents=[common], help="run the built-in models and compare with onnxruntime")
    d.add_argument("--model", choices=["cnn", "encoder", "all"], default="all")
    d.add_argument("--dtype", choices=["float32", "float16", "both"], default="both")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--iterations", type=int, default=3)
    d.add_argument("--save-onnx", default=None, metavar="DIR",
                   help="write the demo models (fp32) as DIR/cnn.onnx and DIR/encoder.onnx, and run nothing")
    d.set_defaults(fn=cmd_demo)

    o = sub.add_parser("ops", help="the supported ops: domain, ONNX versions, tested dtypes, kernel kind")
    o.add_argument("--markdown", action="store_true", help="the markdown of docs/ops.md")
    o.add_argument("--output", default=None, metavar="FILE", help="write to FILE instead of printing")
    o.set_defaults(fn=cmd_ops)

    _add_serve(sub, [common])  # rtxjit serve: Ray Serve, the Open Inference Protocol (docs/serving.md)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from rtxjit.errors import RtxjitError  # importing rtxjit first readies Triton (see rtxjit.config)

    try:
        return args.fn(args)
    except RtxjitError as exc:
        print(f"rtxjit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a folder that cannot be written, a path that is a directory ...
        print(f"rtxjit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rtxjit: interrupted", file=sys.stderr)
        return 130
