"""What Lance feeds its LLM for each task: token splits, attention modes, modalities, and mRoPE position ids with the
MaPE shifts (docs/design/model.md §1.4, §1.5, §3.3, §4.5, §6).

Upstream [L:data/datasets_custom/validation_dataset.py] renders a Qwen-VL chat template in text-template mode
(``TEXT_TEMPLATE=true``, ``--apply_chat_template false``, system prompt ``SP0``), tokenizes it, expands each visual
placeholder into a block ``<|vision_start|> <|video_pad|>*N <|vision_end|>``, and cuts the sequence into splits:
text runs (causal), ViT blocks (full), clean VAE reference blocks (full) and the noisy target block. Positions are
Qwen2.5-VL's ``get_rope_index`` over the whole token sequence [L:modeling/lance/qwen2_navit.py], then the MaPE shifts
of ``shift_position_ids(pro_type=10)`` [L:data/common.py]. With the KV cache [L:modeling/lance/lance.py
``validation_gen_KVcache``] the splits before the noise block are prefilled one by one and the noise block is the
per-step query; the template's trailing ``<|im_end|>`` after the noise block is never computed, so plans end with the
noise block. The cfg_text branch drops the user-text split and recomputes positions on the shorter sequence
(``uncond_split_pro_kvcache``).

Everything here is host code (python/numpy); engines receive the resulting ids and positions as tensors.

Tokenization. Upstream tokenizes the rendered text in one piece and finds the caption by tokenizing it alone and
searching for that id sequence. We tokenize the pieces separately (template text, caption, template text) and
concatenate, so the caption split is exact by construction. The two agree except in these cases, where we keep our
split and log a warning:

* the caption starts with whitespace containing a line break (``"\\n..."``, ``" \\n..."``): in the rendered text it
  follows ``"user\\n"`` and Qwen2's pre-tokenizer joins the line breaks into one token. This only concerns t2i/t2v;
  the edit instruction follows ``<|vision_end|>`` and ends before ``<|im_end|>``, special tokens that BPE never merges
  across, and the x2t question is not searched for at all;
* the caption's own ids also occur earlier in the sequence (e.g. a prompt equal to the start of the system prompt):
  upstream takes the first occurrence and so marks the wrong tokens as the user text.

Where upstream's search finds nothing it raises; we build the plan.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Sequence

import numpy as np

from runtime.spec import constants

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

VISION_START_ID = constants.QWEN2_SPECIAL_TOKENS[constants.VISION_START]
VISION_END_ID = constants.QWEN2_SPECIAL_TOKENS[constants.VISION_END]
PLACEHOLDER_ID = constants.VISUAL_PLACEHOLDER_ID
ENDOFTEXT_ID = constants.QWEN2_SPECIAL_TOKENS[constants.ENDOFTEXT]
# Vision tokens a user's text must not contain: they would open visual blocks that have no grid.
_VISION_TOKEN_IDS = frozenset(
    constants.QWEN2_SPECIAL_TOKENS[t]
    for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
)

# llm_config.json's vision_config [docs/design/model.md §1.5]: spatial_merge_size 2, tokens_per_second 2.
SPATIAL_MERGE_SIZE = 2
TOKENS_PER_SECOND = 2


class Modality(enum.IntEnum):
    """Per-token modality tags of upstream's ``modality_map`` [L:data/datasets_custom/validation_dataset.py]."""

    SYSTEM_PROMPT = -1  # every template token that is not the user's text (incl. chat glue)
    TEXT = 0            # the user's caption / edit instruction: the split the cfg_text branch drops
    NOISE = 1           # the noisy target block
    REF_SOURCE = 2      # clean VAE block of the edit source
    REF_IMAGE = 3       # clean VAE block of an identity reference ("idip"; no builder here)
    REF_VIT = 4         # ViT block


_MODALITY_VALUES = frozenset(int(m) for m in Modality)
SPLIT_KINDS = ("text", "vit", "vae_ref", "noise")


# --- Positions -------------------------------------------------------------------------------------------------------


