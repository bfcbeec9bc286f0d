"""Engine-shaped modules: each ``forward`` takes its engine's contract inputs by name and returns the outputs in
contract order (``runtime.spec.contract``). ONNX export traces these; ``TorchRunner`` runs them. The ``mot`` and ``vit``
engines are the models themselves (`LanceMoT.forward` is its step; the vision tower's forward takes the host-computed
window/rotary inputs); the two VAE engines wrap the VAE's image paths.

They add no math of their own beyond the casts at the engine boundary: contract inputs declared fp32 (patches,
pixels, noise) enter the network in its compute dtype, and the VAE returns fp32 as upstream does (``u.float()``,
``decode(...).float()``). In an fp32 model every such cast is a no-op, so the fp32 and bf16 graphs differ only by
Cast nodes (tests/test_export.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from runtime.models.vae import WanVAE, sample_posterior

if TYPE_CHECKING:
    from runtime.models.checkpoint import LanceModels


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's weights: the precision the engine computes in."""
    return next(module.parameters()).dtype


class VaeEncodeGraph(nn.Module):
    """The ``vae_encode`` engine: ``encode_image`` then ``sample_posterior`` with the noise input."""

    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            image: ``(1, 3, 16h, 16w)`` fp32 in [-1, 1].
            noise: ``(1, 48, h, w)`` fp32 standard normal.
        Returns:
            latent, mean (normalised), log_var (raw), each ``(1, 48, h, w)`` fp32.
        """
        mean, log_var = self.vae.encode_image(image.to(_compute_dtype(self.vae)))
        # Upstream casts the encoder's outputs to float and samples in fp32.
        mean, log_var = mean.float(), log_var.float()
        return sample_posterior(mean, log_var, noise), mean, log_var


class VaeDecodeGraph(nn.Module):
    """The ``vae_decode`` engine: ``decode_image``."""

    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent: ``(1, 48, h, w)`` fp32 normalised -> image ``(1, 3, 16h, 16w)`` fp32 in [-1, 1]."""
        return self.vae.decode_image(latent.to(_compute_dtype(self.vae))).float()


class VaeEncodeFirstGraph(nn.Module):
    """The ``vae_encode_first`` engine: ``encode_first_chunk``, the posterior then the caches."""

    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """video: ``(1, 3, 1, 16h, 16w)`` fp32, noise ``(1, 48, 1, h, w)`` -> latent, mean, log_var
        ``(1, 48, 1, h, w)`` fp32, then the caches in fp32."""
        mean, log_var, caches = self.vae.encode_first_chunk(video.to(_compute_dtype(self.vae)))
        mean, log_var = mean.float(), log_var.float()
        return sample_posterior(mean, log_var, noise), mean, log_var, *(cache.float() for cache in caches)


class VaeEncodeChunkGraph(nn.Module):
    """The ``vae_encode_chunk`` engine: ``encode_chunk`` with the caches as positional inputs and outputs."""

    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, noise: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """video: ``(1, 3, 4, 16h, 16w)`` fp32, noise ``(1, 48, 1, h, w)`` and the caches -> latent, mean, log_var
        ``(1, 48, 1, h, w)`` and the caches."""
        dtype = _compute_dtype(self.vae)
        mean, log_var, caches = self.vae.encode_chunk(video.to(dtype), [cache.to(dtype) for cache in past])
        mean, log_var = mean.float(), log_var.float()
        return sample_posterior(mean, log_var, noise), mean, log_var, *(cache.float() for cache in caches)


class VaeDecodeFirstGraph(nn.Module):
    """The ``vae_decode_first`` engine: ``decode_first_chunk``, the caches returned after the frame."""

    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """latent: ``(1, 48, 1, h, w)`` fp32 -> frame 0 ``(1, 3, 1, 16h, 16w)`` fp32, then the caches in fp32."""
        video, caches = self.vae.decode_first_chunk(latent.to(_compute_dtype(self.vae)))
        return video.float(), *(cache.float() for cache in caches)


class VaeDecodeChunkGraph(nn.Module):
    """The ``vae_decode_chunk`` engine: ``decode_chunk`` with the caches as positional inputs and outputs (one per
    causal convolution, `WanVAE.decoder_cache_slots` order; ONNX export binds them in contract order)."""

    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """latent: ``(1, 48, 1, h, w)`` fp32 and the caches -> ``(1, 3, 4, 16h, 16w)`` fp32 and the new caches."""
        dtype = _compute_dtype(self.vae)
        video, caches = self.vae.decode_chunk(latent.to(dtype), [cache.to(dtype) for cache in past])
        return video.float(), *(cache.float() for cache in caches)


def graph_modules(models: "LanceModels") -> dict[str, nn.Module]:
    """The engine modules over loaded models, by engine name (`runtime.spec.registry.ENGINES` order)."""
    return {"vit": models.vit, "mot": models.mot, "vae_encode": VaeEncodeGraph(models.vae),
            "vae_decode": VaeDecodeGraph(models.vae), "vae_encode_first": VaeEncodeFirstGraph(models.vae),
            "vae_encode_chunk": VaeEncodeChunkGraph(models.vae), "vae_decode_first": VaeDecodeFirstGraph(models.vae),
            "vae_decode_chunk": VaeDecodeChunkGraph(models.vae)}
