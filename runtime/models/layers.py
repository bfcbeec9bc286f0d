"""Building blocks shared by the LLM (`mot.py`) and the vision tower (`vit.py`): one RMSNorm, one rotation, one
mask value, so the reference and the exported graphs compute them the same way everywhere."""

from __future__ import annotations

import torch
from torch import nn

# Additive attention-mask value: finite so that it survives a cast to bf16 (and no row becomes NaN).
MASK_VALUE = -1e9


class RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics; the weight multiplies after casting back, as upstream's ``Qwen2RMSNorm``.
    Explicit math, so the ONNX graph has no opset-23 ``RMSNormalization``."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., hidden)`` float -> same shape, dtype of ``weight * x``."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dim (rotate-half RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
