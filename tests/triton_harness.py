"""Helpers shared by the tests that run a real tritonserver (the one bundled in nvidia-pytriton) on loopback.

- ``triton_test``: the ``triton`` marker plus a skip when no tritonserver is installed.
- ``write_model``: one Python-backend model in a throwaway repository.
- ``running_server``: a ``TritonServer`` on free loopback ports in CPU mode that, on exit, checks that the server, its
  Python stubs and their /dev/shm regions are all gone (only this server's: other engineers' servers may run on the
  same machine at the same time).
- ``grpc_client`` and ``stream_infer``: a tritonclient gRPC client and one request on a decoupled stream.
- ``stub_shm_regions``: the /dev/shm regions of a server's stubs, for leak checks.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pytest

from runtime.spec.request import wire_dtype
from runtime.serving.server import ProcessHandle, ServerOptions, TritonNotFoundError, TritonServer, find_tritonserver

REPO_ROOT = Path(__file__).resolve().parent.parent
SHM_PREFIX = "triton_python_backend_shm_region_"


def _tritonserver_available() -> bool:
    try:
        find_tritonserver()
    except TritonNotFoundError:
        return False
    return True


requires_triton = pytest.mark.skipif(not _tritonserver_available(), reason="no tritonserver: pip install '.[serve]'")


def triton_test(test: Callable) -> Callable:
    """Mark a test ``triton`` and skip it where no tritonserver is installed."""
    return pytest.mark.triton(requires_triton(test))


def write_model(repo: Path, name: str, config: str, model_py: str, *, configs: Mapping[str, str] | None = None) -> Path:
    """Write ``repo/name/config.pbtxt``, ``repo/name/1/model.py`` and ``repo/name/configs/<key>.pbtxt``."""
    model = repo / name
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(config)
    (model / "1" / "model.py").write_text(model_py)
    for config_name, text in (configs or {}).items():
        (model / "configs").mkdir(exist_ok=True)
        (model / "configs" / f"{config_name}.pbtxt").write_text(text)
    return model


def stub_shm_regions(server: TritonServer) -> set[str]:
    """The /dev/shm regions of this server's Python stubs (each stub gets its region's name as argv[2])."""
    regions = set()
    for child in server.children():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")
            regions.update(a.decode() for a in argv if a.startswith(SHM_PREFIX.encode()))
    return regions


@contextlib.contextmanager
def running_server(repo: Path, *, log_path: Path | None = None, **options: object) -> Iterator[TritonServer]:
    """A ready CPU-mode server on free loopback ports; on exit it is stopped and checked for leaks.

    ``PYTHONPATH`` points at the project so models can import ``runtime``. Keyword arguments are ``ServerOptions``
    fields (``cpu=True`` unless given).
    """
    options.setdefault("cpu", True)
    options.setdefault("env", (("PYTHONPATH", str(REPO_ROOT)),))
    server = TritonServer(repo, ServerOptions(**options), log_path=log_path or repo.parent / "tritonserver.log")
    server.start(timeout=120)
    family = [ProcessHandle.of(server.pid), *server.children()]
    regions = stub_shm_regions(server)
    assert regions, f"found no stub shared-memory region among {family}"
    try:
        yield server
    finally:
        server.stop()
        left = [p for p in family if p is not None and p.alive()]
        assert not left, f"processes left after stop: {left}"
        leaked = {r for r in regions if Path("/dev/shm", r).exists()}
        assert not leaked, f"shared-memory regions left after stop: {leaked}"


def grpc_client(server: TritonServer):  # -> tritonclient.grpc.InferenceServerClient
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


@contextlib.contextmanager
def served(engine_dir: Path, checkpoint: Path, out: Path, **repo_options: object) -> Iterator[TritonServer]:
    """The repository ``lance-trt repo`` writes from ``engine_dir`` and ``checkpoint`` into ``out``, served in CPU
    mode (`running_server`), its log beside it."""
    from runtime.serving.repository import ServingTarget, write_repository

    write_repository([engine_dir], checkpoint, out, target=ServingTarget(None), **repo_options)
    with running_server(out, log_path=out.parent / "tritonserver.log") as server:
        yield server


@dataclass
class StreamOutcome:
    """What one request on a decoupled stream received, with arrival times in seconds after sending."""

    responses: list[tuple[float, dict[str, np.ndarray]]] = field(default_factory=list)
    error: tuple[float, str | None, str] | None = None  # (time, gRPC status or None, message)
    final_at: float | None = None


class Stream:
    """One request on its own decoupled gRPC stream; ``collect`` gathers until FINAL, an error or a timeout."""

    def __init__(self, url: str, model: str, inputs: Mapping[str, np.ndarray], *, request_id: str = "",
                 headers: Mapping[str, str] | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self._events: queue.Queue = queue.Queue()
        self.outcome = StreamOutcome()
        self.client = grpcclient.InferenceServerClient(url)
        # tritonclient calls the stream callback with keyword arguments (docs/design/serving.md §4.3)
        self.client.start_stream(callback=lambda result=None, error=None: self._events.put(
            (time.monotonic(), result, error)), headers=dict(headers) if headers else None)
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), wire_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        self.sent_at = time.monotonic()
        self.client.async_stream_infer(model, tensors, request_id=request_id, enable_empty_final_response=True)

    def collect(self, timeout: float, *, first_response: bool = False) -> StreamOutcome:
        """Gather events until FINAL, an error, ``timeout`` seconds, or (``first_response``) any response.

        Events accumulate in ``self.outcome`` across calls, which is also returned.
        """
        outcome = self.outcome
        deadline = time.monotonic() + timeout
        while outcome.final_at is None and outcome.error is None:
            if first_response and outcome.responses:
                break
            try:
                at, result, error = self._events.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            t = at - self.sent_at
            if error is not None:
                outcome.error = (t, error.status(), error.message())
                continue
            response = result.get_response()
            outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
            if outputs:
                outcome.responses.append((t, outputs))
            if response.parameters["triton_final_response"].bool_param:
                outcome.final_at = t
        return outcome

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        """End the stream, cancelling the request only if it may still run (see runtime.client on why)."""
        settled = self.outcome.final_at is not None or self.outcome.error is not None
        self.client.stop_stream(cancel_requests=not settled)
        self.client.close()


def stream_infer(url: str, model: str, inputs: Mapping[str, np.ndarray], *, timeout: float = 30.0,
                 headers: Mapping[str, str] | None = None) -> StreamOutcome:
    """Send one request on a fresh stream and wait for its FINAL response, its error or ``timeout``."""
    stream = Stream(url, model, inputs, headers=headers)
    try:
        return stream.collect(timeout)
    finally:
        stream.close()


# --- A stand-in for model `lance`: the real request module and contract, a fake generator -------------------------

def lance_config_pbtxt(extra: str = "") -> str:
    """A decoupled ``lance`` config with the contract's inputs and outputs (variable dims as -1)."""
    from runtime.spec import request as request_spec

    def dims(shape: tuple) -> str:
        return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)

    def rows(specs: tuple, optional: bool) -> str:
        return ",\n".join(
            f'  {{ name: "{s.name}" data_type: {s.dtype.triton} dims: [ {dims(s.shape)} ]'
            + (" optional: true" if optional and s.optional else "") + " }"
            for s in specs)

    return (f'name: "lance"\nbackend: "python"\nmax_batch_size: 0\nmodel_transaction_policy {{ decoupled: true }}\n'
            f"input [\n{rows(request_spec.LANCE_INPUTS, True)}\n]\noutput [\n{rows(request_spec.LANCE_OUTPUTS, False)}\n]\n"
            f"instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n{extra}")


