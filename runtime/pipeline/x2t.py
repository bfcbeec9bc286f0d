"""x2t: image or video understanding. The ViT rows and the question are prefilled, then the answer is decoded greedily
(docs/design/model.md §4.5, §6, §8). A video is sampled as upstream (12 fps over at most 6 s, spread over the whole
video) and its ViT block advances the mRoPE t row per frame pair."""

from __future__ import annotations

from typing import Any

from runtime.pipeline.core import LancePipeline, Progress, timed
from runtime.pipeline.preprocess import vit_image_input, vit_video_input
from runtime.spec import constants
from runtime.spec.request import GenerationRequest


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    video = request.video is not None
    media = pipeline.load_video(request) if video else pipeline.load_image(request)
    with timed(timings, "preprocess"):
        patches, vit_grid = vit_video_input(media) if video else vit_image_input(media)
    with timed(timings, "vit"):
        vit_rows = pipeline.vit_video(patches, vit_grid) if video else pipeline.vit(patches, vit_grid)
    instruction = constants.X2T_VIDEO_QA_INSTRUCTION if video else constants.X2T_QA_INSTRUCTION
    with timed(timings, "plan"):
        plan = pipeline.plan(request, vit_grid, request.max_new_tokens, instruction=instruction)
    cache = pipeline.new_cache(plan.num_tokens + 1 + request.max_new_tokens, batch=1)
    with timed(timings, "prefill"):
        pipeline.prefill(plan.context(), cache, branch=0, vit_rows=vit_rows, ref_latent=None)
    with timed(timings, "decode_text"):
        tokens = pipeline.decode_text(plan, cache, request.max_new_tokens, progress)
    return {"text": pipeline.host.tokenizer.decode(tokens, skip_special_tokens=True), "token_ids": tokens}
