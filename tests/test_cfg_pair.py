"""CFG across two processes (`runtime.pipeline.cfg_pair`), on the CPU with gloo: two ranks run the same requests, each
prefilling and denoising one CFG branch and exchanging velocities; rank 0's image must equal one process's, both ranks
must end with the same image, and each rank must have computed only its own branch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

from runtime.pipeline import LancePipeline
from runtime.pipeline.scheduler import cfg_active, make_schedule
from runtime.pipeline.warmup import noise_png
from runtime.spec import constants
from runtime.spec.request import GenerationRequest

STEPS = 8      # 6 steps with CFG, then 2 with the conditional branch alone (upstream's interval, shift 3.5)
REQUESTS = {
    "t2i": GenerationRequest("t2i", "a lighthouse on a cliff at dusk", height=256, width=256, steps=STEPS, seed=3),
    "edit": GenerationRequest("edit", "make it snowy", image=noise_png(256, 256), height=256, width=256,
                              steps=STEPS, seed=4),
}


class _Counting:
    """A runner wrapper that records the batch size of every denoise query (a call with latent rows)."""

    def __init__(self, runner) -> None:
        self.runner, self.spec, self.host_inputs = runner, runner.spec, runner.host_inputs
        self.denoise_batches: list[int] = []

    def infer(self, feed):
        if feed["latents"].shape[1] > 0 and feed["timestep"].max() > 0:
            self.denoise_batches.append(int(feed["latents"].shape[0]))
        return self.runner.infer(feed)


def _rank(rank: int, checkpoint: str, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from runtime.pipeline.cfg_pair import CfgPair

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pipeline = LancePipeline.from_checkpoint(checkpoint, runner="torch")
        counting = _Counting(pipeline.engines.mot)
        pipeline.engines["mot"] = counting
        pipeline.cfg_pair = CfgPair(rank)
        batches = {}
        for name, request in REQUESTS.items():
            counting.denoise_batches.clear()
            np.save(Path(out) / f"{name}_{rank}.npy", pipeline.generate(request).image)
            batches[name] = list(counting.denoise_batches)
        (Path(out) / f"batches_{rank}.json").write_text(json.dumps(batches))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    mp.spawn(_rank, args=(str(tiny_checkpoint), str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    single = LancePipeline.from_checkpoint(tiny_checkpoint, runner="torch")
    cfg_steps = sum(cfg_active(t, constants.CFG_INTERVAL) for t in make_schedule(STEPS).timesteps[:-1])
    assert 0 < cfg_steps < STEPS
    for name, request in REQUESTS.items():
        expected = single.generate(request).image
        rank0, rank1 = (np.load(tmp_path / f"{name}_{rank}.npy") for rank in (0, 1))
        assert np.array_equal(rank0, rank1), f"{name}: the ranks' latents diverged"
        difference = np.abs(rank0.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.01, (name, difference.max(), difference.mean())
    batches = [json.loads((tmp_path / f"batches_{rank}.json").read_text()) for rank in (0, 1)]
    for name in REQUESTS:
        # one branch per call on each rank: rank 0 every step, rank 1 only while CFG runs
        assert batches[0][name] == [1] * STEPS and batches[1][name] == [1] * cfg_steps, (name, batches)
