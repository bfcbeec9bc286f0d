"""i2v: image to video. The image enters as ViT rows before the prompt and as the first latent frame of the noise
block, which stays clean (t = 0) and is never updated (upstream ``ff2v_sample``, ``frame_condition_idx=[0]``); the
video takes the image's aspect bucket at the requested area (docs/design/model.md §3.4, §8)."""

from __future__ import annotations

from typing import Any

from runtime.pipeline.core import VIDEO_VIT_TO_VAE_SIDE, LancePipeline, Progress, latent_frames, latent_size, timed
from runtime.spec.request import GenerationRequest


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    vae_pixels, patches, vit_grid = pipeline.media_inputs(request, VIDEO_VIT_TO_VAE_SIDE, timings)
    grid = (latent_frames(request.frames), *latent_size(*vae_pixels.shape[-2:]))
    with timed(timings, "vit"):
        vit_rows = pipeline.vit(patches, vit_grid)
    with timed(timings, "vae_encode"):
        first_frame = pipeline.encode_reference(vae_pixels, request.seed)
    with timed(timings, "plan"):
        plan = pipeline.plan(request, vit_grid, *grid)
    latent = pipeline.generate_latent(request, plan, progress, timings, ref_latent=None, vit_rows=vit_rows,
                                      clean=first_frame)
    return {"video": pipeline.decode_video(latent, grid, timings, progress)}