def get_rope_index(
    input_ids: Sequence[int] | np.ndarray,
    visual_grids: Sequence[Sequence[int]],
    spatial_merge_size: int = SPATIAL_MERGE_SIZE,
    tokens_per_second: float = TOKENS_PER_SECOND,
) -> np.ndarray:
    """Qwen2.5-VL mRoPE position ids as Lance computes them [L:modeling/lance/qwen2_navit.py ``get_rope_index``].

    A visual block is ``<|vision_start|>`` followed by a run of ``<|video_pad|>`` placeholders; Lance marks every
    block as video with ``second_per_grid_ts = 1.0``. Text tokens (``<|vision_start|>``/``<|vision_end|>``
    included) take ``n, n+1, ...`` on all three axes, ``n`` being one past the largest id so far; placeholder cell
    ``(ti, hi, wi)`` of a block whose ``<|vision_start|>`` sits at ``P`` takes
    ``(P+1 + int(ti * tokens_per_second), P+1 + hi, P+1 + wi)``.

    This is the algorithm of transformers < 5 that Lance copied. transformers 5.x restarts text after a block at
    ``P+1 + max(h, w)`` instead of one past the block's largest id: the same for images, different for videos whose
    temporal ids reach further, ``tokens_per_second * (t-1) >= max(h, w)`` (merged h, w).

    Args:
        input_ids: ``(L,)`` int token ids.
        visual_grids: one ``(t, h, w)`` per visual block in order of appearance, before merging: ViT blocks
            ``(T/2, H/14, W/14)``, VAE blocks ``(t_lat, 2*h_lat, 2*w_lat)``; a block holds
            ``t * h * w / spatial_merge_size**2`` placeholders.
        spatial_merge_size: divides the grid's h and w.
        tokens_per_second: temporal stride of consecutive grid frames.
    Returns:
        ``(3, L)`` int64 ids, rows t/h/w.
    Raises:
        ValueError: the number of blocks differs from ``len(visual_grids)``, a block's placeholder run does not hold
            exactly its grid's cell count, or a placeholder stands outside a block.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {ids.shape}")
    starts = np.flatnonzero((ids[:-1] == VISION_START_ID) & (ids[1:] == PLACEHOLDER_ID)) + 1
    if len(starts) != len(visual_grids):
        raise ValueError(f"{len(starts)} visual blocks in input_ids but {len(visual_grids)} grids given")
    positions = np.empty((3, len(ids)), dtype=np.int64)
    cursor = next_id = placeholders = 0
    for start, grid in zip(starts.tolist(), visual_grids):
        t, h, w = _merged_grid(grid, spatial_merge_size)
        end = start + t * h * w
        overrun = end < len(ids) and ids[end] == PLACEHOLDER_ID
        if end > len(ids) or np.any(ids[start:end] != PLACEHOLDER_ID) or overrun:
            raise ValueError(f"the visual block at token {start} does not hold exactly {t * h * w} placeholders "
                             f"(grid {tuple(grid)})")
        positions[:, cursor:start] = next_id + np.arange(start - cursor)
        base = next_id + (start - cursor)
        # Upstream scales the frame index in float and truncates (torch ``.long()``).
        t_ids = (np.arange(t) * 1.0 * tokens_per_second).astype(np.int64)
        block = np.stack(np.meshgrid(t_ids, np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1) + base
        positions[:, start:end] = block
        next_id = int(block.max()) + 1
        cursor = end
        placeholders += t * h * w
    if int(np.count_nonzero(ids == PLACEHOLDER_ID)) != placeholders:
        raise ValueError("input_ids holds <|video_pad|> tokens outside the visual blocks")
    positions[:, cursor:] = next_id + np.arange(len(ids) - cursor)
    return positions


def _merged_grid(grid: Sequence[int], spatial_merge_size: int) -> tuple[int, int, int]:
    """``(t, h / m, w / m)`` of a block's ``(t, h, w)`` grid; raises ValueError for a malformed grid."""
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"a visual grid is three positive ints (t, h, w), got {tuple(grid)}")
    t, h, w = (int(g) for g in grid)
    if h % spatial_merge_size or w % spatial_merge_size:
        raise ValueError(f"grid {tuple(grid)}: h and w must be multiples of spatial_merge_size={spatial_merge_size}")
    return t, h // spatial_merge_size, w // spatial_merge_size


