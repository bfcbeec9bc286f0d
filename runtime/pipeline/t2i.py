"""t2i: text to image. The prompt's sequence ends in a noise block; the Euler loop denoises it under text CFG and the
VAE decodes it (docs/design/model.md §3)."""

from __future__ import annotations

from typing import Any

from runtime.pipeline.core import LancePipeline, Progress, latent_size, timed
from runtime.spec.request import GenerationRequest


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    lat_h, lat_w = latent_size(request.height, request.width)
    with timed(timings, "plan"):
        plan = pipeline.plan(request, lat_h, lat_w)
    latent = pipeline.generate_latent(request, plan, progress, timings, ref_latent=None)
    return {"image": pipeline.decode_image(latent, lat_h, lat_w, timings)}
