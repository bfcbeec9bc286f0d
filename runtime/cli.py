"""`lance-trt`: the command line of the deployment package.

Subcommands: `download`, `tiny`, `run` (every registered task on the PyTorch / ONNX Runtime / TensorRT pipeline
in-process), and the deployment steps `export`, `check-onnx`, `build`, `repo`, `serve`, `demo`, with `bench` and
`gpu-check`, each owned by its module (the module's `*_main(argv)` parses its own flags). Results go to files or
stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runtime.spec import constants, registry
from runtime.spec.contract import PRECISIONS
from runtime.spec.flags import ProgressBar, add_generation_options, read_media, write_output

log = logging.getLogger("lance_trt")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lance-trt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help=f"fetch {constants.HF_REPO_ID} (only the files the runtime needs)")
    p.add_argument("--dir", type=Path, default=Path("lance_checkpoint"), help="destination folder")
    p.add_argument("--repo-id", default=constants.HF_REPO_ID)
    p.add_argument("--video", action="store_true", help="also fetch Lance_3B_Video/")

    p = sub.add_parser("tiny", help="write a tiny random checkpoint in the real HF layout")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", action="store_true", help="add Lance_3B_Video/")

    p = sub.add_parser("run", help="run a task in-process")
    p.add_argument("task", choices=tuple(registry.TASKS),
                   help="; ".join(f"{task.name}: {task.summary}" for task in registry.TASKS.values()))
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (HF layout) or HF repo id")
    p.add_argument("--runner", choices=registry.RUNNERS, default=registry.RUNNERS[0])
    p.add_argument("--engines", type=Path, help="engine folder (ONNX / plans) for the onnxruntime and tensorrt runners")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="compute precision: fp32, or bf16 (GPU; the bf16/ graphs or plans of --engines)")
    p.add_argument("--fp8-gen", action="store_true",
                   help="torch runner on CUDA: FP8 GEMMs for the gen expert (faster denoise, approximate)")
    p.add_argument("--fp8-fast-accum", action="store_true",
                   help="with --fp8-gen: Hopper's fast FP8 accumulation (faster still, slightly less exact)")
    add_generation_options(p)

    for name, (_, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# Subcommands whose flags their own module parses: name -> ("module:function", help).
_DELEGATED = {
    "export": ("export.onnx_export:export_main", "export the engines of a checkpoint to ONNX (fp32 and bf16)"),
    "check-onnx": ("export.check_onnx:check_onnx_main", "check ONNX graphs against the TensorRT 10.5 parser"),
    "build": ("export.build:build_main", "build TensorRT plans with the contract's profiles"),
    "repo": ("runtime.serving.repository:repo_main", "install engines into a Triton model repository"),
    "serve": ("runtime.serving.server:serve_main", "serve a Triton model repository with tritonserver"),
    "demo": ("runtime.demo:demo_main", "tiny checkpoint -> ONNX -> repository -> tritonserver -> gRPC, on CPU"),
    # The benchmarks are their own top layer, outside the product's import graph: loaded only for these two.
    "bench": ("benchmarks.cli:bench_main", "benchmark the runners (GPU) and the Triton path (CPU)"),
    "gpu-check": ("benchmarks.gpu_check:gpu_check_main", "fast GPU engines against the fp32 reference, with gates"),
}


def _delegate(name: str, argv: list[str]) -> int:
    import importlib

    target, _ = _DELEGATED[name]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(argv)


def _cmd_download(args: argparse.Namespace) -> int:
    from runtime.models.checkpoint import download

    path = download(args.dir, repo_id=args.repo_id, video=args.video)
    print(path)
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from runtime.models.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(args.dir, seed=args.seed, video=args.video)
    print(args.dir)
    return 0


def _device_problem(device: str) -> str | None:
    """Why ``--device`` cannot run on this machine, or None. Checked before the pipeline is built: torch's own
    error for a missing GPU is a traceback from deep inside the first move to the device."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device {device}: not a torch device such as cpu, cuda or cuda:1"
    if parsed.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"--device {device}: torch {torch.__version__} sees no CUDA GPU on this machine; use --device cpu"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    from runtime.pipeline import LancePipeline
    from runtime.pipeline.core import PRECISION_DTYPES
    from runtime.runners import EngineError
    from runtime.spec.request import GenerationRequest, RequestError

    try:
        media = read_media(args)
    except OSError as err:
        flag = next(name for name in registry.MEDIA if getattr(args, name) == Path(err.filename))
        print(f"lance-trt: --{flag} {err.filename}: cannot read it: {err.strerror}", file=sys.stderr)
        return 2
    request = GenerationRequest(
        task=args.task, prompt=args.prompt, **media, height=args.height, width=args.width, frames=args.frames,
        steps=args.steps, seed=args.seed, cfg_scale=args.cfg_scale, max_new_tokens=args.max_new_tokens,
    )
    if registry.TASKS[args.task].output != "text" and args.output is None:
        images = " and ".join(name for name, task in registry.TASKS.items() if task.output != "text")
        print(f"lance-trt: -o/--output: required for {images}", file=sys.stderr)
        return 2
    problem = _device_problem(args.device)
    if problem is not None:
        print(f"lance-trt: {problem}", file=sys.stderr)
        return 2
    try:
        request.validate()
        pipeline = LancePipeline.from_checkpoint(
            args.checkpoint, runner=args.runner, engine_dir=args.engines, device=args.device,
            dtype=PRECISION_DTYPES[args.precision], fp8_gen=args.fp8_gen, fp8_fast_accum=args.fp8_fast_accum,
            video=registry.needs_video_model(registry.TASKS[args.task], set(media)),
        )
        bar = ProgressBar("token" if registry.TASKS[args.task].output == "text" else "step")
        try:
            result = pipeline.generate(request, on_progress=bar.update)
        finally:
            bar.close()
    except RequestError as err:
        given = getattr(args, err.field, None) if err.field in registry.MEDIA else None
        where = f"--{err.field} {given}" if given is not None else err.field
        print(f"lance-trt: {where}: {err.message}", file=sys.stderr)
        return 2
    except (ValueError, EngineError) as err:    # a backend, engine file or device that cannot run: one line
        print(f"lance-trt: {err}", file=sys.stderr)
        return 2
    if result.text is not None:
        print(result.text)
        return 0
    kind = registry.TASKS[args.task].output
    try:
        write_output(kind, getattr(result, kind), args.output)
    except (OSError, ValueError) as err:
        print(f"lance-trt: -o/--output: cannot write {args.output}: {err}", file=sys.stderr)
        return 1
    log.info("wrote %s", args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in _DELEGATED:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        return _delegate(argv[0], argv[1:])
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"download": _cmd_download, "tiny": _cmd_tiny, "run": _cmd_run}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
