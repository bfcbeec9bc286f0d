"""The Qwen2.5-VL vision tower as Lance uses it (docs/design/model.md §4; upstream ``modeling/vit/qwen2_5_vl_vit.py``).

Lance loads ``Qwen2.5-VL-ViT/vit.safetensors`` (390 bare keys) into this tower and feeds the merger output straight to
the LLM: no connector, no ``vit_pos_embed`` (``--vit_type qwen_2_5_vl_original``).

Upstream runs window attention as variable-length attention over ``cu_seqlens`` (flash-attn) or per-chunk loops
(transformers' eager/SDPA). Neither exports to a static graph, so here the host (`vision_inputs`) turns a grid into
plain tensors, and the engine forward sees only dense ops:

* ``window_index`` reorders 2x2 merge groups so each 112-px window is contiguous (a Gather); ``reverse_index`` undoes
  it after the merger;
* ``cos``/``sin`` are the 2-D rotary tables, already in window order;
* ``window_mask`` / ``full_mask`` are additive block-diagonal masks (0 inside a block, `MASK_VALUE` outside): per
  window for the windowed blocks, per temporal frame for the full-attention blocks (7, 15, 23, 31).

Nothing crosses a temporal frame (each frame's windows and full-attention block are its own), so a video's
``(t, h, w)`` grid gives exactly the rows of ``t`` runs over ``(1, h, w)`` concatenated; callers may run long videos
frame by frame to keep the ``(P, P)`` masks small.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.layers import MASK_VALUE, RMSNorm, rotate_half

logger = logging.getLogger(__name__)

# Fixed in upstream's modules rather than read from config.json.
_RMS_NORM_EPS = 1e-6
_ROPE_THETA = 10000.0
# The model_type upstream's Qwen2_5_VLVisionConfig writes (Lance's transformers-4.x fork of the class).
_MODEL_TYPE = "qwen2_5_vl"

"""Additive mask entry for a blocked (query, key) pair. Finite, so it survives casts to bf16 (fp32's minimum rounds to
-inf there) and no row can turn into NaN; every row keeps its own diagonal, and exp(-1e9 + s) is exactly 0 in fp32
for any realistic score s, so masked attention equals upstream's chunked attention."""


@dataclass(frozen=True)
class VisionConfig:
    """Vision tower hyper-parameters; defaults are the Qwen2.5-VL-3B tower in ``Qwen2.5-VL-ViT/config.json``.

    Field names are those of the file (upstream's ``Qwen2_5_VLVisionConfig``). The file spells the input channels
    ``in_chans`` as Qwen's own 3B config does and/or ``in_channels`` as the config class does; both are read.

    Attributes:
        depth: transformer blocks.
        hidden_size: block width.
        intermediate_size: SwiGLU MLP width (the MLP has biases).
        num_heads: attention heads (head_dim = hidden_size / num_heads = 80).
        in_channels: image channels (RGB).
        patch_size: spatial patch side in pixels.
        temporal_patch_size: frames per patch (images are repeated to this many frames).
        spatial_merge_size: patches per merged token along each side (the merger concatenates 2x2 patches).
        window_size: window side in pixels for windowed attention (112 px = 8 patches = 4 merged tokens).
        fullatt_block_indexes: blocks that attend over the whole frame instead of a window.
        out_hidden_size: merger output width (= the LLM hidden size, 2048).
        tokens_per_second: temporal position scale of Qwen2.5-VL's mRoPE (read by the LLM side, not by this tower).
        hidden_act: MLP activation; only ``"silu"`` exists in Qwen2.5-VL towers.
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 2048
    tokens_per_second: int = 2
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"VisionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig.hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.head_dim % 4:
            # Rotary halves the head dim, and each half splits evenly between the h and w axes.
            raise ValueError(f"VisionConfig: head_dim {self.head_dim} must be a multiple of 4 for the 2-D rotary")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"VisionConfig.window_size {self.window_size} must be a multiple of "
                             f"patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size}")
        if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"VisionConfig.fullatt_block_indexes {self.fullatt_block_indexes} must lie in "
                             f"[0, {self.depth})")
        if self.hidden_act != "silu":
            raise ValueError(f"VisionConfig.hidden_act must be 'silu' (Qwen2.5-VL), got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row: ``in_channels * temporal_patch_size * patch_size**2`` (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4)."""
        return self.spatial_merge_size**2

    @property
    def window_tokens(self) -> int:
        """Window side in merged tokens (4)."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VisionConfig":
        """Build from a config.json mapping; lists become tuples, keys the tower does not use are ignored.

        Raises:
            ValueError: ``in_chans`` and ``in_channels`` both given and different, or a field fails validation.
        """
        values = dict(values)
        if "in_chans" in values:
            in_chans = values.pop("in_chans")
            if values.setdefault("in_channels", in_chans) != in_chans:
                raise ValueError(f"VisionConfig: in_chans={in_chans} contradicts in_channels={values['in_channels']}")
        known = {f.name for f in fields(cls)}
        ignored = sorted(set(values) - known)
        if ignored:
            logger.debug("VisionConfig ignores keys %s", ignored)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "VisionConfig":
        """Read ``Qwen2.5-VL-ViT/config.json``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """The config.json mapping: every field (lists for tuples), ``in_chans`` beside ``in_channels`` so both
        readers (upstream's config class and Qwen's 3B spelling) find it, and upstream's ``model_type``."""
        values: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        values["in_chans"] = self.in_channels
        values["model_type"] = _MODEL_TYPE
        return values

    @classmethod
    def tiny(cls, out_hidden_size: int) -> "VisionConfig":
        """The same module tree at small width for tests: 4 blocks (full attention at 1 and 3), width 32, 2 heads.

        Patch, temporal patch, merge and window sizes stay real, so grids, windows and patch rows are the real ones.
        """
        return cls(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=(1, 3),
                   out_hidden_size=out_hidden_size)


