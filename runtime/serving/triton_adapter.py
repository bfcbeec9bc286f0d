"""The Triton side of the Python-backend models in ``triton_repo/``: the only module besides their ``model.py`` files
that imports ``triton_python_backend_utils`` (it exists only inside a Triton Python-backend stub).

* `LanceModel` (model ``lance``): parses and checks its config once, builds the same `LancePipeline` the CLI uses --
  in the TensorRT and CPU sets ``mot`` and its KV cache in this process, ``vit``/``vae_encode``/``vae_decode`` as BLS
  calls to their own Triton models (`runtime.runners.triton_bls.BlsRunner`, built by `runtime.runners.factory`); in
  the torch set every engine in this process on the fast CUDA engines -- and serves each request in an envelope:
  response sender -> request tensors -> ``request_from_tensors`` -> ``generate`` (a progress response per denoise
  step or token, the sender's ``is_cancelled()`` polled between them) -> the final response (image, text or video,
  plus ``timings``), FINAL always. ``RequestError`` becomes ``INVALID_ARG``, ``Cancelled`` ``CANCELLED``, anything
  else ``INTERNAL`` with a one-line message (the traceback goes to the log only). One request's failure never touches
  another's. `LanceMetrics` puts its counters and gauges on Triton's metrics port.
* `EngineModel` (``lance_vit``, ``lance_vae_encode``, ``lance_vae_decode`` served on CPU, ``configs/cpu.pbtxt``): the
  fp32 ONNX graph of one engine in ONNX Runtime, with exactly the tensor names and shapes of the ``tensorrt_plan``
  config it stands in for.

Warm-up, before ``initialize`` returns, i.e. before Triton reports the model READY: the torch set owns every engine
and runs whole requests (`runtime.pipeline.warmup`: t2i and edit at each ``warmup_sizes``, x2t), which compiles and
captures what the first client request would. BLS calls are allowed only inside ``execute``, so in the other sets
``lance`` cannot push a request through its children in ``initialize``; it warms what it owns instead -- one ``mot``
call per optimization profile at the profile's smallest shapes (TensorRT context creation, ONNX Runtime's first-run
allocations). The ``tensorrt_plan`` children warm themselves with ``model_warmup`` in their configs
(``runtime.serving.repository``).

Config parameters: `runtime.serving.repository` writes them and parses them back (`LanceSettings`, `EngineSettings`), so
their spelling lives in one module.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from runtime.spec import registry
from runtime.pipeline.warmup import warm_up as warm_up_requests
from runtime.spec.contract import sample_inputs
from runtime.runners import EngineError, Engines, Runner, loaded_gpu_libraries
from runtime.spec.request import Cancelled, GenerationResult, RequestError, one_line, request_from_tensors
from runtime.serving.cfg_partner import PairedPipeline, torch_set_pipeline
from runtime.serving.repository import (
    ConfigError,
    EngineSettings,
    LanceSettings,
    check_io,
    check_lance_config,
    config_parameters,
)

logger = logging.getLogger(__name__)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


# --- Logging into Triton's log -------------------------------------------------------------------------------------


class _TritonLogHandler(logging.Handler):
    """Forwards ``runtime.*`` log records to the server's log (``pb_utils.Logger``), so the pipeline's and the
    runners' messages sit beside Triton's own."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            log = pb_utils.Logger.log_error
        elif record.levelno >= logging.WARNING:
            log = pb_utils.Logger.log_warn
        elif record.levelno >= logging.INFO:
            log = pb_utils.Logger.log_info
        else:
            log = pb_utils.Logger.log_verbose
        try:
            log(f"{record.name}: {self.format(record)}")
        except Exception:  # noqa: BLE001 - logging must never fail a request
            self.handleError(record)


def _install_log_handler() -> None:
    root = logging.getLogger("runtime")
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        root.addHandler(_TritonLogHandler())
        root.setLevel(logging.INFO)
        root.propagate = False


def _version_folder(args: Mapping[str, str]) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def _instance_device(args: Mapping[str, str]) -> torch.device:
    if args.get("model_instance_kind") == "GPU":
        return torch.device("cuda", int(args.get("model_instance_device_id", 0)))
    return torch.device("cpu")


# --- Model lance -----------------------------------------------------------------------------------------------


