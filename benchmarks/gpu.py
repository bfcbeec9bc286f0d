"""`lance-trt bench gpu`: the PyTorch runners on one GPU against their compute floors.

Full-size Lance (`LanceLLMConfig()`, `VisionConfig()`, `WanVAEConfig()`) is built directly on the GPU with seeded
random weights scaled by fan-in (the rule of `runtime.models.tiny`), so no checkpoint is needed; speed does not depend on
the values. Parts (``--parts``, each fits well inside ten minutes on an H100):

* ``peak``: the measured bf16 matrix-product rate and device copy bandwidth: the ceilings every ratio uses.
* ``sdpa``: the denoise attention (16 query heads over 2 K/V heads) through each SDPA backend, with
  ``enable_gqa`` and with K/V expanded per head.
* ``denoise``: one forward of the denoise query (``<vs>`` + latents + ``<ve>`` over the prompt context) for one
  branch and for both CFG branches, per size: the fast runner (`runtime.runners.cuda_mot`) in the ``--variants``
  (compiled element-wise kernels or not, attention backend, the FP8 gen expert with its velocity cosine against the
  bf16 fast path), and the eager reference `LanceMoT.step`; a kernel profile of the fast forward.
* ``vit``: the vision tower at 672x672: the module, and the fast tower (`runtime.runners.cuda_vit`) eager and
  graph-replayed, with its cosine against the module.
* ``vae``: the VAE decoder per size in the end-to-end precision: NCHW, channels-last, with cuDNN autotuning, and
  compiled at the largest size; a kernel profile.
* ``text``: t2i prefill, the x2t ViT-block prefill and AR decode tokens/s.
* ``e2e``: t2i (30 steps, CFG 4.0) per size and x2t, through `LancePipeline` with the fast engines (bf16, and
  with the FP8 gen expert: its image's PSNR against the bf16 one) and with the plain eager reference engines on the
  same weights; peak GPU memory of each.

Each row is a median time over repeats with CUDA events (wall clock for whole requests) and, where it has one, its
floor: FLOPs over the measured matmul peak, or bytes over the measured bandwidth. A table goes to stdout and every
number to the ``--out`` JSON, which names the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.spec import constants
from runtime.models.checkpoint import VIDEO_LATENT_FRAMES, parameters_on_meta
from runtime.spec.contract import PRECISIONS, EngineSpec, engine_specs
from runtime.runners import Engines, Runner, TorchRunner
from runtime.runners.cuda_decode import CHUNK, DecodingMotRunner
from runtime.runners.cuda_mot import CudaMoT, CudaMotRunner
from runtime.runners.factory import cuda_engines
from runtime.runners.cuda_vit import CudaVisionTower, CudaVitRunner
from runtime.runners.graphs import VaeDecodeGraph, VaeEncodeGraph
from runtime.models.mot import LanceLLMConfig, LanceMoT
from runtime.models.vae import WanVAE, WanVAEConfig
from runtime.models.vit import Qwen25VisionTransformer, VisionConfig, vision_inputs
from runtime.pipeline import LanceHost, LancePipeline
from runtime.pipeline.core import PRECISION_DTYPES
from runtime.spec.request import GenerationRequest
from runtime.models.tokenizer import SpecialIds, build_tokenizer_files, load_tokenizer

logger = logging.getLogger(__name__)

PARTS = ("peak", "sdpa", "denoise", "vit", "vae", "text", "e2e", "video")
SDPA_CHOICES = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}
"""``--attention``: the SDPA backends the fast path's unmasked attention may use (default: PyTorch's choice)."""
DENOISE_VARIANTS = {"compiled": (True, "default", ""), "compiled-cudnn": (True, "cudnn", ""),
                    "compiled-flash": (True, "flash", ""), "plain": (False, "default", ""),
                    "compiled-fp8": (True, "default", "fp8-gen"), "plain-fp8": (False, "default", "fp8-gen"),
                    "compiled-fp8-fast-accum": (True, "default", "fp8-gen-fast-accum")}
"""``--variants`` of the denoise part: (compiled element-wise kernels, attention backend, FP8 gen expert: none,
exact accumulation, Hopper's fast accumulation)."""
E2E_VARIANTS = ("reference eager", "fast", "fast fp8-gen", "fast fp8-gen-fast-accum")
PROMPT = "a red cube on a wooden table next to a glass of water, soft studio light, photorealistic"
QUESTION = "What is in the image? Describe it in detail."

# runtime.models.tiny's scales: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.1^2).
_BIAS_STD = 0.02
_NORM_STD = 0.1


# --- Random full-size models ---------------------------------------------------------------------------------------


def _random_value(name: str, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if name.endswith(".bias"):
        return noise.mul_(_BIAS_STD)
    if len(shape) == 1 or name.endswith(".gamma"):
        return noise.mul_(_NORM_STD).add_(1.0)
    return noise.mul_(1.0 / math.sqrt(math.prod(shape[1:])))


def random_module(build: Callable[[], nn.Module], *, seed: int, dtype: torch.dtype,
                  device: torch.device) -> nn.Module:
    """Build a module with its parameters drawn on ``device`` from a generator seeded with ``seed``, in fp32 and then
    cast: the same seed gives the same fp32 values in every process, whatever ``dtype``. Computed buffers (the
    latent position table, the VAE latent statistics) are cast to ``dtype`` too."""
    with parameters_on_meta():
        module = build()
    generator = torch.Generator(device).manual_seed(seed)
    state = {name: _random_value(name, param.shape, generator, device).to(dtype)
             for name, param in module.named_parameters()}
    module.load_state_dict(state, strict=False, assign=True)
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()


@dataclass
class BenchModels:
    """Full-size Lance on random weights with its tokenizer and engine contracts."""

    mot: LanceMoT
    vit: Qwen25VisionTransformer
    vae: WanVAE
    tokenizer: Any
    special: SpecialIds
    specs: dict[str, EngineSpec]
    dtype: torch.dtype
    device: torch.device

    def host(self) -> LanceHost:
        return LanceHost(tokenizer=self.tokenizer, special=self.special, llm_config=self.mot.config,
                         vision_config=self.vit.config,
                         embed_weight=self.mot.language_model.model.embed_tokens.weight.detach(),
                         pos_table=self.mot.latent_pos_embed.pos_embed.detach())


def random_models(*, dtype: torch.dtype, device: torch.device | str = "cuda", seed: int = 0,
                  attn_implementation: str = "sdpa", vae_dtype: torch.dtype | None = None,
                  tiny: bool = False) -> BenchModels:
    """Lance_3B-sized MoT, ViT and VAE with seeded random weights (seeds ``seed``, ``seed + 1``, ``seed + 2``);
    ``tiny`` takes the `tiny()` configs instead (smoke runs on a CPU)."""
    device = torch.device(device)
    if tiny:
        llm, vae_config = LanceLLMConfig.tiny(), WanVAEConfig.tiny()
        vision = VisionConfig.tiny(out_hidden_size=llm.hidden_size)
    else:
        llm, vision, vae_config = LanceLLMConfig(), VisionConfig(), WanVAEConfig()
    # the video model's 31-frame position table (a computed buffer, no weights) serves the image parts unchanged
    llm = replace(llm, max_latent_frames=VIDEO_LATENT_FRAMES)
    mot = random_module(lambda: LanceMoT(llm, attn_implementation), seed=seed, dtype=dtype, device=device)
    vit = random_module(lambda: Qwen25VisionTransformer(vision, attn_implementation), seed=seed + 1, dtype=dtype,
                        device=device)
    vae = random_module(lambda: WanVAE(vae_config), seed=seed + 2, dtype=vae_dtype or dtype, device=device)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, special = load_tokenizer(build_tokenizer_files(folder))
    return BenchModels(mot, vit, vae, tokenizer, special, engine_specs(llm, vision, vae_config), dtype, device)


# --- Engines -------------------------------------------------------------------------------------------------------


class Recorder:
    """A `Runner` wrapper that keeps every call's feed and chosen outputs (detached clones, on their device)."""

    def __init__(self, runner: Runner, keep: Sequence[str] = ()) -> None:
        self.runner = runner
        self.spec = runner.spec
        self.host_inputs = runner.host_inputs
        self.keep = tuple(keep)
        self.calls: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.runner.infer(feed)
        self.calls.append(({k: v.detach().clone() for k, v in feed.items()},
                           {k: outputs[k].detach().clone() for k in self.keep}))
        return outputs


def reference_engines(models: BenchModels) -> Engines:
    """The plain eager PyTorch engines: `LanceMoT.step` and the modules as `TorchRunner`s."""
    specs = models.specs
    return Engines(mot=TorchRunner(specs["mot"], models.mot),
                   vit=TorchRunner(specs["vit"], models.vit),
                   vae_encode=TorchRunner(specs["vae_encode"], VaeEncodeGraph(models.vae)),
                   vae_decode=TorchRunner(specs["vae_decode"], VaeDecodeGraph(models.vae)))


def fast_engines(models: BenchModels, mot: CudaMoT) -> Engines:
    """The fast engines of the product (`runtime.runners.factory.cuda_engines`) over ``mot``."""
    return cuda_engines(models.specs, mot, models.vit, models.vae)


def test_image(side: int = constants.VIT_RESOLUTION_IMAGE, seed: int = 0) -> bytes:
    """A seeded random RGB PNG of ``side`` x ``side`` (x2t at 672 keeps its size: 48 x 48 patches)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Measurement ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measurement: median milliseconds and, where known, the floor and work behind it."""

    part: str
    name: str
    variant: str
    ms: float
    ms_min: float
    floor_ms: float | None = None
    tflops: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def of_floor(self) -> float | None:
        return None if self.floor_ms is None else self.floor_ms / self.ms


def cuda_times(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 10) -> list[float]:
    """Milliseconds of ``fn`` per call, timed with CUDA events on the current stream after ``warmup`` calls (wall
    clock without CUDA)."""
    if not torch.cuda.is_available():
        return wall_times(fn, warmup=warmup, repeat=repeat)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def wall_times(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 3) -> list[float]:
    """Wall-clock milliseconds of ``fn`` (device synchronised before and after)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_row(part: str, name: str, variant: str, times: Sequence[float], *, flops: float | None = None,
             floor_ms: float | None = None, peak_tflops: float | None = None, **extra: Any) -> Row:
    ms = statistics.median(times)
    if flops is not None and peak_tflops:
        floor_ms = flops / (peak_tflops * 1e9)
    tflops = None if flops is None else flops / (ms * 1e9)
    row = Row(part, name, variant, ms, min(times), floor_ms, tflops, dict(extra))
    logger.info("%s %s [%s]: %.3f ms%s", part, name, variant, ms,
                "" if row.of_floor is None else f" ({100 * row.of_floor:.0f}% of floor)")
    return row


@contextlib.contextmanager
def peak_memory(extra: dict[str, Any]) -> Iterator[None]:
    """Record the peak allocated and reserved GPU memory (GiB) of the block into ``extra``."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    extra["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    extra["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30


# --- FLOP and byte counts ------------------------------------------------------------------------------------------


def mot_forward_flops(config: LanceLLMConfig, und_rows: int, gen_rows: int, keys: Sequence[int],
                      logits_rows: int) -> float:
    """FLOPs of one MoT step: the projections of every row, attention of every query row over its keys
    (``keys[b]`` per batch entry; the block's rows per entry are ``(und_rows + gen_rows) / len(keys)``), the lm_head
    on ``logits_rows`` rows. Multiply-adds count 2."""
    c = config
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    per_row = 2 * c.num_hidden_layers * (c.hidden_size * (heads + 2 * kv) * hd + heads * hd * c.hidden_size
                                         + 3 * c.hidden_size * c.intermediate_size)
    queries = (und_rows + gen_rows) // len(keys)
    attention = sum(4 * c.num_hidden_layers * heads * hd * queries * k for k in keys)
    heads_flops = 2 * logits_rows * c.hidden_size * c.vocab_size + 2 * gen_rows * c.hidden_size * 2 * 48
    return per_row * (und_rows + gen_rows) + attention + heads_flops


def und_weight_bytes(mot: LanceMoT) -> int:
    """Bytes one text decode step must read: the und expert of every layer, the final norm and the lm_head."""
    total = 0
    for name, param in mot.language_model.named_parameters():
        if "_moe_gen" in name or "embed_tokens" in name:
            continue
        total += param.numel() * param.element_size()
    return total


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call as `torch.utils.flop_counter` counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# --- Parts ---------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    models: BenchModels
    args: argparse.Namespace
    fast: CudaMoT
    rows: list[Row] = field(default_factory=list)
    fast_fp8: CudaMoT | None = None
    peak_tflops: float | None = None
    bandwidth_gbps: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


def fp8_model(ctx: Context, fast_accum: bool = False) -> CudaMoT:
    """The fast model with the FP8 gen expert (quantized once, on first use; twins share the FP8 weights)."""
    if ctx.fast_fp8 is None:
        ctx.fast_fp8 = ctx.fast.with_fp8_gen()
    return ctx.fast_fp8.with_fp8_gen(fast_accum) if fast_accum else ctx.fast_fp8


def part_peak(ctx: Context) -> None:
    device = ctx.models.device
    n = 8192 if device.type == "cuda" else 512
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    times = cuda_times(lambda: torch.mm(a, b, out=out), warmup=5, repeat=20)
    ctx.peak_tflops = 2 * n**3 / (statistics.median(times) * 1e9)
    ctx.rows.append(make_row("peak", f"bf16 matmul {n}^3", "cuBLAS", times, flops=2 * n**3,
                             peak_tflops=ctx.peak_tflops))
    size = 2**30 if device.type == "cuda" else 2**24
    src = torch.empty(size, device=device, dtype=torch.uint8).random_(generator=generator)
    dst = torch.empty_like(src)
    times = cuda_times(lambda: dst.copy_(src), warmup=3, repeat=20)
    ctx.bandwidth_gbps = 2 * src.numel() / (statistics.median(times) * 1e6)
    ctx.rows.append(make_row("peak", f"device copy {size >> 20} MiB", "read+write", times,
                             bandwidth_gbps=ctx.bandwidth_gbps))


def part_sdpa(ctx: Context) -> None:
    """The denoise attention at 1024 px: 4098 queries x 16 heads over 4098 + 70 keys x 2 heads."""
    c, device = ctx.models.mot.config, ctx.models.device
    generator = torch.Generator(device).manual_seed(1)
    rows, keys = (4098, 4098 + 70) if device.type == "cuda" else (258, 258 + 70)
    q = torch.randn(1, rows, c.num_attention_heads, c.head_dim, device=device, dtype=torch.bfloat16,
                    generator=generator).transpose(1, 2)
    k, v = (torch.randn(1, keys, c.num_key_value_heads, c.head_dim, device=device, dtype=torch.bfloat16,
                        generator=generator).transpose(1, 2) for _ in range(2))
    group = c.num_attention_heads // c.num_key_value_heads
    flops = 4 * c.num_attention_heads * c.head_dim * rows * keys
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for gqa in ("enable_gqa", "expanded"):
            def call() -> torch.Tensor:
                with sdpa_kernel([backend]):
                    if gqa == "enable_gqa":
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                                          v.repeat_interleave(group, 1))
            try:
                times = cuda_times(call, warmup=3, repeat=20)
            except RuntimeError as err:
                ctx.rows.append(Row("sdpa", "attention 1024px", f"{backend.name} {gqa}", math.nan, math.nan,
                                    extra={"error": str(err).splitlines()[0][:200]}))
                continue
            ctx.rows.append(make_row("sdpa", "attention 1024px", f"{backend.name} {gqa}", times, flops=flops,
                                     peak_tflops=ctx.peak_tflops))
    # Which kernels PyTorch picks on its own for the fast path's call.
    if device.type == "cuda":
        ctx.info["sdpa_default_kernels"] = kernel_profile(
            lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), top=4)


def _query_feeds(ctx: Context, side: int) -> dict[int, dict[str, torch.Tensor]]:
    """The denoise query feed of a t2i request at ``side`` px, for 1 and 2 branches, recorded from the pipeline
    (its prefill and one denoise call through the fast runner)."""
    models = ctx.models
    ctx.fast.set_compile(False)       # recording needs no compiled kernels (and must not depend on them)
    recorder = Recorder(CudaMotRunner(models.specs["mot"], ctx.fast, graphs=False))
    engines = Engines(mot=recorder, vit=None, vae_encode=None, vae_decode=_NoDecode(models.specs["vae_decode"]))
    pipeline = LancePipeline(engines, models.host(), device=models.device, dtype=models.dtype)
    pipeline.generate(GenerationRequest("t2i", PROMPT, height=side, width=side, steps=1, seed=0))
    (feed, _), = [call for call in recorder.calls if call[0]["latents"].shape[1] > 0]
    ctx.info[f"t2i_contexts {side}px"] = feed["past_len"].tolist()
    return {2: feed, 1: first_branch(feed)}


def first_branch(feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cond branch of a batched ``mot`` feed (batch axis 1 of the past, 0 elsewhere)."""
    unbatched = ("latent_pos", "causal")
    return {name: t if name in unbatched else t.narrow(1 if name.startswith("past_") and t.dim() > 1 else 0, 0, 1)
            for name, t in feed.items()}


class _NoDecode:
    """A ``vae_decode`` runner that returns a blank image (the query-recording runs skip the VAE)."""

    host_inputs: tuple[str, ...] = ()

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latent = feed["latent"]
        shape = (1, 3, 16 * latent.shape[-2], 16 * latent.shape[-1])
        return {"image": torch.zeros(shape, device=latent.device)}


def part_denoise(ctx: Context) -> None:
    models, config = ctx.models, ctx.models.mot.config
    profiled: set[str] = set()
    for side in ctx.args.sizes:
        feeds = _query_feeds(ctx, side)
        for batch, feed in sorted(feeds.items()):
            lat = feed["latents"].shape[1]
            past = feed["past_len"].tolist()
            flops = mot_forward_flops(config, und_rows=2 * batch, gen_rows=lat * batch,
                                      keys=[lat + 2 + p for p in past], logits_rows=batch)
            name = f"denoise forward {side}px B={batch}"
            bf16_velocity = None
            for compile, attention, fp8 in (DENOISE_VARIANTS[v] for v in ctx.args.variants):
                model = fp8_model(ctx, fast_accum=fp8.endswith("fast-accum")) if fp8 else ctx.fast
                model.set_compile(compile)
                model.sdpa_backends = SDPA_CHOICES[attention]
                variant = "fast" + (" compiled" if compile else "") + ("" if attention == "default" else
                                                                       f" {attention}-attn") + (f" {fp8}" * bool(fp8))
                runner = CudaMotRunner(models.specs["mot"], model)
                try:
                    velocity = runner.infer(feed)["velocity"]
                    times = cuda_times(lambda: runner.infer(feed), warmup=2, repeat=ctx.args.repeat)
                except RuntimeError as err:
                    ctx.rows.append(Row("denoise", name, variant, math.nan, math.nan,
                                        extra={"error": str(err).splitlines()[0][:200]}))
                    continue
                extra: dict[str, Any] = {}
                if not fp8 and bf16_velocity is None:
                    bf16_velocity = velocity.float()
                elif fp8 and bf16_velocity is not None:
                    extra["velocity_cosine_vs_bf16"] = F.cosine_similarity(
                        velocity.float().flatten(), bf16_velocity.flatten(), dim=0).item()
                ctx.rows.append(make_row("denoise", name, variant + " (runner.infer)", times, flops=flops,
                                         peak_tflops=ctx.peak_tflops, rows=lat + 2, past=past, **extra))
                for graph in runner.captured_graphs():
                    times = cuda_times(graph.replay, warmup=2, repeat=ctx.args.repeat)
                    ctx.rows.append(make_row("denoise", name, variant + " (graph replay)", times, flops=flops,
                                             peak_tflops=ctx.peak_tflops))
                if attention == "default" and side == max(ctx.args.sizes) and batch == 1:
                    eager = CudaMotRunner(models.specs["mot"], model, graphs=False)
                    times = cuda_times(lambda: eager.infer(feed), warmup=2, repeat=ctx.args.repeat)
                    ctx.rows.append(make_row("denoise", name, variant + " (no graph)", times, flops=flops,
                                             peak_tflops=ctx.peak_tflops))
                    if compile and models.device.type == "cuda" and variant not in profiled:
                        ctx.info[f"profile {name} {variant}"] = kernel_profile(lambda: eager.infer(feed), top=20)
                        profiled.add(variant)
                runner.clear()
            reference = TorchRunner(models.specs["mot"], models.mot)
            device_feed = {name: t.to(models.device) for name, t in feed.items()}   # no host inputs there
            times = cuda_times(lambda: reference.infer(device_feed), warmup=1, repeat=max(3, ctx.args.repeat // 3))
            ctx.rows.append(make_row("denoise", name, "reference eager", times, flops=flops,
                                     peak_tflops=ctx.peak_tflops))
            torch.cuda.empty_cache()
    for model in (ctx.fast, ctx.fast_fp8):
        if model is not None:
            model.set_compile(ctx.args.compile)
            model.sdpa_backends = SDPA_CHOICES[ctx.args.attention]


def kernel_profile(fn: Callable[[], Any], top: int = 14) -> list[dict[str, Any]]:
    """The CUDA kernels of one call of ``fn`` (after a warm-up), grouped by name: the top ``top`` by time."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [(e.key, e.count, _device_us(e)) for e in prof.key_averages()]
    events = sorted((e for e in events if e[2] > 0), key=lambda e: e[2], reverse=True)
    total = sum(us for _, _, us in events) or 1.0
    rows = [{"kernel": key[:120], "calls": count, "ms": us / 1e3, "share": us / total} for key, count, us in
            events[:top]]
    rows.append({"kernel": "(all kernels)", "calls": sum(c for _, c, _ in events), "ms": total / 1e3, "share": 1.0})
    return rows


def _device_us(event: Any) -> float:
    """Device microseconds of a profiler average (``device_time_total``; ``cuda_time_total`` before torch 2.4)."""
    for name in ("self_device_time_total", "device_time_total", "self_cuda_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def part_vit(ctx: Context) -> None:
    """The tower at 672x672: the module (SDPA with the (P, P) masks) and the fast runner (`CudaVitRunner`) eager and
    graph-replayed; the floor counts the fast tower's work (windowed attention over each window only)."""
    models = ctx.models
    side = constants.VIT_RESOLUTION_IMAGE
    grid = (1, side // 14, side // 14)
    inputs = vision_inputs(grid, models.vit.config)
    generator = torch.Generator(models.device).manual_seed(2)
    patches = torch.randn(inputs.num_patches, models.vit.config.patch_dim, device=models.device, generator=generator)
    host_feed = {**inputs.engine_inputs(), "patches": patches}          # masks on the host, as the pipeline sends
    device_feed = {name: t.to(models.device) for name, t in host_feed.items()}
    spec, on_cuda = models.specs["vit"], models.device.type == "cuda"
    tower = CudaVisionTower(models.vit)
    eager = CudaVitRunner(spec, tower, graphs=False)
    flops = counted_flops(lambda: eager.infer(host_feed))
    tower.set_compile(on_cuda)
    name = f"ViT {side}x{side} ({inputs.num_patches} patches)"
    module = TorchRunner(spec, models.vit)
    module_out = module.infer(device_feed)["hidden"].float()
    for variant, runner, feed in (("module sdpa, eager", module, device_feed),
                                  ("fast, eager", eager, host_feed),
                                  ("fast, graph", CudaVitRunner(spec, tower), host_feed)):
        out = runner.infer(feed)["hidden"].float()
        times = cuda_times(lambda: runner.infer(feed), warmup=3, repeat=ctx.args.repeat)
        cosine = F.cosine_similarity(out.flatten(), module_out.flatten(), dim=0).item()
        ctx.rows.append(make_row("vit", name, variant, times, flops=flops, peak_tflops=ctx.peak_tflops,
                                 cosine_vs_module=cosine))
    if on_cuda:
        ctx.info[f"profile {name}"] = kernel_profile(lambda: eager.infer(host_feed), top=12)


VAE_VARIANTS = ("NCHW", "channels_last", "channels_last cudnn-benchmark", "channels_last compiled")
"""Ways the VAE decoder runs in the ``vae`` part: memory format, cuDNN autotuning, ``torch.compile`` (the largest
size only: it compiles per shape)."""


def part_vae(ctx: Context) -> None:
    """The decoder in the end-to-end precision (``--vae-precision``, the one gpu_check gates; fp32 and TF32 are in the
    first runs' JSON) per size and `VAE_VARIANTS`, with a kernel profile at the largest size."""
    models, vae = ctx.models, ctx.models.vae
    generator = torch.Generator(models.device).manual_seed(3)
    dtype = vae.conv1.weight.dtype
    compiled = torch.compile(vae.decode_image, dynamic=False) if models.device.type == "cuda" else vae.decode_image
    largest = max(ctx.args.sizes)
    for side in ctx.args.sizes:
        latent = torch.randn(1, 48, side // 16, side // 16, device=models.device, generator=generator).to(dtype)
        flops = counted_flops(lambda: vae.decode_image(latent))       # the same work in every variant
        for variant in VAE_VARIANTS:
            if variant.endswith("compiled") and side != largest:
                continue
            z = latent if variant == "NCHW" else latent.contiguous(memory_format=torch.channels_last)
            decode_image = compiled if variant.endswith("compiled") else vae.decode_image

            def decode() -> torch.Tensor:
                return decode_image(z)
            autotune = variant.endswith(("cudnn-benchmark", "compiled"))
            with torch.backends.cudnn.flags(enabled=True, benchmark=autotune, deterministic=False, allow_tf32=False):
                extra: dict[str, Any] = {}
                with peak_memory(extra):
                    times = cuda_times(decode, warmup=2, repeat=max(3, ctx.args.repeat // 2))
                if side == largest and variant == "channels_last cudnn-benchmark" and models.device.type == "cuda":
                    ctx.info[f"profile VAE decode {side}px {variant}"] = kernel_profile(decode, top=12)
            ctx.rows.append(make_row("vae", f"VAE decode {side}px", f"{str(dtype).removeprefix('torch.')} {variant}",
                                     times, flops=flops, peak_tflops=ctx.peak_tflops, **extra))


def part_text(ctx: Context) -> None:
    """Prefill calls recorded from a t2i and an x2t request, then AR decode through the runner."""
    models, config = ctx.models, ctx.models.mot.config
    recorder = Recorder(CudaMotRunner(models.specs["mot"], ctx.fast, graphs=False))
    engines = Engines(mot=recorder, vit=TorchRunner(models.specs["vit"], models.vit), vae_encode=None,
                      vae_decode=None)
    pipeline = LancePipeline(engines, models.host(), device=models.device, dtype=models.dtype)
    pipeline.generate(GenerationRequest("x2t", QUESTION, image=test_image(), max_new_tokens=2))
    prefill = [feed for feed, _ in recorder.calls if feed["und_head"].shape[1] > 1]
    runner = DecodingMotRunner(models.specs["mot"], ctx.fast)
    for feed in prefill:
        rows, past = feed["und_head"].shape[1], int(feed["past_len"][0])
        flops = mot_forward_flops(config, und_rows=rows, gen_rows=0, keys=[rows + past], logits_rows=1)
        kind = "ViT block" if rows > 100 else "text"
        times = cuda_times(lambda: runner.infer(feed), warmup=2, repeat=ctx.args.repeat)
        ctx.rows.append(make_row("text", f"prefill {kind} {rows} rows (past {past})", "fast graph", times,
                                 flops=flops, peak_tflops=ctx.peak_tflops))
    # AR decode: one row against a context of the x2t size, the cache growing by one row per token.
    context = sum(feed["und_head"].shape[1] for feed in prefill)
    decode_feed = dict(recorder.calls[-1][0])
    kv_shape = (config.num_hidden_layers, 1, context + ctx.args.tokens, config.num_key_value_heads, config.head_dim)
    generator = torch.Generator(models.device).manual_seed(4)
    past_key = torch.randn(kv_shape, device=models.device, generator=generator).to(models.dtype)
    past_value = torch.randn(kv_shape, device=models.device, generator=generator).to(models.dtype)
    step = {"n": 0}

    def decode_one() -> None:
        n = context + step["n"] % ctx.args.tokens
        runner.infer({**decode_feed, "past_key": past_key[:, :, :n], "past_value": past_value[:, :, :n],
                      "past_len": torch.full((1,), n, device=models.device)})
        step["n"] += 1
    times = cuda_times(decode_one, warmup=3, repeat=ctx.args.tokens)
    floor_bytes = und_weight_bytes(models.mot) + 2 * kv_shape[0] * context * kv_shape[3] * kv_shape[4] * 2
    floor_ms = floor_bytes / (ctx.bandwidth_gbps * 1e6) if ctx.bandwidth_gbps else None
    name = f"AR decode (context {context})"
    ctx.rows.append(make_row("text", name, "fast (runner.infer)", times, floor_ms=floor_ms,
                             tokens_per_s=1e3 / statistics.median(times), bytes=floor_bytes))
    for graph in runner.captured_graphs()[-1:]:
        times = cuda_times(graph.replay, warmup=2, repeat=ctx.args.tokens)
        ctx.rows.append(make_row("text", name, "fast (graph replay)", times, floor_ms=floor_ms,
                                 tokens_per_s=1e3 / statistics.median(times)))
    loop = runner.greedy_loop(context, ctx.args.tokens, pipeline.host.embed_weight, allowed=config.vocab_size)
    cos, sin = (torch.zeros(1, ctx.args.tokens, config.head_dim, device=models.device) for _ in range(2))
    loop.start(past_key[:, :, :context], past_value[:, :, :context], 0, cos, sin)
    chunks = max(1, ctx.args.tokens // CHUNK - 2)
    times = [t / CHUNK for t in cuda_times(loop.next_tokens, warmup=2, repeat=chunks)]
    ctx.rows.append(make_row("text", name, f"fast (device loop, {CHUNK} tokens a graph)", times, floor_ms=floor_ms,
                             tokens_per_s=1e3 / statistics.median(times)))
    if models.device.type == "cuda":
        eager = CudaMotRunner(models.specs["mot"], ctx.fast, graphs=False)
        n = context + 1
        feed = {**decode_feed, "past_key": past_key[:, :, :n], "past_value": past_value[:, :, :n],
                "past_len": torch.full((1,), n, device=models.device)}
        ctx.info[f"profile {name}"] = kernel_profile(lambda: eager.infer(feed), top=16)


def part_e2e(ctx: Context) -> None:
    models = ctx.models
    host = models.host()
    requests = [(f"t2i {side}x{side} 30 steps CFG 4.0",
                 GenerationRequest("t2i", PROMPT, height=side, width=side, steps=constants.DEFAULT_STEPS,
                                   cfg_scale=constants.DEFAULT_CFG_SCALE, seed=0))
                for side in ctx.args.e2e_sizes]
    requests.append(("x2t 672x672, 64 tokens", GenerationRequest("x2t", QUESTION, image=test_image(),
                                                                  max_new_tokens=64)))
    config = models.mot.config
    bf16_images: dict[str, np.ndarray] = {}
    for variant in ctx.args.e2e_variants:
        engines = {"reference eager": lambda: reference_engines(models),
                   "fast": lambda: fast_engines(models, ctx.fast),
                   "fast fp8-gen": lambda: fast_engines(models, fp8_model(ctx)),
                   "fast fp8-gen-fast-accum": lambda: fast_engines(models, fp8_model(ctx, fast_accum=True))}[variant]()
        pipeline = LancePipeline(engines, host, device=models.device, dtype=models.dtype)
        for name, request in requests:
            if request.task == "x2t" and ("fp8" in variant or
                                          variant == "reference eager" and not ctx.args.reference_x2t):
                continue
            results = []
            extra: dict[str, Any] = {}
            with peak_memory(extra):
                times = wall_times(lambda: results.append(pipeline.generate(request)),
                                   warmup=1, repeat=ctx.args.e2e_repeat)
            timings = results[-1].timings
            extra["stages_s"] = {k: round(v, 4) for k, v in timings.items()}
            floor_ms = None
            if request.task == "t2i":
                floor_ms = _t2i_floor_ms(ctx, config, request)
                image = results[-1].image
                if variant == "fast":
                    bf16_images[name] = image
                elif "fp8" in variant and name in bf16_images:
                    extra["psnr_vs_fast_bf16_db"] = psnr(image, bf16_images[name])
            else:
                tokens = len(results[-1].token_ids or [])
                extra["tokens"] = tokens
                extra["decode_tokens_per_s"] = tokens / timings["decode_text"] if timings.get("decode_text") else None
            ctx.rows.append(make_row("e2e", name, variant, times, floor_ms=floor_ms, **extra))
        for runner in (engines.mot, engines.vit):
            if isinstance(runner, (CudaMotRunner, CudaVitRunner)):
                runner.clear()
        torch.cuda.empty_cache()


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(((image.astype(np.float64) - reference.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf


def _t2i_floor_ms(ctx: Context, config: LanceLLMConfig, request: GenerationRequest) -> float | None:
    """The compute floor of a t2i request: its denoise forwards (56 for 30 steps with CFG above t = 0.4) at the
    measured peak, over the prompt's real context lengths; prefill and VAE excluded."""
    from runtime.pipeline.scheduler import cfg_active, make_schedule

    from runtime.pipeline.sequence import cfg_text_branch, plan_t2i

    if not ctx.peak_tflops:
        return None
    lat_h, lat_w = request.height // 16, request.width // 16
    lat = lat_h * lat_w
    schedule = make_schedule(request.steps, constants.DEFAULT_TIMESTEP_SHIFT)
    plan = plan_t2i(ctx.models.tokenizer, request.prompt, lat_h, lat_w)
    contexts = (plan.context_length, cfg_text_branch(plan).context_length)
    flops = 0.0
    for step in range(schedule.steps):
        batch = 2 if cfg_active(schedule.timesteps[step], constants.CFG_INTERVAL) else 1
        flops += mot_forward_flops(config, und_rows=2 * batch, gen_rows=lat * batch,
                                   keys=[lat + 2 + c for c in contexts[:batch]], logits_rows=batch)
    return flops / (ctx.peak_tflops * 1e9)


def part_video(ctx: Context) -> None:
    """t2v at ``--video-size`` (upstream's README 480 x 848) for each ``--video-frames``: a 1-step request that
    compiles and autotunes for the shape, then one request of ``--video-steps`` steps end to end (prefill, the loop,
    the chunked VAE decode; peak memory), then the denoise
    step of both CFG branches and of the cond branch alone, timed on the recorded feed against its floor. A full
    30-step request is extrapolated from those: prefill + 30 steps as the CFG interval runs them + decode."""
    from runtime.pipeline.scheduler import cfg_active, make_schedule

    models, config = ctx.models, ctx.models.mot.config
    height, width = ctx.args.video_size
    schedule = make_schedule(constants.DEFAULT_STEPS, constants.DEFAULT_TIMESTEP_SHIFT)
    cfg_steps = sum(cfg_active(t, constants.CFG_INTERVAL) for t in schedule.timesteps[:-1])
    for frames in ctx.args.video_frames:
        request = GenerationRequest("t2v", PROMPT, height=height, width=width, frames=frames,
                                    steps=ctx.args.video_steps, seed=0)
        recorder = Recorder(CudaMotRunner(models.specs["mot"], ctx.fast))
        engines = fast_engines(models, ctx.fast)
        engines["mot"] = recorder
        pipeline = LancePipeline(engines, models.host(), device=models.device, dtype=models.dtype)
        name = f"t2v {height}x{width} {frames} frames"
        extra: dict[str, Any] = {}
        with peak_memory(extra):
            start = time.perf_counter()
            pipeline.generate(replace(request, steps=1))
            extra["warmup_request_s"] = round(time.perf_counter() - start, 2)
            recorder.calls.clear()
            result = pipeline.generate(request)
        timings = result.timings
        extra["stages_s"] = {k: round(v, 4) for k, v in timings.items()}
        queries = [feed for feed, _ in recorder.calls if feed["latents"].shape[1] > 0]
        feed = queries[0]
        recorder.calls.clear()
        lat = feed["latents"].shape[1]
        ctx.rows.append(make_row("video", name, f"{request.steps} steps, warm", [1e3 * sum(timings.values())],
                                 latent_tokens=lat, frames=result.video.shape[0], **extra))
        step_ms = {}
        for batch, step_feed in ((2, feed), (1, first_branch(feed))):
            past = step_feed["past_len"].tolist()
            flops = mot_forward_flops(config, und_rows=2 * batch, gen_rows=lat * batch,
                                      keys=[lat + 2 + p for p in past], logits_rows=batch)
            runner = recorder.runner
            times = cuda_times(lambda: runner.infer(step_feed), warmup=1, repeat=ctx.args.video_repeat)
            step_ms[batch] = statistics.median(times)
            ctx.rows.append(make_row("video", f"{name} denoise step B={batch}", "fast compiled", times, flops=flops,
                                     peak_tflops=ctx.peak_tflops, latent_tokens=lat, past=past))
        floors = [row.floor_ms for row in ctx.rows[-2:]]            # B=2, B=1
        floor = cfg_steps * floors[0] + (schedule.steps - cfg_steps) * floors[1] if all(floors) else None
        estimate = (1e3 * (timings.get("prefill", 0.0) + timings.get("vae_decode", 0.0))
                    + cfg_steps * step_ms[2] + (schedule.steps - cfg_steps) * step_ms[1])
        ctx.rows.append(make_row("video", f"{name} 30 steps CFG 4.0", "extrapolated", [estimate], floor_ms=floor,
                                 cfg_steps=cfg_steps, vae_decode_s=round(timings.get("vae_decode", 0.0), 3)))
        recorder.runner.clear()
        del pipeline, engines, recorder, result, queries, feed
        torch.cuda.empty_cache()


PART_FUNCTIONS = {"peak": part_peak, "sdpa": part_sdpa, "denoise": part_denoise, "vit": part_vit,
                  "vae": part_vae, "text": part_text, "e2e": part_e2e, "video": part_video}


# --- Report --------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'part':<8} {'measurement':<44} {'variant':<26} {'median ms':>10} {'floor ms':>9} {'of floor':>8} "
             f"{'TFLOP/s':>8}  notes"]
    for r in rows:
        floor = "" if r.floor_ms is None else f"{r.floor_ms:9.2f}"
        share = "" if r.of_floor is None else f"{100 * r.of_floor:7.0f}%"
        tflops = "" if r.tflops is None else f"{r.tflops:8.0f}"
        notes = ", ".join(f"{k}={_short(v)}" for k, v in r.extra.items() if k not in ("stages_s", "bytes"))
        lines.append(f"{r.part:<8} {r.name:<44} {r.variant:<26} {r.ms:10.2f} {floor:>9} {share:>8} {tflops:>8}  "
                     f"{notes}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "numpy": np.__version__, "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type != "cuda":
        return {"gpu": f"none ({device})", **info}
    props = torch.cuda.get_device_properties(device)
    return {"gpu": torch.cuda.get_device_name(device), "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30, **info}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lance-trt bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 768, 1024], help="square image sides (px)")
    parser.add_argument("--e2e-sizes", nargs="*", type=int, default=[768, 1024], help="t2i sides of the e2e part")
    parser.add_argument("--repeat", type=int, default=10, help="timed repeats per component")
    parser.add_argument("--e2e-repeat", type=int, default=2, help="timed requests per end-to-end row")
    parser.add_argument("--tokens", type=int, default=128, help="AR decode steps timed")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="fast path without torch.compile'd element-wise kernels")
    parser.add_argument("--vae-precision", choices=PRECISIONS, default="bf16",
                        help="VAE precision of the end-to-end rows (the one that passes gpu_check's gate)")
    parser.add_argument("--reference-x2t", action="store_true", help="also time x2t with the eager engines")
    parser.add_argument("--e2e-variants", nargs="+", choices=E2E_VARIANTS, default=list(E2E_VARIANTS),
                        help="engine sets of the e2e part (the FP8 one runs t2i only)")
    parser.add_argument("--variants", nargs="+", choices=sorted(DENOISE_VARIANTS), default=["compiled", "compiled-fp8"],
                        help="fast-path variants the denoise part times")
    parser.add_argument("--attention", choices=sorted(SDPA_CHOICES), default="default",
                        help="SDPA backend of the fast path outside the variants the denoise part compares")
    parser.add_argument("--video-size", nargs=2, type=int, default=[480, 848], metavar=("H", "W"),
                        help="t2v size of the video part")
    parser.add_argument("--video-frames", nargs="+", type=int, default=[49, 121], help="t2v frame counts (4k+1)")
    parser.add_argument("--video-steps", type=int, default=2, help="steps of the video part's measured request")
    parser.add_argument("--video-repeat", type=int, default=3, help="timed repeats of each video denoise step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a smoke run of the script, CPU allowed)")
    parser.add_argument("--device", default="cuda")
    return parser


def bench_gpu_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lance-trt bench gpu: no CUDA device (--tiny --device cpu runs a smoke test)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    models = random_models(dtype=torch.bfloat16, device=device, seed=args.seed,
                           vae_dtype=PRECISION_DTYPES[args.vae_precision], tiny=args.tiny)
    ctx = Context(models, args, CudaMoT(models.mot, compile=args.compile and device.type == "cuda",
                                        sdpa_backends=SDPA_CHOICES[args.attention]))
    ctx.info["environment"] = _environment(device)
    ctx.info["weights_gib"] = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    logger.info("models built in %.1f s (%.1f GiB)", time.perf_counter() - start, ctx.info["weights_gib"])
    parts = [p for p in PARTS if p in args.parts]
    if "peak" not in parts:
        parts.insert(0, "peak")          # every ratio needs the measured ceilings
    failures = {}
    with torch.inference_mode():
        for part in parts:
            part_start = time.perf_counter()
            try:
                PART_FUNCTIONS[part](ctx)
            except Exception as err:   # one part's failure must not lose the others' numbers
                logger.exception("part %s failed", part)
                failures[part] = f"{type(err).__name__}: {err}"
            ctx.info[f"seconds {part}"] = round(time.perf_counter() - part_start, 1)
    result = {"environment": ctx.info.pop("environment"), "peak_tflops": ctx.peak_tflops,
              "bandwidth_gbps": ctx.bandwidth_gbps, "rows": [vars(r) | {"of_floor": r.of_floor} for r in ctx.rows],
              "info": ctx.info, "failures": failures, "argv": list(argv)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"GPU: {result['environment']['gpu']}, torch {torch.__version__}, measured bf16 peak "
          f"{ctx.peak_tflops or float('nan'):.0f} TFLOP/s, copy {ctx.bandwidth_gbps or float('nan'):.0f} GB/s")
    print(format_table(ctx.rows))
    for part, message in failures.items():
        print(f"FAILED {part}: {message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(bench_gpu_main(sys.argv[1:]))
