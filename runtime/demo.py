"""`lance-trt demo [--out DIR]`: the whole deployment path on a CPU in about two minutes, with a tiny random model.

    tiny checkpoint (DIR/ckpt) -> fp32 ONNX (DIR/engines/<digest>/fp32, `lance-trt export`)
      -> model repository (DIR/triton_repo, `lance-trt repo`) -> tritonserver, CPU configs (`lance-trt serve --cpu`)
      -> t2i, edit and x2t over gRPC (`runtime.client.LanceClient`) -> DIR/t2i.png, DIR/edit.png, DIR/x2t.txt

Every step is the production code path; only the model is tiny (random weights: the pictures are noise and the answer
is gibberish). Steps already done are reused: the checkpoint when DIR/ckpt is complete, the export when its inputs
(checkpoint files, exporting code, library versions) are unchanged. Afterwards ``lance-trt serve --cpu --repo
DIR/triton_repo`` serves the same repository again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from runtime.spec import registry
from runtime.serving.server import ServerOptions, ServerStartError, TritonNotFoundError, TritonServer

logger = logging.getLogger(__name__)

EXPORT_GROUPS = (("mot",), tuple(name for name in registry.ENGINES if name != "mot"))
"""One export process per group: on two cores the MoT takes about as long as the other engines together."""
_CHECKPOINT_STAMP = ".complete"


def _step(message: str) -> float:
    print(f"lance-trt demo: {message}", file=sys.stderr, flush=True)
    return time.perf_counter()


def tiny_checkpoint(path: Path) -> Path:
    """A tiny random checkpoint (seed 0) at ``path``, written once and reused."""
    from runtime.models.tiny import write_tiny_checkpoint

    if not (path / _CHECKPOINT_STAMP).exists():
        write_tiny_checkpoint(path, seed=0)
        (path / _CHECKPOINT_STAMP).touch()
    return path


def _progress(task: str):
    unit = "token" if task == "x2t" else "step"

    def report(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r  {task}: {unit} {done}/{total}", end=end, file=sys.stderr, flush=True)

    return report


def _requests(url: str, out: Path, size: int, steps: int, max_new_tokens: int) -> None:
    """t2i, then edit and x2t on the t2i picture, through the gRPC client; the results go to ``out``."""
    from PIL import Image

    from runtime.client import LanceClient

    client = LanceClient(url)
    t2i = client.generate("t2i", "a red cube on a wooden table", height=size, width=size, steps=steps, seed=42,
                          on_progress=_progress("t2i"), timeout=600)
    Image.fromarray(t2i.image).save(out / "t2i.png")
    edit = client.generate("edit", "make the cube blue", out / "t2i.png", height=size, width=size, steps=steps,
                           seed=42, on_progress=_progress("edit"), timeout=600)
    Image.fromarray(edit.image).save(out / "edit.png")
    x2t = client.generate("x2t", "What is in this picture?", out / "t2i.png", max_new_tokens=max_new_tokens,
                          on_progress=_progress("x2t"), timeout=600)
    (out / "x2t.txt").write_text(x2t.text + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lance-trt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lance_demo"), help="demo folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="x2t answer budget (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of writing DIR/ckpt "
                        "(with --engines: the folder it was exported to)")
    parser.add_argument("--engines", type=Path, help="use this export of --checkpoint instead of exporting")
    return parser


def demo_main(argv: Sequence[str] | None = None) -> int:
    """`lance-trt demo`: 0 when all three requests succeeded; 1 when a step failed (its message on stderr)."""
    from export.onnx_export import ExportError, export_cached
    from runtime.client import LanceClientError
    from runtime.serving.repository import RepoError, ServingTarget, write_repository

    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is None) != (args.engines is None):
        parser.error("--checkpoint and --engines go together (an existing checkpoint and its export)")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = t = _step(f"tiny checkpoint -> {out / 'ckpt'}")
    try:
        checkpoint = args.checkpoint or tiny_checkpoint(out / "ckpt")
        t = _step(f"checkpoint ready in {time.perf_counter() - t:.1f} s; exporting fp32 ONNX (about a minute on 2 "
                  "cores; reused when nothing changed)")
        engines = args.engines or export_cached(checkpoint, out / "engines", ("fp32",), EXPORT_GROUPS)
        t = _step(f"ONNX in {engines} ({time.perf_counter() - t:.1f} s); writing {out / 'triton_repo'}")
        write_repository([engines], checkpoint, out / "triton_repo", target=ServingTarget(None))
        server = TritonServer(out / "triton_repo", ServerOptions(cpu=True), log_path=out / "tritonserver.log")
    except (ExportError, RepoError, TritonNotFoundError) as err:
        print(f"lance-trt demo: {err}", file=sys.stderr)
        return 1
    t = _step(f"starting tritonserver (CPU configs; log {server.log_path})")
    try:
        server.start(timeout=300)
        t = _step(f"serving on grpc {server.grpc_url} ({time.perf_counter() - t:.1f} s); t2i, edit, x2t over gRPC")
        _requests(server.grpc_url, out, args.size, args.steps, args.max_new_tokens)
    except (ServerStartError, LanceClientError) as err:
        print(f"lance-trt demo: {err}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    _step(f"requests done in {time.perf_counter() - t:.1f} s; whole demo {time.perf_counter() - start:.0f} s")
    for name in ("t2i.png", "edit.png", "x2t.txt"):
        print(out / name)
    print(f"serve it again: lance-trt serve --cpu --repo {out / 'triton_repo'}", file=sys.stderr)
    return 0