def mape_shift(position_ids: np.ndarray, modalities: Sequence[int] | np.ndarray) -> np.ndarray:
    """Lance's modality-aware RoPE shifts, upstream ``shift_position_ids(pro_type=10)`` [L:data/common.py].

    In this order: the t-row of all ``REF_VIT`` tokens is offset so the first of them has t = 1000; likewise
    ``REF_IMAGE`` to 2000; if ``REF_SOURCE`` tokens exist and are as many as the ``NOISE`` tokens, the noise tokens
    take the reference tokens' ids on all three rows. Tokens after a shifted block keep their unshifted ids.

    Upstream runs the rules once per full/full_noise split (they are idempotent) and not at all without such a split;
    ViT and reference blocks are exactly those splits, so the rules never fire without one and the gate is omitted.

    Args:
        position_ids: ``(3, L)`` int ids from `get_rope_index`.
        modalities: ``(L,)`` `Modality` value per token.
    Returns:
        A shifted ``(3, L)`` int64 copy.
    """
    positions = np.array(position_ids, dtype=np.int64, copy=True)
    modality = np.asarray(modalities, dtype=np.int64)
    if positions.ndim != 2 or positions.shape[0] != 3 or modality.shape != (positions.shape[1],):
        raise ValueError(f"position_ids must be (3, L) and modalities (L,), got {positions.shape} and "
                         f"{modality.shape}")
    # Upstream tests "any ids non-zero" (sum != 0); for a real block that is "the block exists".
    for tag, first_t in ((Modality.REF_VIT, constants.MAPE_VIT_T_OFFSET),
                         (Modality.REF_IMAGE, constants.MAPE_REF_IMAGE_T_OFFSET)):
        mask = modality == tag
        if positions[:, mask].sum() != 0:
            positions[0, mask] += first_t - positions[0, mask][0]
    source, noise = modality == Modality.REF_SOURCE, modality == Modality.NOISE
    if positions[:, source].sum() != 0 and source.sum() == noise.sum():
        positions[:, noise] = positions[:, source]
    return positions


def latent_position_ids(t: int, h: int, w: int, max_size: int = constants.MAX_LATENT_SIZE) -> np.ndarray:
    """Rows of ``latent_pos_embed`` for a ``(t, h, w)`` latent in raster order (t, then h, then w):
    ``ti * max_size**2 + hi * max_size + wi`` [L:data/data_utils.py ``get_flattened_position_ids_extrapolate_video``].

    Every VAE block starts at 0, so an edit reference and its target get identical ids. A width beyond ``max_size``
    aliases into the next row, as upstream (no guard there either); a warning is logged.

    Returns:
        ``(t*h*w,)`` int64.
    """
    if min(t, h, w) < 1:
        raise ValueError(f"latent grid must be positive, got (t, h, w) = ({t}, {h}, {w})")
    if max(h, w) > max_size:
        logger.warning("latent grid %dx%d exceeds max_latent_size=%d: positions alias, as upstream", h, w, max_size)
    ids = (np.arange(t)[:, None, None] * max_size * max_size + np.arange(h)[None, :, None] * max_size
           + np.arange(w)[None, None, :])
    return ids.reshape(-1).astype(np.int64)