# --- Leaf modules ------------------------------------------------------------------------------------------------


class Qwen25VisionPatchEmbed(nn.Module):
    """Patch embedding. Upstream's Conv3d has stride == kernel, so on pre-flattened patch rows it is one MatMul.

    The parameter stays the checkpoint's Conv3d weight ``(hidden, C, tp, p, p)``; its flattening order (C, tp, p, p)
    is the order of a patch row (see `runtime.pipeline.preprocess`).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: ``(P, patch_dim)`` float -> ``(P, hidden)`` in the weight's dtype."""
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class Qwen25VisionMLP(nn.Module):
    """SwiGLU MLP with biases: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(P, hidden)`` -> ``(P, hidden)``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --- Rotary and attention (pure functions) -------------------------------------------------------------------------


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate in fp32 (upstream upcasts q and k) and cast back.

    Args:
        x: ``(heads, P, head_dim)`` float.
        cos, sin: ``(P, head_dim)`` fp32.
    Returns:
        ``(heads, P, head_dim)`` in ``x``'s dtype.
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference attention: scores in the compute dtype, additive mask, softmax in fp32.

    Args:
        q, k, v: ``(heads, P, head_dim)`` float.
        mask: ``(P, P)`` additive float (0 or `MASK_VALUE`).
    Returns:
        ``(heads, P, head_dim)`` in ``q``'s dtype.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + mask.to(q.dtype)
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`eager_attention` through ``F.scaled_dot_product_attention`` (fused kernels on GPU); same signature.

    The batch axis is added because 3-D inputs send SDPA to its unfused math kernel on CUDA."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask.to(q.dtype)[None, None])[0]


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}


class Qwen25VisionAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) and 2-D rotary on q and k."""

    def __init__(self, config: VisionConfig, attn_implementation: str = "eager") -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention = ATTENTION_FUNCTIONS[attn_implementation]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(P, hidden)`` float, rows in window order.
            cos, sin: ``(P, head_dim)`` fp32, window order.
            mask: ``(P, P)`` additive float.
        Returns:
            ``(P, hidden)``.
        """
        seq = x.shape[0]
        # (P, 3*hidden) -> (3, heads, P, head_dim): head-major for batched matmuls.
        q, k, v = self.qkv(x).reshape(seq, 3, self.num_heads, -1).permute(1, 2, 0, 3).unbind(0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attention(q, k, v, mask)
        return self.proj(out.transpose(0, 1).reshape(seq, -1))


# --- Block, merger, tower ------------------------------------------------------------------------------------------


class Qwen25VisionBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: VisionConfig, attn_implementation: str = "eager") -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, _RMS_NORM_EPS)
        self.norm2 = RMSNorm(config.hidden_size, _RMS_NORM_EPS)
        self.attn = Qwen25VisionAttention(config, attn_implementation)
        self.mlp = Qwen25VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: ``(P, hidden)``; cos, sin: ``(P, head_dim)`` fp32; mask: ``(P, P)`` additive -> ``(P, hidden)``."""
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class Qwen25VisionPatchMerger(nn.Module):
    """RMSNorm, concatenate each 2x2 merge group (4 consecutive rows), Linear -> exact GELU -> Linear."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        merged = config.hidden_size * config.merge_unit
        self.ln_q = RMSNorm(config.hidden_size, _RMS_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(P, hidden)`` with merge groups contiguous -> ``(P / merge_unit, out_hidden_size)``."""
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class Qwen25VisionTransformer(nn.Module):
    """The tower; ``state_dict()`` keys are exactly those of ``vit.safetensors``.

    Args:
        config: hyper-parameters.
        attn_implementation: ``"eager"`` (the export reference: MatMul/Softmax) or ``"sdpa"``.
    """

    def __init__(self, config: VisionConfig | None = None, attn_implementation: str = "eager") -> None:
        super().__init__()
        if attn_implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)}, "
                             f"got {attn_implementation!r}")
        self.config = config = config or VisionConfig()
        self.full_attention = frozenset(config.fullatt_block_indexes)
        self.patch_embed = Qwen25VisionPatchEmbed(config)
        self.blocks = nn.ModuleList(Qwen25VisionBlock(config, attn_implementation) for _ in range(config.depth))
        self.merger = Qwen25VisionPatchMerger(config)

    def forward(
        self,
        patches: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window_mask: torch.Tensor,
        full_mask: torch.Tensor,
        window_index: torch.Tensor,
        reverse_index: torch.Tensor,
    ) -> torch.Tensor:
        """The engine graph: static ops only; every grid-dependent quantity comes from `vision_inputs`.

        Args:
            patches: ``(P, patch_dim)`` float, rows in the preprocessing (raster merge-group) order.
            cos, sin: ``(P, head_dim)`` fp32 rotary tables in window order.
            window_mask: ``(P, P)`` additive float, block-diagonal per window (window order).
            full_mask: ``(P, P)`` additive float, block-diagonal per temporal frame (window order).
            window_index: ``(P / 4,)`` int64, merge group at each window-order slot.
            reverse_index: ``(P / 4,)`` int64, the inverse permutation.
        Returns:
            ``(P / 4, out_hidden_size)``: one LLM hidden state per merged token, in raster order.
        """
        x = self.patch_embed(patches)
        unit = self.config.merge_unit
        x = x.reshape(-1, unit, x.shape[-1]).index_select(0, window_index).reshape(-1, x.shape[-1])
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_mask if i in self.full_attention else window_mask)
        # The merger acts on whole merge groups, so it commutes with their permutation: un-permute its output.
        return self.merger(x).index_select(0, reverse_index)


