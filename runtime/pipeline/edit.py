"""edit: image editing. The input image enters twice, as ViT rows (understanding) and as a clean VAE reference block
(generation); the output takes the input's aspect bucket at the requested area (docs/design/model.md §4.4, §4.5)."""

from __future__ import annotations

from typing import Any

from runtime.pipeline.core import VIT_TO_VAE_SIDE, LancePipeline, Progress, latent_size, timed
from runtime.spec.request import GenerationRequest


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    vae_pixels, patches, vit_grid = pipeline.media_inputs(request, VIT_TO_VAE_SIDE, timings)
    lat_h, lat_w = latent_size(*vae_pixels.shape[-2:])
    with timed(timings, "vit"):
        vit_rows = pipeline.vit(patches, vit_grid)
    with timed(timings, "vae_encode"):
        ref_latent = pipeline.encode_reference(vae_pixels, request.seed)
    with timed(timings, "plan"):
        plan = pipeline.plan(request, vit_grid, lat_h, lat_w)
    latent = pipeline.generate_latent(request, plan, progress, timings, ref_latent=ref_latent, vit_rows=vit_rows)
    return {"image": pipeline.decode_image(latent, lat_h, lat_w, timings)}
