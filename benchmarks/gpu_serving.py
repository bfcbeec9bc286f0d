"""`lance-trt bench serving`: tritonserver on one GPU with the torch engine set, through gRPC, against the in-process
pipeline on the same engines, in one run.

Steps (``--phase all``; each writes its section of the ``--out`` JSON):

1. ``checkpoint``: a full-size random checkpoint in the real layout (`runtime.models.tiny.write_random_checkpoint`,
   drawn on the GPU), written once under ``--work``.
2. ``inprocess`` (a child process, so its GPU memory is gone before the server starts): what ``lance-trt run
   --device cuda --precision bf16`` runs -- `LancePipeline.from_checkpoint` on the fast CUDA engines -- with the
   server's warm-up (`runtime.pipeline.warmup`), then t2i at ``--size`` (``--steps``, CFG 4.0, ``--repeat`` times),
   x2t and edit; the outputs are kept for the byte comparison.
3. ``serve``: `lance-trt repo --engine-set torch`, `TritonServer` (start to ready: the load time, warm-up included),
   then through `runtime.client.LanceClient` over gRPC on the same machine: the first request and the steady state
   of t2i (each compared byte for byte with the in-process output), x2t and edit; 4 concurrent clients against 4
   sequential requests of the same seeds; a request cancelled at step ``--cancel-at`` (the server's log says at which
   step it stopped) and the request after it; GPU memory (nvidia-smi, and the model's ``lance_gpu_memory_bytes``)
   before and after ``--memory-requests`` requests with varying prompts; the metrics port's Lance lines.

``--tiny --device cpu`` is a smoke run of every step on the tiny configs (CI): the torch set then runs on a CPU
instance (the plain modules in fp32), through the same server, client and measurements.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import logging
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

logger = logging.getLogger("benchmarks.gpu_serving")

PROMPT = "a red fox resting in fresh snow, golden hour light, detailed fur"
EDIT_INSTRUCTION = "make it look like a watercolor painting"
QUESTION = "Describe this image."
MEMORY_PROMPTS = ("a lighthouse on a cliff at dusk", "a bowl of ramen on a wooden table",
                  "an astronaut riding a horse on the moon, photorealistic", "a city street in the rain at night")
CHECKPOINT_MARK = "written.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lance-trt bench serving", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--phase", choices=("all", "checkpoint", "inprocess", "serve"), default="all")
    add("--work", type=Path, default=Path("/tmp/lance_serving"), help="checkpoint, repository, outputs, logs")
    add("--size", type=int, default=1024, help="t2i and edit side (px)")
    add("--steps", type=int, default=30)
    add("--repeat", type=int, default=3, help="timed t2i requests per path")
    add("--max-new-tokens", type=int, default=64, help="x2t answer budget")
    add("--concurrency", type=int, default=4)
    add("--cancel-at", type=int, default=10, help="the progress step at which the client cancels")
    add("--memory-requests", type=int, default=20)
    add("--fp8-gen", action="store_true", help="the FP8 gen expert in both paths")
    add("--cfg-pair", action="store_true",
        help="serve each request's CFG branches on two GPUs (0 and 1; two CPU processes with --device cpu), against "
             "the in-process pipeline on one")
    add("--tiny", action="store_true", help="tiny configs (smoke run)")
    add("--device", default="cuda")
    add("--out", type=Path, help="JSON results file (default: WORK/serving.json)")
    return parser


# --- Shared -------------------------------------------------------------------------------------------------------


def _png(side: int, seed: int) -> bytes:
    """A seeded smooth RGB image (gradients and a disc, not noise: the ViT and VAE see image-like input)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = rng.uniform(0.2, 0.8, 3)
    pixels = np.stack([base[c] + 0.3 * np.sin(2 * np.pi * (x * (c + 1) + y * (2 - c))) for c in range(3)], -1)
    pixels[(x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.05] = rng.uniform(0, 1, 3)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def requests(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The measured requests, as keyword arguments of `GenerationRequest` / `LanceClient.generate`."""
    side = args.size
    return {
        "t2i": dict(task="t2i", prompt=PROMPT, height=side, width=side, steps=args.steps, seed=0),
        "x2t": dict(task="x2t", prompt=QUESTION, image=_png(672, 1), max_new_tokens=args.max_new_tokens),
        "edit": dict(task="edit", prompt=EDIT_INSTRUCTION, image=_png(side, 2), height=side, width=side,
                     steps=args.steps, seed=0),
    }


def output_of(result: Any) -> np.ndarray | str | None:
    if result is None:
        return None
    return result.text if result.text is not None else (result.image if result.image is not None else result.video)


def compare(served: np.ndarray | str | None, local: np.ndarray | str) -> dict[str, Any]:
    """Byte equality, and for images where they differ: the largest difference and the PSNR."""
    if served is None:
        return {"identical": False, "served": None}
    if isinstance(served, str) or isinstance(local, str):
        return {"identical": served == local, "served": served[:200], "inprocess": local[:200]}
    identical = served.shape == local.shape and np.array_equal(served, local)
    report: dict[str, Any] = {"identical": bool(identical)}
    if not identical and served.shape == local.shape:
        diff = served.astype(np.float64) - local.astype(np.float64)
        mse = float(np.mean(diff ** 2))
        report |= {"max_abs": float(np.abs(diff).max()), "psnr_db": 10 * np.log10(255 ** 2 / mse) if mse else None}
    return report


def _median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _environment() -> dict[str, Any]:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = "none"
    return {"gpu": gpu or "none", "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def gpu_memory_used_mib() -> float | None:
    """The GPU's used memory as nvidia-smi reports it (every process), MiB."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout
        return float(text.split()[0])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return None


# --- Phases -------------------------------------------------------------------------------------------------------


def phase_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """The random checkpoint under WORK/ckpt (written once; a mark file says it is complete)."""
    from runtime.models.tiny import write_random_checkpoint

    folder = args.work / "ckpt"
    mark = folder / CHECKPOINT_MARK
    if mark.is_file():
        return json.loads(mark.read_text())
    start = time.perf_counter()
    write_random_checkpoint(folder, seed=0, full_size=not args.tiny, device=args.device)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    info = {"path": str(folder), "full_size": not args.tiny, "gib": round(size / 2**30, 2),
            "seconds": round(time.perf_counter() - start, 1)}
    mark.write_text(json.dumps(info) + "\n")
    return info


def phase_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    """The in-process pipeline on the fast engines: load, warm-up, the measured requests; outputs to WORK/inprocess."""
    import torch

    from runtime.pipeline import LancePipeline
    from runtime.pipeline.warmup import warm_up
    from runtime.runners import loaded_gpu_libraries
    from runtime.spec.request import GenerationRequest

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    start = time.perf_counter()
    pipeline = LancePipeline.from_checkpoint(args.work / "ckpt", runner="torch", device=args.device, dtype=dtype,
                                             fp8_gen=args.fp8_gen)
    report: dict[str, Any] = {"load_s": round(time.perf_counter() - start, 2), "libraries": loaded_gpu_libraries()}
    report["warmup_s"] = {k: round(v, 2) for k, v in warm_up(pipeline, [(args.size, args.size)]).items()}
    folder = args.work / "inprocess"
    folder.mkdir(parents=True, exist_ok=True)
    for name, fields in requests(args).items():
        seconds = []
        for _ in range(args.repeat if name == "t2i" else 1):
            t0 = time.perf_counter()
            result = pipeline.generate(GenerationRequest(**fields))
            seconds.append(time.perf_counter() - t0)
        output = output_of(result)
        if isinstance(output, str):
            (folder / f"{name}.txt").write_text(output, encoding="utf-8")
        else:
            np.save(folder / f"{name}.npy", output)
        report[name] = {"wall_ms": [round(1e3 * s, 1) for s in seconds], "median_ms": round(_median_ms(seconds), 1),
                        "stages_s": {k: round(v, 4) for k, v in result.timings.items()}}
        logger.info("in-process %s: %.1f ms", name, _median_ms(seconds))
    if args.device.startswith("cuda"):
        report["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


def load_inprocess_outputs(folder: Path) -> dict[str, np.ndarray | str]:
    outputs: dict[str, np.ndarray | str] = {}
    for path in folder.iterdir():
        outputs[path.stem] = np.load(path) if path.suffix == ".npy" else path.read_text(encoding="utf-8")
    return outputs


class Timed:
    """One gRPC request: wall time, progress events, result or error."""

    def __init__(self, client: Any, fields: dict[str, Any], on_progress: Callable[[int, int], None] | None = None):
        self.progress: list[tuple[float, int]] = []
        self.error: BaseException | None = None
        self.result = None
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            self.progress.append((time.perf_counter() - t0, done))
            if on_progress is not None:
                on_progress(done, total)

        try:
            self.result = client.generate(**fields, on_progress=progress, timeout=600)
        except Exception as err:  # noqa: BLE001 - a cancelled or failed request is a measurement here
            self.error = err
        self.seconds = time.perf_counter() - t0

    @property
    def timings(self) -> dict[str, float]:
        return self.result.timings if self.result is not None else {}

    @property
    def error_text(self) -> str | None:
        return None if self.error is None else f"{type(self.error).__name__}: {self.error}"


class _CancelNow(Exception):
    """Raised from the progress callback: `LanceClient` then cancels the stream."""


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def lance_metric_lines(text: str) -> list[str]:
    """The metric lines about Lance: our own families, Triton's per-model ones for ``lance``, the GPU's memory."""
    keep = re.compile(r'^(lance_\w+|nv_\w+\{[^}]*model="lance"[^}]*\}|nv_gpu_memory_\w+|nv_gpu_utilization)\b')
    return [line for line in text.splitlines() if keep.match(line)]


def _gauge(lines: Sequence[str], name: str, **labels: str) -> float | None:
    for line in lines:
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_for_log(path: Path, pattern: str, timeout: float) -> re.Match | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(re.finditer(pattern, path.read_text(errors="replace")))
        if found:
            return found[-1]
        time.sleep(0.1)
    return None


def phase_serve(args: argparse.Namespace, report: dict[str, Any], save: Callable[[], None]) -> None:
    """Fills ``report`` section by section, calling ``save`` after each (a run cut short keeps what it measured)."""
    from runtime.client import LanceClient
    from runtime.serving.repository import write_repository
    from runtime.serving.server import ServerOptions, TritonServer

    local = load_inprocess_outputs(args.work / "inprocess")
    repo = args.work / "repo"
    on_cpu = args.device == "cpu"        # the smoke run: the torch set on a CPU instance (plain modules, fp32)
    write_repository([], args.work / "ckpt", repo, engine_set="torch", fp8_gen=args.fp8_gen,
                     warmup_sizes=[(args.size, args.size)], gpus=None if on_cpu else (0, 1) if args.cfg_pair else (0,),
                     precision="fp32" if on_cpu else "bf16", cfg_pair=args.cfg_pair)
    log_path = args.work / "server.log"
    memory_idle = gpu_memory_used_mib()
    server = TritonServer(repo, ServerOptions(cpu=on_cpu, stub_timeout_seconds=1200), log_path=log_path)
    server.start(timeout=1200)
    try:
        metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        report["load"] = {"start_to_ready_s": round(server.startup_s, 1),
                          "phases_s": {phase: _gauge(lance_metric_lines(_scrape(metrics_url)), "lance_load_seconds",
                                                     phase=phase) for phase in ("build", "warmup")},
                          "gpu_memory_mib": {"before": memory_idle, "ready": gpu_memory_used_mib()}}
        save()
        client = LanceClient(server.grpc_url)
        fields = requests(args)

        runs = [Timed(client, fields["t2i"]) for _ in range(1 + args.repeat)]
        t2i = [run.seconds for run in runs]
        report["t2i"] = {"first_ms": round(1e3 * t2i[0], 1), "steady_ms": [round(1e3 * s, 1) for s in t2i[1:]],
                         "median_ms": round(_median_ms(t2i[1:]), 1),
                         "vs_inprocess": [compare(output_of(run.result), local["t2i"]) for run in runs],
                         "stages_s": runs[-1].timings, "errors": [r.error_text for r in runs if r.error]}
        save()
        for name in ("x2t", "edit"):
            run = Timed(client, fields[name])
            report[name] = {"wall_ms": round(1e3 * run.seconds, 1), "stages_s": run.timings, "error": run.error_text,
                            "vs_inprocess": compare(output_of(run.result), local[name])}
        save()
        report["concurrency"] = concurrency(client, fields["t2i"], args.concurrency)
        save()
        report["cancel"] = cancel(client, fields["t2i"], args.cancel_at, log_path, local["t2i"])
        save()
        report["memory"] = memory(client, fields["t2i"], args.memory_requests, metrics_url)
        report["metrics"] = lance_metric_lines(_scrape(metrics_url))
        save()
    finally:
        server.stop()


def concurrency(client: Any, fields: dict[str, Any], clients: int) -> dict[str, Any]:
    """``clients`` requests at once (seeds 1..N), then the same one after another: equal bytes, and the times."""
    from runtime.client import LanceClient

    seeds = list(range(1, clients + 1))
    runs: dict[int, Timed] = {}

    def one(seed: int) -> None:
        runs[seed] = Timed(LanceClient(client.url), {**fields, "seed": seed})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    concurrent_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequential = {seed: Timed(client, {**fields, "seed": seed}) for seed in seeds}
    sequential_s = time.perf_counter() - t0
    return {"clients": clients, "concurrent_wall_s": round(concurrent_s, 2),
            "sequential_wall_s": round(sequential_s, 2),
            "errors": [run.error_text for run in (*runs.values(), *sequential.values()) if run.error],
            "identical": {seed: bool(runs[seed].result is not None and sequential[seed].result is not None
                                     and np.array_equal(runs[seed].result.image, sequential[seed].result.image))
                          for seed in seeds},
            "concurrent_latency_ms": {seed: round(1e3 * runs[seed].seconds, 1) for seed in seeds}}


def cancel(client: Any, fields: dict[str, Any], at: int, log_path: Path, expected: np.ndarray) -> dict[str, Any]:
    """Cancel at progress step ``at``; the server's log line says where it stopped; the next request is exact."""
    def stop(done: int, total: int) -> None:
        if done >= at:
            raise _CancelNow()

    run = Timed(client, fields, on_progress=stop)
    seen = run.progress[-1][1] if run.progress else 0
    match = _wait_for_log(log_path, r"cancelled after step (\d+) of (\d+)", timeout=60)
    stopped = int(match.group(1)) if match else None
    after = Timed(client, fields)
    return {"client_cancelled_at_step": seen, "server_stopped_after_step": stopped,
            "steps_after_cancel": None if stopped is None else stopped - seen,
            "client_error": run.error_text, "next_request": compare(output_of(after.result), expected)}


def memory(client: Any, fields: dict[str, Any], count: int, metrics_url: str) -> dict[str, Any]:
    """GPU memory before and after ``count`` requests that cycle through prompts (new prompt lengths: new graphs)."""
    before = {"nvidia_smi_mib": gpu_memory_used_mib(),
              "torch_reserved_mib": (_gauge(lance_metric_lines(_scrape(metrics_url)), "lance_gpu_memory_bytes",
                                            kind="reserved") or 0) / 2**20}
    seconds, used = [], []
    for index in range(count):
        run = Timed(client, {**fields, "prompt": MEMORY_PROMPTS[index % len(MEMORY_PROMPTS)], "seed": 100 + index})
        seconds.append(run.seconds)
        used.append(gpu_memory_used_mib())
    lines = lance_metric_lines(_scrape(metrics_url))
    after = {"nvidia_smi_mib": gpu_memory_used_mib(),
             "torch_reserved_mib": (_gauge(lines, "lance_gpu_memory_bytes", kind="reserved") or 0) / 2**20,
             "torch_peak_allocated_mib": (_gauge(lines, "lance_gpu_memory_bytes", kind="peak_allocated") or 0) / 2**20}
    growth = None if None in (before["nvidia_smi_mib"], after["nvidia_smi_mib"]) else (
        after["nvidia_smi_mib"] - before["nvidia_smi_mib"])
    return {"requests": count, "before": before, "after": after, "nvidia_smi_growth_mib": growth,
            "torch_reserved_growth_mib": after["torch_reserved_mib"] - before["torch_reserved_mib"],
            "median_ms": round(_median_ms(seconds), 1), "nvidia_smi_mib_after_each": used}


# --- Report -------------------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """The headline figures, one per line."""
    rows = [f"GPU: {result['environment']['gpu']}"]
    local, served = result.get("inprocess", {}), result.get("serve", {})
    for name in ("t2i", "x2t", "edit"):
        if name in local:
            rows.append(f"in-process {name:5s} median {local[name]['median_ms']:9.1f} ms")
    if served:
        t2i = served["t2i"]
        overhead = t2i["median_ms"] - local["t2i"]["median_ms"]
        rows += [f"served load (start to ready) {served['load']['start_to_ready_s']} s, "
                 f"phases {served['load']['phases_s']}",
                 f"served t2i first {t2i['first_ms']} ms, steady median {t2i['median_ms']} ms, overhead "
                 f"{overhead:+.1f} ms ({100 * overhead / local['t2i']['median_ms']:+.2f} %), identical "
                 f"{[c['identical'] for c in t2i['vs_inprocess']]}",
                 *(f"served {name} {served[name]['wall_ms']} ms, identical {served[name]['vs_inprocess']['identical']}"
                   for name in ("x2t", "edit")),
                 f"denoise stage of the last t2i: served {t2i['stages_s']['denoise']:.3f} s, in-process "
                 f"{local['t2i']['stages_s']['denoise']:.3f} s (in-process / served "
                 f"{local['t2i']['stages_s']['denoise'] / t2i['stages_s']['denoise']:.2f}x"
                 f"{', the CFG pair against one device' if '--cfg-pair' in result['argv'] else ''})",
                 f"concurrency: {served['concurrency']['identical']}, errors {served['concurrency']['errors']}",
                 f"cancel: client at step {served['cancel']['client_cancelled_at_step']}, server stopped after "
                 f"{served['cancel']['server_stopped_after_step']}, next request identical "
                 f"{served['cancel']['next_request']['identical']}",
                 f"memory over {served['memory']['requests']} requests: nvidia-smi "
                 f"{served['memory']['nvidia_smi_growth_mib']} MiB, torch reserved "
                 f"{served['memory']['torch_reserved_growth_mib']:.0f} MiB"]
    return "\n".join(rows)


def _without(argv: Sequence[str], *options: str) -> list[str]:
    """``argv`` less the given options and their values."""
    kept, skip = [], False
    for item in argv:
        if not skip and item not in options:
            kept.append(item)
        skip = item in options and not skip
    return kept


def _inprocess_child(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """The in-process phase in a child process (its GPU memory is released when it exits)."""
    out = args.work / "inprocess.json"
    command = [sys.executable, "-m", "benchmarks.gpu_serving", *argv, "--phase", "inprocess", "--out", str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())["inprocess"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "serving.json"
    result: dict[str, Any] = {"environment": _environment(), "argv": argv}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    result["checkpoint"] = phase_checkpoint(args)
    gc.collect()
    if args.phase == "inprocess":
        result["inprocess"] = phase_inprocess(args)
    elif args.phase in ("all", "serve"):
        if args.phase == "all":
            result["inprocess"] = _inprocess_child(args, _without(argv, "--phase", "--out"))
        else:
            result["inprocess"] = json.loads((args.work / "inprocess.json").read_text())["inprocess"]
        save()
        result["serve"] = {}
        phase_serve(args, result["serve"], save)
    save()
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