def build_pipeline(model: str, settings: LanceSettings, device: torch.device):  # -> LancePipeline | PairedPipeline
    """The CLI's `LancePipeline` for the repository's engine set.

    torch: every engine in this process on the fast CUDA engines, built from the checkpoint on ``device`` (what
    ``lance-trt run --device cuda`` runs; on a CPU instance the plain modules, as ``--device cpu``); with a CFG
    partner configured for ``device``, a `runtime.serving.cfg_partner.PairedPipeline` (rank 1 on the partner).
    tensorrt, onnxruntime: the in-process engines (``mot``, the video VAE's chunk steps) from their files, the other
    engines as BLS calls; the host side (tokenizer, configs, embedding and position tables) and the engine specs come
    from the checkpoint, loaded on the CPU, and only the host tensors move to ``device``.

    Raises:
        ConfigError: the torch set on a CPU instance in bf16 or FP8; CFG pairs without one for ``device``.
        PartnerError: the CFG partner failed to start or to load.
    """
    from runtime.pipeline import LancePipeline, load_host
    from runtime.pipeline.core import PRECISION_DTYPES
    from runtime.runners.factory import bls_runners, file_runner

    dtype = PRECISION_DTYPES[settings.precision]
    if settings.engine_set == "torch":
        if device.type != "cuda" and (settings.precision != "fp32" or settings.fp8_gen):
            raise ConfigError(f"engine_set torch on a CPU instance runs the plain modules in fp32, not "
                              f"{settings.precision}{' with fp8_gen' if settings.fp8_gen else ''}: make the instance "
                              "KIND_GPU")
        partner = settings.cfg_partner(model, str(device))
        if partner is not None:
            return PairedPipeline.start(settings, device, torch.device(partner))
        return torch_set_pipeline(settings, device)
    host, specs = load_host(settings.checkpoint, device=device, dtype=dtype, video=settings.video)
    own = {name: file_runner(settings.engine_set, specs[name], path, threads=settings.threads, device=device)
           for name, path in settings.engines.items()}
    children = bls_runners(specs, settings.children, pb_utils, precision=settings.precision, device=device,
                           timeout_us=int(settings.child_timeout_s * 1e6))
    return LancePipeline(Engines(**own, **children), host, device=device, dtype=dtype)


def warm_up(runner: Runner, precision: str, device: torch.device) -> None:
    """One call per optimization profile at its smallest shapes (random inputs within the contract's bounds)."""
    for profile in runner.spec.profiles:
        feed = sample_inputs(runner.spec, precision, **profile.point(0))
        start = time.perf_counter()
        runner.infer({name: value.to(device) for name, value in feed.items()})
        logger.info("warmup: %s profile %r in %.2f s", runner.spec.name, profile.name, time.perf_counter() - start)


def request_arrays(request: Any) -> dict[str, np.ndarray]:
    """Every input tensor of a Triton request as a host array (``request_from_tensors``' argument)."""
    arrays = {}
    for tensor in request.inputs():
        if tensor.is_cpu():
            arrays[tensor.name()] = tensor.as_numpy()
        else:
            arrays[tensor.name()] = dlpack.from_dlpack(tensor.to_dlpack()).cpu().numpy()
    return arrays


def task_label(arrays: Mapping[str, np.ndarray]) -> str:
    """The request's task for metrics and logs, read before validation: a known task name, or ``-``."""
    value = arrays.get("task")
    if value is not None and value.size == 1 and isinstance(value.reshape(-1)[0], bytes):
        name = value.reshape(-1)[0].decode("utf-8", errors="replace")
        if name in registry.TASKS:
            return name
    return "-"


def result_tensors(result: GenerationResult) -> list[Any]:
    """The final response's tensors: the result's output kind (``image`` UINT8 [H, W, 3], ``text`` BYTES [1] or
    ``video`` UINT8 [T, H, W, 3]) and ``timings``."""
    kind = next(kind for kind in registry.OUTPUT_KINDS if getattr(result, kind) is not None)
    value = getattr(result, kind)
    if kind == "text":
        output = pb_utils.Tensor("text", np.array([value.encode("utf-8")], dtype=np.object_))
    else:
        output = pb_utils.Tensor(kind, np.ascontiguousarray(value))
    timings = json.dumps({stage: round(seconds, 6) for stage, seconds in result.timings.items()})
    return [output, pb_utils.Tensor("timings", np.array([timings.encode("utf-8")], dtype=np.object_))]


