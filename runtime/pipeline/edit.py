"""edit: image editing. The input image enters twice, as ViT rows (understanding) and as a clean VAE reference block
(generation); the output takes the input's aspect bucket at the requested area (docs/design/model.md §4.4, §4.5)."""

from __future__ import annotations

import math
from typing import Any

import torch

from runtime.pipeline.core import VIT_TO_VAE_SIDE, LancePipeline, Progress, timed
from runtime.pipeline.preprocess import vae_image_input, vit_image_input
from runtime.spec import constants, limits
from runtime.spec.request import GenerationRequest, RequestError


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    image = pipeline.load_image(request)
    area_side = round(math.sqrt(request.height * request.width))
    with timed(timings, "preprocess"):
        vae_pixels = vae_image_input(image, area_side).to(pipeline.device, torch.float32)
        patches, vit_grid = vit_image_input(image, round(area_side * VIT_TO_VAE_SIDE))
    lat_h, lat_w = (s // constants.VAE_DOWNSAMPLE_SPATIAL for s in vae_pixels.shape[-2:])
    if max(lat_h, lat_w) > constants.MAX_LATENT_SIZE:
        raise RequestError("height", f"the image's aspect bucket at {request.height}x{request.width} is "
                           f"{vae_pixels.shape[-2]}x{vae_pixels.shape[-1]}, over {limits.MAX_SIZE} px per "
                           "side: ask for a smaller area")
    with timed(timings, "vit"):
        vit_rows = pipeline.vit(patches, vit_grid)
    with timed(timings, "vae_encode"):
        ref_latent = pipeline.encode_reference(vae_pixels, request.seed)
    with timed(timings, "plan"):
        plan = pipeline.plan(request, vit_grid, lat_h, lat_w)
    latent = pipeline.generate_latent(request, plan, progress, timings, ref_latent=ref_latent, vit_rows=vit_rows)
    return {"image": pipeline.decode_image(latent, lat_h, lat_w, timings)}