LANCE_STANDIN_PY = '''
"""Stand-in for model lance: validates with runtime.spec.request, streams progress, answers without a network.

t2i/edit: `steps` progress responses, then an image of the requested size filled with seed % 256.
x2t: one progress response per character of the answer (the prompt upper-cased), then the text.
A prompt starting with "sleep" waits 0.1 s before each progress response. Cancellation is checked before each one
and logged as "stand-in cancelled".
"""
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.spec import request as request_spec
from runtime.spec.request import RequestError, request_from_tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._run(request, sender)
            except RequestError as err:
                error = pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        return None

    def _run(self, request, sender):
        tensors = {}
        for spec in request_spec.LANCE_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                tensors[spec.name] = tensor.as_numpy()
        req = request_from_tensors(tensors)
        answer = req.prompt.upper()[: req.max_new_tokens]
        total = len(answer) if req.task == "x2t" else req.steps
        delay = 0.1 if req.prompt.startswith("sleep") else 0.0
        for done in range(1, total + 1):
            if request.is_cancelled():
                pb_utils.Logger.log_info("stand-in cancelled")
                sender.send(flags=FINAL)
                return
            time.sleep(delay)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("progress", np.array([done, total], np.int64))]))
        if req.task == "x2t":
            out = pb_utils.Tensor("text", np.array([answer.encode("utf-8")], dtype=np.object_))
        else:
            out = pb_utils.Tensor("image", np.full((req.height, req.width, 3), req.seed % 256, np.uint8))
        # Triton 2.51's Python backend has no response parameters (python_backend #394, 2025): no timings here
        sender.send(pb_utils.InferenceResponse(output_tensors=[out]), flags=FINAL)
'''


def write_lance_standin(repo: Path) -> Path:
    """A populated ``repo/lance`` stand-in model (see ``LANCE_STANDIN_PY``)."""
    return write_model(repo, "lance", lance_config_pbtxt(), LANCE_STANDIN_PY)