class ResponseStream:
    """The responses of one decoupled request: progress, then exactly one final response or error, then FINAL.

    ``close()`` (called in ``finally``) sends a bare FINAL if nothing final went out, so the client always learns
    that the request is over. ``seconds`` adds up the time the loop spent in progress sends and cancellation polls
    (each a round trip to the server process).
    """

    def __init__(self, sender: Any) -> None:
        self._sender = sender
        self.closed = False
        self.progress_sent = (0, 0)
        self.seconds = 0.0

    def is_cancelled(self) -> bool:
        start = time.perf_counter()
        cancelled = self._sender.is_cancelled()
        self.seconds += time.perf_counter() - start
        return cancelled

    def progress(self, done: int, total: int) -> None:
        start = time.perf_counter()
        self._sender.send(pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("progress", np.array([done, total], dtype=np.int64))]))
        self.progress_sent = (done, total)
        self.seconds += time.perf_counter() - start

    def finish(self, tensors: list[Any]) -> None:
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
        self.closed = True

    def fail(self, message: str, code: Any) -> None:
        self._sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
        self.closed = True

    def close(self) -> None:
        if not self.closed:
            self._sender.send(flags=FINAL)
            self.closed = True


class LanceMetrics:
    """Model ``lance``'s own Prometheus metrics, beside Triton's on the metrics port:

    * ``lance_requests_total{task, outcome}`` (counter): Triton's own counters see a decoupled model's error response
      as a success (measured on 2.51), so refusals, cancellations and failures are counted here. ``outcome`` is
      ``ok``, ``invalid_argument``, ``cancelled`` or ``internal``; ``task`` is ``-`` when the request named no known
      task.
    * ``lance_stage_seconds_total{task, stage}`` (counter): the pipeline's stage timings of successful requests
      (``prefill``, ``denoise``, ``vit``, ``vae_encode``, ``vae_decode``, ...); over ``lance_requests_total`` the mean
      per request.
    * ``lance_gpu_memory_bytes{kind}`` (gauge, GPU instances): PyTorch's ``allocated``, ``reserved`` and
      ``peak_allocated`` bytes on the instance's GPU after the latest request.
    * ``lance_load_seconds{phase}`` (gauge): ``build`` (checkpoint and engines) and ``warmup`` at load.
    """

    def __init__(self) -> None:
        family = pb_utils.MetricFamily
        self._families = {
            "requests": family(name="lance_requests_total", description="Lance requests by task and outcome",
                               kind=family.COUNTER),
            "stages": family(name="lance_stage_seconds_total", description="Seconds spent per pipeline stage",
                             kind=family.COUNTER),
            "memory": family(name="lance_gpu_memory_bytes", description="PyTorch GPU memory of the lance instance",
                             kind=family.GAUGE),
            "load": family(name="lance_load_seconds", description="Seconds the lance instance took to load",
                           kind=family.GAUGE),
        }
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}

    def _metric(self, family: str, **labels: str) -> Any:
        key = (family, tuple(sorted(labels.items())))
        if key not in self._metrics:
            self._metrics[key] = self._families[family].Metric(labels=labels)
        return self._metrics[key]

    def count(self, task: str, outcome: str) -> None:
        self._metric("requests", task=task, outcome=outcome).increment(1.0)

    def stages(self, task: str, timings: Mapping[str, float]) -> None:
        for stage, seconds in timings.items():
            self._metric("stages", task=task, stage=stage).increment(seconds)

    def memory(self, device: torch.device) -> None:
        if device.type != "cuda":
            return
        for kind, value in (("allocated", torch.cuda.memory_allocated(device)),
                            ("reserved", torch.cuda.memory_reserved(device)),
                            ("peak_allocated", torch.cuda.max_memory_allocated(device))):
            self._metric("memory", kind=kind).set(float(value))

    def load(self, phase: str, seconds: float) -> None:
        self._metric("load", phase=phase).set(seconds)


