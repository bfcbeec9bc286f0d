"""The Wan2.2 VAE (the TI2V-5B VAE of ``Wan2.2_VAE.pth``) with its causal caches made explicit.

The math is upstream's [L:modeling/vae/wan/vae2_2.py @4baeee0 = W:wan/modules/vae2_2.py]; docs/design/model.md §5 gives
the
architecture, the chunk plan and the latent normalisation. Attribute names equal the checkpoint keys, so the plain
``WanVAE_`` state dict loads with ``load_state_dict`` and no renames. Parity is pinned by tests/test_vae.py against
diffusers' ``AutoencoderKLWan`` configured as the Wan2.2 VAE.

Upstream runs video in chunks: the encoder sees frame 0 alone, then 4 frames at a time; the decoder sees one latent
frame at a time. Every causal 3-D convolution (temporal kernel 3) reads the last frames of its input from the previous
chunk. Here those frames are explicit tensors, never state on ``self``:

* ``forward_first(x, with_caches)`` runs the first chunk (one frame) as a pure 2-D network (docs/design/model.md §5.4): a
  causal convolution whose past is zero reduces to a 2-D convolution with its last temporal tap, ``upsample3d`` skips
  its time convolution, ``DupUp3D`` keeps the last temporal copy, ``AvgDown3D`` averages in one zero frame. It returns
  the caches the next chunk needs (or none, for single images).
* ``forward(x, caches)`` runs a later chunk as a 3-D network and returns the caches for the chunk after it.

Caches form a flat tuple in execution order, one per cached convolution; ``WanVAE.encoder_cache_slots`` and
``WanVAE.decoder_cache_slots`` name each one and give its shape. Forwards have no data-dependent control flow, no
``.item()`` and no views above rank 7 (TensorRT's limit is 8), so they export to ONNX as they are.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.spec.constants import WAN22_LATENT_MEAN, WAN22_LATENT_STD

logger = logging.getLogger(__name__)

Caches = tuple[Tensor, ...]


# --- Configuration -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanVAEConfig:
    """Wan2.2 VAE hyper-parameters; the defaults are those of ``Wan2.2_VAE.pth`` (docs/design/model.md §5.1).

    Attributes:
        z_dim: latent channels (the encoder emits ``2 * z_dim``: mean and log-variance).
        dim: encoder base width (stage widths ``dim * (1, *dim_mult)``).
        dec_dim: decoder base width (stage widths ``dec_dim * (dim_mult[-1], *reversed(dim_mult))``).
        dim_mult: width multipliers per stage; every stage but the last halves the resolution.
        num_res_blocks: residual blocks per encoder stage (the decoder has one more per stage).
        temperal_downsample: per down stage, whether it also halves time (upstream's spelling; the decoder mirrors it).
        patch_size: pixel patchification before the encoder and after the decoder.
        image_channels: RGB.
    """

    z_dim: int = 48
    dim: int = 160
    dec_dim: int = 256
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    image_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("z_dim", "dim", "dec_dim", "num_res_blocks", "patch_size", "image_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.z_dim != len(WAN22_LATENT_MEAN):
            raise ValueError(f"WanVAEConfig.z_dim must be {len(WAN22_LATENT_MEAN)} (the Wan2.2 latent statistics), "
                             f"got {self.z_dim}")
        if len(self.dim_mult) < 2 or min(self.dim_mult) < 1:
            raise ValueError(f"WanVAEConfig.dim_mult needs >= 2 positive entries, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"WanVAEConfig.temperal_downsample needs one flag per down stage "
                             f"({len(self.dim_mult) - 1}), got {self.temperal_downsample}")
        # The parameter-free shortcuts regroup channels: every stage must divide evenly (upstream asserts the same).
        enc, dec = self.encoder_dims, self.decoder_dims
        for i, temporal in enumerate(self.temperal_downsample):
            factor = (2 if temporal else 1) * 4
            if (enc[i] * factor) % enc[i + 1] or (dec[i + 1] * factor) % dec[i]:
                raise ValueError(f"WanVAEConfig: stage {i} widths {enc[i]}->{enc[i + 1]} (encoder) / "
                                 f"{dec[i]}->{dec[i + 1]} (decoder) do not regroup by the factor {factor}")

    @property
    def encoder_dims(self) -> tuple[int, ...]:
        return tuple(self.dim * m for m in (1, *self.dim_mult))

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        return tuple(self.dec_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult)))

    @property
    def io_channels(self) -> int:
        """Channels of a patchified frame: ``image_channels * patch_size**2`` (12)."""
        return self.image_channels * self.patch_size**2

    @property
    def latent_scale(self) -> int:
        """Encoder input (patchified) resolution over latent resolution: 2 per down stage (8)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side (16)."""
        return self.patch_size * self.latent_scale

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4): the encoder's chunk length, the decoder's frames per chunk."""
        return 2 ** sum(self.temperal_downsample)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "WanVAEConfig":
        """Build from a mapping of field names (lists become tuples); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"WanVAEConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def from_json(cls, path: str | Path) -> "WanVAEConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def encoder_cache_slots(self) -> tuple["CacheSlot", ...]:
        """The video encoder's chunk caches in call order (`WanVAE.encoder_cache_slots`), without any weights."""
        return _cache_slots(self, "encoder")

    def decoder_cache_slots(self) -> tuple["CacheSlot", ...]:
        """The video decoder's chunk caches in call order (`WanVAE.decoder_cache_slots`), without any weights."""
        return _cache_slots(self, "decoder")

    @classmethod
    def tiny(cls) -> "WanVAEConfig":
        """Small widths, the same module tree and key names, the real 48-channel latent and 12-channel patches."""
        return cls(dim=8, dec_dim=12)


@dataclass(frozen=True)
class CacheSlot:
    """One causal cache: the last ``frames`` input frames of the convolution ``name`` (a checkpoint module path).

    Its shape is ``(batch, channels, frames, scale * h, scale * w)`` for a latent grid of ``h x w`` cells.
    """

    name: str
    channels: int
    frames: int
    scale: int

    def shape(self, batch: int, latent_height: int, latent_width: int) -> tuple[int, int, int, int, int]:
        return (batch, self.channels, self.frames, self.scale * latent_height, self.scale * latent_width)


# --- Pure functions --------------------------------------------------------------------------------------------------


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Fold ``patch_size x patch_size`` pixel blocks into channels, channel order ``(c, r, q)`` as upstream.

    Args:
        x: ``(B, C, T, H, W)`` video or ``(B, C, H, W)`` image, any float dtype.

    Returns:
        ``(B, C * p * p, T, H / p, W / p)`` (or without ``T``), same dtype.
    """
    if x.dim() == 4:
        return patchify(x.unsqueeze(2), patch_size).squeeze(2)
    b, c, t, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, t, h // p, p, w // p, p)            # (b, c, t, h, q, w, r)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: Tensor, patch_size: int) -> Tensor:
    """Inverse of ``patchify``.

    Args:
        x: ``(B, C * p * p, T, h, w)`` or ``(B, C * p * p, h, w)``.

    Returns:
        ``(B, C, T, h * p, w * p)`` (or without ``T``), same dtype.
    """
    if x.dim() == 4:
        return unpatchify(x.unsqueeze(2), patch_size).squeeze(2)
    b, cpp, t, h, w = x.shape
    p = patch_size
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)          # (b, c, r, q, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


def sample_posterior(mu: Tensor, log_var: Tensor, noise: Tensor) -> Tensor:
    """Lance's reparameterisation ``mu + exp(log_var / 2) * noise`` [L:modeling/vae/wan/model.py ``reparameterize``].

    As upstream, ``mu`` is the *normalised* mean that ``encode`` returns while ``log_var`` is on the raw latent scale,
    and there is no clamp (diffusers clamps log-variance to [-30, 20]; Lance does not).

    Args:
        mu: ``(B, 48, t, h, w)`` normalised latent mean (or ``(B, 48, h, w)``).
        log_var: raw log-variance, same shape.
        noise: standard normal noise, same shape (an input, so the sample is reproducible).

    Returns:
        The latent sample, same shape and dtype.
    """
    if not mu.shape == log_var.shape == noise.shape:
        raise ValueError(f"sample_posterior: mu {tuple(mu.shape)}, log_var {tuple(log_var.shape)} and noise "
                         f"{tuple(noise.shape)} must have one shape")
    return noise * torch.exp(0.5 * log_var) + mu


def frame_conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """A causal ``Conv3d`` on one frame whose past frames are zero: only the last temporal tap sees data.

    Args:
        x: ``(B, C_in, H, W)`` the frame.

    Returns:
        ``(B, C_out, H', W')`` what the 3-D convolution yields for that frame.
    """
    return F.conv2d(x, conv.weight[:, :, -1], conv.bias, conv.stride[1:], conv.padding[1:])


def _fold_time(x: Tensor) -> Tensor:
    """``(B, C, T, H, W) -> (B * T, C, H, W)`` for per-frame 2-D ops."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _unfold_time(x: Tensor, frames: int) -> Tensor:
    """``(B * T, C, H, W) -> (B, C, T, H, W)``."""
    bt, c, h, w = x.shape
    return x.reshape(bt // frames, frames, c, h, w).transpose(1, 2)


# --- Leaf modules ----------------------------------------------------------------------------------------------------


class WanCausalConv3d(nn.Conv3d):
    """3-D convolution, zero "same" padding in space, causal in time.

    The ``past_frames`` frames before a chunk come from a cache (the tail of the previous chunk's input) instead of
    upstream's zero padding; a first chunk (zero past) runs as ``frame_conv``. ``past_frames`` is ``kernel_t - 1`` for
    the padded convolutions and 1 for ``downsample3d``'s stride-2 time convolution, which upstream feeds the last
    frame of the previous chunk only.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int],
                 stride: tuple[int, int, int] = (1, 1, 1), past_frames: int | None = None) -> None:
        kt, kh, kw = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, kh // 2, kw // 2))
        self.past_frames = kt - 1 if past_frames is None else past_frames

    def forward(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """Args:
            x: ``(B, C_in, T, H, W)`` the chunk.
            cache: ``(B, C_in, past_frames, H, W)`` the frames before it.

        Returns:
            ``(B, C_out, T', H, W)`` and the next cache, the last ``past_frames`` frames of ``cache ++ x``.
        """
        x = torch.cat([cache, x], dim=2)
        return super().forward(x), x[:, :, -self.past_frames:]

    def first_cache(self, x: Tensor) -> Tensor:
        """The cache after a first chunk whose single input frame was ``x`` ``(B, C_in, H, W)``: zeros, then ``x``."""
        if self.past_frames == 1:
            return x.unsqueeze(2)
        b, c, h, w = x.shape
        return torch.cat([x.new_zeros(b, c, self.past_frames - 1, h, w), x.unsqueeze(2)], dim=2)

    def empty_cache(self, x: Tensor) -> Tensor:
        """An all-zero cache ``(B, C_in, past_frames, H, W)`` for input frames shaped like ``x`` ``(B, C_in, H, W)``."""
        b, c, h, w = x.shape
        return x.new_zeros(b, c, self.past_frames, h, w)

    def cache_slot(self, name: str, scale: int) -> CacheSlot:
        return CacheSlot(name, self.in_channels, self.past_frames, scale)


class WanRMSNorm(nn.Module):
    """Upstream ``RMS_norm``: L2-normalise over channels (not mean-square), times ``sqrt(C)`` and ``gamma``.

    Works on ``(B, C, T, H, W)`` and ``(B, C, H, W)`` inputs alike; ``gamma`` keeps the checkpoint's shape.
    """

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(B, C, ...)``. Returns: same shape and dtype."""
        gamma = self.gamma.reshape(-1, *(1,) * (x.dim() - 2))
        return F.normalize(x, dim=1) * self.scale * gamma


class WanAttentionBlock(nn.Module):
    """Single-head self-attention within each frame (1x1-conv projections), with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = WanRMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(B, C, T, H, W)`` or ``(B, C, H, W)``. Returns: same shape and dtype."""
        if x.dim() == 5:
            return _unfold_time(self.forward(_fold_time(x)), x.shape[2])
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=-1)                              # each (n, 1, h*w, c)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return self.proj(y) + x


class WanAvgDown3D(nn.Module):
    """Parameter-free down shortcut: fold ``factor_t x factor_s x factor_s`` blocks into channels, average groups."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.group_size = in_channels * factor_t * factor_s * factor_s // out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(B, C_in, T, H, W)``, ``T`` a multiple of ``factor_t``.

        Returns: ``(B, C_out, T / factor_t, H / factor_s, W / factor_s)``.
        """
        b, c, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        assert t % ft == 0, "later chunks hold whole frame groups"
        # Batch folded into channels keeps the view at rank 7 (upstream's is rank 8, TensorRT's limit).
        x = x.reshape(b * c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 2, 4, 6, 1, 3, 5)
        x = x.reshape(b, self.out_channels, self.group_size, t // ft, h // fs, w // fs)
        return x.mean(dim=2)

    def forward_first(self, x: Tensor) -> Tensor:
        """First chunk: upstream front-pads ``factor_t - 1`` zero frames and averages them in.

        Args: x: ``(B, C_in, H, W)``. Returns: ``(B, C_out, H / factor_s, W / factor_s)``.
        """
        frames = x.unsqueeze(2)
        if self.factor_t > 1:
            b, c, h, w = x.shape
            frames = torch.cat([x.new_zeros(b, c, self.factor_t - 1, h, w), frames], dim=2)
        return self.forward(frames).squeeze(2)


class WanDupUp3D(nn.Module):
    """Parameter-free up shortcut: repeat channels, unfold them into ``factor_t x factor_s x factor_s`` blocks."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(B, C_in, T, H, W)``. Returns: ``(B, C_out, T * factor_t, H * factor_s, W * factor_s)``."""
        b, c, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        # expand + reshape is repeat_interleave over channels; batch folded to stay at rank 7.
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w)
        x = x.reshape(b * self.out_channels, ft, fs, fs, t, h, w).permute(0, 4, 1, 5, 2, 6, 3)
        return x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)

    def forward_first(self, x: Tensor) -> Tensor:
        """First chunk: upstream drops the ``factor_t - 1`` leading temporal copies.

        Args: x: ``(B, C_in, H, W)``. Returns: ``(B, C_out, H * factor_s, W * factor_s)``.
        """
        return self.forward(x.unsqueeze(2))[:, :, -1]


# --- Blocks: each takes its slice of the caches and returns its new caches --------------------------------------------


class _CachedBlock(Protocol):
    num_caches: int

    def __call__(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]: ...

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]: ...