# --- Splits and plans -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One piece of the sequence, prefilled (or, for ``noise``, queried) as a unit.

    Attributes:
        kind: ``"text"``, ``"vit"`` (ViT block, und weights), ``"vae_ref"`` (clean VAE latent block, gen weights on
            its latent rows) or ``"noise"`` (the noisy target block, the per-step query).
        token_ids: the split's token ids; a visual block is ``<|vision_start|>``, ``num_rows`` placeholders,
            ``<|vision_end|>``, and its rows 1..num_rows are replaced by ViT / latent embeddings.
        modality: `Modality` tag of every token of the split.
        grid_thw: visual blocks: the grid given to `get_rope_index`, ViT ``(T/2, H/14, W/14)`` (the ViT's own
            grid_thw) or VAE ``(t_lat, 2*h_lat, 2*w_lat)``; None for text.
    """

    kind: str
    token_ids: tuple[int, ...]
    modality: int
    grid_thw: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"split kind must be one of {SPLIT_KINDS}, got {self.kind!r}")
        if self.modality not in _MODALITY_VALUES:
            raise ValueError(f"modality must be one of {sorted(_MODALITY_VALUES)}, got {self.modality!r}")
        if not self.token_ids:
            raise ValueError("a split holds at least one token")
        if self.kind == "text":
            if self.grid_thw is not None:
                raise ValueError("a text split has no grid")
            if _VISION_TOKEN_IDS.intersection(self.token_ids):
                raise ValueError("a text split must not contain vision tokens")
            return
        if self.grid_thw is None:
            raise ValueError(f"a {self.kind} split needs grid_thw")
        if self.token_ids != _block_ids(self.grid_thw):
            raise ValueError(f"a {self.kind} split of grid {self.grid_thw} must be <|vision_start|>, its grid's "
                             "merged cell count of <|video_pad|>, <|vision_end|>")

    @property
    def attn_mode(self) -> str:
        """``"causal"`` for text; ``"full"`` (bidirectional within the split, all cached keys visible) otherwise."""
        return "causal" if self.kind == "text" else "full"

    @property
    def num_rows(self) -> int:
        """ViT tokens or latent tokens of a visual block (``len(token_ids) - 2``); 0 for text."""
        return 0 if self.kind == "text" else len(self.token_ids) - 2

    @property
    def latent_thw(self) -> tuple[int, int, int]:
        """``(t, h, w)`` latent grid of a ``vae_ref`` / ``noise`` block."""
        if self.kind not in ("vae_ref", "noise"):
            raise ValueError(f"a {self.kind} split has no latent grid")
        return _merged_grid(self.grid_thw, SPATIAL_MERGE_SIZE)


def _block_ids(grid_thw: Sequence[int]) -> tuple[int, ...]:
    """``<|vision_start|>``, one placeholder per merged grid cell, ``<|vision_end|>``."""
    t, h, w = _merged_grid(grid_thw, SPATIAL_MERGE_SIZE)
    return (VISION_START_ID, *(PLACEHOLDER_ID,) * (t * h * w), VISION_END_ID)


def _text_split(token_ids: Sequence[int], modality: Modality) -> Split:
    return Split("text", tuple(token_ids), int(modality))


def _visual_split(kind: str, grid_thw: Sequence[int], modality: Modality) -> Split:
    return Split(kind, _block_ids(grid_thw), int(modality), tuple(int(g) for g in grid_thw))


@dataclass(frozen=True, eq=False)
class SequencePlan:
    """The splits of one CFG branch and the mRoPE ids of its whole sequence.

    Generation plans end with the ``noise`` split; the ones before it are the context to prefill. x2t plans have no
    noise split: their splits are the whole context, ``decode_token_id`` is the first decode input (the ``"\\n"``
    after ``assistant``), and ``position_ids`` also covers that token and ``max_new_tokens`` more, as upstream
    (decode step ``s`` feeds position column ``num_tokens + s``).

    Attributes:
        splits: the splits in sequence order.
        position_ids: ``(3, P)`` int64, read-only; ``P = num_tokens`` for generation,
            ``num_tokens + 1 + max_new_tokens`` for x2t.
        decode_token_id: x2t only.
        max_new_tokens: x2t only (0 otherwise).
    """

    splits: tuple[Split, ...]
    position_ids: np.ndarray
    decode_token_id: int | None = None
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        positions = np.array(self.position_ids, dtype=np.int64, copy=True)
        positions.setflags(write=False)
        object.__setattr__(self, "position_ids", positions)
        kinds = [s.kind for s in self.splits]
        if "noise" in kinds[:-1] or kinds.count("noise") > 1:
            raise ValueError("a plan holds at most one noise split, and it comes last")
        if (self.decode_token_id is None) != (self.max_new_tokens == 0) or self.max_new_tokens < 0:
            raise ValueError("decode_token_id and max_new_tokens >= 1 go together (x2t plans)")
        if self.decode_token_id is not None and self.noise_index is not None:
            raise ValueError("an x2t plan has no noise split")
        expected = self.num_tokens + (1 + self.max_new_tokens if self.decode_token_id is not None else 0)
        if positions.shape != (3, expected):
            raise ValueError(f"position_ids must be (3, {expected}), got {positions.shape}")

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each split in the token sequence, then the total length."""
        return tuple(np.cumsum([0, *(len(s.token_ids) for s in self.splits)]).tolist())

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @cached_property
    def token_ids(self) -> np.ndarray:
        """``(num_tokens,)`` int64 ids of all splits."""
        return np.array([i for s in self.splits for i in s.token_ids], dtype=np.int64)

    @cached_property
    def modalities(self) -> np.ndarray:
        """``(num_tokens,)`` int64 `Modality` per token."""
        return np.repeat([s.modality for s in self.splits], [len(s.token_ids) for s in self.splits]).astype(np.int64)

    @property
    def visual_grids(self) -> list[tuple[int, int, int]]:
        return [s.grid_thw for s in self.splits if s.grid_thw is not None]

    def split_slice(self, index: int) -> slice:
        """Token range of split ``index`` in the sequence (also its KV-cache rows once prefilled in order)."""
        return slice(self.offsets[index], self.offsets[index + 1])

    def split_position_ids(self, index: int) -> np.ndarray:
        """``(3, len(split))`` int64 ids of split ``index``."""
        return self.position_ids[:, self.split_slice(index)]

    @property
    def noise_index(self) -> int | None:
        """Index of the noise split, None for x2t."""
        return len(self.splits) - 1 if self.splits and self.splits[-1].kind == "noise" else None

    @property
    def context_splits(self) -> tuple[Split, ...]:
        """The splits to prefill: all but the noise split."""
        return self.splits if self.noise_index is None else self.splits[:-1]

    @property
    def context_length(self) -> int:
        """KV-cache rows after prefilling the context."""
        return self.offsets[len(self.context_splits)]

    def context(self) -> tuple[tuple[Split, np.ndarray], ...]:
        """The context splits, each with its ``(3, len(split))`` position ids: what a prefill caches."""
        return tuple((split, self.split_position_ids(index)) for index, split in enumerate(self.context_splits))

    @property
    def decode_position_ids(self) -> np.ndarray:
        """x2t: ``(3, max_new_tokens)`` ids of decode steps 0..max_new_tokens-1."""
        if self.decode_token_id is None:
            raise ValueError("only x2t plans decode text")
        return self.position_ids[:, self.num_tokens:self.num_tokens + self.max_new_tokens]


