"""`lance-client`: generate with a Lance server over gRPC (model ``lance``, a decoupled stream).

Importable without torch: tritonclient[grpc], numpy, pillow and tqdm only (``pip install 'lance-trt[client]'``).

    lance-client t2i --prompt "a red fox in snow" -o fox.png
    lance-client x2t --image fox.png --prompt "What animal is this?"
    lance-client edit --image fox.png --prompt "make it night" -o night.png

Each request runs on its own gRPC stream with ``enable_empty_final_response`` (so completion is explicit). The
``triton_grpc_error`` header is not sent: on Triton 2.51 it can crash the server on a decoupled model's error, so a
model error arrives as the server's message (which names the field) without a gRPC code. Progress responses carry
``progress`` = (done, total); the final response carries ``image`` or ``text`` and ``timings`` (JSON, per stage). Ctrl-C, an exception in the
progress callback, or the timeout cancels the request on the server (``stop_stream(cancel_requests=True)``), which
the model sees through ``is_cancelled()``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from runtime.spec import registry
from runtime.spec.flags import ProgressBar, add_task_subcommands, check_task_arguments, write_output
from runtime.spec.endpoints import DEFAULT_GRPC_PORT, LANCE_MODEL
from runtime.spec.request import (
    LANCE_OUTPUTS,
    GenerationRequest,
    GenerationResult,
    ProgressCallback,
    by_name,
    request_to_tensors,
    wire_dtype,
)

log = logging.getLogger(__name__)

DEFAULT_URL = f"localhost:{DEFAULT_GRPC_PORT}"
DEFAULT_TIMEOUT_S = 1800.0
_OUTPUTS = by_name(LANCE_OUTPUTS)
# Measured on Triton 2.51: a request refused by a full queue arrives on the stream as a bare message, without a code
# even with the triton_grpc_error header; the same refusal on a unary call is UNAVAILABLE.
_QUEUE_FULL = "Exceeds maximum queue size"
# After the stream deadline the server still needs a moment to report DEADLINE_EXCEEDED through the callback.
_DEADLINE_GRACE_S = 5.0


class LanceClientError(Exception):
    """The server refused or failed the request, or could not be reached.

    Attributes:
        message: the server's (or gRPC's) message.
        code: the gRPC status name (``INVALID_ARGUMENT``, ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``CANCELLED``,
            ``INTERNAL``...), or None when the server gave none.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.message = message
        self.code = code


def _client_error(error: InferenceServerException) -> LanceClientError:
    message = error.message() or str(error)
    status = error.status()
    code = status.removeprefix("StatusCode.") if status else None
    if code is None and _QUEUE_FULL in message:
        code = "UNAVAILABLE"
    return LanceClientError(message, code)


