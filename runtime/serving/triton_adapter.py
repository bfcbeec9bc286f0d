"""The Triton side of the Python-backend models in ``triton_repo/``: the only module besides their ``model.py`` files
that imports ``triton_python_backend_utils`` (it exists only inside a Triton Python-backend stub).

* `LanceModel` (model ``lance``): parses and checks its config once, builds the same `LancePipeline` the CLI uses --
  ``mot`` and its KV cache in this process, ``vit``/``vae_encode``/``vae_decode`` as BLS calls to their own Triton
  models (`runtime.runners.triton_bls.BlsRunner`, built by `runtime.runners.factory`) -- and serves each request in an envelope: response sender ->
  request tensors -> ``request_from_tensors`` -> ``generate`` (a progress response per denoise step or token, the
  sender's ``is_cancelled()`` polled between them) -> the final response (image, text or video, plus ``timings``),
  FINAL always. ``RequestError`` becomes ``INVALID_ARG``, ``Cancelled`` ``CANCELLED``, anything else ``INTERNAL``
  with a one-line message (the traceback goes to the log only). One request's failure never touches another's.
* `EngineModel` (``lance_vit``, ``lance_vae_encode``, ``lance_vae_decode`` served on CPU, ``configs/cpu.pbtxt``): the
  fp32 ONNX graph of one engine in ONNX Runtime, with exactly the tensor names and shapes of the ``tensorrt_plan``
  config it stands in for.

Warmup: BLS calls are allowed only inside ``execute``, so ``lance`` cannot push a request through its children in
``initialize``. It warms what it owns instead -- one ``mot`` call per optimization profile at the profile's smallest
shapes (TensorRT context creation, ONNX Runtime's first-run allocations) -- before ``initialize`` returns, i.e.
before Triton reports the model READY. The ``tensorrt_plan`` children warm themselves with ``model_warmup`` in
their configs (``runtime.serving.repository``).

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
from runtime.spec.contract import sample_inputs
from runtime.runners import EngineError, Engines, Runner
from runtime.spec.request import Cancelled, GenerationResult, RequestError, request_from_tensors
from runtime.serving.repository import EngineSettings, LanceSettings, check_io, check_lance_config, config_parameters

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


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, prefixed with its type: what an INTERNAL error tells the client."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# --- Model lance -----------------------------------------------------------------------------------------------


def build_pipeline(settings: LanceSettings, device: torch.device):  # -> runtime.pipeline.LancePipeline
    """The CLI's `LancePipeline` with the in-process engines (``mot``, the video VAE's chunk steps) in this process
    and the other engines as BLS calls.

    The host side (tokenizer, configs, embedding and position tables) and the engine specs come from the
    checkpoint, loaded on the CPU (on ``device`` when ``mot`` itself runs from PyTorch); only the host tensors move
    to ``device``.
    """
    from runtime.pipeline import LancePipeline, load_host
    from runtime.pipeline.core import PRECISION_DTYPES
    from runtime.runners.factory import bls_runners, file_runner

    dtype = PRECISION_DTYPES[settings.precision]
    own: dict[str, Runner]
    if settings.mot_runner == "torch":
        reference = LancePipeline.from_checkpoint(settings.checkpoint, runner="torch", device=device, dtype=dtype,
                                                  video=settings.video)
        host = reference.host
        specs = {name: runner.spec for name, runner in reference.engines.items()}
        own = {name: runner for name, runner in reference.engines.items() if name not in settings.children}
    else:
        # The engines hold the networks: the host side needs only the tokenizer, configs and the embedding.
        host, specs = load_host(settings.checkpoint, device=device, dtype=dtype, video=settings.video)
        own = {name: file_runner(settings.mot_runner, specs[name], path, threads=settings.threads, device=device)
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
    that the request is over.
    """

    def __init__(self, sender: Any) -> None:
        self._sender = sender
        self.closed = False
        self.progress_sent = (0, 0)

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()

    def progress(self, done: int, total: int) -> None:
        self._sender.send(pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("progress", np.array([done, total], dtype=np.int64))]))
        self.progress_sent = (done, total)

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


class RequestCounter:
    """The custom Prometheus counter ``lance_requests_total{task, outcome}``: Triton's own counters see a decoupled
    model's error response as a success (measured on 2.51), so refusals, cancellations and failures are counted here.
    ``outcome`` is ``ok``, ``invalid_argument``, ``cancelled`` or ``internal``; ``task`` is ``-`` when the request named
    no known task."""

    def __init__(self) -> None:
        self._family = pb_utils.MetricFamily(name="lance_requests_total",
                                             description="Lance requests by task and outcome",
                                             kind=pb_utils.MetricFamily.COUNTER)
        self._metrics: dict[tuple[str, str], Any] = {}

    def count(self, task: str, outcome: str) -> None:
        key = (task, outcome)
        if key not in self._metrics:
            self._metrics[key] = self._family.Metric(labels={"task": task, "outcome": outcome})
        self._metrics[key].increment(1.0)


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
        start = time.perf_counter()
        self.pipeline = build_pipeline(self.settings, self.device)
        logger.info("model %s: pipeline on %s (%s, %s model, in-process engines via %s %s, children %s) in %.1f s",
                    self.name, self.device, self.settings.precision, "video" if self.settings.video else "image",
                    self.settings.mot_runner, {name: str(path) for name, path in self.settings.engines.items()},
                    dict(self.settings.children), time.perf_counter() - start)
        if self.settings.warmup:
            with torch.inference_mode():
                warm_up(self.pipeline.engines.mot, self.settings.precision, self.device)
        self.counter = RequestCounter()

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
            result.timings["total"] = time.perf_counter() - start
            stream.finish(result_tensors(result))
            self.counter.count(task, "ok")
            logger.info("request %s: %s done in %.2f s", request_id, task, result.timings["total"])
        except RequestError as err:
            logger.info("request %s: refused: %s", request_id, err)
            stream.fail(str(err), pb_utils.TritonError.INVALID_ARG)
            self.counter.count(task, "invalid_argument")
        except Cancelled:
            done, total = stream.progress_sent
            logger.info("request %s: cancelled after step %d of %d; stopped", request_id, done, total)
            stream.fail("the request was cancelled", pb_utils.TritonError.CANCELLED)
            self.counter.count(task, "cancelled")
        except Exception as err:  # noqa: BLE001 - the envelope turns every failure into this request's error
            logger.exception("request %s failed", request_id)
            stream.fail(one_line(err), pb_utils.TritonError.INTERNAL)
            self.counter.count(task, "internal")
        finally:
            stream.close()

    def finalize(self) -> None:
        logger.info("model %s: unloading", getattr(self, "name", "lance"))


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
