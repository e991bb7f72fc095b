"""Command line: ``regkern <command>`` or ``python -m regkern <command>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from ..version import __version__
from .bench import add_bench_arguments, run_bench
from .demo import add_demo_arguments, run_demo
from .env import add_env_arguments, run_env
from .inspect import add_inspect_arguments, run_inspect

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regkern", description="Fused attention kernels for register ViTs.")
    parser.add_argument("--version", action="version", version=f"regkern {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="patch a timm ViT with registers, compare with timm, print residual-norm table"
    )
    add_demo_arguments(demo)
    bench = commands.add_parser(
        "bench", help="run the benchmark suite, print speedups and targets, write JSON, markdown and a PNG plot"
    )
    add_bench_arguments(bench)
    inspect = commands.add_parser(
        "inspect",
        help="run a patched, monitored ViT over images; write norm tables, histograms, norm and attention maps",
    )
    add_inspect_arguments(inspect)
    env = commands.add_parser(
        "env", help="print versions, CUDA toolkit, GPU, CUDA extension and attention backend (for bug reports)"
    )
    add_env_arguments(env)
    return parser


COMMANDS = {"demo": run_demo, "bench": run_bench, "inspect": run_inspect, "env": run_env}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"regkern {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
