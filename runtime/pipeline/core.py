"""The Lance pipeline's shared phases over the engines, exactly as upstream computes them; each task is its own module
(``runtime/pipeline/<task>.py``) that strings these phases together, named by `runtime.spec.registry`.

One pipeline serves every backend: it talks to `runtime.runners.Engines` (runners bound by the contract's names) and
keeps the host work to itself: tokenizing and planning the sequence (`runtime.pipeline.sequence`), token and position
embeddings, mRoPE tables, the KV cache, the schedule, CFG and the Euler update (`runtime.pipeline.scheduler`), noise,
and image pre/post-processing.

`generate` validates the request and runs its task, whose phases read top-down: plan, encode the inputs, prefill each
CFG branch split by split, denoise (or decode text), decode the latent. Per-request state lives in locals and
`KVCache`s, never on ``self``, so one pipeline serves requests one after another. Cancellation is polled between steps
and tokens.

Determinism: the initial noise (and the VAE posterior noise of an edit) come from a CPU ``torch.Generator`` seeded
with the request's seed, drawn in fp32 and cast to the compute dtype, so a seed gives the same result on any device
and runner. Upstream draws bf16 noise from a CUDA generator; that is the one deliberate difference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from runtime.models.mot import LanceLLMConfig, latent_pos_table, mrope_cos_sin
from runtime.models.tokenizer import SpecialIds
from runtime.models.vit import VisionConfig, VisionInputs, vision_inputs
from runtime.pipeline.cfg_pair import COND, CfgPair
from runtime.pipeline.kv_cache import KVCache
from runtime.pipeline.preprocess import (
    load_image,
    load_video,
    to_uint8_image,
    to_uint8_video,
    vae_image_input,
    vae_video_input,
    vit_image_input,
    vit_video_input,
)
from runtime.pipeline.scheduler import apply_cfg, cfg_active, euler_step, make_schedule
from runtime.pipeline.sequence import SequencePlan, Split, cfg_text_branch, cond_branch, latent_position_ids
from runtime.runners import DeviceDecoding, Engines, Runner, to_device
from runtime.spec import constants, registry
from runtime.spec.contract import EngineSpec, torch_dtype
from runtime.spec.limits import FRAMES_STEP, MAX_IMAGE_PIXELS, MAX_SIZE, MAX_TEXT_ROWS
from runtime.spec.request import Cancelled, GenerationRequest, GenerationResult, RequestError

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]

VIT_TO_VAE_SIDE = 7 / 8              # upstream's resolutions: ViT 224/448/672 beside VAE 256/512/768
VIDEO_VIT_TO_VAE_SIDE = 616 / 640    # upstream's video_480p: ViT 616 beside VAE 640


@dataclass(frozen=True)
class LanceHost:
    """What the pipeline computes on the host: the tokenizer, the configs, and the two tables it gathers rows from.

    Attributes:
        tokenizer: Qwen2 fast tokenizer of the checkpoint.
        special: its special token ids.
        llm_config: the MoT configuration.
        vision_config: the ViT configuration.
        embed_weight: ``(vocab, D)`` token embedding (``language_model.model.embed_tokens.weight``).
        pos_table: ``(frames * 64**2, D)`` latent position table (regenerated, as upstream).
    """

    tokenizer: object
    special: SpecialIds
    llm_config: LanceLLMConfig
    vision_config: VisionConfig
    embed_weight: torch.Tensor
    pos_table: torch.Tensor

    def embed(self, token_ids: np.ndarray | list[int]) -> torch.Tensor:
        """``(L,)`` token ids -> ``(1, L, D)`` embeddings."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.embed_weight.device)
        return self.embed_weight[ids][None]

    def rope(self, position_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, L)`` mRoPE ids -> cos, sin ``(1, L, head_dim)`` fp32."""
        ids = torch.as_tensor(np.ascontiguousarray(position_ids), device=self.embed_weight.device)[None]
        cfg = self.llm_config
        return mrope_cos_sin(ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)


class LancePipeline:
    """Every registered task over `Engines` of any backend."""

    def __init__(self, engines: Engines, host: LanceHost, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, cfg_pair: CfgPair | None = None):
        self.engines = engines
        self.host = host
        self.device = torch.device(device)
        self.dtype = dtype
        self.cfg_pair = cfg_pair
        """With a `runtime.pipeline.cfg_pair.CfgPair`, this process computes one CFG branch of every request."""

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, runner: str = "torch", engine_dir: str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        fp8_gen: bool = False, fp8_fast_accum: bool = False, video: bool = False,
                        cfg_pair: CfgPair | None = None) -> "LancePipeline":
        """Load a checkpoint (folder in the HF layout or repo id) and build the engines of ``runner``: the PyTorch
        modules for ``torch`` (the fast CUDA engines on a GPU, `runtime.runners.factory.engines_for`), the graphs or
        plans in ``engine_dir`` otherwise (then only the host side is loaded). ``fp8_gen``, ``fp8_fast_accum``: see
        ``engines_for``. ``video``: the video model (``Lance_3B_Video``), which the video tasks need. ``cfg_pair``: this
        process's rank of a CFG pair."""
        from runtime.models.checkpoint import load_lance
        from runtime.spec.contract import engine_specs
        from runtime.runners.factory import engines_for

        if runner == "torch":
            models = load_lance(checkpoint, device=device, dtype=dtype, video=video)
            host = LanceHost(
                tokenizer=models.tokenizer, special=models.special_ids, llm_config=models.llm_config,
                vision_config=models.vision_config,
                embed_weight=models.mot.language_model.model.embed_tokens.weight.detach(),
                pos_table=models.mot.latent_pos_embed.pos_embed.detach(),
            )
            specs = engine_specs(models.llm_config, models.vision_config, models.vae_config)
            engines = engines_for(runner, models, specs=specs, precision=_precision(dtype), fp8_gen=fp8_gen,
                                  fp8_fast_accum=fp8_fast_accum)
        else:
            if engine_dir is None:
                raise ValueError(f"the {runner} runner needs --engines (a folder written by `lance-trt export`)")
            host, specs = load_host(checkpoint, device=device, dtype=dtype, video=video)
            engines = engines_for(runner, Path(engine_dir), specs=specs, precision=_precision(dtype),
                                  fp8_gen=fp8_gen)
        return cls(engines, host, device=device, dtype=dtype, cfg_pair=cfg_pair)

    # --- entry point ------------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """Run one request. Raises `RequestError` for bad input, `Cancelled` when ``is_cancelled()`` turns true."""
        request.validate()
        self.check_task(request)
        run = registered(registry.TASKS[request.task].run)
        if self.pairs(request):
            is_cancelled = self.cfg_pair.agreed(is_cancelled)   # both ranks stop at the same step
        timings: dict[str, float] = {}
        with torch.inference_mode():
            outputs = run(self, request, Progress(on_progress, is_cancelled), timings)
        return GenerationResult(**outputs, timings=timings)

    def pairs(self, request: GenerationRequest) -> bool:
        """Whether ``request`` runs on both ranks of this pipeline's CFG pair: a task that denoises latents, with
        text CFG on. The other requests (x2t, CFG scale 1) run on this process alone."""
        return (self.cfg_pair is not None and registry.TASKS[request.task].output != "text"
                and request.cfg_scale > 1.0)

    def check_task(self, request: GenerationRequest) -> None:
        """Refuse a request this pipeline cannot run: its task's engines are not all bound, or it needs the video model
        (a video task, or a video input) and the checkpoint is the image model (its position table holds one frame).

        Raises:
            RequestError: on ``task`` (or ``video``), naming what is missing.
        """
        task = registry.TASKS[request.task]
        missing = [name for name in task.engines if name not in self.engines]
        if missing:
            raise RequestError("task", f"{task.name} needs the engines {', '.join(missing)}, which this deployment "
                               "does not load")
        if registry.needs_video_model(task, set(request.media)) and self.host.llm_config.max_latent_frames < 2:
            field, what = ("task", task.name) if task.video_model else ("video", f"{task.name} on a video")
            raise RequestError(field, f"{what} needs the video model ({constants.VIDEO_CKPT_DIR}); this pipeline "
                               "loaded the image model")

    # --- phases -----------------------------------------------------------------------------------------------------

    def plan(self, request: GenerationRequest, *layout: Any, **options: Any) -> SequencePlan:
        """The sequence of ``request`` from its task's planner (`runtime.spec.registry.Task.planner`), called with the
        tokenizer, the prompt, ``layout`` (latent and ViT grids, the answer budget) and ``options``; a prompt the
        tokenizer or the planner refuses is the client's error."""
        planner = registered(registry.TASKS[request.task].planner)
        try:
            plan = planner(self.host.tokenizer, request.prompt, *layout, **options)
        except ValueError as err:
            raise RequestError("prompt", str(err)) from None
        text_rows = sum(len(s.token_ids) for s in plan.splits if s.kind == "text")
        if text_rows > MAX_TEXT_ROWS:
            raise RequestError("prompt", f"the prompt makes {text_rows} text tokens, at most {MAX_TEXT_ROWS} fit "
                               "the context budget")
        return plan

    def load_image(self, request: GenerationRequest) -> Any:
        """The request's input image, decoded (PIL); a file that is not an image is the client's error."""
        try:
            return load_image(request.image, max_pixels=MAX_IMAGE_PIXELS)
        except ValueError as err:
            raise RequestError("image", str(err)) from None

    def media_inputs(self, request: GenerationRequest, vit_to_vae_side: float,
                     timings: dict[str, float]) -> tuple[torch.Tensor, Any, tuple[int, int, int]]:
        """The request's image or video as the VAE sees it (aspect bucket at the requested area, on this device:
        ``(1, 3, H, W)`` or ``(1, 3, T, H, W)``) and as the ViT sees it (patches, per frame pair for a video, and the
        grid at ``vit_to_vae_side`` of that side): the inputs of edit, i2v and video edit.

        Raises:
            RequestError: the medium cannot be decoded, or its bucket at this area is wider than the latent table.
        """
        video = request.video is not None
        media = self.load_video(request) if video else self.load_image(request)
        area_side = area_side_of(request)
        vit_side = round(area_side * vit_to_vae_side)
        with timed(timings, "preprocess"):
            if video:
                pixels, (patches, vit_grid) = vae_video_input(media, area_side), vit_video_input(media, vit_side)
            else:
                pixels, (patches, vit_grid) = vae_image_input(media, area_side), vit_image_input(media, vit_side)
        check_bucket(request, pixels, "video" if video else "image")
        return pixels.to(self.device, torch.float32), patches, vit_grid

    def load_video(self, request: GenerationRequest) -> list[Any]:
        """The frames upstream samples from the request's video (PIL); a file that is not a video is the client's
        error."""
        try:
            return load_video(request.video, max_pixels=MAX_IMAGE_PIXELS)
        except ValueError as err:
            raise RequestError("video", str(err)) from None

    def infer(self, runner: Runner, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run an engine with every input cast to its contract dtype at this pipeline's precision, on the device
        (the runner's host inputs on the CPU). Host-to-device copies do not wait for the device
        (`runtime.runners.to_device`): the loop queues its steps without synchronising."""
        precision = _precision(self.dtype)
        dtypes = {t.name: torch_dtype(t.dtype, precision) for t in runner.spec.inputs}
        cpu = torch.device("cpu")
        return runner.infer({name: to_device(value, cpu if name in runner.host_inputs else self.device, dtypes[name])
                             for name, value in feed.items()})

    def vit(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """ViT rows ``(1, P/4, D)`` of one image (or one frame pair)."""
        feed = {**_vision_inputs(grid, self.host.vision_config).engine_inputs(), "patches": patches}
        (rows,) = self.infer(self.engines.vit, feed).values()
        return rows[None]

    def vit_video(self, pairs: Sequence[torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
        """ViT rows ``(1, T/2 * P/4, D)`` of a video: one engine call per frame pair (`vit_video_input`), in ``t``
        order."""
        pair_grid = (1, *grid[1:])
        return torch.cat([self.vit(patches, pair_grid) for patches in pairs], dim=1)

    def encode_video(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """A reference video ``(1, 3, 1 + 4k, H, W)`` as sampled latent tokens ``(1, (1 + k) * h * w, 48)`` in (t, h,
        w) raster order: frame 0 alone, then 4 frames per engine call with the causal caches passed along (upstream
        ``WanVAE_.encode``), each latent frame sampled with its slice of one seeded noise tensor."""
        step = constants.VAE_DOWNSAMPLE_TEMPORAL
        t, (h, w) = latent_frames(pixels.shape[2]), latent_size(*pixels.shape[-2:])
        noise = randn((1, constants.LATENT_CHANNELS, t, h, w), seed + 1)
        out = self.infer(self.engines.vae_encode_first, {"video": pixels[:, :, :1], "noise": noise[:, :, :1]})
        latents = [out["latent"]]
        for index in range(1, t):
            frames = pixels[:, :, 1 + (index - 1) * step:1 + index * step]
            out = self.infer(self.engines.vae_encode_chunk, {"video": frames, "noise": noise[:, :, index:index + 1],
                                                             **carried(out)})
            latents.append(out["latent"])
        return to_tokens(torch.cat(latents, dim=2))

    def encode_reference(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """The edit reference as latent tokens ``(1, h*w, 48)``: Lance samples the posterior, with explicit noise."""
        h, w = latent_size(*pixels.shape[-2:])
        noise = randn((1, constants.LATENT_CHANNELS, h, w), seed + 1)
        out = self.infer(self.engines.vae_encode, {"image": pixels, "noise": noise})
        return to_tokens(out["latent"])

    def new_cache(self, capacity: int, batch: int) -> KVCache:
        cfg = self.host.llm_config
        return KVCache(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                       capacity=capacity, batch=batch, dtype=self.dtype, device=self.device)

    def prefill(self, context: Sequence[tuple[Split, np.ndarray]], cache: KVCache, branch: int, *,
                vit_rows: torch.Tensor | None, ref_latent: torch.Tensor | None) -> torch.Tensor:
        """Write ``context`` (splits with their position ids: `SequencePlan.context`, `Branch.context`) into
        ``cache`` slot ``branch``, one engine call per split (upstream's KV protocol: text causal, visual blocks
        bidirectional). Returns the last call's logits."""
        logits = None
        for split, positions in context:
            feed = self.split_feed(split, positions, vit_rows, ref_latent)
            out = self.mot(feed, cache, slice(branch, branch + 1), causal=split.attn_mode == "causal")
            cache.append(slice(branch, branch + 1), out["key"], out["value"])
            logits = out["logits"]
        return logits

    def split_feed(self, split: Split, positions: np.ndarray, vit_rows: torch.Tensor | None,
                    latents: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The row groups of one split: text and ViT blocks are all und rows; a latent block is
        ``[<|vision_start|>] + latents (gen) + [<|vision_end|>]`` at t = 0 (a clean reference; the denoise query
        sets its own timesteps in `velocity`)."""
        host = self.host
        if split.kind == "text":
            head, lat, tail = host.embed(split.token_ids), self._no_latents(1), self._no_rows(1)
            latent_pos = self._no_rows(1)[0]
        elif split.kind == "vit":
            ids = split.token_ids
            head = torch.cat([host.embed(ids[:1]), vit_rows, host.embed(ids[-1:])], dim=1)
            lat, tail, latent_pos = self._no_latents(1), self._no_rows(1), self._no_rows(1)[0]
        else:
            t, h, w = split.latent_thw
            head, tail = host.embed(split.token_ids[:1]), host.embed(split.token_ids[-1:])
            lat = latents
            latent_pos = host.pos_table[torch.as_tensor(latent_position_ids(t, h, w), device=self.device)]
        cos, sin = host.rope(positions)
        return {"und_head": head, "latents": lat, "timestep": torch.zeros(1, lat.shape[1]), "latent_pos": latent_pos,
                "und_tail": tail, "cos": cos, "sin": sin}

    def mot(self, feed: dict[str, torch.Tensor], cache: KVCache, branches: slice, causal: bool) -> dict:
        past_key, past_value, past_len = cache.past(branches)
        return self.infer(self.engines.mot, {
            **feed, "past_key": past_key, "past_value": past_value, "past_len": past_len,
            "causal": torch.tensor(causal),
        })

    def generate_latent(self, request: GenerationRequest, plan: SequencePlan, progress: "Progress",
                         timings: dict[str, float], *, ref_latent: torch.Tensor | None,
                         vit_rows: torch.Tensor | None = None, clean: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill the cond (and cfg_text) context, then run the Euler loop on the noise block.

        ``clean`` ``(1, n, 48)``: latent tokens that start the noise block and stay as they are (i2v's first frame,
        upstream ``frame_condition_idx=[0]``): they enter every step at t = 0 and no step updates them, while the CFG
        renormalisation still measures the velocity of the whole block, as upstream's."""
        use_cfg = request.cfg_scale > 1.0
        branches = [cond_branch(plan)] + ([cfg_text_branch(plan)] if use_cfg else [])
        pair = self.cfg_pair if self.pairs(request) else None
        if pair is not None:
            branches = branches[pair.rank:pair.rank + 1]       # this rank's branch only
        cache = self.new_cache(max(b.context_length for b in branches), batch=len(branches))
        with timed(timings, "prefill"):
            for index, branch in enumerate(branches):
                self.prefill(branch.context, cache, index, vit_rows=vit_rows, ref_latent=ref_latent)
        noise_split = plan.splits[plan.noise_index]
        t, h, w = noise_split.latent_thw
        x = randn((1, t * h * w, constants.LATENT_CHANNELS), request.seed).to(self.device, self.dtype)
        pinned = 0 if clean is None else clean.shape[1]
        if clean is not None:
            x[:, :pinned] = clean.to(x.dtype)
        schedule = make_schedule(request.steps, constants.DEFAULT_TIMESTEP_SHIFT)
        # The noise query of each branch: its own positions, the same rows.
        query = [self.split_feed(noise_split, b.query_position_ids, None, x) for b in branches]
        with timed(timings, "denoise"):
            for step in range(schedule.steps):
                progress.check()
                t_now = schedule.timesteps[step]
                cfg = use_cfg and cfg_active(t_now, constants.CFG_INTERVAL)
                velocity = self.step_velocity(query, x, t_now, cache, pinned, cfg=cfg, pair=pair)
                if cfg:
                    velocity = apply_cfg(velocity[0:1], velocity[1:2], request.cfg_scale, constants.CFG_RENORM_MIN)
                x[:, pinned:] = euler_step(x[:, pinned:], velocity[:, pinned:], schedule.dts[step])
                progress.advance(step + 1, schedule.steps)
        return x

    def step_velocity(self, query: list[dict[str, torch.Tensor]], x: torch.Tensor, t: float, cache: KVCache,
                      clean_rows: int, *, cfg: bool, pair: CfgPair | None) -> torch.Tensor:
        """One step's velocities, ``(2, L, 48)`` conditional first where ``cfg``, else ``(1, L, 48)``: both branches
        batched in one call, or with a CFG pair this rank's branch and the other's by exchange."""
        if pair is None:
            return self.velocity(query[:2 if cfg else 1], x, t, cache, clean_rows)
        if cfg:
            return pair.exchange(self.velocity(query, x, t, cache, clean_rows))
        own = self.velocity(query, x, t, cache, clean_rows) if pair.rank == COND else None
        return pair.share(own, like=x)

    def velocity(self, queries: list[dict[str, torch.Tensor]], x: torch.Tensor, t: float,
                  cache: KVCache, clean_rows: int = 0) -> torch.Tensor:
        """One batched noise-block query over ``len(queries)`` branches (rows stacked, attention per branch); the
        first ``clean_rows`` latent rows are at t = 0."""
        batch = len(queries)
        feed = {name: torch.cat([q[name] for q in queries]) for name in ("und_head", "und_tail", "cos", "sin")}
        feed["latents"] = x.expand(batch, -1, -1)
        timestep = torch.full((batch, x.shape[1]), t)
        timestep[:, :clean_rows] = 0.0
        feed["timestep"] = timestep
        feed["latent_pos"] = queries[0]["latent_pos"]
        return self.mot(feed, cache, slice(0, batch), causal=False)["velocity"]

    def decode_text(self, plan: SequencePlan, cache: KVCache, max_new_tokens: int,
                     progress: "Progress") -> list[int]:
        """Greedy decoding: first input ``"\\n"``, logits past ``len(tokenizer)`` masked, stop at ``<|im_end|>``."""
        if isinstance(self.engines.mot, DeviceDecoding):
            return self._decode_on_device(self.engines.mot, plan, cache, max_new_tokens, progress)
        special = self.host.special
        positions = plan.position_ids[:, plan.num_tokens:]
        token, tokens = plan.decode_token_id, []
        for step in range(max_new_tokens):
            progress.check()
            split = Split("text", (token,), int(plan.splits[-1].modality))
            feed = self.split_feed(split, positions[:, step:step + 1], None, None)
            out = self.mot(feed, cache, slice(0, 1), causal=True)
            cache.append(slice(0, 1), out["key"], out["value"])
            logits = out["logits"][0].float()
            logits[special.len:] = -math.inf
            token = int(logits.argmax())
            progress.advance(step + 1, max_new_tokens)
            if token == special.im_end:
                break
            tokens.append(token)
        return tokens

    def _decode_on_device(self, mot: DeviceDecoding, plan: SequencePlan, cache: KVCache, max_new_tokens: int,
                          progress: "Progress") -> list[int]:
        """`decode_text`'s loop run by the engine on its device, a few tokens per host round trip (cancellation and
        progress are checked per round trip; tokens past the stop token are dropped)."""
        special = self.host.special
        past_key, past_value, past_len = cache.past(slice(0, 1))
        cos, sin = self.host.rope(plan.position_ids[:, plan.num_tokens:plan.num_tokens + max_new_tokens])
        loop = mot.greedy_loop(int(past_len[0]), max_new_tokens, self.host.embed_weight, allowed=special.len)
        loop.start(past_key, past_value, plan.decode_token_id, cos, sin)
        decoded: list[int] = []
        while len(decoded) < max_new_tokens and special.im_end not in decoded:
            progress.check()
            decoded += loop.next_tokens()
            progress.advance(min(len(decoded), max_new_tokens), max_new_tokens)
        decoded = decoded[:max_new_tokens]
        return decoded[:decoded.index(special.im_end)] if special.im_end in decoded else decoded

    def decode_image(self, latent: torch.Tensor, lat_h: int, lat_w: int, timings: dict[str, float]) -> np.ndarray:
        """Latent tokens ``(1, h*w, 48)`` -> ``(H, W, 3)`` uint8 with upstream's rounding."""
        with timed(timings, "vae_decode"):
            grid = latent.reshape(1, lat_h, lat_w, constants.LATENT_CHANNELS).permute(0, 3, 1, 2).contiguous()
            image = self.infer(self.engines.vae_decode, {"latent": grid})["image"]
        return to_uint8_image(image.float().cpu())

    def decode_video(self, latent: torch.Tensor, grid: tuple[int, int, int], timings: dict[str, float],
                     progress: "Progress") -> np.ndarray:
        """Latent tokens ``(1, t*h*w, 48)`` -> ``(1 + 4(t-1), H, W, 3)`` uint8, one latent frame per engine call
        (upstream ``WanVAE_.decode``): the caches pass from call to call, so memory holds one chunk, not the video."""
        t, h, w = grid
        frames = latent.reshape(1, t, h, w, constants.LATENT_CHANNELS).permute(0, 4, 1, 2, 3)
        pixels = []
        with timed(timings, "vae_decode"):
            out = self.infer(self.engines.vae_decode_first, {"latent": frames[:, :, :1].contiguous()})
            pixels.append(to_uint8_video(out["video"].float().cpu()))
            for index in range(1, t):
                progress.check()
                feed = {"latent": frames[:, :, index:index + 1].contiguous(), **carried(out)}
                out = self.infer(self.engines.vae_decode_chunk, feed)
                pixels.append(to_uint8_video(out["video"].float().cpu()))
        return np.concatenate(pixels)

    def _no_rows(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 0, self.host.llm_config.hidden_size, device=self.device)

    def _no_latents(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 0, constants.LATENT_CHANNELS, device=self.device)


def load_host(checkpoint: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              video: bool = False) -> tuple[LanceHost, dict[str, EngineSpec]]:
    """The host side of a pipeline and the engines' contract, without building any network (for runners whose
    engines hold the weights): tokenizer, configs, the token embedding and the regenerated latent position table."""
    from runtime.models.checkpoint import load_host_parts
    from runtime.spec.contract import engine_specs

    parts = load_host_parts(checkpoint, device=device, dtype=dtype, video=video)
    cfg = parts.llm_config
    pos_table = latent_pos_table(cfg.max_latent_frames, constants.MAX_LATENT_SIZE, cfg.hidden_size)
    host = LanceHost(tokenizer=parts.tokenizer, special=parts.special_ids, llm_config=cfg,
                     vision_config=parts.vision_config, embed_weight=parts.embed_weight,
                     pos_table=pos_table.to(device=device, dtype=dtype))
    return host, engine_specs(cfg, parts.vision_config, parts.vae_config)


@functools.cache
def registered(path: str) -> Callable[..., Any]:
    """The function a registry entry names as ``module:function`` (`runtime.spec.registry.Task`)."""
    module, function = path.split(":")
    return getattr(importlib.import_module(module), function)


@functools.lru_cache(maxsize=8)
def _vision_inputs(grid: tuple[int, int, int], config: VisionConfig) -> VisionInputs:
    """`vision_inputs` per grid, kept for the next request of the same bucket: its two ``(P, P)`` masks take tens of
    milliseconds on the host at 672x672 (the engines never write their inputs)."""
    return vision_inputs(grid, config)


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The compute dtype of each precision (`runtime.spec.contract.PRECISIONS`)."""


def _precision(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def latent_size(height: int, width: int) -> tuple[int, int]:
    return height // constants.VAE_DOWNSAMPLE_SPATIAL, width // constants.VAE_DOWNSAMPLE_SPATIAL


def area_side_of(request: GenerationRequest) -> int:
    """The side of the square whose area the request asks for: edit, i2v and video edit bucket their input at it."""
    return round(math.sqrt(request.height * request.width))


def check_bucket(request: GenerationRequest, pixels: torch.Tensor, medium: str) -> None:
    """Refuse an input whose aspect bucket at the requested area is wider than the latent position table.

    Raises:
        RequestError: on ``height``, saying what to ask instead.
    """
    if max(pixels.shape[-2:]) // constants.VAE_DOWNSAMPLE_SPATIAL > constants.MAX_LATENT_SIZE:
        raise RequestError("height", f"the {medium}'s aspect bucket at {request.height}x{request.width} is "
                           f"{pixels.shape[-2]}x{pixels.shape[-1]}, over {MAX_SIZE} px per side: ask for a smaller area")


def carried(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A chunk engine's ``next.<conv>`` caches as the next call's ``past.<conv>`` inputs."""
    return {name.replace("next.", "past.", 1): value for name, value in outputs.items() if name.startswith("next.")}


def latent_frames(frames: int) -> int:
    """Latent frames of a ``1 + 4k`` frame video: ``1 + k`` (upstream ``get_thw``)."""
    return (frames - 1) // FRAMES_STEP + 1


def randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 standard normal noise from a CPU generator (docs/design/engines.md §6)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """``(1, 48, h, w)`` -> ``(1, h*w, 48)`` in (h, w) raster order, Lance's packing."""
    return latent.flatten(2).transpose(1, 2).contiguous()


class Progress:
    """Progress reporting and cancellation polling between steps."""

    def __init__(self, on_progress: ProgressCallback | None, is_cancelled: CancelCheck | None):
        self._on_progress = on_progress
        self._is_cancelled = is_cancelled

    def check(self) -> None:
        if self._is_cancelled is not None and self._is_cancelled():
            raise Cancelled("the request was cancelled")

    def advance(self, done: int, total: int) -> None:
        if self._on_progress is not None:
            self._on_progress(done, total)


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a stage's time includes its queued kernels
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
