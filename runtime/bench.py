"""`lance-trt bench NAME [options]`: run one benchmark (each parses its own options).

Benchmarks: ``triton`` -- the Triton path's cost per denoise step, per BLS call and per request against the
in-process pipeline, tiny model on CPU (``benchmarks/bls_overhead.py``); ``gpu`` -- the PyTorch runners at full size
on a GPU against the compute floor (``runtime/bench_gpu.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Sequence

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _script(path: str) -> Callable[[Sequence[str]], int]:
    """The ``main(argv)`` of a benchmark script of the source checkout (``benchmarks/`` is not a package)."""

    def run(argv: Sequence[str]) -> int:
        file = _SOURCE_ROOT / path
        if not file.is_file():
            print(f"lance-trt bench: {file} is missing: benchmarks run from a source checkout", file=sys.stderr)
            return 2
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main(argv)

    return run


BENCHMARKS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "triton": (_script("benchmarks/bls_overhead.py"), "Triton path vs in-process pipeline, tiny model on CPU"),
    "gpu": (lambda argv: importlib.import_module("runtime.bench_gpu").bench_gpu_main(list(argv)),
            "full-size PyTorch runners on a GPU vs the compute floor (docs/benchmarks.md)"),
}


def bench_main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to ``BENCHMARKS[argv[0]]`` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        listing = "\n".join(f"  {name:8s} {help_text}" for name, (_, help_text) in BENCHMARKS.items())
        print(f"usage: lance-trt bench NAME [options]   (NAME --help for its options)\n{listing}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    run, _ = BENCHMARKS[argv[0]]
    return run(argv[1:])
