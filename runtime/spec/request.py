"""The wire format of model ``lance``: its request and response tensors, a request and its result as dataclasses,
validation, and the conversion from and to the request tensors.

The CLI, the pipeline, the BLS model and the gRPC client share this module, so it imports numpy and the standard
library only. Which inputs exist, which task needs which medium and which outputs a task sends all derive from
`runtime.spec.registry`; every limit is in `runtime.spec.limits`. Validation rejects, it never rounds or clamps: every
error is a ``RequestError`` naming the field, the allowed values and what was received.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from runtime.spec import constants, registry
from runtime.spec.contract import DType, TensorSpec
from runtime.spec.limits import (
    CFG_SCALE_RANGE,
    DEFAULT_FRAMES,
    FRAMES_STEP,
    MAX_FRAMES,
    MAX_IMAGE_BYTES,
    MAX_VIDEO_BYTES,
    MAX_NEW_TOKENS_RANGE,
    MAX_PROMPT_CHARS,
    MAX_VIDEO_AREA,
    MAX_SIZE,
    MIN_SIZE,
    SEED_MAX,
    SIZE_MULTIPLE,
    STEPS_RANGE,
)


def _tasks_doc(field: str) -> str:
    *rest, last = registry.tasks_taking(field)
    return f"{', '.join(rest)} and {last}" if rest else last


def _video_default(field: str) -> str:
    """The tasks whose own default of ``field`` differs from the request's, for the interface docs."""
    own = {task.name: dict(task.defaults)[field] for task in registry.TASKS.values() if field in dict(task.defaults)}
    return "".join(f"; {name}: {value} by default" for name, value in own.items())


# --- Request and response tensors (stable: new optional inputs/outputs may be added) ---------------------------

LANCE_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("task", DType.BYTES, (1,), "one of: " + ", ".join(registry.TASKS)),
    TensorSpec("prompt", DType.BYTES, (1,), "UTF-8 " + ", ".join(f"{t.prompt} ({t.name})"
                                                                  for t in registry.TASKS.values())),
    TensorSpec("image", DType.BYTES, (1,), f"encoded PNG or JPEG, for {_tasks_doc('image')}", optional=True),
    TensorSpec("video", DType.BYTES, (1,), f"encoded video file (MP4, WebM, ...), at most {MAX_VIDEO_BYTES >> 20} MiB, "
               f"for {_tasks_doc('video')}; sampled at 12 fps over at most 6 s", optional=True),
    TensorSpec("height", DType.INT64, (1,), f"output height, multiple of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}]"
               f"{_video_default('height')}", optional=True),
    TensorSpec("width", DType.INT64, (1,), f"output width, multiple of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}]"
               f"{_video_default('width')}", optional=True),
    TensorSpec("frames", DType.INT64, (1,), f"{_tasks_doc('frames')} frame count, {FRAMES_STEP}k+1 in [1, {MAX_FRAMES}] "
               f"(default {DEFAULT_FRAMES})", optional=True),
    TensorSpec("steps", DType.INT64, (1,), f"denoising steps in [{STEPS_RANGE[0]}, {STEPS_RANGE[1]}]", optional=True),
    TensorSpec("seed", DType.INT64, (1,), "noise seed in [0, 2**32-1]", optional=True),
    TensorSpec("max_new_tokens", DType.INT64, (1,),
               f"{_tasks_doc('max_new_tokens')} answer budget in [{MAX_NEW_TOKENS_RANGE[0]}, {MAX_NEW_TOKENS_RANGE[1]}]",
               optional=True),
    TensorSpec("cfg_scale", DType.FP32, (1,), f"text guidance scale in [{CFG_SCALE_RANGE[0]:g}, {CFG_SCALE_RANGE[1]:g}]",
               optional=True),
)

_OUTPUT_OF_KIND = {
    "image": TensorSpec("image", DType.UINT8, ("H", "W", 3), "generated image, final response"),
    "text": TensorSpec("text", DType.BYTES, (1,), "UTF-8 answer, final response"),
    "video": TensorSpec("video", DType.UINT8, ("T", "H", "W", 3), "generated frames, final response"),
}

