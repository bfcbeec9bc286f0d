"""t2v: text to video. As t2i with the video system prompt and a ``t x h x w`` noise block; the VAE decodes the latent
one latent frame at a time (docs/design/model.md §8)."""

from __future__ import annotations

from typing import Any

from runtime.pipeline.core import LancePipeline, Progress, latent_frames, latent_size, timed
from runtime.spec.request import GenerationRequest


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    grid = (latent_frames(request.frames), *latent_size(request.height, request.width))
    with timed(timings, "plan"):
        plan = pipeline.plan(request, *grid)
    latent = pipeline.generate_latent(request, plan, progress, timings, ref_latent=None)
    return {"video": pipeline.decode_video(latent, grid, timings, progress)}
