"""The video tasks on the tiny video checkpoint: t2v and i2v end to end in-process (PyTorch runner, CPU), the request
fields they add, the i2v first-frame rule, and the MP4 files the CLI writes. 256 px, 9 frames, 2 steps."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.spec.request import GenerationRequest, RequestError
from runtime.spec.video import read_frames, write_mp4

PROMPT = "a red kite over a green hill"


def _t2v(**options: object) -> GenerationRequest:
    return GenerationRequest("t2v", PROMPT, **{"height": 256, "width": 256, "frames": 9, "steps": 2, **options})


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_video_requests_take_their_defaults_and_refuse_bad_frames() -> None:
    video, image = GenerationRequest("t2v", PROMPT), GenerationRequest("t2i", PROMPT)
    assert (video.height, video.width, video.frames) == (480, 848, 49)       # upstream's README t2v, 13 latent frames
    assert (image.height, image.width) == (768, 768)
    for frames in (0, 2, 8, 125, True, 9.0):
        with pytest.raises(RequestError, match="frames"):
            _t2v(frames=frames).validate()
    assert _t2v(frames=121).validate().frames == 121


def test_t2v_is_deterministic_per_seed(video_pipeline) -> None:
    first = video_pipeline.generate(_t2v(seed=3))
    again = video_pipeline.generate(_t2v(seed=3))
    other = video_pipeline.generate(_t2v(seed=4))
    assert first.video.shape == (9, 256, 256, 3) and first.video.dtype == np.uint8
    np.testing.assert_array_equal(first.video, again.video)
    assert not np.array_equal(first.video, other.video)
    assert first.video.std() > 0 and {"prefill", "denoise", "vae_decode"} <= set(first.timings)


class _Recorder:
    """The real mot runner, keeping a copy of every noise-block query's latents and timesteps."""

    def __init__(self, runner) -> None:
        self.runner, self.spec, self.host_inputs = runner, runner.spec, runner.host_inputs
        self.queries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if feed["latents"].shape[1] and feed["timestep"].max() > 0:
            self.queries.append((feed["latents"].clone(), feed["timestep"].clone()))
        return self.runner.infer(feed)


def test_i2v_keeps_the_first_latent_frame_clean(video_pipeline) -> None:
    """Upstream's frame_condition_idx=[0]: latent frame 0 is the encoded image, enters every step at t = 0 and no step
    changes it; the other frames carry the step's flow time and move."""
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    request = GenerationRequest("i2v", PROMPT, image=_png(pixels), height=256, width=256, frames=9, steps=3, seed=5)
    recorder = _Recorder(video_pipeline.engines["mot"])
    video_pipeline.engines["mot"] = recorder
    try:
        result = video_pipeline.generate(request)
    finally:
        video_pipeline.engines["mot"] = recorder.runner
    assert result.video.shape == (9, 256, 256, 3)
    frame = 16 * 16                                    # one latent frame of a 256 x 256 video
    vae_pixels, _, _ = video_pipeline.image_inputs(request, 1.0, {})
    clean = video_pipeline.encode_reference(vae_pixels, request.seed)
    assert len(recorder.queries) == 3
    previous = None
    for latents, timestep in recorder.queries:
        assert latents.shape[1] == 3 * frame
        torch.testing.assert_close(latents[:, :frame], clean.expand(latents.shape[0], -1, -1), rtol=0, atol=0)
        assert torch.all(timestep[:, :frame] == 0) and torch.all(timestep[:, frame:] > 0)
        assert len(torch.unique(timestep[:, frame:])) == 1
        if previous is not None:
            assert not torch.equal(latents[:, frame:], previous[:, frame:])
        previous = latents


def test_video_tasks_need_the_video_model(torch_pipeline) -> None:
    with pytest.raises(RequestError, match="video model"):
        torch_pipeline.generate(_t2v())


def test_cli_writes_exactly_the_frames_at_12_fps(tiny_video_checkpoint: Path, tmp_path: Path) -> None:
    import av

    from runtime.cli import main

    out = tmp_path / "kite.mp4"
    assert main(["run", "t2v", "--checkpoint", str(tiny_video_checkpoint), "--prompt", PROMPT, "--height", "256",
                 "--width", "256", "--frames", "5", "--steps", "1", "-o", str(out)]) == 0
    assert read_frames(out).shape == (5, 256, 256, 3)
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == 12


def test_mp4_round_trip_and_refusals(tmp_path: Path) -> None:
    gradient = np.broadcast_to(np.linspace(0, 255, 96).astype(np.uint8)[None, None, :, None], (5, 64, 96, 3))
    write_mp4(tmp_path / "g.mp4", np.ascontiguousarray(gradient))
    back = read_frames(tmp_path / "g.mp4")
    assert back.shape == gradient.shape and np.abs(back.astype(int) - gradient).max() <= 3
    with pytest.raises(ValueError, match="even sides"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((1, 63, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "float.mp4", np.zeros((1, 64, 64, 3), np.float32))