def _chain(blocks: Iterable[_CachedBlock], x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
    """Run blocks in order on a later chunk, each on the next ``block.num_caches`` caches."""
    new: list[Tensor] = []
    for block in blocks:
        x, block_caches = block(x, caches[len(new):len(new) + block.num_caches])
        new.extend(block_caches)
    assert len(new) == len(caches), "cache count is checked at the model entry points"
    return x, tuple(new)


def _chain_first(blocks: Iterable[_CachedBlock], x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
    """Run blocks in order on a first chunk, collecting their caches if ``with_caches``."""
    new: list[Tensor] = []
    for block in blocks:
        x, block_caches = block.forward_first(x, with_caches)
        new.extend(block_caches)
    return x, tuple(new)


class WanResample(nn.Module):
    """Spatial 2x resampling (per frame), with a temporal 2x step in the ``*3d`` modes.

    Modes: ``upsample2d`` / ``upsample3d``: nearest 2x (= upstream's nearest-exact for factor 2) then a 3x3 conv;
    ``upsample3d`` first doubles the frames with ``time_conv`` (C -> 2C channels, interleaved as two frames).
    ``downsample2d`` / ``downsample3d``: zero pad right/bottom, 3x3 conv with stride 2; ``downsample3d`` then halves
    the frames with ``time_conv`` (stride 2 over the previous chunk's last frame and this chunk).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"WanResample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = WanCausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = WanCausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), past_frames=1)
        else:
            self.time_conv = None
        self.num_caches = 0 if self.time_conv is None else 1

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
        """Args:
            x: ``(B, C, T, H, W)`` a later chunk.
            caches: ``time_conv``'s cache (``*3d`` modes) or nothing.

        Returns:
            ``(B, C, T', H', W')`` with ``T' = 2T`` (upsample3d), ``T / 2`` (downsample3d) or ``T``; the new caches.
        """
        new: Caches = ()
        if self.mode == "upsample3d":
            x, cache = self.time_conv(x, caches[0])
            new = (cache,)
            b, c2, t, h, w = x.shape
            # Channel halves [0, C) and [C, 2C) are the two output frames of each input frame.
            x = x.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        x = _unfold_time(self.resample(_fold_time(x)), x.shape[2])
        if self.mode == "downsample3d":
            x, cache = self.time_conv(x, caches[0])
            new = (cache,)
        return x, new

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """First chunk: spatial resampling only (upstream skips ``time_conv`` on the first chunk).

        Args: x: ``(B, C, H, W)``. Returns: ``(B, C, H', W')`` and, if ``with_caches``, ``time_conv``'s cache.
        """
        y = self.resample(x)
        if not with_caches or self.time_conv is None:
            return y, ()
        if self.mode == "upsample3d":
            # Upstream's "Rep" sentinel: the second chunk's time conv sees zero past frames.
            return y, (self.time_conv.empty_cache(x),)
        return y, (self.time_conv.first_cache(y),)

    def cache_slots(self, prefix: str, scale: int) -> tuple[CacheSlot, ...]:
        """``scale``: this block's input resolution over the latent grid."""
        if self.time_conv is None:
            return ()
        # downsample3d's time conv runs after the spatial step, upsample3d's before it.
        at = scale // 2 if self.mode == "downsample3d" else scale
        return (self.time_conv.cache_slot(f"{prefix}.time_conv", at),)


class WanResidualBlock(nn.Module):
    """RMSNorm, SiLU, causal conv, RMSNorm, SiLU, causal conv; a 1x1x1 conv shortcut when widths differ.

    ``residual`` keeps upstream's indices (``residual.0.gamma``, ``residual.2.weight``, ...): slot 5 is upstream's
    ``Dropout(0.0)``, the identity at inference.
    """

    num_caches = 2

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            WanRMSNorm(in_dim, spatial_dims=3), nn.SiLU(), WanCausalConv3d(in_dim, out_dim, (3, 3, 3)),
            WanRMSNorm(out_dim, spatial_dims=3), nn.SiLU(), nn.Identity(), WanCausalConv3d(out_dim, out_dim, (3, 3, 3)),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C_in, T, H, W)``; caches: the two convolutions' caches.

        Returns: ``(B, C_out, T, H, W)`` and the two new caches.
        """
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        h, cache1 = conv1(act1(norm1(x)), caches[0])
        h, cache2 = conv2(act2(norm2(h)), caches[1])
        return h + (x if self.shortcut is None else self.shortcut(x)), (cache1, cache2)

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C_in, H, W)``. Returns: ``(B, C_out, H, W)`` and, if ``with_caches``, two caches."""
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        h1 = act1(norm1(x))
        h2 = act2(norm2(frame_conv(conv1, h1)))
        y = frame_conv(conv2, h2) + (x if self.shortcut is None else frame_conv(self.shortcut, x))
        return y, (conv1.first_cache(h1), conv2.first_cache(h2)) if with_caches else ()

    def cache_slots(self, prefix: str, scale: int) -> tuple[CacheSlot, ...]:
        return (self.residual[2].cache_slot(f"{prefix}.residual.2", scale),
                self.residual[6].cache_slot(f"{prefix}.residual.6", scale))


class WanMidBlock(nn.Sequential):
    """Residual block, per-frame attention, residual block (children ``0``, ``1``, ``2`` as in the checkpoint)."""

    num_caches = 4

    def __init__(self, dim: int) -> None:
        super().__init__(WanResidualBlock(dim, dim), WanAttentionBlock(dim), WanResidualBlock(dim, dim))

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:  # type: ignore[override]
        """Args: x: ``(B, C, T, H, W)``; caches: 4. Returns: same shape, 4 new caches."""
        res1, attn, res2 = self
        x, caches1 = res1(x, caches[:2])
        x, caches2 = res2(attn(x), caches[2:])
        return x, caches1 + caches2

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C, H, W)``. Returns: same shape and, if ``with_caches``, 4 caches."""
        res1, attn, res2 = self
        x, caches1 = res1.forward_first(x, with_caches)
        x, caches2 = res2.forward_first(attn(x), with_caches)
        return x, caches1 + caches2

    def cache_slots(self, prefix: str, scale: int) -> tuple[CacheSlot, ...]:
        return self[0].cache_slots(f"{prefix}.0", scale) + self[2].cache_slots(f"{prefix}.2", scale)


class WanHead(nn.Sequential):
    """RMSNorm, SiLU, causal conv (children ``0``, ``1``, ``2`` as in the checkpoint)."""

    num_caches = 1

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(WanRMSNorm(in_dim, spatial_dims=3), nn.SiLU(), WanCausalConv3d(in_dim, out_dim, (3, 3, 3)))

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:  # type: ignore[override]
        """Args: x: ``(B, C_in, T, H, W)``; caches: 1. Returns: ``(B, C_out, T, H, W)``, 1 new cache."""
        norm, act, conv = self
        y, cache = conv(act(norm(x)), caches[0])
        return y, (cache,)

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C_in, H, W)``. Returns: ``(B, C_out, H, W)`` and, if ``with_caches``, 1 cache."""
        norm, act, conv = self
        h = act(norm(x))
        return frame_conv(conv, h), (conv.first_cache(h),) if with_caches else ()

    def cache_slots(self, prefix: str, scale: int) -> tuple[CacheSlot, ...]:
        return (self[2].cache_slot(f"{prefix}.2", scale),)


class WanDownBlock(nn.Module):
    """Upstream ``Down_ResidualBlock``: residual blocks (+ a down ``WanResample``) plus an ``AvgDown3D`` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = WanAvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        blocks: list[nn.Module] = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_res_blocks)]
        if spatial:
            blocks.append(WanResample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.num_caches = sum(block.num_caches for block in blocks)

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C_in, T, H, W)``. Returns: ``(B, C_out, T', H', W')``, new caches."""
        shortcut = self.avg_shortcut(x)
        y, new = _chain(self.downsamples, x, caches)
        return y + shortcut, new

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C_in, H, W)``. Returns: ``(B, C_out, H', W')``, caches if ``with_caches``."""
        shortcut = self.avg_shortcut.forward_first(x)
        y, new = _chain_first(self.downsamples, x, with_caches)
        return y + shortcut, new

    def cache_slots(self, prefix: str, scale: int) -> tuple[CacheSlot, ...]:
        return tuple(slot for j, block in enumerate(self.downsamples)
                     for slot in block.cache_slots(f"{prefix}.downsamples.{j}", scale))


class WanUpBlock(nn.Module):
    """Upstream ``Up_ResidualBlock``: residual blocks (+ an up ``WanResample``) plus a ``DupUp3D`` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = WanDupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        blocks: list[nn.Module] = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                   for i in range(num_res_blocks)]
        if spatial:
            blocks.append(WanResample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.num_caches = sum(block.num_caches for block in blocks)

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C_in, T, H, W)``. Returns: ``(B, C_out, T', H', W')``, new caches."""
        y, new = _chain(self.upsamples, x, caches)
        return (y if self.avg_shortcut is None else y + self.avg_shortcut(x)), new

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, C_in, H, W)``. Returns: ``(B, C_out, H', W')``, caches if ``with_caches``."""
        y, new = _chain_first(self.upsamples, x, with_caches)
        return (y if self.avg_shortcut is None else y + self.avg_shortcut.forward_first(x)), new

    def cache_slots(self, prefix: str, scale: int) -> tuple[CacheSlot, ...]:
        return tuple(slot for j, block in enumerate(self.upsamples)
                     for slot in block.cache_slots(f"{prefix}.upsamples.{j}", scale))


# --- Encoder, decoder ------------------------------------------------------------------------------------------------


class WanEncoder3d(nn.Module):
    """Patchified frames ``(B, 12, ...)`` -> ``(B, 2 * z_dim, ...)`` at 1/8 resolution, time / 4 after frame 0."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = config.encoder_dims
        stages = len(config.dim_mult)
        self.conv1 = WanCausalConv3d(config.io_channels, dims[0], (3, 3, 3))
        self.downsamples = nn.ModuleList(
            WanDownBlock(dims[i], dims[i + 1], config.num_res_blocks,
                         temporal=i < stages - 1 and config.temperal_downsample[i], spatial=i < stages - 1)
            for i in range(stages)
        )
        self.middle = WanMidBlock(dims[-1])
        self.head = WanHead(dims[-1], 2 * config.z_dim)
        self._latent_scale = config.latent_scale

    @property
    def _blocks(self) -> tuple[_CachedBlock, ...]:
        return (*self.downsamples, self.middle, self.head)

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, 12, T, H, W)`` a later chunk; caches: ``len(cache_slots())`` tensors.

        Returns: ``(B, 2 * z_dim, T / 4, H / 8, W / 8)`` and the new caches.
        """
        x, cache = self.conv1(x, caches[0])
        x, rest = _chain(self._blocks, x, caches[1:])
        return x, (cache, *rest)

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, 12, H, W)`` the first frame. Returns: ``(B, 2 * z_dim, H / 8, W / 8)``, caches or ``()``."""
        y, rest = _chain_first(self._blocks, frame_conv(self.conv1, x), with_caches)
        return y, (self.conv1.first_cache(x), *rest) if with_caches else ()

    def cache_slots(self, prefix: str) -> tuple[CacheSlot, ...]:
        scale = self._latent_scale
        slots = [self.conv1.cache_slot(f"{prefix}.conv1", scale)]
        for s, block in enumerate(self.downsamples):
            slots += block.cache_slots(f"{prefix}.downsamples.{s}", scale >> s)
        return (*slots, *self.middle.cache_slots(f"{prefix}.middle", 1), *self.head.cache_slots(f"{prefix}.head", 1))