LANCE_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("progress", DType.INT64, (2,), "(done, total) per denoise step or generated token"),
    *(_OUTPUT_OF_KIND[kind] for kind in registry.OUTPUT_KINDS),
    # Triton 2.51's Python backend cannot attach response parameters, so per-stage timings travel as a tensor.
    TensorSpec("timings", DType.BYTES, (1,), "JSON object of per-stage seconds, final response"),
)


def by_name(specs: tuple[TensorSpec, ...]) -> Mapping[str, TensorSpec]:
    """Index a spec tuple by tensor name."""
    return {spec.name: spec for spec in specs}


ProgressCallback = Callable[[int, int], None]
"""``on_progress(done, total)``: called after each denoise step or generated token."""


class RequestError(ValueError):
    """A request field is missing or invalid. ``str()`` is ``"<field>: <message>"``.

    Attributes:
        field: the request field (a ``LANCE_INPUTS`` name) at fault.
        message: what is allowed and what was received.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Cancelled(Exception):
    """The client cancelled the request; raised by the pipeline between denoise steps or generated tokens."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, prefixed with its type: what an INTERNAL error tells the client."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@dataclass(frozen=True)
class GenerationRequest:
    """One Lance request. Defaults are upstream's (``constants``); ``validate()`` checks every field.

    Attributes:
        task: one of ``registry.TASKS``.
        prompt: the prompt, question or instruction (`registry.Task.prompt`); UTF-8 text.
        image: the encoded input image (PNG or JPEG bytes) for the tasks that take one; None otherwise.
        video: the encoded input video for the tasks that take one; None otherwise. A task that lists media takes
            exactly one of them (x2t: an image or a video).
        height, width: output size in pixels; None takes the task's default (`registry.Task.defaults`), else
            upstream's 768.
        frames: frames of a generated video, ``4k + 1``.
        steps: denoising steps (t2i, edit).
        seed: seed of the initial noise.
        max_new_tokens: answer budget (x2t).
        cfg_scale: text classifier-free guidance scale (t2i, edit).

    Fields are in `LANCE_INPUTS` order and carry its names.
    """

    task: str
    prompt: str
    image: bytes | None = None
    video: bytes | None = None
    height: int | None = None
    width: int | None = None
    frames: int = DEFAULT_FRAMES
    steps: int = constants.DEFAULT_STEPS
    seed: int = constants.DEFAULT_SEED
    max_new_tokens: int = constants.DEFAULT_MAX_NEW_TOKENS
    cfg_scale: float = constants.DEFAULT_CFG_SCALE

    def __post_init__(self) -> None:
        task = registry.TASKS.get(self.task) if isinstance(self.task, str) else None
        defaults = dict(task.defaults) if task is not None else {}
        for name, default in (("height", constants.DEFAULT_HEIGHT), ("width", constants.DEFAULT_WIDTH)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults.get(name, default))

    @property
    def media(self) -> tuple[str, ...]:
        """The media fields this request carries, in `registry.MEDIA` order."""
        return tuple(name for name in registry.MEDIA if getattr(self, name) is not None)

    def validate(self) -> GenerationRequest:
        """Check every field; returns ``self`` so calls chain.

        Raises:
            RequestError: the first invalid field, in declaration order.
        """
        if not isinstance(self.task, str) or self.task not in registry.TASKS:
            raise RequestError("task", f"must be one of {', '.join(registry.TASKS)}; got {self.task!r}")
        if not isinstance(self.prompt, str):
            raise RequestError("prompt", f"must be text, got {type(self.prompt).__name__}")
        if not any(unicodedata.category(c)[0] not in "ZC" for c in self.prompt):
            # blank, or only spaces, control and format characters (zero-width spaces and joiners)
            raise RequestError("prompt", "must contain visible characters")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise RequestError("prompt", f"at most {MAX_PROMPT_CHARS} characters, got {len(self.prompt)}")
        self._validate_media()
        for name in ("height", "width"):
            value = _integer(name, getattr(self, name))
            if not (MIN_SIZE <= value <= MAX_SIZE and value % SIZE_MULTIPLE == 0):
                raise RequestError(name, f"must be a multiple of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}], got {value}")
        if registry.TASKS[self.task].output == "video" and self.height * self.width > MAX_VIDEO_AREA:
            raise RequestError("height", f"{self.task} makes videos of at most {MAX_VIDEO_AREA} pixels per frame (640 x 640 "
                               f"area, e.g. 480 x 848), got {self.height} x {self.width} = {self.height * self.width}")
        frames = _integer("frames", self.frames)
        if not (1 <= frames <= MAX_FRAMES and (frames - 1) % FRAMES_STEP == 0):
            raise RequestError("frames", f"must be {FRAMES_STEP}k+1 in [1, {MAX_FRAMES}] (1, 5, 9, ..., {MAX_FRAMES}), "
                                         f"got {frames}")
        _check_range("steps", _integer("steps", self.steps), STEPS_RANGE)
        _check_range("seed", _integer("seed", self.seed), (0, SEED_MAX))
        _check_range("max_new_tokens", _integer("max_new_tokens", self.max_new_tokens), MAX_NEW_TOKENS_RANGE)
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float, np.floating)):
            raise RequestError("cfg_scale", f"must be a number, got {type(self.cfg_scale).__name__}")
        low, high = CFG_SCALE_RANGE
        if not (math.isfinite(self.cfg_scale) and low <= self.cfg_scale <= high):
            raise RequestError("cfg_scale", f"must be a finite number in [{low:g}, {high:g}], got {self.cfg_scale!r}")
        return self

    def _validate_media(self) -> None:
        """A task that lists media takes exactly one of them; a medium it does not list is refused."""
        task = registry.TASKS[self.task]
        given = self.media
        for name in given:
            if name not in task.media:
                raise RequestError(name, f"only {_tasks_doc(name)} take {_ARTICLE[name]}; {self.task} does not")
        if task.media and not given:
            wanted = " or ".join(f"{_ARTICLE[name]} ({_MEDIUM_FORMATS[name]})" for name in task.media)
            raise RequestError(task.media[0], f"required for {self.task}: {wanted}")
        if len(given) > 1:
            raise RequestError(given[1], f"{self.task} takes one of {' and '.join(task.media)}, got both")
        for name in given:
            _check_encoded(name, getattr(self, name), _MAX_BYTES[name])


