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


def test_video_bounds_size_the_engine_profiles() -> None:
    """The profiles' video maxima are exactly what the largest valid requests make: 121 frames of the largest bucket
    at the 640 x 640 area (t2v, i2v, video edit), and 73 sampled frames (37 pairs) of the largest ViT bucket at 616."""
    from runtime.pipeline.preprocess import bucket_table
    from runtime.spec import contract, limits

    assert max(h * w for h, w in bucket_table(640)) // 16**2 * 31 == contract.MAX_VIDEO_LATENT_TOKENS
    assert max((h // 28) * (w // 28) for h, w in bucket_table(616)) * 37 == contract.MAX_VIDEO_VIT_ROWS
    assert limits.MAX_INPUT_FRAMES == 73 and (limits.MAX_INPUT_FRAMES + 1) // 2 == 37
    for name in ("t2v", "i2v", "video-edit"):
        with pytest.raises(RequestError, match="at most 409600 pixels per frame") as caught:
            GenerationRequest(name, PROMPT, height=768, width=768, image=b"x" if name == "i2v" else None,
                              video=b"x" if name == "video-edit" else None).validate()
        assert caught.value.field == "height"


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


def _generate_recording(pipeline, request: GenerationRequest):
    """The result of ``request`` and its denoise queries' (latents, timestep), recorded around the real mot runner."""
    recorder = _Recorder(pipeline.engines["mot"])
    pipeline.engines["mot"] = recorder
    try:
        return pipeline.generate(request), recorder.queries
    finally:
        pipeline.engines["mot"] = recorder.runner


def test_i2v_keeps_the_first_latent_frame_clean(video_pipeline) -> None:
    """Upstream's frame_condition_idx=[0]: latent frame 0 is the encoded image, enters every step at t = 0 and no step
    changes it; the other frames carry the step's flow time and move."""
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    request = GenerationRequest("i2v", PROMPT, image=_png(pixels), height=256, width=256, frames=9, steps=3, seed=5)
    result, queries = _generate_recording(video_pipeline, request)
    assert result.video.shape == (9, 256, 256, 3)
    frame = 16 * 16                                    # one latent frame of a 256 x 256 video
    vae_pixels, _, _ = video_pipeline.media_inputs(request, 1.0, {})
    clean = video_pipeline.encode_reference(vae_pixels, request.seed)
    assert len(queries) == 3
    previous = None
    for latents, timestep in queries:
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


# --- x2t on a video --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """2 s of random 96 x 64 frames at 12 fps, as H.264 MP4."""
    frames = np.random.default_rng(1).integers(0, 256, (24, 64, 96, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_mp4(path, frames)
    return path.read_bytes()


def test_frames_are_sampled_as_upstream() -> None:
    """Upstream's MultiClipsFrameSampler at inference (12 fps, at most 6 s, 4k+1 frames spread over the whole video,
    floored): worked by hand from its code for these cases."""
    from runtime.pipeline.preprocess import sample_frame_indices

    assert sample_frame_indices(24, 12) == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 23]
    ten_seconds = sample_frame_indices(240, 24)          # capped at 6 s: 72 -> 69 frames, over all 10 s
    assert len(ten_seconds) == 69 and ten_seconds[:4] == [0, 3, 7, 10] and ten_seconds[-1] == 239
    assert sample_frame_indices(7, 24) == [0]             # round(3.5) = 4 -> 1 frame
    assert len(sample_frame_indices(100, 25)) == 45       # 4 s: 48 -> 45
    with pytest.raises(ValueError, match="too short"):
        sample_frame_indices(1, 24)


def test_vit_per_frame_pair_is_the_whole_video(video_pipeline, clip: bytes) -> None:
    """The tower attends within a temporal patch only, so one call per frame pair equals one call over the video."""
    from runtime.models.vit import vision_inputs
    from runtime.pipeline.preprocess import load_video, vit_video_input

    pairs, grid = vit_video_input(load_video(clip)[:4])
    assert grid[0] == 2 and all(p.shape == pairs[0].shape for p in pairs)
    vit, config = video_pipeline.engines["vit"].module, video_pipeline.host.vision_config
    with torch.no_grad():
        whole = vit(torch.cat(pairs), **vision_inputs(grid, config).engine_inputs())
    torch.testing.assert_close(video_pipeline.vit_video(pairs, grid)[0], whole, rtol=1e-5, atol=1e-5)


def test_x2t_on_a_video_is_deterministic(video_pipeline, clip: bytes) -> None:
    request = GenerationRequest("x2t", "What happens in the video?", video=clip, max_new_tokens=4)
    first, again = video_pipeline.generate(request), video_pipeline.generate(request)
    assert first.text == again.text and first.token_ids == again.token_ids and len(first.token_ids) <= 4
    assert {"vit", "prefill", "decode_text"} <= set(first.timings)


@pytest.mark.parametrize("changes, field, words", [
    (dict(video=b"\x00\x00\x00\x18ftypmp42 not really"), "video", "not a decodable MP4"),
    (dict(video=b"RIFF" + bytes(64)), "video", "not a decodable"),
    (dict(video=b""), "video", "is empty"),
    (dict(image=_png(np.zeros((32, 32, 3), np.uint8))), "video", "got both"),
    (dict(task="t2i"), "video", "only x2t and video-edit take a video"),
], ids=["mp4-header-only", "avi-header-only", "empty", "image-and-video", "video-for-t2i"])
def test_bad_videos_are_refused(video_pipeline, clip: bytes, changes: dict, field: str, words: str) -> None:
    fields = {"task": "x2t", "prompt": "what?", "video": clip, "max_new_tokens": 2} | changes
    with pytest.raises(RequestError, match=words) as caught:
        video_pipeline.generate(GenerationRequest(**fields))
    assert caught.value.field == field


def test_video_over_the_cap_is_refused_before_decoding() -> None:
    from runtime.spec.limits import MAX_VIDEO_BYTES

    with pytest.raises(RequestError, match=f"at most {MAX_VIDEO_BYTES} bytes") as caught:
        GenerationRequest("x2t", "what?", video=bytes(MAX_VIDEO_BYTES + 1)).validate()
    assert caught.value.field == "video"


def test_truncated_video_is_refused(video_pipeline, clip: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        video_pipeline.generate(GenerationRequest("x2t", "what?", video=clip[: len(clip) // 2], max_new_tokens=2))
    assert caught.value.field == "video" and "<_io." not in caught.value.message


def test_x2t_on_a_video_needs_the_video_model(torch_pipeline, clip: bytes) -> None:
    with pytest.raises(RequestError, match="needs the video model") as caught:
        torch_pipeline.generate(GenerationRequest("x2t", "what?", video=clip, max_new_tokens=2))
    assert caught.value.field == "video"


def test_cli_answers_about_a_video(tiny_video_checkpoint: Path, clip: bytes, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import main

    (tmp_path / "clip.mp4").write_bytes(clip)
    assert main(["run", "x2t", "--checkpoint", str(tiny_video_checkpoint), "--video", str(tmp_path / "clip.mp4"),
                 "--prompt", "what?", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.endswith("\n")


# --- video edit ------------------------------------------------------------------------------------------------------


def test_video_edit_keeps_the_sampled_frames_and_is_deterministic(video_pipeline, clip: bytes) -> None:
    """21 frames sampled from the 2 s clip come back edited: the reference video's 6 latent frames set the noise block
    (plan_edit with lat_t), the output takes the clip's 3:2 bucket at the 256 x 256 area."""
    request = GenerationRequest("video-edit", "make it night", video=clip, height=256, width=256, steps=2, seed=3)
    first, queries = _generate_recording(video_pipeline, request)
    again = video_pipeline.generate(request)
    assert first.video.shape == (21, 224, 304, 3)
    np.testing.assert_array_equal(first.video, again.video)
    assert queries[0][0].shape[1] == 6 * 14 * 19         # t x h x w latent tokens of the noise block
    assert {"vit", "vae_encode", "denoise", "vae_decode"} <= set(first.timings)


def test_video_edit_takes_a_video_only(video_pipeline, clip: bytes) -> None:
    with pytest.raises(RequestError, match="required for video-edit") as caught:
        GenerationRequest("video-edit", "make it night").validate()
    assert caught.value.field == "video"
    with pytest.raises(RequestError, match="only x2t, edit and i2v take an image"):
        GenerationRequest("video-edit", "x", video=clip, image=_png(np.zeros((8, 8, 3), np.uint8))).validate()


def test_cli_edits_a_video(tiny_video_checkpoint: Path, clip: bytes, tmp_path: Path) -> None:
    from runtime.cli import main

    (tmp_path / "clip.mp4").write_bytes(clip)
    out = tmp_path / "night.mp4"
    assert main(["run", "video-edit", "--checkpoint", str(tiny_video_checkpoint), "--video",
                 str(tmp_path / "clip.mp4"), "--prompt", "make it night", "--height", "256", "--width", "256",
                 "--steps", "1", "-o", str(out)]) == 0
    assert read_frames(out).shape == (21, 224, 304, 3)
