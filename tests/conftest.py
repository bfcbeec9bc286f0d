"""Session fixtures shared by the test files: one tiny checkpoint in the real layout, and a torch pipeline on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Lance checkpoint (seed 0) in the HF layout."""
    from runtime.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0)


@pytest.fixture(scope="session")
def torch_pipeline(tiny_checkpoint: Path):
    """The reference pipeline (PyTorch runner, fp32, CPU) on the tiny checkpoint."""
    from runtime.pipeline import LancePipeline

    return LancePipeline.from_checkpoint(tiny_checkpoint)