_ARTICLE = {"image": "an image", "video": "a video"}
_MEDIUM_FORMATS = {"image": "an encoded PNG or JPEG", "video": "an encoded video file"}
_MAX_BYTES = {"image": MAX_IMAGE_BYTES, "video": MAX_VIDEO_BYTES}


def _check_encoded(name: str, value: object, max_bytes: int) -> None:
    if not isinstance(value, bytes):
        raise RequestError(name, f"must be the encoded file as bytes, got {type(value).__name__}")
    if not value:
        raise RequestError(name, "is empty")
    if len(value) > max_bytes:
        raise RequestError(name, f"at most {max_bytes} bytes encoded, got {len(value)}")


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RequestError(name, f"must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise RequestError(name, f"must be in [{bounds[0]}, {bounds[1]}], got {value}")


@dataclass(frozen=True)
class GenerationResult:
    """What a request produced: an image (t2i, edit), a text answer (x2t) or a video (t2v, i2v), and per-stage timings.

    Attributes:
        image: (H, W, 3) uint8 RGB, or None.
        video: (T, H, W, 3) uint8 RGB frames, or None.
        text: the decoded answer, or None.
        token_ids: the generated token ids of an x2t answer (without the end token), or None.
        timings: seconds per pipeline stage, e.g. ``{"prefill": 0.12, "denoise": 3.4, "vae_decode": 0.2}``.
    """

    image: np.ndarray | None = None
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    video: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if sum(getattr(self, kind) is not None for kind in registry.OUTPUT_KINDS) != 1:
            raise ValueError(f"a GenerationResult holds exactly one of {', '.join(registry.OUTPUT_KINDS)}")
        for kind, rank in (("image", 3), ("video", 4)):
            pixels = getattr(self, kind)
            if pixels is not None and (pixels.dtype != np.uint8 or pixels.ndim != rank or pixels.shape[-1] != 3):
                raise ValueError(f"{kind} must be ({'T, ' * (rank - 3)}H, W, 3) uint8, got {pixels.shape} "
                                 f"{pixels.dtype}")


# --- Triton request tensors ------------------------------------------------------------------------------------

_INPUTS = by_name(LANCE_INPUTS)
_REQUIRED = tuple(spec.name for spec in LANCE_INPUTS if not spec.optional)


def wire_dtype(dtype: np.dtype) -> str:
    """Triton's wire name of a numpy dtype (``INT64``, ``FP32``, ``BYTES``, ...), for error messages."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.kind == "f":
        return f"FP{dtype.itemsize * 8}"
    return dtype.name.upper()


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype} [{', '.join(str(d) for d in shape)}]"


def request_from_tensors(inputs: Mapping[str, np.ndarray]) -> GenerationRequest:
    """Build and validate a request from the tensors of one Triton request.

    Args:
        inputs: tensor name -> array as ``pb_utils.Tensor.as_numpy()`` gives it: BYTES as an object array of
            ``bytes``, INT64 as int64, FP32 as float32; each of shape [1]. Absent optional inputs take the defaults.

    Raises:
        RequestError: an unknown or missing input, a wrong dtype or shape, text that is not UTF-8, or a field that
            fails ``GenerationRequest.validate``.
    """
    for name in inputs:
        if name not in _INPUTS:
            raise RequestError(name, f"unknown input; the inputs are {', '.join(_INPUTS)}")
    for name in _REQUIRED:
        if name not in inputs:
            raise RequestError(name, "required input is missing")
    values = {name: _scalar(_INPUTS[name], np.asarray(array)) for name, array in inputs.items()}
    return GenerationRequest(**values).validate()


def _scalar(spec: TensorSpec, array: np.ndarray) -> object:
    """The Python value of a one-element request tensor, after dtype, shape and UTF-8 checks."""
    expected = spec.dtype.numpy
    ok_dtype = array.dtype.kind in "OS" if spec.dtype is DType.BYTES else array.dtype == expected
    if not ok_dtype or array.shape != spec.shape:
        raise RequestError(spec.name, f"expected {_describe(wire_dtype(np.dtype(expected)), spec.shape)}, "
                                      f"got {_describe(wire_dtype(array.dtype), array.shape)}")
    value = array.reshape(-1)[0]
    if spec.dtype is DType.INT64:
        return int(value)
    if spec.dtype is DType.FP32:
        return float(value)
    assert spec.dtype is DType.BYTES, f"no conversion for {spec.dtype}"
    if not isinstance(value, bytes):
        raise RequestError(spec.name, f"expected bytes in a BYTES tensor, got {type(value).__name__}")
    if spec.name in registry.MEDIA:
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(spec.name, f"not valid UTF-8 (byte {err.start})") from None


def request_to_tensors(request: GenerationRequest, *, only: set[str] | None = None) -> dict[str, np.ndarray]:
    """The Triton input tensors of ``request`` (the inverse of ``request_from_tensors``).

    Args:
        request: the request; not validated here (the server validates).
        only: names of the optional inputs to send (None: all that are set); required inputs are always sent.
    """
    tensors: dict[str, np.ndarray] = {}
    for spec in LANCE_INPUTS:
        value = getattr(request, spec.name)
        if value is None or (spec.optional and only is not None and spec.name not in only):
            continue
        if spec.dtype is DType.BYTES:
            if not isinstance(value, (bytes, str)):
                raise RequestError(spec.name, f"expected text or bytes, got {type(value).__name__}")
            data = value.encode("utf-8") if isinstance(value, str) else value
            tensors[spec.name] = np.array([data], dtype=np.object_)
        else:
            try:
                tensors[spec.name] = np.array([value], dtype=spec.dtype.numpy)
            except (OverflowError, TypeError, ValueError):
                raise RequestError(spec.name, f"{value!r} does not fit "
                                              f"{wire_dtype(np.dtype(spec.dtype.numpy))}") from None
    return tensors
