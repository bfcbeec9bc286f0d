"""`lance-trt bench NAME [options]`: run one benchmark (each parses its own options).

Benchmarks: ``triton`` -- the Triton path's cost per denoise step, per BLS call and per request against the
in-process pipeline, tiny model on CPU (`benchmarks.bls_overhead`); ``gpu`` -- the PyTorch runners at full size on a
GPU against the compute floor (`benchmarks.gpu`); ``serving`` -- tritonserver on a GPU with the torch engine set
against the in-process pipeline, through gRPC (`benchmarks.gpu_serving`). All ship in the wheel; a benchmark module is
imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

BENCHMARKS: dict[str, tuple[str, str]] = {
    "triton": ("benchmarks.bls_overhead:main", "Triton path vs in-process pipeline, tiny model on CPU"),
    "gpu": ("benchmarks.gpu:bench_gpu_main", "full-size PyTorch runners on a GPU vs the compute floor "
                                             "(docs/benchmarks.md)"),
    "serving": ("benchmarks.gpu_serving:main", "tritonserver with the torch engine set on a GPU vs the in-process "
                                               "pipeline, through gRPC (docs/benchmarks.md)"),
    "scaleout": ("benchmarks.scaleout_model:main", "on paper: t2i latency and throughput at 8 GPUs and 8 nodes from "
                                                   "the one-GPU figures (docs/deploy.md)"),
}


def bench_main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to ``BENCHMARKS[argv[0]]`` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        listing = "\n".join(f"  {name:8s} {help_text}" for name, (_, help_text) in BENCHMARKS.items())
        print(f"usage: lance-trt bench NAME [options]   (NAME --help for its options)\n{listing}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module, function = BENCHMARKS[argv[0]][0].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])
