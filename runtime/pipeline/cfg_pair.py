"""CFG across two devices: the conditional and the cfg_text branch of one request on two ranks, each holding the
model, with the velocities exchanged at every step.

Both ranks run the same `LancePipeline.generate` (SPMD) with a `CfgPair`: each prefills only its own branch's context
and, while CFG is active, computes only its own branch's velocity (one branch where a single device computes both,
batched); an all-gather gives both ranks both velocities, so both apply the same CFG combination and Euler step and
keep the same latents. On a step without CFG rank 0 computes the conditional velocity and broadcasts it. Rank 0's
result is the request's; rank 1 computes the same latents and its result is discarded. The collectives run on the
process group's backend: NCCL between GPUs, gloo between CPU processes (tests/test_cfg_pair.py).

Cancellation is agreed, not local: at every progress check rank 0 broadcasts whether its request was cancelled
(`CfgPair.agreed`), so both ranks stop at the same step and no collective is left waiting for the other rank.

The images equal one device's within the precision's tolerance, not bit for bit: one branch per call instead of two
batched changes the kernels' blocking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

COND, CFG_TEXT = 0, 1
"""The ranks' branches: rank 0 holds the conditional branch and answers the request, rank 1 the cfg_text branch."""


@dataclass(frozen=True)
class CfgPair:
    """This process's place in a CFG pair.

    Attributes:
        rank: `COND` or `CFG_TEXT`, this process's rank in ``group``.
        group: the process group of the two ranks (None: the default group, of exactly two ranks).
    """

    rank: int
    group: Any = None

    def __post_init__(self) -> None:
        if self.rank not in (COND, CFG_TEXT):
            raise ValueError(f"a CFG pair has ranks 0 (conditional) and 1 (cfg_text), got {self.rank}")
        size = dist.get_world_size(self.group)
        if size != 2:
            raise ValueError(f"a CFG pair needs a process group of 2 ranks, got {size}")

    def exchange(self, velocity: torch.Tensor) -> torch.Tensor:
        """Both branches' velocities ``(2, L, 48)``, conditional first, from this rank's own ``(1, L, 48)``."""
        gathered = [torch.empty_like(velocity) for _ in range(2)]
        dist.all_gather(gathered, velocity.contiguous(), group=self.group)
        return torch.cat(gathered)

    def agreed(self, is_cancelled: Callable[[], bool] | None) -> Callable[[], bool]:
        """The cancellation check both ranks call at the same points: rank 0 asks ``is_cancelled`` and broadcasts the
        answer, rank 1 (whose own check is ignored) receives it."""
        def check() -> bool:
            flag = torch.tensor([self.rank == COND and is_cancelled is not None and bool(is_cancelled())],
                                device=self._device())
            dist.broadcast(flag, src=self._global(COND), group=self.group)
            return bool(flag.item())
        return check

    def share(self, velocity: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Rank 0's conditional velocity on both ranks (a step without CFG); rank 1 passes None and gets a tensor
        shaped and typed like ``like``."""
        out = velocity.contiguous() if self.rank == COND else torch.empty_like(like)
        dist.broadcast(out, src=self._global(COND), group=self.group)
        return out

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _device(self) -> torch.device:
        """Where a collective's small tensors live: NCCL moves only CUDA tensors (this process's current GPU)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