class LanceModel:
    """Model ``lance``: the decoupled BLS model that runs the Lance pipeline (see the module docstring)."""

    def initialize(self, args: Mapping[str, str]) -> None:
        _install_log_handler()
        self.name = args["model_name"]
        config = json.loads(args["model_config"])
        check_lance_config(self.name, config)
        self.device = _instance_device(args)
        capability = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the instance's GPU for every library's default allocations
            capability = "{}.{}".format(*torch.cuda.get_device_capability(self.device))
        self.settings = LanceSettings.parse(self.name, config_parameters(config), _version_folder(args), capability)
        self.metrics = LanceMetrics()
        start = time.perf_counter()
        self.pipeline = build_pipeline(self.name, self.settings, self.device)
        self.metrics.load("build", time.perf_counter() - start)
        logger.info("model %s: torch %s, GPU libraries %s", self.name, torch.__version__, loaded_gpu_libraries())
        logger.info("model %s: pipeline on %s (%s, %s model, engine set %s, in-process engine files %s, children %s) "
                    "in %.1f s", self.name, self.device, self.settings.precision,
                    "video" if self.settings.video else "image", self.settings.engine_set,
                    {name: str(path) for name, path in self.settings.engines.items()}, dict(self.settings.children),
                    time.perf_counter() - start)
        if self.settings.warmup:
            start = time.perf_counter()
            self._warm_up()
            self.metrics.load("warmup", time.perf_counter() - start)
        self.metrics.memory(self.device)

    def _warm_up(self) -> None:
        """The torch set runs whole requests (it owns every engine); the others warm ``mot`` per profile (BLS calls
        to the children are allowed only inside ``execute``)."""
        if self.settings.engine_set == "torch":
            warm_up_requests(self.pipeline, self.settings.warmup_sizes)
        else:
            with torch.inference_mode():
                warm_up(self.pipeline.engines.mot, self.settings.precision, self.device)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._serve(request)
        return None

    def _serve(self, request: Any) -> None:
        """The per-request envelope; never raises, so one request's failure stays its own."""
        stream = ResponseStream(request.get_response_sender())
        request_id = request.request_id() or "-"
        task = "-"
        start = time.perf_counter()
        try:
            arrays = request_arrays(request)
            task = task_label(arrays)
            generation = request_from_tensors(arrays)
            result = self.pipeline.generate(generation, on_progress=stream.progress,
                                            is_cancelled=stream.is_cancelled)
            result.timings["progress_ipc"] = stream.seconds
            result.timings["total"] = time.perf_counter() - start
            stream.finish(result_tensors(result))
            self.metrics.count(task, "ok")
            self.metrics.stages(task, result.timings)
            logger.info("request %s: %s done in %.2f s", request_id, task, result.timings["total"])
        except RequestError as err:
            logger.info("request %s: refused: %s", request_id, err)
            stream.fail(str(err), pb_utils.TritonError.INVALID_ARG)
            self.metrics.count(task, "invalid_argument")
        except Cancelled:
            done, total = stream.progress_sent
            logger.info("request %s: cancelled after step %d of %d; stopped", request_id, done, total)
            stream.fail("the request was cancelled", pb_utils.TritonError.CANCELLED)
            self.metrics.count(task, "cancelled")
        except Exception as err:  # noqa: BLE001 - the envelope turns every failure into this request's error
            logger.exception("request %s failed", request_id)
            stream.fail(one_line(err), pb_utils.TritonError.INTERNAL)
            self.metrics.count(task, "internal")
        finally:
            stream.close()
            if self.device.type == "cuda":
                # the request's transient blocks go back to the driver once it is answered, so the process holds
                # the weights, the captured graphs and the next request's working set, not every size seen so far
                torch.cuda.empty_cache()
            self.metrics.memory(self.device)

    def finalize(self) -> None:
        logger.info("model %s: unloading", getattr(self, "name", "lance"))
        if isinstance(getattr(self, "pipeline", None), PairedPipeline):
            self.pipeline.close()


# --- Engine stand-ins (CPU) --------------------------------------------------------------------------------------


class EngineModel:
    """One engine's fp32 ONNX graph in ONNX Runtime, standing in for its ``tensorrt_plan`` model on CPU."""

    def initialize(self, args: Mapping[str, str]) -> None:
        from runtime.runners.factory import file_runner

        _install_log_handler()
        self.name = args["model_name"]
        config = json.loads(args["model_config"])
        settings = EngineSettings.parse(self.name, config_parameters(config), _version_folder(args))
        check_io(self.name, config, settings.spec.inputs, settings.spec.outputs, "fp32")
        self.runner = file_runner("onnxruntime", settings.spec, settings.onnx, threads=settings.threads)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._infer(request) for request in requests]

    def _infer(self, request: Any) -> Any:
        spec = self.runner.spec
        try:
            feed = {name: dlpack.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
                    for name in spec.input_names}
            outputs = self.runner.infer(feed)
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(outputs[name].contiguous()))
                for name in spec.output_names])
        except EngineError as err:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))
        except Exception as err:  # noqa: BLE001 - one request's failure is its own response
            logger.exception("model %s: inference failed", self.name)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(err), pb_utils.TritonError.INTERNAL))