# --- Host side: grid -> engine inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionInputs:
    """Everything `Qwen25VisionTransformer.forward` needs besides the patches, for one ``(t, h, w)`` grid.

    Attributes:
        grid_thw: temporal groups, patch rows, patch columns.
        cos, sin: ``(P, head_dim)`` fp32, window order.
        window_mask, full_mask: ``(P, P)`` fp32 additive masks (0 / `MASK_VALUE`), window order.
        window_index, reverse_index: ``(P / 4,)`` int64 permutation of merge groups and its inverse.
    """

    grid_thw: tuple[int, int, int]
    cos: torch.Tensor
    sin: torch.Tensor
    window_mask: torch.Tensor
    full_mask: torch.Tensor
    window_index: torch.Tensor
    reverse_index: torch.Tensor

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    def engine_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors by ``forward`` argument name (all but ``patches``)."""
        return {"cos": self.cos, "sin": self.sin, "window_mask": self.window_mask, "full_mask": self.full_mask,
                "window_index": self.window_index, "reverse_index": self.reverse_index}


def check_grid(grid_thw: Sequence[int], config: VisionConfig) -> tuple[int, int, int]:
    """Validate a ``(t, h, w)`` patch grid and return it as ints.

    Raises:
        ValueError: not three positive ints, or h / w not multiples of the merge size.
    """
    if len(grid_thw) != 3:
        raise ValueError(f"grid_thw must be (t, h, w), got {tuple(grid_thw)}")
    t, h, w = (int(v) for v in grid_thw)
    m = config.spatial_merge_size
    if min(t, h, w) < 1 or h % m or w % m:
        raise ValueError(f"grid_thw {(t, h, w)} needs t, h, w >= 1 and h, w multiples of {m}")
    return t, h, w


def vision_position_ids(grid_thw: Sequence[int], config: VisionConfig) -> torch.Tensor:
    """(row, column) of every patch in the preprocessing order: frames, then 2x2 merge groups in raster order, then
    the 4 patches of a group in raster order (upstream ``rot_pos_emb``).

    Returns:
        ``(P, 2)`` int64.
    """
    t, h, w = check_grid(grid_thw, config)
    m = config.spatial_merge_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack((rows, cols), dim=-1)                                   # (h, w, 2)
    ids = ids.reshape(h // m, m, w // m, m, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
    return ids.repeat(t, 1)


def vision_window_index(grid_thw: Sequence[int], config: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's ``get_window_index`` for one grid: merge groups regrouped into windows of
    ``window_tokens x window_tokens`` groups, per frame, windows in raster order, groups in raster order inside a
    window. Windows at the right and bottom edges are cut short (upstream pads with -100 and drops the padding).

    Returns:
        ``(P / 4,)`` int64 merge-group index per window-order slot, and the window lengths in patches.
    """
    t, h, w = check_grid(grid_thw, config)
    m, n = config.spatial_merge_size, config.window_tokens
    gh, gw = h // m, w // m
    groups = torch.arange(t * gh * gw).reshape(t, gh, gw)
    index, lengths = [], []
    for frame in groups:
        for r in range(0, gh, n):
            for c in range(0, gw, n):
                window = frame[r:r + n, c:c + n].reshape(-1)
                index.append(window)
                lengths.append(window.numel() * config.merge_unit)
    return torch.cat(index), lengths


