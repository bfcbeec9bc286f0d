"""The video tasks through a real tritonserver (CPU set, ONNX Runtime) on the tiny video model's repository
(``lance-trt export --video``, ``lance-trt repo --video``), called with the product's gRPC client: each result equals
the in-process pipeline's on the same graphs, and bad video inputs come back as errors naming the field. 256 px, 9
frames, 2 steps."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from runtime.client import LanceClient, LanceClientError
from runtime.pipeline import LancePipeline
from runtime.serving.server import TritonServer
from runtime.spec.request import GenerationRequest
from runtime.spec.video import write_mp4
from tests.triton_harness import requires_triton, served

pytestmark = [pytest.mark.triton, requires_triton]
OPTIONS = {"height": 256, "width": 256, "steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def server(tiny_video_checkpoint: Path, video_engine_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with served(video_engine_dir, tiny_video_checkpoint, tmp_path_factory.mktemp("triton_video") / "repo",
                video=True) as server:
        yield server


@pytest.fixture(scope="module")
def local(tiny_video_checkpoint: Path, video_engine_dir: Path) -> LancePipeline:
    return LancePipeline.from_checkpoint(tiny_video_checkpoint, runner="onnxruntime", engine_dir=video_engine_dir,
                                         video=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    frames = np.random.default_rng(2).integers(0, 256, (12, 64, 96, 3), dtype=np.uint8)   # 1 s at 12 fps
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_mp4(path, frames)
    return path.read_bytes()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("task", ["t2v", "i2v", "video-edit", "x2t-video"])
def test_served_video_tasks_equal_the_local_pipeline(server: TritonServer, local: LancePipeline, clip: bytes,
                                                     task: str) -> None:
    fields = {"t2v": dict(frames=9, **OPTIONS), "i2v": dict(image=_png(), frames=9, **OPTIONS),
              "video-edit": dict(video=clip, **OPTIONS), "x2t-video": dict(video=clip, max_new_tokens=3)}[task]
    name = "x2t" if task == "x2t-video" else task
    expected = local.generate(GenerationRequest(name, "a kite in the wind", **fields))
    progress: list[tuple[int, int]] = []
    got = LanceClient(server.grpc_url).generate(name, "a kite in the wind", **fields,
                                                on_progress=lambda done, total: progress.append((done, total)))
    if name == "x2t":
        assert got.text == expected.text
        return
    assert got.video.shape == expected.video.shape and got.video.shape[1:] in ((256, 256, 3), (224, 304, 3))
    np.testing.assert_array_equal(got.video, expected.video)
    assert progress[-1] == (2, 2) and {"denoise", "vae_decode"} <= set(got.timings)


@pytest.mark.parametrize("task, fields, words", [
    ("x2t", dict(video=b"\x00\x00\x00\x18ftypisom" + bytes(100)), "video: not a decodable"),
    ("video-edit", dict(video=b"not a video"), "video: not a decodable"),
    ("video-edit", dict(video=None), "video: required for video-edit"),
    ("t2v", dict(frames=8), "frames: must be 4k+1"),
    ("t2v", dict(frames=125), "frames: must be 4k+1"),
    ("t2v", dict(height=250), "height: must be a multiple of 16"),
], ids=["x2t-junk-mp4", "edit-not-a-video", "edit-without-video", "frames-8", "frames-125", "height-250"])
def test_bad_video_inputs_are_refused(server: TritonServer, clip: bytes, task: str, fields: dict,
                                      words: str) -> None:
    fields = {"video": clip, "max_new_tokens": 2} | fields if task == "x2t" else fields
    if "video" in fields and fields["video"] is None:
        fields.pop("video")
    client = LanceClient(server.grpc_url)
    with pytest.raises(LanceClientError, match=re.escape(words)):
        client.generate(task, "x", **fields, steps=1, timeout=60)


def test_truncated_video_is_refused_and_the_server_keeps_serving(server: TritonServer, clip: bytes) -> None:
    client = LanceClient(server.grpc_url)
    with pytest.raises(LanceClientError, match="video: ") as caught:
        client.generate("x2t", "what?", video=clip[: len(clip) // 2], max_new_tokens=2)
    assert "<_io." not in str(caught.value)
    assert client.generate("x2t", "what?", video=clip, max_new_tokens=2).text is not None
