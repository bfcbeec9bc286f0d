"""x2t: image understanding. The ViT rows and the question are prefilled, then the answer is decoded greedily
(docs/design/model.md §4.5, §6)."""

from __future__ import annotations

from typing import Any

from runtime.pipeline.core import LancePipeline, Progress, timed
from runtime.pipeline.preprocess import vit_image_input
from runtime.spec.request import GenerationRequest


def run(pipeline: LancePipeline, request: GenerationRequest, progress: Progress,
        timings: dict[str, float]) -> dict[str, Any]:
    image = pipeline.load_image(request)
    with timed(timings, "preprocess"):
        patches, vit_grid = vit_image_input(image)
    with timed(timings, "vit"):
        vit_rows = pipeline.vit(patches, vit_grid)
    with timed(timings, "plan"):
        plan = pipeline.plan(request, vit_grid, request.max_new_tokens)
    cache = pipeline.new_cache(plan.num_tokens + 1 + request.max_new_tokens, batch=1)
    with timed(timings, "prefill"):
        pipeline.prefill(plan.context(), cache, branch=0, vit_rows=vit_rows, ref_latent=None)
    with timed(timings, "decode_text"):
        tokens = pipeline.decode_text(plan, cache, request.max_new_tokens, progress)
    return {"text": pipeline.host.tokenizer.decode(tokens, skip_special_tokens=True), "token_ids": tokens}
