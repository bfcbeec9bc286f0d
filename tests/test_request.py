"""runtime.spec.request: defaults, every rejection names its field, and the tensor conversion round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.spec import constants, registry
from runtime.spec import request as request_spec
from runtime.spec.request import (
    MAX_IMAGE_BYTES,
    MAX_PROMPT_CHARS,
    SEED_MAX,
    GenerationRequest,
    GenerationResult,
    RequestError,
    request_from_tensors,
    request_to_tensors,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32  # content is not decoded here (runtime.pipeline.preprocess does that)


def _tensors(**overrides: object) -> dict[str, np.ndarray]:
    """A valid t2i request as tensors, with some tensors replaced (None removes one)."""
    tensors = request_to_tensors(GenerationRequest(task="t2i", prompt="a red fox"))
    for name, value in overrides.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    return tensors


def _bytes(value: bytes) -> np.ndarray:
    return np.array([value], dtype=np.object_)


def test_defaults_are_upstreams() -> None:
    request = GenerationRequest(task="t2i", prompt="a red fox")
    assert (request.height, request.width) == (768, 768)
    assert (request.steps, request.cfg_scale, request.seed, request.max_new_tokens) == (30, 4.0, 42, 256)
    assert (request.steps, request.cfg_scale, request.seed) == (
        constants.DEFAULT_STEPS, constants.DEFAULT_CFG_SCALE, constants.DEFAULT_SEED)
    assert request.image is None
    assert request.validate() is request


def test_fields_equal_contract_inputs() -> None:
    assert [f.name for f in dataclasses.fields(GenerationRequest)] == [s.name for s in request_spec.LANCE_INPUTS]


def test_minimal_tensors_take_defaults() -> None:
    request = request_from_tensors({"task": _bytes(b"t2i"), "prompt": _bytes("un renard roux \u00e9".encode())})
    assert request == GenerationRequest(task="t2i", prompt="un renard roux \u00e9")


def test_round_trip_every_field() -> None:
    request = GenerationRequest(task="edit", prompt="make it night", image=PNG, height=512, width=1024, steps=12,
                                seed=SEED_MAX, cfg_scale=7.5, max_new_tokens=9)
    tensors = request_to_tensors(request)
    assert set(tensors) == {s.name for s in request_spec.LANCE_INPUTS} - {"video"}      # an edit takes no video
    for spec in request_spec.LANCE_INPUTS:
        if spec.name in tensors:
            assert tensors[spec.name].dtype == spec.dtype.numpy and tensors[spec.name].shape == spec.shape
    assert request_from_tensors(tensors) == request
    video = GenerationRequest(task="x2t", prompt="what happens?", video=b"\x00\x00\x00\x18ftypmp42", max_new_tokens=3)
    assert request_from_tensors(request_to_tensors(video)) == video


def test_to_tensors_only_sends_chosen_options() -> None:
    tensors = request_to_tensors(GenerationRequest(task="t2i", prompt="x", steps=5), only={"steps"})
    assert set(tensors) == {"task", "prompt", "steps"}


@pytest.mark.parametrize("boundary", [
    dict(height=256, width=1024), dict(height=1024, width=256), dict(steps=1), dict(steps=200), dict(seed=0),
    dict(seed=SEED_MAX), dict(cfg_scale=1.0), dict(cfg_scale=20.0), dict(max_new_tokens=1), dict(max_new_tokens=2048),
])
def test_boundaries_accepted(boundary: dict) -> None:
    GenerationRequest(task="t2i", prompt="p", **boundary).validate()


TASK_LIST = ", ".join(registry.TASKS)

# (field the error must name, words the message must contain, request fields)
BAD_REQUESTS = [
    ("task", TASK_LIST, dict(task="v2t")),
    ("task", TASK_LIST, dict(task="")),
    ("prompt", "visible characters", dict(prompt="")),
    ("prompt", "visible characters", dict(prompt=" \n\t ")),
    ("prompt", "visible characters", dict(prompt="\u200b\u200c\u200d\u2060\ufeff \u00ad")),
    ("prompt", f"at most {MAX_PROMPT_CHARS}", dict(prompt="a" * (MAX_PROMPT_CHARS + 1))),
    ("prompt", "text", dict(prompt=b"bytes")),
    ("height", "multiple of 16 in [256, 1024]", dict(height=700)),
    ("height", "multiple of 16 in [256, 1024]", dict(height=240)),
    ("width", "multiple of 16 in [256, 1024]", dict(width=1040)),
    ("width", "multiple of 16 in [256, 1024]", dict(width=0)),
    ("width", "integer", dict(width=768.0)),
    ("height", "integer", dict(height=True)),
    ("steps", "[1, 200]", dict(steps=0)),
    ("steps", "[1, 200]", dict(steps=201)),
    ("seed", f"[0, {SEED_MAX}]", dict(seed=-1)),
    ("seed", f"[0, {SEED_MAX}]", dict(seed=SEED_MAX + 1)),
    ("cfg_scale", "finite number in [1, 20]", dict(cfg_scale=float("nan"))),
    ("cfg_scale", "finite number in [1, 20]", dict(cfg_scale=float("inf"))),
    ("cfg_scale", "finite number in [1, 20]", dict(cfg_scale=0.5)),
    ("cfg_scale", "finite number in [1, 20]", dict(cfg_scale=20.5)),
    ("cfg_scale", "number", dict(cfg_scale="4")),
    ("max_new_tokens", "[1, 2048]", dict(max_new_tokens=0)),
    ("max_new_tokens", "[1, 2048]", dict(max_new_tokens=4096)),
    ("image", "required for x2t", dict(task="x2t")),
    ("image", "required for edit", dict(task="edit")),
    ("image", "t2i does not", dict(image=PNG)),
    ("image", "empty", dict(task="x2t", image=b"")),
    ("image", f"at most {MAX_IMAGE_BYTES} bytes", dict(task="edit", image=b"\0" * (MAX_IMAGE_BYTES + 1))),
    ("image", "bytes", dict(task="x2t", image="photo.png")),
]


@pytest.mark.parametrize("field, words, fields", BAD_REQUESTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_REQUESTS)])
def test_validate_rejects(field: str, words: str, fields: dict) -> None:
    request = GenerationRequest(**{"task": "t2i", "prompt": "a red fox", **fields})
    with pytest.raises(RequestError) as caught:
        request.validate()
    assert caught.value.field == field
    assert words in caught.value.message
    assert str(caught.value) == f"{field}: {caught.value.message}"
    assert isinstance(caught.value, ValueError)


def test_rejects_rather_than_rounds() -> None:
    with pytest.raises(RequestError, match="height: .* got 770"):
        GenerationRequest(task="t2i", prompt="p", height=770).validate()


# (field, expected message fragment, tensor overrides)
BAD_TENSORS = [
    ("colour", "unknown input; the inputs are task, prompt, image", dict(colour=_bytes(b"red"))),
    ("task", "required input is missing", dict(task=None)),
    ("prompt", "required input is missing", dict(prompt=None)),
    ("prompt", "not valid UTF-8 (byte 2)", dict(prompt=_bytes(b"ab\xff\xfe"))),
    ("task", "not valid UTF-8", dict(task=_bytes(b"\xc3"))),
    ("steps", "expected INT64 [1], got FP32 [1]", dict(steps=np.array([30.0], np.float32))),
    ("seed", "expected INT64 [1], got INT32 [1]", dict(seed=np.array([1], np.int32))),
    ("seed", "expected INT64 [1], got INT64 [2]", dict(seed=np.array([1, 2], np.int64))),
    ("height", "expected INT64 [1], got INT64 []", dict(height=np.array(512, np.int64))),
    ("cfg_scale", "expected FP32 [1], got FP64 [1]", dict(cfg_scale=np.array([4.0], np.float64))),
    ("prompt", "expected BYTES [1], got BYTES [1, 1]", dict(prompt=np.array([[b"x"]], np.object_))),
    ("prompt", "expected BYTES [1], got INT64 [1]", dict(prompt=np.array([7], np.int64))),
    ("prompt", "expected bytes in a BYTES tensor, got str", dict(prompt=np.array(["x"], np.object_))),
    ("cfg_scale", "finite number", dict(cfg_scale=np.array([np.nan], np.float32))),
    ("width", "multiple of 16", dict(width=np.array([777], np.int64))),
    ("task", f"must be one of {TASK_LIST}; got 'T2I'", dict(task=_bytes(b"T2I"))),
    ("image", "required for x2t", dict(task=_bytes(b"x2t"))),
    ("prompt", "visible characters", dict(prompt=_bytes(b"   "))),
    ("seed", "[0, 4294967295]", dict(seed=np.array([-5], np.int64))),
]


@pytest.mark.parametrize("field, words, overrides", BAD_TENSORS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_TENSORS)])
def test_from_tensors_rejects(field: str, words: str, overrides: dict) -> None:
    with pytest.raises(RequestError) as caught:
        request_from_tensors(_tensors(**overrides))
    assert caught.value.field == field
    assert words in caught.value.message


def test_to_tensors_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(RequestError, match="seed: .* does not fit INT64"):
        request_to_tensors(GenerationRequest(task="t2i", prompt="p", seed=2**70))


def test_result_holds_exactly_one_output() -> None:
    image = np.zeros((256, 272, 3), np.uint8)
    assert GenerationResult(image=image).image is image
    assert GenerationResult(text="a fox", token_ids=(1, 2)).timings == {}
    with pytest.raises(ValueError, match="exactly one"):
        GenerationResult()
    with pytest.raises(ValueError, match="exactly one"):
        GenerationResult(image=image, text="x")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        GenerationResult(image=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        GenerationResult(image=np.zeros((4, 4), np.uint8))