class LanceClient:
    """A gRPC client of model ``lance``. One ``generate`` call at a time per instance.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        model: the Triton model name.
    """

    def __init__(self, url: str = DEFAULT_URL, *, model: str = LANCE_MODEL) -> None:
        self.url = url
        self.model = model

    def generate(
        self,
        task: str,
        prompt: str,
        image: bytes | str | os.PathLike[str] | None = None,
        *,
        video: bytes | str | os.PathLike[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        cfg_scale: float | None = None,
        max_new_tokens: int | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> GenerationResult:
        """Run one request and wait for its result.

        Args:
            task: one of ``registry.TASKS``.
            prompt: prompt, question or instruction.
            image: encoded PNG/JPEG bytes, or a path to such a file (the tasks whose `registry.Task.media` has it).
            video: an encoded video file's bytes, or its path (likewise).
            height, width, frames, steps, seed, cfg_scale, max_new_tokens: generation options; None leaves the
                server's default (upstream's, per task).
            on_progress: called with (done, total) for every progress response.
            timeout: seconds for the whole request (the gRPC stream deadline); None waits without limit.

        Returns:
            The image, text or video, with the per-stage ``timings`` of the final response.

        Raises:
            LanceClientError: with the server's message and gRPC code.
        """
        media = {name: _read(name, value) for name, value in (("image", image), ("video", video))
                 if value is not None}
        options = {"height": height, "width": width, "frames": frames, "steps": steps, "seed": seed,
                   "cfg_scale": cfg_scale, "max_new_tokens": max_new_tokens}
        given = {name for name, value in options.items() if value is not None}
        request = GenerationRequest(task=task, prompt=prompt, **media, **{name: options[name] for name in given})
        try:
            tensors = request_to_tensors(request, only=given | set(media))
        except ValueError as err:
            raise LanceClientError(str(err), "INVALID_ARGUMENT") from None
        return self._stream(tensors, on_progress, timeout)

    def _stream(self, tensors: dict[str, np.ndarray], on_progress: ProgressCallback | None,
                timeout: float | None) -> GenerationResult:
        inputs = []
        for name, array in tensors.items():
            tensor = grpcclient.InferInput(name, list(array.shape), wire_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        events: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()

        # tritonclient calls the stream callback with keyword arguments (docs/design/serving.md §4.3)
        def callback(result: grpcclient.InferResult | None = None,
                     error: InferenceServerException | None = None) -> None:
            events.put((result, error))

        client = grpcclient.InferenceServerClient(self.url)
        settled = False  # FINAL or an error arrived: the server holds nothing for this request any more
        try:
            # No `triton_grpc_error` header: on Triton 2.51 an error response of a decoupled model on such a stream
            # can crash the server (seen in 7 of 10 runs). Errors then carry the server's message without a code.
            client.start_stream(callback=callback, stream_timeout=timeout)
            request_id = uuid.uuid4().hex
            log.debug("request %s to %s at %s", request_id, self.model, self.url)
            try:
                client.async_stream_infer(self.model, inputs, request_id=request_id, enable_empty_final_response=True)
            except InferenceServerException as err:
                # the stream died at once (e.g. nothing listens at the url); its cause comes through the callback
                settled = True
                with contextlib.suppress(queue.Empty):
                    err = events.get(timeout=_DEADLINE_GRACE_S)[1] or err
                raise _client_error(err) from None
            deadline = None if timeout is None else time.monotonic() + timeout + _DEADLINE_GRACE_S
            outputs: dict[str, Any] = {}
            timings: dict[str, float] = {}
            while not settled:
                wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    result, error = events.get(timeout=wait)
                except queue.Empty:
                    raise LanceClientError(f"no answer within {timeout} s", "DEADLINE_EXCEEDED") from None
                if error is not None:
                    settled = True
                    raise _client_error(error)
                assert result is not None, "stream callback without result or error"
                response = result.get_response()
                progress = result.as_numpy("progress") if _has_output(response, "progress") else None
                if progress is not None and on_progress is not None:
                    on_progress(int(progress[0]), int(progress[1]))
                for kind in registry.OUTPUT_KINDS:
                    if _has_output(response, kind):
                        value = result.as_numpy(kind)
                        outputs[kind] = _decode_text(value) if kind == "text" else value
                if _has_output(response, "timings"):
                    timings.update(json.loads(_decode_text(result.as_numpy("timings"))))
                settled = response.parameters["triton_final_response"].bool_param
        finally:
            # Cancel only a request that may still run (Ctrl-C, a raising callback, no answer in time). Cancelling a
            # stream whose request was refused by a full queue makes Triton 2.51 keep the model referenced: its
            # graceful shutdown then waits out --exit-timeout-secs (see runtime.serving.server).
            client.stop_stream(cancel_requests=not settled)
            client.close()
        if not outputs:
            raise LanceClientError(f"the server's final response carried none of {', '.join(registry.OUTPUT_KINDS)}",
                                   "INTERNAL")
        return GenerationResult(**outputs, timings=timings)


def _has_output(response: Any, name: str) -> bool:
    assert name in _OUTPUTS, f"{name} is not an output of model lance"
    return any(output.name == name for output in response.outputs)


def _decode_text(array: np.ndarray) -> str:
    value = array.reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as err:
        raise LanceClientError(f"the server's text is not UTF-8 (byte {err.start})", "INTERNAL") from None


# --- `lance-client` ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """`lance-client TASK`, a subcommand per registered task, with the generation flags of `lance-trt run`."""
    parser = argparse.ArgumentParser(prog="lance-client", description="Generate with a Lance Triton server.")
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC endpoint host:port (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds for the whole request (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_task_subcommands(parser)
    return parser


def _read(field: str, value: bytes | str | os.PathLike[str]) -> bytes:
    """A medium's bytes, read from its path unless given as bytes."""
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as err:
        raise LanceClientError(f"{field}: cannot read {value}: {err.strerror}") from None


def _error_line(err: LanceClientError, args: argparse.Namespace) -> str:
    """The error as the user typed the request: a refused image or video names the file given to ``--image`` or
    ``--video`` (the server knows only the field, ``image: ...``)."""
    field = next((name for name in registry.MEDIA if err.message.startswith(f"{name}: ")), None)
    if field is None or getattr(args, field) is None:
        return str(err)
    line = f"--{field} {getattr(args, field)}: {err.message.removeprefix(f'{field}: ')}"
    return f"{err.code}: {line}" if err.code else line


def main(argv: list[str] | None = None) -> int:
    """0 on success, 1 when the server refuses or fails the request, 2 for bad arguments, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_task_arguments(parser, args)
    for name in registry.MEDIA:
        if getattr(args, name) is not None and not getattr(args, name).is_file():
            parser.error(f"--{name}: {getattr(args, name)} is not a readable file")

    bar = ProgressBar("token" if registry.TASKS[args.task].output == "text" else "step", disable=args.quiet)
    try:
        result = LanceClient(args.url).generate(
            args.task, args.prompt, args.image, video=args.video, height=args.height, width=args.width,
            frames=args.frames,
            steps=args.steps,
            seed=args.seed, cfg_scale=args.cfg_scale, max_new_tokens=args.max_new_tokens,
            on_progress=bar.update, timeout=args.timeout,
        )
    except LanceClientError as err:
        bar.close()
        print(f"lance-client: {_error_line(err, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("lance-client: cancelled", file=sys.stderr)
        return 130
    bar.close()
    if result.text is not None:
        print(result.text)
        return 0
    kind = registry.TASKS[args.task].output
    pixels = getattr(result, kind)
    try:
        write_output(kind, pixels, args.output)
    except (OSError, ValueError) as err:
        print(f"lance-client: -o/--output: cannot write {args.output}: {err}", file=sys.stderr)
        return 1
    frames = f", {len(pixels)} frames" if kind == "video" else ""
    print(f"lance-client: wrote {args.output} ({pixels.shape[-2]}x{pixels.shape[-3]}{frames})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
