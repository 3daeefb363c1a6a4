"""``sts bench``: the GPU benchmarks, each a module with its own ``main(argv)`` and options."""

from __future__ import annotations

import argparse
import importlib

from sts.errors import STSError

#: Benchmark name -> module exposing ``main(argv)``.
BENCHMARKS = {"kernels": "sts.bench.kernels", "e2e": "sts.bench.e2e", "serve": "sts.bench.serve"}

#: What each benchmark measures, for ``sts bench --help`` (the modules load torch: not imported for the help).
SUMMARIES = {
    "e2e": "decode speed through Engine.generate: autoregressive, dense speculative and STS, same process",
    "kernels": "the attention kernels (sparse and dense verify, scores, top-k, re-rank) against PyTorch's, in GB/s",
    "serve": "sts serve's throughput under concurrent streaming clients, against direct Engine.generate",
}

#: Benchmarks that need a GPU whatever their options (the others check their own ``--device``).
GPU_ONLY = ("kernels",)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Add the benchmark choice; its own options follow it (``sts bench e2e --help``)."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "benchmarks:\n" + "".join(f"  {name:9s}{SUMMARIES[name]}\n" for name in sorted(BENCHMARKS)) + (
        "each one's own options: sts bench <benchmark> --help")
    p.add_argument("bench", nargs="?", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (none: its defaults)")


def run_bench_cli(args: argparse.Namespace) -> None:
    """Run the chosen benchmark with its options (an STSError when none is chosen)."""
    import torch

    if args.bench is None:
        raise STSError(f"choose a benchmark: {', '.join(sorted(BENCHMARKS))} (sts bench --help)")
    if args.bench in GPU_ONLY and not torch.cuda.is_available() and args.options not in (["--help"], ["-h"]):
        raise STSError("sts bench measures GPU speed and needs a CUDA device")
    importlib.import_module(BENCHMARKS[args.bench]).main(args.options)