def block_diagonal_mask(lengths: Sequence[int]) -> torch.Tensor:
    """Additive ``(sum(lengths), sum(lengths))`` fp32 mask: 0 within each consecutive block, `MASK_VALUE` across."""
    block = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    same = block[:, None] == block[None, :]
    return torch.where(same, torch.zeros(()), torch.full((), MASK_VALUE))


def vision_rotary(position_ids: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables: ``head_dim / 4`` frequencies (theta 10000) for the row and as many for the column,
    laid out ``[row | col | row | col]`` as upstream's ``cat((emb, emb))``; computed in fp32 like upstream.

    Args:
        position_ids: ``(P, 2)`` int64 (row, column).
    Returns:
        cos, sin: ``(P, head_dim)`` fp32.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (_ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    angles = (position_ids.float()[..., None] * inv_freq).flatten(1)      # (P, 2 * half / 2) = (P, half)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def vision_inputs(grid_thw: Sequence[int], config: VisionConfig) -> VisionInputs:
    """Host computation of the engine inputs for one ``(t, h, w)`` patch grid (plain torch on CPU).

    Raises:
        ValueError: a bad grid (see `check_grid`).
    """
    t, h, w = check_grid(grid_thw, config)
    window_index, window_lengths = vision_window_index((t, h, w), config)
    # Rotary rows follow their patches: permute the per-patch tables by merge group, like the hidden states.
    positions = vision_position_ids((t, h, w), config)
    positions = positions.reshape(-1, config.merge_unit, 2)[window_index].reshape(-1, 2)
    cos, sin = vision_rotary(positions, config.head_dim)
    # The window order keeps frames contiguous and in order, so per-frame blocks are the same in either order.
    return VisionInputs(
        grid_thw=(t, h, w),
        cos=cos,
        sin=sin,
        window_mask=block_diagonal_mask(window_lengths),
        full_mask=block_diagonal_mask([h * w] * t),
        window_index=window_index,
        reverse_index=torch.argsort(window_index),
    )
