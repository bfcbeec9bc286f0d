"""The cost of serving through Triton, tiny model on CPU: the Triton path against the in-process pipeline on the same
ONNX graphs and runner (ONNX Runtime, fp32).

Run as ``lance-trt bench triton [options]`` (or ``python -m benchmarks.bls_overhead``). It writes (or reuses) a tiny
checkpoint and its fp32 export under ``--work``, fills a repository there, starts tritonserver with the CPU configs,
and then alternates requests between the in-process `LancePipeline` and the server (the server idles while the local
pipeline runs: both share the same cores). Measured per run, medians reported:

* denoise step: the mean interval between progress callbacks (in-process) or progress responses as the gRPC client
  receives them (Triton), and the server's own ``denoise`` stage / steps from the ``timings`` output;
* one BLS call: the ``vae_decode`` (t2i) and ``vit`` (x2t) stages, in-process runner call vs BLS round trip;
* one AR token (x2t): the ``decode_text`` stage / tokens, and the client-side interval as for the steps;
* each request end to end (``generate`` vs the client's wall time).

The table goes to stdout, the figures to ``--json`` (default ``WORK/bls_overhead.json``; the committed figures are
``benchmarks/bls_overhead.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def _mean_interval(times: Sequence[float]) -> float:
    """Mean time between consecutive progress events of one request (responses can arrive in bursts, so single
    intervals say little)."""
    return (times[-1] - times[0]) / (len(times) - 1)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class _StreamRequest:
    """One request on its own gRPC stream, recording when each response arrives (no ``triton_grpc_error`` header:
    docs/serving.md)."""

    def __init__(self, url: str, tensors: dict[str, np.ndarray]) -> None:
        import tritonclient.grpc as grpcclient

        from runtime.spec.request import wire_dtype

        self._grpc = grpcclient
        self.events: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result=None, error=None: self.events.put(
            (time.perf_counter(), result, error)))
        self.inputs = []
        for name, array in tensors.items():
            tensor = grpcclient.InferInput(name, list(array.shape), wire_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            self.inputs.append(tensor)

    def run(self, timeout: float = 300.0) -> tuple[float, list[float], dict]:
        """(wall seconds, progress arrival times, final outputs)."""
        start = time.perf_counter()
        self.client.async_stream_infer("lance", self.inputs, enable_empty_final_response=True)
        progress, final = [], {}
        try:
            while True:
                at, result, error = self.events.get(timeout=timeout)
                if error is not None:
                    raise RuntimeError(f"server error: {error}")
                response = result.get_response()
                outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
                if "progress" in outputs:
                    progress.append(at)
                final.update({k: v for k, v in outputs.items() if k != "progress"})
                if response.parameters["triton_final_response"].bool_param:
                    return at - start, progress, final
        finally:
            self.client.stop_stream()
            self.client.close()


def _local(pipeline, request) -> tuple[float, list[float], dict[str, float]]:
    times: list[float] = []
    start = time.perf_counter()
    result = pipeline.generate(request, on_progress=lambda done, total: times.append(time.perf_counter()))
    return time.perf_counter() - start, times, result.timings


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(local: dict[str, list[float]], triton: dict[str, list[float]]) -> list[dict]:
    """Median and minimum of each metric in milliseconds. On a shared machine the minimum is the better estimate of
    a cost (other processes only ever add time), except for what the client sees: gRPC may deliver several progress
    responses at once, so only the median of the client-side intervals is kept."""
    rows = []
    for key, label, with_min in (
        ("step_server", "denoise step (server stage / steps)", True),
        ("step", "denoise step (client view)", False),
        ("vae_decode", "vae_decode call: runner vs BLS", True),
        ("vit", "vit call: runner vs BLS", True),
        ("token_server", "x2t token (server stage / tokens)", True),
        ("token", "x2t token (client view)", False),
        ("t2i", "t2i end to end", True),
        ("x2t", "x2t end to end", True),
    ):
        row: dict = {"metric": label, "unit": "ms"}
        for stat, reduce in (("median", _median), ("min", min)):
            if stat == "min" and not with_min:
                row |= {"in_process_min": None, "triton_min": None, "overhead_min": None}
                continue
            here, there = reduce(local[key]) * 1e3, reduce(triton[key]) * 1e3
            row |= {f"in_process_{stat}": round(here, 3), f"triton_{stat}": round(there, 3),
                    f"overhead_{stat}": round(there - here, 3)}
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance-trt bench triton", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("lance_bench"), help="work folder (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help="an existing tiny checkpoint (with --engines)")
    parser.add_argument("--engines", type=Path, help="its fp32 export (with --checkpoint)")
    parser.add_argument("--size", type=int, default=256, help="t2i side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=32, help="x2t max_new_tokens (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=10, help="measured runs per path (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="result file (default: WORK/bls_overhead.json)")
    args = parser.parse_args(argv)
    args.json = args.json or args.work / "bls_overhead.json"
    if (args.checkpoint is None) != (args.engines is None):
        parser.error("--checkpoint and --engines go together")

    import torch

    from export.onnx_export import export_cached
    from runtime.demo import EXPORT_GROUPS, tiny_checkpoint
    from runtime.pipeline import LancePipeline
    from runtime.spec.request import GenerationRequest, request_to_tensors
    from runtime.serving.server import ServerOptions, TritonServer
    from runtime.serving.repository import ServingTarget, write_repository

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or tiny_checkpoint(args.work / "ckpt")
    engines = args.engines or export_cached(checkpoint, args.work / "engines", ("fp32",), EXPORT_GROUPS)
    write_repository([engines], checkpoint, args.work / "triton_repo", target=ServingTarget(None))
    pipeline = LancePipeline.from_checkpoint(checkpoint, runner="onnxruntime", engine_dir=engines)
    t2i = GenerationRequest("t2i", "a red cube on a wooden table", height=args.size, width=args.size,
                            steps=args.steps, seed=1)
    image = _png(pipeline.generate(t2i).image)
    x2t = GenerationRequest("x2t", "What is in this picture?", image=image, max_new_tokens=args.tokens)
    local = {k: [] for k in ("step", "step_server", "vae_decode", "vit", "token", "token_server", "t2i", "x2t")}
    triton = {k: [] for k in local}
    with TritonServer(args.work / "triton_repo", ServerOptions(cpu=True),
                      log_path=args.work / "tritonserver.log") as server:
        for run in range(args.runs + 1):  # run 0 warms both paths and is not counted
            wall, times, timings = _local(pipeline, t2i)
            wall_t, times_t, final = _StreamRequest(server.grpc_url, request_to_tensors(t2i)).run()
            server_timings = json.loads(final["timings"][0])
            x_wall, x_times, x_timings = _local(pipeline, x2t)
            x_wall_t, x_times_t, x_final = _StreamRequest(server.grpc_url, request_to_tensors(x2t)).run()
            x_server = json.loads(x_final["timings"][0])
            if run == 0:
                continue
            local["step"].append(_mean_interval(times))
            triton["step"].append(_mean_interval(times_t))
            local["step_server"].append(timings["denoise"] / args.steps)
            triton["step_server"].append(server_timings["denoise"] / args.steps)
            local["vae_decode"].append(timings["vae_decode"])
            triton["vae_decode"].append(server_timings["vae_decode"])
            local["vit"].append(x_timings["vit"])
            triton["vit"].append(x_server["vit"])
            local["token_server"].append(x_timings["decode_text"] / len(x_times))
            triton["token_server"].append(x_server["decode_text"] / len(x_times_t))
            local["token"].append(_mean_interval(x_times))
            triton["token"].append(_mean_interval(x_times_t))
            local["t2i"].append(wall)
            triton["t2i"].append(wall_t)
            local["x2t"].append(x_wall)
            triton["x2t"].append(x_wall_t)
            print(f"run {run}: t2i {wall:.3f} s in-process, {wall_t:.3f} s via Triton; "
                  f"x2t {x_wall:.3f} s, {x_wall_t:.3f} s", file=sys.stderr)
    rows = _rows(local, triton)
    print(f"\nTriton path vs in-process pipeline: tiny model, CPU ({os.cpu_count()} cores), t2i {args.size}x"
          f"{args.size} {args.steps} steps CFG 4.0, x2t {args.tokens} tokens, {args.runs} runs: medians, then minima\n")
    print(f"{'metric (ms)':38s} {'in-process':>10s} {'Triton':>10s} {'overhead':>10s}   "
          f"{'min: in-process':>15s} {'Triton':>8s} {'overhead':>9s}")
    for row in rows:
        minima = (f"{row['in_process_min']:15.2f} {row['triton_min']:8.2f} {row['overhead_min']:+9.2f}"
                  if row["in_process_min"] is not None else f"{'-':>15s} {'-':>8s} {'-':>9s}")
        print(f"{row['metric']:38s} {row['in_process_median']:10.2f} {row['triton_median']:10.2f} "
              f"{row['overhead_median']:+10.2f}   {minima}")
    result = {
        "benchmark": "bls_overhead",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "config": {"size": args.size, "steps": args.steps, "cfg_scale": t2i.cfg_scale, "tokens": args.tokens,
                   "runs": args.runs, "runner": "onnxruntime fp32", "triton": "2.51 (nvidia-pytriton), CPU configs"},
        "rows": rows,
        "samples": {"in_process": local, "triton": triton},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
