"""Lance's Mixture-of-Transformers LLM and its generation adapters (docs/design/model.md §1-§2).

Upstream: ``modeling/lance/qwen2_navit.py`` (``PackedAttentionMoT``, ``Qwen2MoTDecoderLayer``, ``Qwen2Model`` with
``norm_moe_gen``; the ``forward_inference`` KV path), ``modeling/lance/lance.py`` (``time_embedder``, ``vae2llm``,
``llm2vae``, ``latent_pos_embed``), ``modeling/lance/modeling_utils.py`` (timestep and 3-D sin-cos tables) and
``modeling/qwen2_5_vl/modeling_qwen2_5_vl.py`` (mRoPE).

The LLM is a Qwen2.5-VL-3B-shaped decoder whose every layer holds two experts: "und" (text, ViT rows and the
``<|vision_start|>``/``<|vision_end|>`` boundary rows) and "gen" (every VAE-latent row, noisy or clean). Projections,
q/k-norms, both RMSNorms, the MLP and the final norm are per expert; attention is one joint softmax over all rows.

`LanceMoT.step` is the ``mot`` engine (``runtime.spec.contract.mot_spec``): one graph serves text prefill, ViT-block
prefill, AR decode, VAE-reference prefill and the denoise query. Upstream routes rows with index scatters
(``x[idx] = f(x[idx])``) and runs attention as flash-attn varlen over a growing cache. Here the rows of a call come in
three groups in sequence order (``und_head``, ``latents``, ``und_tail``, any may be empty) so routing is static
slicing, and the cache is explicit I/O: past K/V come in sliced to ``P`` rows with ``past_len`` valid rows per batch
entry, and the new K/V rows go out for the runner to write. Positions (mRoPE cos/sin, latent position rows) are host
computations passed in as tensors.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from runtime.spec.constants import (
    LATENT_CHANNELS,
    LATENT_POS_SPLIT_DIVISOR,
    MAX_LATENT_SIZE,
    QWEN2_SPECIAL_TOKENS,
    TIMESTEP_EMBED_DIM,
)
# MASK_VALUE: finite, so it survives a cast to bf16; every query row keeps its own key, so no row is fully masked,
# and exp(-1e9 + s) is exactly 0 in fp32 for any realistic score s.
from runtime.models.layers import MASK_VALUE, RMSNorm, rotate_half

logger = logging.getLogger(__name__)

# The vision tower as ``Lance_3B/llm_config.json`` embeds it (Qwen2.5-VL-3B). The LLM side reads only
# ``tokens_per_second`` and ``spatial_merge_size`` (host-side mRoPE positions); the rest is kept for the file.
_VISION_CONFIG_3B: dict[str, Any] = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}

# Keys of llm_config.json that the MoT does not read; `LanceLLMConfig.to_dict` writes them with the Qwen2.5-VL-3B
# values so a tiny checkpoint's file has the real one's fields. ``tie_word_embeddings`` is true in the file, but the
# checkpoint stores ``language_model.lm_head.weight`` and Lance runs untied (``--tie_word_embeddings false``).
_FILE_ONLY_FIELDS: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

# Scalar fields read from and written to llm_config.json under their own names.
_FILE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "rope_theta", "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id",
    "vision_start_token_id", "vision_end_token_id", "vision_token_id", "image_token_id", "video_token_id",
)
_TOKEN_ID_FIELDS = tuple(name for name in _FILE_FIELDS if name.endswith("token_id"))


@dataclass(frozen=True)
class LanceLLMConfig:
    """MoT LLM hyper-parameters; defaults are ``Lance_3B/llm_config.json`` (a Qwen2.5-VL-3B text config).

    Field names are the file's, except ``mrope_section`` (the file's ``rope_scaling.mrope_section``) and two
    deployment settings the file does not hold.

    Attributes:
        hidden_size: residual width D.
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (GQA).
        intermediate_size: SwiGLU MLP width (no biases).
        vocab_size: embedding and lm_head rows (151936; every Qwen2.5 token id exists).
        rope_theta: RoPE base.
        rms_norm_eps: epsilon of every RMSNorm, q/k-norms included.
        hidden_act: MLP activation; Qwen2 uses ``"silu"`` only.
        mrope_section: rotary frequency pairs per (t, h, w) axis; sums to head_dim / 2.
        bos_token_id .. video_token_id: Qwen2.5-VL special ids as the file lists them.
        vision_config: the ViT config dict the file embeds; the LLM side reads ``tokens_per_second`` and
            ``spatial_merge_size`` from it.
        qk_norm: per-head RMSNorm on q and k before RoPE (upstream ``--llm_qk_norm``, on for Lance; tests switch
            it off to compare with plain Qwen2.5-VL).
        max_latent_frames: latent frames of the 3-D position table (1 for Lance_3B, 31 for Lance_3B_Video). Not in
            the file: the checkpoint's ``latent_pos_embed.pos_embed`` row count tells it (`with_latent_table_rows`).
    """

    hidden_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    intermediate_size: int = 11008
    vocab_size: int = 151936
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    bos_token_id: int = QWEN2_SPECIAL_TOKENS["<|endoftext|>"]
    eos_token_id: int = QWEN2_SPECIAL_TOKENS["<|im_end|>"]
    vision_start_token_id: int = QWEN2_SPECIAL_TOKENS["<|vision_start|>"]
    vision_end_token_id: int = QWEN2_SPECIAL_TOKENS["<|vision_end|>"]
    vision_token_id: int = QWEN2_SPECIAL_TOKENS["<|vision_pad|>"]
    image_token_id: int = QWEN2_SPECIAL_TOKENS["<|image_pad|>"]
    video_token_id: int = QWEN2_SPECIAL_TOKENS["<|video_pad|>"]
    vision_config: Mapping[str, Any] = field(default_factory=lambda: dict(_VISION_CONFIG_3B), hash=False)
    qk_norm: bool = True
    max_latent_frames: int = 1

    def __post_init__(self) -> None:
        # Own copies, so a caller's dict or list cannot change a frozen config.
        object.__setattr__(self, "vision_config", dict(self.vision_config))
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "max_latent_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"LanceLLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"LanceLLMConfig: rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) "
                             "must be > 0")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LanceLLMConfig: hidden_size {self.hidden_size}, num_attention_heads "
                             f"{self.num_attention_heads} and num_key_value_heads {self.num_key_value_heads} must "
                             "divide evenly")
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 1 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"LanceLLMConfig.mrope_section {self.mrope_section} must be three positive sizes "
                             f"summing to head_dim / 2 = {self.head_dim / 2}")
        if self.hidden_size % 2:
            # The 3-D latent position table splits D into even t/h/w parts.
            raise ValueError(f"LanceLLMConfig.hidden_size must be even, got {self.hidden_size}")
        if self.hidden_act != "silu":
            raise ValueError(f"LanceLLMConfig.hidden_act must be 'silu' (Qwen2), got {self.hidden_act!r}")
        for name in _TOKEN_ID_FIELDS:
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"LanceLLMConfig.{name} = {getattr(self, name)} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        for name in ("tokens_per_second", "spatial_merge_size"):
            value = self.vision_config.get(name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LanceLLMConfig.vision_config[{name!r}] must be a positive int, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_second(self) -> int:
        """mRoPE temporal step per latent/ViT frame group (``vision_config.tokens_per_second``)."""
        return self.vision_config["tokens_per_second"]

    @property
    def spatial_merge_size(self) -> int:
        """ViT patches merged per token side (``vision_config.spatial_merge_size``)."""
        return self.vision_config["spatial_merge_size"]

    @property
    def latent_table_rows(self) -> int:
        """Rows of ``latent_pos_embed.pos_embed``: ``max_latent_frames * MAX_LATENT_SIZE**2``."""
        return self.max_latent_frames * MAX_LATENT_SIZE**2

    def with_latent_table_rows(self, rows: int) -> "LanceLLMConfig":
        """This config with ``max_latent_frames`` read off a checkpoint's position-table row count
        (4096 -> 1 for Lance_3B, 126976 -> 31 for Lance_3B_Video).

        Raises:
            ValueError: ``rows`` is not a positive multiple of ``MAX_LATENT_SIZE**2``.
        """
        frames, rest = divmod(rows, MAX_LATENT_SIZE**2)
        if rest or frames < 1:
            raise ValueError(f"latent_pos_embed.pos_embed has {rows} rows, not a positive multiple of "
                             f"{MAX_LATENT_SIZE}^2 = {MAX_LATENT_SIZE**2}")
        return replace(self, max_latent_frames=frames)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, qk_norm: bool = True,
                  max_latent_frames: int = 1) -> "LanceLLMConfig":
        """Build from an llm_config.json mapping. Missing keys take the defaults; keys the MoT does not read are
        ignored. The RoPE section comes from ``rope_scaling`` (transformers 4 files) or ``rope_parameters``
        (transformers 5 files).

        Raises:
            ValueError: a RoPE type other than mRoPE, a missing ``mrope_section``, or a field that fails validation.
        """
        kwargs: dict[str, Any] = {name: values[name] for name in _FILE_FIELDS if name in values}
        rope = values.get("rope_scaling") or values.get("rope_parameters")
        if rope is not None:
            rope_type = rope.get("type", rope.get("rope_type"))
            # Qwen2.5-VL files say "mrope"; transformers rewrites it to "default" (plain inv_freq) + mrope_section.
            if rope_type not in ("mrope", "default") or "mrope_section" not in rope:
                raise ValueError(f"Lance needs mRoPE (rope type 'mrope' with an mrope_section), got {rope!r}")
            kwargs["mrope_section"] = tuple(rope["mrope_section"])
            if "rope_theta" not in kwargs and "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
        if "vision_config" in values:
            kwargs["vision_config"] = values["vision_config"]
        ignored = sorted(set(values) - set(kwargs) - {"rope_scaling", "rope_parameters"})
        if ignored:
            logger.debug("LanceLLMConfig ignores keys %s", ignored)
        return cls(**kwargs, qk_norm=qk_norm, max_latent_frames=max_latent_frames)

    @classmethod
    def from_json(cls, path: str | Path, *, qk_norm: bool = True, max_latent_frames: int = 1) -> "LanceLLMConfig":
        """Read ``Lance_3B/llm_config.json`` (see `from_dict`)."""
        return cls.from_dict(json.loads(Path(path).read_text()), qk_norm=qk_norm,
                             max_latent_frames=max_latent_frames)

    def to_dict(self) -> dict[str, Any]:
        """The llm_config.json mapping with the real file's field names. ``qk_norm`` and ``max_latent_frames`` are
        not file fields and are not written."""
        values = dict(_FILE_ONLY_FIELDS)
        values.update({name: getattr(self, name) for name in _FILE_FIELDS})
        values["rope_scaling"] = {"type": "mrope", "mrope_section": list(self.mrope_section)}
        values["vision_config"] = dict(self.vision_config)
        return values

    @classmethod
    def tiny(cls) -> "LanceLLMConfig":
        """The same module tree at small width for tests: hidden 64, 2 layers, 4 query / 2 kv heads (head_dim 16,
        mrope_section (2, 3, 3)), MLP 128. The vocabulary stays 151936 so every real token id exists."""
        return cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, mrope_section=(2, 3, 3),
                   vision_config={**_VISION_CONFIG_3B, "out_hidden_size": 64})


# --- Pure functions: tables, rotary, attention -----------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_EMBED_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """DiT sinusoidal timestep features, ``[cos | sin]`` (cos first, as upstream's ``TimestepEmbedder``).

    Args:
        t: ``(...)`` float, flow time in [0, 1] (not scaled by 1000).
        dim: feature size (even).
    Returns:
        ``(..., dim)`` fp32.
    Raises:
        ValueError: odd ``dim``.
    """
    if dim % 2:
        raise ValueError(f"timestep_embedding needs an even dim, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _sincos_1d(num_positions: int, dim: int) -> torch.Tensor:
    """``[sin(p * w_k) | cos(p * w_k)]`` for p in [0, num_positions), ``w_k = 10000^(-k / (dim/2))``, in float64 as
    upstream's numpy code; returned ``(num_positions, dim)`` fp32."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).float()


def latent_pos_table(num_frames: int, max_size: int, dim: int) -> torch.Tensor:
    """Lance's 3-D sin-cos latent position table (upstream ``get_3d_sincos_pos_embed``).

    ``dim`` splits into t, h and w parts: ``d = dim // 3`` rounded down to even for t and h, the rest for w
    (682 / 682 / 684 at 2048). Row ``t * max_size**2 + h * max_size + w`` is ``[emb_t(t) | emb_h(h) | emb_w(w)]``,
    each part ``[sin | cos]`` of `_sincos_1d`. Each axis table is built once and broadcast, so no float64 copy of
    the whole table is ever held (the video table has 126976 rows).

    Returns:
        ``(num_frames * max_size**2, dim)`` fp32.
    Raises:
        ValueError: sizes < 1, or ``dim`` that leaves an odd or empty part.
    """
    part = dim // LATENT_POS_SPLIT_DIVISOR
    part -= part % 2
    rest = dim - 2 * part
    if num_frames < 1 or max_size < 1 or part < 2 or rest % 2:
        raise ValueError(f"latent_pos_table needs num_frames, max_size >= 1 and an even dim >= 6, got "
                         f"({num_frames}, {max_size}, {dim})")
    size = (num_frames, max_size, max_size)
    emb_t = _sincos_1d(num_frames, part)[:, None, None].expand(*size, part)
    emb_h = _sincos_1d(max_size, part)[None, :, None].expand(*size, part)
    emb_w = _sincos_1d(max_size, rest)[None, None, :].expand(*size, rest)
    return torch.cat([emb_t, emb_h, emb_w], dim=-1).reshape(num_frames * max_size**2, dim)


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                  mrope_section: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL multimodal RoPE tables, already merged per section (host side, fp32).

    Frequency pair ``k`` rotates by the t, h or w position as ``mrope_section`` assigns it (``[16, 24, 24]``: the
    first 16 pairs t, the next 24 h, the last 24 w), and the table repeats for the two halves of the head, exactly
    upstream's split of ``cat(freqs, freqs)`` into ``mrope_section * 2`` chunks taking chunk ``i`` from axis ``i % 3``.
    For pure text the three rows are equal and this is ordinary 1-D RoPE.

    Args:
        position_ids: ``(B, 3, L)`` int64, rows t, h, w.
    Returns:
        cos, sin: ``(B, L, head_dim)`` fp32.
    Raises:
        ValueError: ``position_ids`` not ``(B, 3, L)``, or sections that do not sum to ``head_dim / 2``.
    """
    if position_ids.dim() != 3 or position_ids.shape[1] != 3:
        raise ValueError(f"position_ids must be (B, 3, L), got {tuple(position_ids.shape)}")
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim / 2 = {head_dim / 2}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)    # (B, 3, L, head_dim / 2)
    sections = freqs.split(list(mrope_section), dim=-1)
    merged = torch.cat([section[:, axis] for axis, section in enumerate(sections)], dim=-1)
    angles = torch.cat([merged, merged], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on queries and keys (the one rotation of this module).

    Args:
        q: ``(B, L, heads, head_dim)``.
        k: ``(B, L, kv_heads, head_dim)``.
        cos, sin: ``(B, L, head_dim)``, broadcast over heads.
    Returns:
        rotated q and k, shapes unchanged, in the promoted dtype of the inputs.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention_mask(past_len: torch.Tensor, num_past: int, num_query: int, causal: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of the joint attention over ``[past ; query block]``.

    Query row ``i`` of batch entry ``b`` sees past rows ``j < past_len[b]`` and block rows ``j <= i`` (causal) or all
    block rows (bidirectional): flash-attn's bottom-right-aligned causal mask over a cache, as upstream runs it.

    Args:
        past_len: ``(B,)`` int64, valid past rows per batch entry.
        num_past: P, past rows present (valid or not).
        num_query: L, rows of the block.
        causal: ``()`` bool.
    Returns:
        ``(B, 1, L, P + L)`` in ``dtype``: 0 where allowed, `MASK_VALUE` elsewhere.
    """
    device = past_len.device
    batch = past_len.shape[0]
    past_ok = torch.arange(num_past, device=device)[None, :] < past_len[:, None]            # (B, P)
    rows = torch.arange(num_query, device=device)
    block_ok = (rows[None, :] <= rows[:, None]) | ~causal                                   # (L, L)
    allowed = torch.cat([past_ok[:, None, :].expand(batch, num_query, num_past),
                         block_ok[None].expand(batch, num_query, num_query)], dim=-1)
    return torch.where(allowed, 0.0, MASK_VALUE).to(dtype)[:, None]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference attention: scores in the compute dtype, additive mask, softmax in fp32.

    Grouped-query attention without copying K/V: the query heads that share a kv head are stacked along the row
    axis (head ``h`` uses kv head ``h // (heads / kv_heads)``, as transformers' ``repeat_kv``).

    Args:
        q: ``(B, heads, L, head_dim)``.
        k, v: ``(B, kv_heads, S, head_dim)``.
        mask: ``(B, 1, L, S)`` additive, in q's dtype.
    Returns:
        ``(B, heads, L, head_dim)`` in q's dtype.
    """
    batch, heads, rows, head_dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(batch, kv_heads, group * rows, head_dim), k.transpose(-1, -2))
    scores = scores.reshape(batch, kv_heads, group, rows, keys) * head_dim**-0.5 + mask[:, :, None]
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs.reshape(batch, kv_heads, group * rows, keys), v)
    return out.reshape(batch, heads, rows, head_dim)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`eager_attention` through ``F.scaled_dot_product_attention`` (fused kernels on a GPU); same signature.

    K/V are expanded to every query head (transformers' ``repeat_kv``) rather than passed with ``enable_gqa``: the
    call always carries a mask, which rules out flash attention, and the masked fused kernels need equal head counts.
    """
    batch, heads = q.shape[0], q.shape[1]
    kv_heads, keys, head_dim = k.shape[1], k.shape[2], k.shape[3]
    shape = (batch, kv_heads, heads // kv_heads, keys, head_dim)
    k = k[:, :, None].expand(shape).reshape(batch, heads, keys, head_dim)
    v = v[:, :, None].expand(shape).reshape(batch, heads, keys, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


ATTENTION_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"eager": eager_attention, "sdpa": sdpa_attention}

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Hidden states of one call in sequence order: (und_head, latent, und_tail), each ``(B, rows, D)``; any may have
zero rows."""


def route(und: Callable[[torch.Tensor], Any], gen: Callable[[torch.Tensor], Any], rows: Rows) -> tuple[Any, Any, Any]:
    """Apply the und expert to the head and tail groups and the gen expert to the latent group (static slicing:
    the graph holds no ScatterND/NonZero)."""
    head, latent, tail = rows
    return und(head), gen(latent), und(tail)


# --- Leaf modules ----------------------------------------------------------------------------------------------


class LanceMLP(nn.Module):
    """Qwen2 SwiGLU MLP without biases: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LanceLLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, rows, hidden)`` -> ``(B, rows, hidden)``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LanceTimestepEmbedder(nn.Module):
    """DiT timestep embedder: `timestep_embedding` (256) -> Linear -> SiLU -> Linear (hidden)."""

    def __init__(self, hidden_size: int, frequency_size: int = TIMESTEP_EMBED_DIM) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: ``(...)`` float in [0, 1] -> ``(..., hidden)`` in the weights' dtype."""
        return self.mlp(timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LanceLatentPosEmbed(nn.Module):
    """The frozen 3-D sin-cos table ``pos_embed`` ``(frames * 64**2, hidden)``; the host gathers rows from it.

    Upstream pops the stored ``latent_pos_embed.pos_embed`` from the checkpoint and regenerates the table
    (``inference_lance.py``), so the stored values never matter. The buffer keeps the checkpoint key so loading
    checks see it (a 126976-row table loaded into a 4096-row model is a size mismatch), but loading keeps the
    formula's values.
    """

    def __init__(self, num_frames: int, max_size: int, hidden_size: int) -> None:
        super().__init__()
        self.num_frames, self.max_size, self.hidden_size = num_frames, max_size, hidden_size
        self.register_buffer("pos_embed", latent_pos_table(num_frames, max_size, hidden_size))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids: ``(Lg,)`` int64, ``t * 64**2 + h * 64 + w`` -> ``(Lg, hidden)``."""
        return self.pos_embed[position_ids]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "pos_embed"
        stored = state_dict.get(key)
        if stored is not None and stored.shape == self.pos_embed.shape:
            # A meta-device model (loaded with assign=True) has no values yet: compute them, with the device and
            # dtype assign=True gives every other tensor.
            table = self.pos_embed
            if table.is_meta:
                table = latent_pos_table(self.num_frames, self.max_size, self.hidden_size).to(stored.device,
                                                                                               stored.dtype)
            state_dict = {**state_dict, key: table}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --- Attention, decoder layer, stack ----------------------------------------------------------------------------


class LanceMoTAttention(nn.Module):
    """Joint self-attention with per-expert q/k/v/o projections and q/k-norms (upstream ``PackedAttentionMoT``).

    Numerics: q and k go to fp32 before the q/k-norm and RoPE for every row and come back to the compute dtype
    before attention. That is upstream's "gen" mode; its "und" mode does norm and RoPE in the activation dtype.
    The engine has no mode input, so every row takes the fp32 path: identical in fp32, strictly more accurate in
    bf16. The returned keys are the cache rows: after q/k-norm and RoPE, in the compute dtype.
    """

    def __init__(self, config: LanceLLMConfig, attn_implementation: str) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.attention = ATTENTION_FUNCTIONS[attn_implementation]
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.q_proj = nn.Linear(hidden, q_size)
        self.k_proj = nn.Linear(hidden, kv_size)
        self.v_proj = nn.Linear(hidden, kv_size)
        self.o_proj = nn.Linear(q_size, hidden, bias=False)
        self.q_proj_moe_gen = nn.Linear(hidden, q_size)
        self.k_proj_moe_gen = nn.Linear(hidden, kv_size)
        self.v_proj_moe_gen = nn.Linear(hidden, kv_size)
        self.o_proj_moe_gen = nn.Linear(q_size, hidden, bias=False)

        def qk_norm() -> nn.Module:
            return RMSNorm(head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

        self.q_norm, self.k_norm = qk_norm(), qk_norm()
        self.q_norm_moe_gen, self.k_norm_moe_gen = qk_norm(), qk_norm()

    def _qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One expert's projections of one row group.

        Args:
            x: ``(B, rows, hidden)``.
            gen: use the gen expert's weights.
        Returns:
            q ``(B, rows, heads, head_dim)`` fp32 after q-norm; k ``(B, rows, kv_heads, head_dim)`` fp32 after
            k-norm; v ``(B, rows, kv_heads, head_dim)`` in the compute dtype.
        """
        if gen:
            q_proj, k_proj, v_proj = self.q_proj_moe_gen, self.k_proj_moe_gen, self.v_proj_moe_gen
            q_norm, k_norm = self.q_norm_moe_gen, self.k_norm_moe_gen
        else:
            q_proj, k_proj, v_proj, q_norm, k_norm = self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm
        # Explicit head counts, never -1: a group may have zero rows.
        batch, rows = x.shape[0], x.shape[1]
        q = q_norm(q_proj(x).view(batch, rows, self.num_heads, self.head_dim).float())
        k = k_norm(k_proj(x).view(batch, rows, self.num_kv_heads, self.head_dim).float())
        v = v_proj(x).view(batch, rows, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, rows: Rows, cos: torch.Tensor, sin: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, mask: torch.Tensor) -> tuple[Rows, torch.Tensor, torch.Tensor]:
        """
        Args:
            rows: normalized hidden states, three ``(B, rows_i, hidden)`` groups (L rows in all).
            cos, sin: ``(B, L, head_dim)`` fp32 mRoPE tables.
            past_key, past_value: ``(B, P, kv_heads, head_dim)`` this layer's cache rows (compute dtype).
            mask: ``(B, 1, L, P + L)`` additive (`attention_mask`).
        Returns:
            attention outputs after o_proj as three groups; the block's key and value rows
            ``(B, L, kv_heads, head_dim)`` in the compute dtype.
        """
        dtype = rows[0].dtype
        groups = route(lambda x: self._qkv(x, gen=False), lambda x: self._qkv(x, gen=True), rows)
        q, k = apply_rotary(torch.cat([g[0] for g in groups], dim=1), torch.cat([g[1] for g in groups], dim=1),
                            cos, sin)
        q, k = q.to(dtype), k.to(dtype)
        v = torch.cat([g[2] for g in groups], dim=1)
        out = self.attention(q.transpose(1, 2), torch.cat([past_key, k], dim=1).transpose(1, 2),
                             torch.cat([past_value, v], dim=1).transpose(1, 2), mask)
        batch, total = q.shape[0], q.shape[1]
        out = out.transpose(1, 2).reshape(batch, total, self.num_heads * self.head_dim)
        n_head, n_latent = rows[0].shape[1], rows[1].shape[1]
        split = (out[:, :n_head], out[:, n_head:n_head + n_latent], out[:, n_head + n_latent:])
        return route(self.o_proj, self.o_proj_moe_gen, split), k, v


class LanceMoTDecoderLayer(nn.Module):
    """Pre-norm MoT block (upstream ``Qwen2MoTDecoderLayer``): per-expert input norm, joint attention, per-expert
    post-attention norm and MLP, residuals around both."""

    def __init__(self, config: LanceLLMConfig, attn_implementation: str) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LanceMoTAttention(config, attn_implementation)
        self.mlp = LanceMLP(config)
        self.mlp_moe_gen = LanceMLP(config)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.input_layernorm_moe_gen = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(hidden, eps)

    def forward(self, rows: Rows, cos: torch.Tensor, sin: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, mask: torch.Tensor) -> tuple[Rows, torch.Tensor, torch.Tensor]:
        """Arguments as `LanceMoTAttention.forward` (``rows`` un-normalized); returns the new hidden states and the
        block's key and value rows."""
        normed = route(self.input_layernorm, self.input_layernorm_moe_gen, rows)
        attn, key, value = self.self_attn(normed, cos, sin, past_key, past_value, mask)
        rows = (rows[0] + attn[0], rows[1] + attn[1], rows[2] + attn[2])
        normed = route(self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, rows)
        mlp = route(self.mlp, self.mlp_moe_gen, normed)
        return (rows[0] + mlp[0], rows[1] + mlp[1], rows[2] + mlp[2]), key, value


class LanceMoTModel(nn.Module):
    """Token embedding, the decoder stack and the two final norms (``norm`` for und rows, ``norm_moe_gen`` for
    latent rows). Rotary tables are inputs: upstream's ``rotary_emb`` has no weights."""

    def __init__(self, config: LanceLLMConfig, attn_implementation: str) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LanceMoTDecoderLayer(config, attn_implementation)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rows: Rows, cos: torch.Tensor, sin: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, mask: torch.Tensor) -> tuple[Rows, torch.Tensor, torch.Tensor]:
        """Run every layer.

        Args:
            rows: embedded rows, three ``(B, rows_i, hidden)`` groups (L rows in all).
            cos, sin: ``(B, L, head_dim)`` fp32.
            past_key, past_value: ``(layers, B, P, kv_heads, head_dim)``.
            mask: ``(B, 1, L, P + L)`` additive.
        Returns:
            last-layer hidden states (before the final norms) as three groups; key and value rows
            ``(layers, B, L, kv_heads, head_dim)``.
        """
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            rows, key, value = layer(rows, cos, sin, past_key[i], past_value[i], mask)
            keys.append(key)
            values.append(value)
        return rows, torch.stack(keys), torch.stack(values)


class LanceMoTForCausalLM(nn.Module):
    """The MoT stack plus the untied ``lm_head`` (checkpoint prefix ``language_model``)."""

    def __init__(self, config: LanceLLMConfig, attn_implementation: str) -> None:
        super().__init__()
        self.model = LanceMoTModel(config, attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# --- Top model -----------------------------------------------------------------------------------------------------


class LanceMoT(nn.Module):
    """Lance minus the vision tower and VAE: ``state_dict()`` keys and shapes are exactly those of
    ``Lance_3B/model.safetensors`` (1021 tensors; the video checkpoint's 126976-row table with
    ``max_latent_frames=31``).

    Args:
        config: hyper-parameters (default: Lance_3B).
        attn_implementation: ``"eager"`` (the export reference: MatMul/Softmax) or ``"sdpa"``.
    """

    def __init__(self, config: LanceLLMConfig | None = None, attn_implementation: str = "eager") -> None:
        super().__init__()
        if attn_implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)}, "
                             f"got {attn_implementation!r}")
        self.config = config = config or LanceLLMConfig()
        self.language_model = LanceMoTForCausalLM(config, attn_implementation)
        self.time_embedder = LanceTimestepEmbedder(config.hidden_size)
        self.vae2llm = nn.Linear(LATENT_CHANNELS, config.hidden_size)
        self.llm2vae = nn.Linear(config.hidden_size, LATENT_CHANNELS)
        self.latent_pos_embed = LanceLatentPosEmbed(config.max_latent_frames, MAX_LATENT_SIZE, config.hidden_size)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text rows for the host: input_ids ``(B, L)`` int64 -> ``(B, L, hidden)`` in the weights' dtype."""
        return self.language_model.model.embed_tokens(input_ids)

    def embed_latents(self, latents: torch.Tensor, timestep: torch.Tensor, latent_pos: torch.Tensor) -> torch.Tensor:
        """Latent tokens as LLM rows: ``vae2llm(latents) + time_embedder(timestep) + latent_pos``.

        Args:
            latents: ``(B, Lg, 48)`` float.
            timestep: ``(B, Lg)`` float, flow time t in [0, 1] per latent row (0 for clean rows).
            latent_pos: ``(Lg, hidden)`` float, rows of ``latent_pos_embed`` gathered by the host.
        Returns:
            ``(B, Lg, hidden)``.
        """
        return self.vae2llm(latents) + self.time_embedder(timestep) + latent_pos[None]

    def forward_layers(
        self,
        und_head: torch.Tensor,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        latent_pos: torch.Tensor,
        und_tail: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        past_len: torch.Tensor,
        causal: torch.Tensor,
    ) -> tuple[Rows, torch.Tensor, torch.Tensor]:
        """`step` without the heads: arguments as `step`; returns the last layer's hidden states (before the final
        norms) as ``(und_head, latent, und_tail)`` groups, and the key and value rows."""
        rows = (und_head, self.embed_latents(latents, timestep, latent_pos).to(und_head.dtype), und_tail)
        mask = attention_mask(past_len, past_key.shape[2], cos.shape[1], causal, und_head.dtype)
        return self.language_model.model(rows, cos, sin, past_key, past_value, mask)

    def step(
        self,
        und_head: torch.Tensor,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        latent_pos: torch.Tensor,
        und_tail: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        past_len: torch.Tensor,
        causal: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One MoT step over a block of rows against a KV cache: the ``mot`` engine graph.

        Rows come as three groups in sequence order; any may have zero rows (L = Lh + Lg + Lt >= 1).

        Args:
            und_head: ``(B, Lh, D)`` float, und rows before the latent rows (text, ViT rows, <|vision_start|>).
            latents: ``(B, Lg, 48)`` float, latent tokens for the gen expert (embedded in-graph, `embed_latents`).
            timestep: ``(B, Lg)`` float, flow time of each latent row (0 for clean rows).
            latent_pos: ``(Lg, D)`` float, latent position rows (gathered by the host from ``latent_pos_embed``).
            und_tail: ``(B, Lt, D)`` float, und rows after the latent rows (<|vision_end|>).
            cos, sin: ``(B, L, head_dim)`` fp32 (`mrope_cos_sin`).
            past_key, past_value: ``(layers, B, P, kv_heads, head_dim)``, the cache sliced to P rows.
            past_len: ``(B,)`` int64, valid past rows per batch entry (<= P); later rows are masked out.
            causal: ``()`` bool, causal among the block's rows (text) or bidirectional (visual blocks).
        Returns:
            logits: ``(B, vocab)`` fp32, ``lm_head(norm(h))`` of the last row of the block.
            velocity: ``(B, Lg, 48)``, ``llm2vae(norm_moe_gen(h))`` of the latent rows.
            key, value: ``(layers, B, L, kv_heads, head_dim)``, the block's cache rows (keys after q/k-norm and
                RoPE). The step never writes its inputs: the runner stores these at ``past_len``.
        """
        rows, key, value = self.forward_layers(und_head, latents, timestep, latent_pos, und_tail, cos, sin,
                                               past_key, past_value, past_len, causal)
        model = self.language_model.model
        # The last row of the block, whichever group holds it (x[:, -1:] of an empty group is empty).
        last = torch.cat([group[:, -1:] for group in rows], dim=1)[:, -1]
        logits = self.language_model.lm_head(model.norm(last)).float()
        velocity = self.llm2vae(model.norm_moe_gen(rows[1]))
        return logits, velocity, key, value

    # nn.Module calls, the PyTorch runner and torch.onnx.export all run the step.
    forward = step
