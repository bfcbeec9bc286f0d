"""video-edit: video editing, image edit's sequence over a video. The sampled frames enter twice, as a ViT block
(one call per frame pair) and as a clean VAE reference video (encoded chunk by chunk); the noise block has the
reference's size and shares its mRoPE ids; the output has the input's sampled frame count and its aspect bucket at the
requested area (upstream ``tiv2v_sample``, sample_task edit; docs/design/model.md §8)."""

from __future__ import annotations

from typing import Any

from runtime.pipeline.core import VIDEO_VIT_TO_VAE_SIDE, LancePipeline, Progress, latent_frames, latent_size, timed
from runtime.spec.request import GenerationRequest


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    pixels, pairs, vit_grid = pipeline.media_inputs(request, VIDEO_VIT_TO_VAE_SIDE, timings)
    grid = (latent_frames(pixels.shape[2]), *latent_size(*pixels.shape[-2:]))
    with timed(timings, "vit"):
        vit_rows = pipeline.vit_video(pairs, vit_grid)
    with timed(timings, "vae_encode"):
        reference = pipeline.encode_video(pixels, request.seed)
    with timed(timings, "plan"):
        plan = pipeline.plan(request, vit_grid, *grid[1:], lat_t=grid[0], vision_type="video")
    latent = pipeline.generate_latent(request, plan, progress, timings, ref_latent=reference, vit_rows=vit_rows)
    return {"video": pipeline.decode_video(latent, grid, timings, progress)}
