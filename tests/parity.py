"""Shared numerics checks for the parity tests: max-abs error relative to the reference scale, and cosine."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

CHECKPOINT_KEYS = Path(__file__).parent / "data" / "checkpoint_keys.json"


@lru_cache(maxsize=None)
def checkpoint_keys() -> dict[str, dict[str, list[int]]]:
    """Every tensor of the real checkpoint files: {file: {key: shape}} (copied from shared/design)."""
    return json.loads(CHECKPOINT_KEYS.read_text())


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4, min_cos: float = 0.99999) -> None:
    """Assert ``ours`` matches ``ref``: shapes equal, all finite, max-abs <= tol x max(1, ref scale), cosine >= min_cos.

    Prints the figures so ``pytest -s`` shows them.
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all(), f"{name}: non-finite values"
    if not ref.any():       # an all-zero reference (a cache before any frame): only zeros match it
        assert not ours.any(), f"{name}: the reference is all zero, ours is not"
        return
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    cos = F.cosine_similarity(ours.flatten().double(), ref.flatten().double(), dim=0).item()
    print(f"{name}: max-abs {err:.3e} (ref max-abs {scale:.3f}), cosine {cos:.9f}")
    assert err <= tol * max(scale, 1.0), f"{name}: max-abs {err:.3e} > {tol} x {scale:.3f}"
    assert cos >= min_cos, f"{name}: cosine {cos}"


def randomize(model: torch.nn.Module, seed: int, *, bias_scale: float = 0.1) -> None:
    """Seeded unit-gain random weights: norm scales around 1, small biases, N(0, 1) embeddings, everything else
    N(0, 1/fan_in) so activations keep their scale through deep stacks (and two experts never coincide)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name or name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(bias_scale * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
