"""Load-time warm-up: a few requests through a pipeline before it serves, so that the first client request is not
the slow one.

On the fast CUDA engines the first call of a shape pays for ``torch.compile`` (the MoT's element-wise chains, the ViT,
the VAE decoder per output size), cuDNN's and cuBLAS's algorithm choices and the CUDA graph pool; the warm-up pays
them at load instead. It runs each image task (t2i, edit, x2t on an image) at each configured size, with just enough
denoising steps to run both CFG layouts (both branches, then the conditional branch alone). The video tasks are not
warmed: their first request compiles the chunked VAE at its size.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Sequence

import numpy as np

from runtime.pipeline.scheduler import cfg_active, make_schedule
from runtime.spec import constants
from runtime.spec.request import GenerationRequest

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "a lighthouse on a cliff at dusk"
WARMUP_TOKENS = 8
"""Answer tokens of the warm-up x2t request: enough to capture the decode step's graph."""


def warmup_steps() -> int:
    """The fewest denoising steps whose schedule has a CFG step and a conditional-only step (7 with upstream's
    shift 3.5 and CFG interval)."""
    for steps in range(2, constants.DEFAULT_STEPS + 1):
        timesteps = make_schedule(steps).timesteps[:-1]
        if len({cfg_active(t, constants.CFG_INTERVAL) for t in timesteps}) == 2:
            return steps
    return constants.DEFAULT_STEPS


def noise_png(height: int, width: int, seed: int = 0) -> bytes:
    """A seeded random RGB PNG: an input image of the given size."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def warmup_requests(sizes: Sequence[tuple[int, int]]) -> list[GenerationRequest]:
    """t2i and edit at each ``(height, width)``, then one x2t on an image: the image tasks' shapes."""
    steps = warmup_steps()
    requests = []
    for height, width in sizes:
        requests.append(GenerationRequest("t2i", WARMUP_PROMPT, height=height, width=width, steps=steps))
        requests.append(GenerationRequest("edit", WARMUP_PROMPT, image=noise_png(height, width), height=height,
                                          width=width, steps=steps))
    side = constants.VIT_RESOLUTION_IMAGE
    requests.append(GenerationRequest("x2t", "What is in the picture?", image=noise_png(side, side),
                                      max_new_tokens=WARMUP_TOKENS))
    return requests


def warm_up(pipeline, sizes: Sequence[tuple[int, int]]) -> dict[str, float]:  # pipeline: LancePipeline
    """Run `warmup_requests` through ``pipeline``; returns the seconds of each (``"t2i 1024x1024"``: 4.2)."""
    seconds = {}
    for request in warmup_requests(sizes):
        label = request.task if request.task == "x2t" else f"{request.task} {request.height}x{request.width}"
        start = time.perf_counter()
        pipeline.generate(request)
        seconds[label] = time.perf_counter() - start
        logger.info("warmup: %s in %.2f s", label, seconds[label])
    return seconds