def _generation_plan(splits: Sequence[Split]) -> SequencePlan:
    """A generation branch's plan: `get_rope_index` over its splits, then `mape_shift`."""
    plan = SequencePlan(tuple(splits), get_rope_index([i for s in splits for i in s.token_ids],
                                                      [s.grid_thw for s in splits if s.grid_thw is not None]))
    return SequencePlan(plan.splits, mape_shift(plan.position_ids, plan.modalities))


# --- Builders ------------------------------------------------------------------------------------------------------


def _chat_prefix(system_prompt: str) -> str:
    """Template text up to the user's content [L:data/system_prompt_render.py ``JINJA_PROMPT_TMPL``]."""
    return f"{constants.IM_START}system\n{system_prompt}{constants.IM_END}\n{constants.IM_START}user\n"


# Closes the user turn and opens the assistant turn, whose content (the target block or the answer) follows.
_ASSISTANT_OPENING = f"{constants.IM_END}\n{constants.IM_START}assistant\n"


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_user_text(tokenizer: PreTrainedTokenizerBase, text: str, what: str) -> tuple[int, ...]:
    """Ids of the user's text with special-token parsing off: a literal ``<|im_end|>`` in a prompt stays the
    characters it is made of, so no request can close its turn or open a system one. For every text that contains
    no special-token string the ids equal upstream's (which parses them). ValueError if the text is empty."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    ids = tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if not ids:
        raise ValueError(f"{what} is empty")
    return ids


def _warn_if_upstream_differs(
    tokenizer: PreTrainedTokenizerBase, run_texts: Sequence[str], run_ids: Sequence[int], plan: SequencePlan,
    caption_index: int,
) -> None:
    """Log where upstream's render-then-search would tokenize or split differently (see the module docstring).

    ``run_texts`` are the adjacent texts (no special token between them) around the caption, ``run_ids`` their ids
    as tokenized here; ``caption_index`` is the caption's split in ``plan``.
    """
    if list(_encode(tokenizer, "".join(run_texts))) != list(run_ids):
        logger.warning("BPE merges across the caption boundary in upstream's rendering: its ids differ from the "
                       "separately tokenized pieces used here")
    ids, caption = plan.token_ids.tolist(), list(plan.splits[caption_index].token_ids)
    first = next(i for i in range(len(ids)) if ids[i:i + len(caption)] == caption)
    if first != plan.offsets[caption_index]:
        logger.warning("the caption's ids also occur at token %d, before the caption (token %d): upstream would mark "
                       "that earlier span as the user text", first, plan.offsets[caption_index])


def _plan_generation(
    tokenizer: PreTrainedTokenizerBase, system_prompt: str, caption: str, references: Sequence[Split],
    noise_grid: tuple[int, int, int],
) -> SequencePlan:
    """``prefix | references | caption | assistant opening | noise``."""
    prefix = _chat_prefix(system_prompt)
    splits = [
        _text_split(_encode(tokenizer, prefix), Modality.SYSTEM_PROMPT),
        *references,
        _text_split(_encode_user_text(tokenizer, caption, "prompt"), Modality.TEXT),
        _text_split(_encode(tokenizer, _ASSISTANT_OPENING), Modality.SYSTEM_PROMPT),
        _visual_split("noise", noise_grid, Modality.NOISE),
    ]
    plan = _generation_plan(splits)
    # Without references the prefix, caption and opening render as one text run (t2i/t2v); with them the caption
    # run starts after the reference block's <|vision_end|>.
    caption_index = 1 + len(references)
    run_texts = ([prefix] if not references else []) + [caption, _ASSISTANT_OPENING]
    run_start = 0 if not references else plan.offsets[caption_index]
    run_ids = plan.token_ids[run_start:plan.offsets[plan.noise_index]].tolist()
    _warn_if_upstream_differs(tokenizer, run_texts, run_ids, plan, caption_index)
    return plan


def _latent_grid(lat_t: int, lat_h: int, lat_w: int) -> tuple[int, int, int]:
    """get_rope_index grid of a ``(t, h, w)`` latent block: h and w doubled so one mRoPE cell is one latent token."""
    for name, value in (("lat_t", lat_t), ("lat_h", lat_h), ("lat_w", lat_w)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(lat_t), SPATIAL_MERGE_SIZE * int(lat_h), SPATIAL_MERGE_SIZE * int(lat_w)


def plan_t2i(tokenizer: PreTrainedTokenizerBase, prompt: str, lat_h: int, lat_w: int) -> SequencePlan:
    """Text-to-image [L:…/validation_dataset.py ``t2v_sample``, text-template mode].

    Splits: ``<|im_start|>system\\n{SYSTEM_PROMPT_T2I}<|im_end|>\\n<|im_start|>user\\n`` (causal, -1) |
    ``{prompt}`` (causal, 0) | ``<|im_end|>\\n<|im_start|>assistant\\n`` (causal, -1) | noise block of
    ``lat_h * lat_w`` latents (1). No MaPE shift applies.

    Args:
        tokenizer: Qwen2 fast tokenizer (`runtime.models.tokenizer.load_tokenizer`).
        prompt: the user's caption.
        lat_h, lat_w: latent grid (pixels / 16).
    """
    return _plan_generation(tokenizer, constants.SYSTEM_PROMPT_T2I, prompt, (), _latent_grid(1, lat_h, lat_w))


def plan_t2v(tokenizer: PreTrainedTokenizerBase, prompt: str, lat_t: int, lat_h: int, lat_w: int) -> SequencePlan:
    """Text-to-video and image-to-video (the same sequence; i2v pins latent frame 0 in the pipeline)
    [L:…/validation_dataset.py ``t2v_sample``, ``ff2v_sample``]: as `plan_t2i` with ``SYSTEM_PROMPT_T2V`` and a
    ``lat_t * lat_h * lat_w`` noise block."""
    return _plan_generation(tokenizer, constants.SYSTEM_PROMPT_T2V, prompt, (), _latent_grid(lat_t, lat_h, lat_w))


def plan_i2v(
    tokenizer: PreTrainedTokenizerBase, prompt: str, vit_grid: Sequence[int], lat_t: int, lat_h: int, lat_w: int,
) -> SequencePlan:
    """Image-to-video [L:…/validation_dataset.py ``ff2v_sample``]; the image is the user turn's first content.

    Splits: ``<|im_start|>system\n{SYSTEM_PROMPT_T2V}<|im_end|>\n<|im_start|>user\n`` (causal, -1) | ViT block of the
    image (full, 4) | ``{prompt}`` (causal, 0) | ``<|im_end|>\n<|im_start|>assistant\n`` (causal, -1) | noise block of
    ``lat_t * lat_h * lat_w`` latents (1), whose first latent frame the pipeline keeps clean. MaPE: the ViT block's
    t-row starts at 1000; with no VAE reference block the noise keeps its own ids. The cfg_text branch keeps the ViT
    block (only the prompt is dropped), as upstream's ``i_sample_modality != 0`` mask.
    """
    vit = _visual_split("vit", vit_grid, Modality.REF_VIT)
    return _plan_generation(tokenizer, constants.SYSTEM_PROMPT_T2V, prompt, (vit,),
                            _latent_grid(lat_t, lat_h, lat_w))


def plan_edit(
    tokenizer: PreTrainedTokenizerBase, instruction: str, vit_grid: Sequence[int], lat_h: int, lat_w: int,
    *, lat_t: int = 1, vision_type: str = "image",
) -> SequencePlan:
    """Image (or video) edit [L:…/validation_dataset.py ``tiv2v_sample``, sample_task "edit"].

    Splits: ``<|im_start|>system\\n{system_prompt_edit(vision_type)}<|im_end|>\\n<|im_start|>user\\n`` (causal, -1)
    | ViT block (full, 4) | VAE reference block (full, 2) | ``{instruction}`` (causal, 0) |
    ``<|im_end|>\\n<|im_start|>assistant\\n`` (causal, -1) | noise block of the reference's size (1).
    MaPE: the ViT block's t-row starts at 1000, the noise block takes the reference block's ids on all rows, later
    text keeps its unshifted ids. The system prompt spells "user’s" with U+2019, as upstream.

    Upstream names the vision type after the last element of its input list; with the example order
    ``[instruction, image]`` that is "image"/"video", which is what ``vision_type`` gives.

    Args:
        instruction: the edit instruction.
        vit_grid: ``(T/2, H/14, W/14)`` of the ViT input (``(1, H/14, W/14)`` for an image).
        lat_h, lat_w: latent grid of the reference, which the target shares.
        lat_t: latent frames (video edit).
        vision_type: ``"image"`` or ``"video"``.
    """
    if vision_type not in ("image", "video"):
        raise ValueError(f"vision_type must be 'image' or 'video', got {vision_type!r}")
    latent_grid = _latent_grid(lat_t, lat_h, lat_w)
    references = (
        _visual_split("vit", vit_grid, Modality.REF_VIT),
        _visual_split("vae_ref", latent_grid, Modality.REF_SOURCE),
    )
    return _plan_generation(tokenizer, constants.system_prompt_edit(vision_type), instruction, references,
                            latent_grid)


def plan_x2t(
    tokenizer: PreTrainedTokenizerBase, question: str, vit_grid: Sequence[int], max_new_tokens: int,
    *, instruction: str = constants.X2T_QA_INSTRUCTION,
) -> SequencePlan:
    """Image/video understanding [L:…/validation_dataset.py ``x2t_sample``; L:modeling/lance/lance.py
    ``validation_und_KVcache``].

    Context splits: ``<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n`` (causal) | ViT block
    (full) | ``{question}<|im_end|>\\n<|im_start|>assistant`` (causal). The ``"\\n"`` after ``assistant`` is
    ``decode_token_id``, the first decode input. Positions: `get_rope_index` over the context, that token and
    ``max_new_tokens`` padding tokens (``<|endoftext|>``, upstream's pad id), with no MaPE shift.

    The question and the template after it form one text run (upstream does not search for it); the question is
    tokenized on its own with special-token parsing off and borders ``<|im_end|>``, so the ids equal upstream's
    rendering exactly for every question without special-token strings.

    Args:
        question: the user's question (may be empty: upstream's caption mode renders no user text).
        vit_grid: ``(T/2, H/14, W/14)`` of the ViT input.
        max_new_tokens: decode budget (upstream: 256).
        instruction: the system prompt; upstream's video example uses "Watch the video carefully and answer the
            question."
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    question_ids = _encode_user_text(tokenizer, question, "question") if question else ()
    prefix = _text_split(_encode(tokenizer, _chat_prefix(instruction)), Modality.SYSTEM_PROMPT)
    # The question borders <|im_end|>, so its ids and the template's concatenate to upstream's run exactly.
    *tail, decode_token = question_ids + _encode(tokenizer, _ASSISTANT_OPENING)
    vit = _visual_split("vit", vit_grid, Modality.REF_VIT)
    splits = (prefix, vit, _text_split(tail, Modality.SYSTEM_PROMPT))
    context = [i for s in splits for i in s.token_ids]
    positions = get_rope_index([*context, decode_token, *(ENDOFTEXT_ID,) * max_new_tokens], [vit.grid_thw])
    return SequencePlan(splits, positions, decode_token_id=decode_token, max_new_tokens=int(max_new_tokens))