class WanDecoder3d(nn.Module):
    """Latent ``(B, z_dim, ...)`` -> patchified frames ``(B, 12, ...)`` at 8x resolution, 4 frames per later chunk."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = config.decoder_dims
        stages = len(config.dim_mult)
        temporal_up = config.temperal_downsample[::-1]
        self.conv1 = WanCausalConv3d(config.z_dim, dims[0], (3, 3, 3))
        self.middle = WanMidBlock(dims[0])
        self.upsamples = nn.ModuleList(
            WanUpBlock(dims[i], dims[i + 1], config.num_res_blocks + 1,   # one more than the encoder, as upstream
                       temporal=i < stages - 1 and temporal_up[i], spatial=i < stages - 1)
            for i in range(stages)
        )
        self.head = WanHead(dims[-1], config.io_channels)

    @property
    def _blocks(self) -> tuple[_CachedBlock, ...]:
        return (self.middle, *self.upsamples, self.head)

    def forward(self, x: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, z_dim, 1, h, w)`` one later latent frame; caches: ``len(cache_slots())`` tensors.

        Returns: ``(B, 12, 4, 8h, 8w)`` and the new caches.
        """
        x, cache = self.conv1(x, caches[0])
        x, rest = _chain(self._blocks, x, caches[1:])
        return x, (cache, *rest)

    def forward_first(self, x: Tensor, with_caches: bool) -> tuple[Tensor, Caches]:
        """Args: x: ``(B, z_dim, h, w)`` latent frame 0. Returns: ``(B, 12, 8h, 8w)``, caches or ``()``."""
        y, rest = _chain_first(self._blocks, frame_conv(self.conv1, x), with_caches)
        return y, (self.conv1.first_cache(x), *rest) if with_caches else ()

    def cache_slots(self, prefix: str) -> tuple[CacheSlot, ...]:
        slots = [self.conv1.cache_slot(f"{prefix}.conv1", 1), *self.middle.cache_slots(f"{prefix}.middle", 1)]
        for s, block in enumerate(self.upsamples):
            slots += block.cache_slots(f"{prefix}.upsamples.{s}", 1 << s)
        return (*slots, *self.head.cache_slots(f"{prefix}.head", 1 << (len(self.upsamples) - 1)))


