"""The MoT's key/value cache: preallocated buffers the runner writes new rows into (the engines never mutate inputs)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for up to ``batch`` CFG branches.

    Buffers are ``(num_layers, batch, capacity, num_kv_heads, head_dim)``; branch ``b`` holds ``lengths[b]`` valid
    rows. Branches fill independently (each context is prefilled on its own, as upstream does) and are read together
    by the batched denoise query, which masks every branch past its own length.
    """

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, capacity: int, batch: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, capacity, kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * batch

    @property
    def capacity(self) -> int:
        return self.key.shape[2]

    def past(self, branches: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(past_key, past_value, past_len)`` for the branches in ``branches``, sliced to their longest context.
        ``past_len`` is a CPU tensor: the lengths are host data (the caller moves it where its engine reads it)."""
        lengths = self.lengths[branches]
        rows = max(lengths)
        past_len = torch.tensor(lengths, dtype=torch.int64)
        return self.key[:, branches, :rows], self.value[:, branches, :rows], past_len

    def append(self, branches: slice, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write new rows ``(num_layers, b, rows, kv_heads, head_dim)`` after each branch's valid rows."""
        rows = key.shape[2]
        for offset, branch in enumerate(range(*branches.indices(len(self.lengths)))):
            start = self.lengths[branch]
            if start + rows > self.capacity:
                raise ValueError(f"KV cache overflow: branch {branch} holds {start} rows, {rows} more exceed "
                                 f"the capacity {self.capacity}")
            self.key[:, branch, start:start + rows] = key[:, offset]
            self.value[:, branch, start:start + rows] = value[:, offset]
            self.lengths[branch] = start + rows