@dataclass(frozen=True)
class Branch:
    """One CFG branch of a generation plan as upstream runs it: the context splits it caches, each with the position
    ids its rows are cached at, and the position ids of its noise query (docs/design/model.md §3.3).

    Attributes:
        context: ``(split, (3, len(split)) ids)`` in prefill order.
        query_position_ids: ``(3, len(noise split))`` ids of the noise query.
    """

    context: tuple[tuple[Split, np.ndarray], ...]
    query_position_ids: np.ndarray

    @property
    def context_length(self) -> int:
        """KV-cache rows after prefilling the branch's context."""
        return sum(len(split.token_ids) for split, _ in self.context)


def cond_branch(plan: SequencePlan) -> Branch:
    """The conditional branch: the whole context and the noise query, at the full sequence's positions."""
    if plan.noise_index is None:
        raise ValueError("only generation plans (with a noise split) have CFG branches")
    return Branch(plan.context(), plan.split_position_ids(plan.noise_index))


def cfg_text_branch(plan: SequencePlan) -> Branch:
    """The text-unconditional branch: the context without the user-text split, its rows cached at the **full**
    sequence's positions (the kept splits stay where they are, with a gap where the caption was); only the noise
    query takes the ids of `cfg_text_plan`, recomputed on the sequence without the caption [L:modeling/lance/lance.py
    ``validation_gen_KVcache``: ``update_gen_context(current_sequence, current_pos_ids, cfg_text_context, ...)`` for
    the context, ``uncond_pos_ids[:, :, kv_len:kv_len + N + 2]`` for the query; docs/design/model.md §3.3]."""
    uncond = cfg_text_plan(plan)
    context = tuple((split, ids) for split, ids in plan.context() if split.modality != Modality.TEXT)
    return Branch(context, uncond.split_position_ids(uncond.noise_index))


def cfg_text_plan(plan: SequencePlan) -> SequencePlan:
    """The sequence upstream recomputes positions on for the cfg_text noise query: every split whose modality is not
    `Modality.TEXT` (drops exactly the user-text split), positions recomputed by `get_rope_index` on the shorter
    sequence and shifted by `mape_shift` [L:modeling/lance/lance.py ``uncond_split_pro_kvcache``]. Its context ids are
    not the branch's cached ones: see `cfg_text_branch`."""
    if plan.noise_index is None:
        raise ValueError("only generation plans (with a noise split) have a cfg_text branch")
    kept = [s for s in plan.splits if s.modality != Modality.TEXT]
    if len(kept) == len(plan.splits):
        raise ValueError("the plan has no user-text split to drop")
    return _generation_plan(kept)