@functools.lru_cache(maxsize=8)
def _cache_slots(config: WanVAEConfig, part: str) -> tuple[CacheSlot, ...]:
    with torch.device("meta"):
        return (WanEncoder3d if part == "encoder" else WanDecoder3d)(config).cache_slots(part)


# --- The VAE ---------------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """The Wan2.2 VAE (upstream ``WanVAE_`` plus the ``Wan2_2_VAE`` latent normalisation).

    Latents are normalised as upstream: ``encode`` returns ``mu = (mu_raw - mean) * (1 / std)`` and the raw
    ``log_var``; ``decode`` takes normalised latents and undoes it (``z / (1 / std) + mean``). ``mean``/``std`` are
    ``runtime.spec.constants.WAN22_LATENT_MEAN/STD`` (non-persistent buffers: they are not checkpoint tensors).

    Video: ``T = 1 + 4k`` frames -> ``t = 1 + k`` latent frames. The chunk steps carry their caches explicitly:
    ``encode_first_chunk`` / ``encode_chunk`` (4 frames each) and ``decode_first_chunk`` / ``decode_chunk`` (1 latent
    frame each) take and return a flat tuple in the order of ``encoder_cache_slots()`` / ``decoder_cache_slots()``.
    Images (``T = 1``) run as pure 2-D networks: ``encode_image`` / ``decode_image``.
    """

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or WanVAEConfig()
        self.encoder = WanEncoder3d(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = WanDecoder3d(config)
        self.register_buffer("latent_mean", torch.tensor(WAN22_LATENT_MEAN, dtype=torch.float32), persistent=False)
        self.register_buffer("latent_std", torch.tensor(WAN22_LATENT_STD, dtype=torch.float32), persistent=False)

    # -- cache declarations --

    def encoder_cache_slots(self) -> tuple[CacheSlot, ...]:
        """The encoder chunk caches, in the order ``encode_chunk`` takes and returns them (24 for the real config)."""
        return self.encoder.cache_slots("encoder")

    def decoder_cache_slots(self) -> tuple[CacheSlot, ...]:
        """The decoder chunk caches, in the order ``decode_chunk`` takes and returns them (32 for the real config)."""
        return self.decoder.cache_slots("decoder")

    # -- latent normalisation --

    def _stats(self, rank: int) -> tuple[Tensor, Tensor]:
        """``(mean, 1 / std)`` shaped to broadcast over ``(B, z, ...)`` tensors of ``rank`` dims."""
        shape = (1, -1, *(1,) * (rank - 2))
        return self.latent_mean.reshape(shape), (1.0 / self.latent_std).reshape(shape)

    def _posterior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output ``(B, 2z, ...)`` -> (normalised mu, raw log_var), each ``(B, z, ...)``."""
        h = self.conv1(h) if h.dim() == 5 else frame_conv(self.conv1, h)
        mu, log_var = h.chunk(2, dim=1)
        mean, inv_std = self._stats(mu.dim())
        return (mu - mean) * inv_std, log_var

    def _denormalise(self, z: Tensor) -> Tensor:
        mean, inv_std = self._stats(z.dim())
        return z / inv_std + mean

    # -- input checks --

    def _check_pixels(self, x: Tensor, what: str, rank: int) -> None:
        f = self.config.spatial_factor
        if x.dim() != rank or x.shape[1] != self.config.image_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"{what}: expected a rank-{rank} (B, {self.config.image_channels}, ..., H, W) tensor with "
                             f"H and W multiples of {f}, got {tuple(x.shape)}")

    def _check_latent(self, z: Tensor, what: str, rank: int) -> None:
        if z.dim() != rank or z.shape[1] != self.config.z_dim:
            raise ValueError(f"{what}: expected a rank-{rank} (B, {self.config.z_dim}, ...) latent, "
                             f"got {tuple(z.shape)}")

    @staticmethod
    def _check_caches(caches: Sequence[Tensor], slots: tuple[CacheSlot, ...], what: str) -> None:
        if len(caches) != len(slots):
            raise ValueError(f"{what}: expected {len(slots)} caches, got {len(caches)}")

    # -- images: pure 2-D networks --

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Encode single images (the ``T = 1`` path, as 2-D convolutions).

        Args:
            image: ``(B, 3, H, W)`` in [-1, 1], ``H`` and ``W`` multiples of 16.

        Returns:
            ``mu`` (normalised) and ``log_var`` (raw), each ``(B, 48, H / 16, W / 16)``.
        """
        self._check_pixels(image, "encode_image", 4)
        h, _ = self.encoder.forward_first(patchify(image, self.config.patch_size), with_caches=False)
        return self._posterior(h)

    def decode_image(self, z: Tensor) -> Tensor:
        """Decode single-frame latents (the ``t = 1`` path, as 2-D convolutions).

        Args:
            z: ``(B, 48, h, w)`` normalised latents.

        Returns:
            ``(B, 3, 16h, 16w)`` in [-1, 1].
        """
        self._check_latent(z, "decode_image", 4)
        x, _ = self.decoder.forward_first(frame_conv(self.conv2, self._denormalise(z)), with_caches=False)
        return unpatchify(x, self.config.patch_size).clamp(-1.0, 1.0)

    # -- video chunk steps --

    def encode_first_chunk(self, frame: Tensor) -> tuple[Tensor, Tensor, Caches]:
        """Encode frame 0 of a video and start the encoder caches.

        Args:
            frame: ``(B, 3, 1, H, W)`` in [-1, 1].

        Returns:
            ``mu``, ``log_var`` each ``(B, 48, 1, H / 16, W / 16)``; the caches (``encoder_cache_slots`` order).
        """
        self._check_pixels(frame, "encode_first_chunk", 5)
        if frame.shape[2] != 1:
            raise ValueError(f"encode_first_chunk: expected 1 frame, got {frame.shape[2]}")
        h, caches = self.encoder.forward_first(patchify(frame[:, :, 0], self.config.patch_size), with_caches=True)
        mu, log_var = self._posterior(h.unsqueeze(2))
        return mu, log_var, caches

    def encode_chunk(self, frames: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Tensor, Caches]:
        """Encode the next 4 frames of a video.

        Args:
            frames: ``(B, 3, 4, H, W)`` in [-1, 1].
            caches: the caches the previous step returned.

        Returns:
            ``mu``, ``log_var`` each ``(B, 48, 1, H / 16, W / 16)``; the new caches.
        """
        self._check_pixels(frames, "encode_chunk", 5)
        if frames.shape[2] != self.config.temporal_factor:
            raise ValueError(f"encode_chunk: expected {self.config.temporal_factor} frames, got {frames.shape[2]}")
        self._check_caches(caches, self.encoder_cache_slots(), "encode_chunk")
        h, caches = self.encoder(patchify(frames, self.config.patch_size), caches)
        mu, log_var = self._posterior(h)
        return mu, log_var, caches

    def decode_first_chunk(self, z: Tensor) -> tuple[Tensor, Caches]:
        """Decode latent frame 0 of a video and start the decoder caches.

        Args:
            z: ``(B, 48, 1, h, w)`` normalised latent.

        Returns:
            ``(B, 3, 1, 16h, 16w)`` in [-1, 1]; the caches (``decoder_cache_slots`` order).
        """
        self._check_latent(z, "decode_first_chunk", 5)
        if z.shape[2] != 1:
            raise ValueError(f"decode_first_chunk: expected 1 latent frame, got {z.shape[2]}")
        x, caches = self.decoder.forward_first(frame_conv(self.conv2, self._denormalise(z[:, :, 0])), with_caches=True)
        return unpatchify(x, self.config.patch_size).clamp(-1.0, 1.0).unsqueeze(2), caches

    def decode_chunk(self, z: Tensor, caches: Sequence[Tensor]) -> tuple[Tensor, Caches]:
        """Decode the next latent frame of a video.

        Args:
            z: ``(B, 48, 1, h, w)`` normalised latent.
            caches: the caches the previous step returned.

        Returns:
            ``(B, 3, 4, 16h, 16w)`` in [-1, 1]; the new caches.
        """
        self._check_latent(z, "decode_chunk", 5)
        if z.shape[2] != 1:
            raise ValueError(f"decode_chunk: expected 1 latent frame, got {z.shape[2]}")
        self._check_caches(caches, self.decoder_cache_slots(), "decode_chunk")
        x, caches = self.decoder(self.conv2(self._denormalise(z)), caches)
        return unpatchify(x, self.config.patch_size).clamp(-1.0, 1.0), caches

    # -- whole videos --

    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Encode videos chunk by chunk: frame 0 alone, then 4 frames at a time (upstream ``WanVAE_.encode``).

        Args:
            video: ``(B, 3, T, H, W)`` in [-1, 1], ``T = 1 + 4k``, ``H`` and ``W`` multiples of 16.

        Returns:
            ``mu`` (normalised) and ``log_var`` (raw), each ``(B, 48, 1 + k, H / 16, W / 16)``.
        """
        self._check_pixels(video, "encode", 5)
        step = self.config.temporal_factor
        frames = video.shape[2]
        if (frames - 1) % step:
            raise ValueError(f"encode: the frame count must be 1 + {step}k, got {frames}")
        logger.debug("encode: %d frames in %d chunks", frames, 1 + (frames - 1) // step)
        if frames == 1:
            mu, log_var = self.encode_image(video[:, :, 0])
            return mu.unsqueeze(2), log_var.unsqueeze(2)
        mu, log_var, caches = self.encode_first_chunk(video[:, :, :1])
        mus, log_vars = [mu], [log_var]
        for start in range(1, frames, step):
            mu, log_var, caches = self.encode_chunk(video[:, :, start:start + step], caches)
            mus.append(mu)
            log_vars.append(log_var)
        return torch.cat(mus, dim=2), torch.cat(log_vars, dim=2)

    def decode(self, z: Tensor) -> Tensor:
        """Decode latent videos one latent frame at a time (upstream ``WanVAE_.decode`` + clamp).

        Args:
            z: ``(B, 48, t, h, w)`` normalised latents.

        Returns:
            ``(B, 3, 1 + 4(t - 1), 16h, 16w)`` in [-1, 1].
        """
        self._check_latent(z, "decode", 5)
        latent_frames = z.shape[2]
        logger.debug("decode: %d latent frames", latent_frames)
        if latent_frames == 1:
            return self.decode_image(z[:, :, 0]).unsqueeze(2)
        x, caches = self.decode_first_chunk(z[:, :, :1])
        out = [x]
        for i in range(1, latent_frames):
            x, caches = self.decode_chunk(z[:, :, i:i + 1], caches)
            out.append(x)
        return torch.cat(out, dim=2)
