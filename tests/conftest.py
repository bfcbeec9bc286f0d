"""Session fixtures shared by the test files: one tiny checkpoint in the real layout, its models and contract, its
ONNX export (cached across sessions), and a torch pipeline on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.onnx_export import export_cached
from runtime.models.checkpoint import LanceModels, load_lance
from runtime.spec.contract import PRECISIONS, EngineSpec, engine_specs
from runtime.demo import EXPORT_GROUPS

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def engine_dir(tiny_checkpoint: Path, request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 and bf16 graphs of all four engines, from pytest's cache when the checkpoint and code are unchanged (in
    the session's temporary folder when the cache plugin is off)."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("lance-trt-onnx")) if cache is not None else tmp_path_factory.getbasetemp() / "onnx"
    return export_cached(tiny_checkpoint, root, PRECISIONS, EXPORT_GROUPS)


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoint: Path) -> LanceModels:
    return load_lance(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_specs(tiny_models: LanceModels) -> dict[str, EngineSpec]:
    return engine_specs(tiny_models.llm_config, tiny_models.vision_config, tiny_models.vae_config)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Lance checkpoint (seed 0) in the HF layout."""
    from runtime.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0)


@pytest.fixture(scope="session")
def torch_pipeline(tiny_checkpoint: Path):
    """The reference pipeline (PyTorch runner, fp32, CPU) on the tiny checkpoint."""
    from runtime.pipeline import LancePipeline

    return LancePipeline.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_video_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with ``Lance_3B_Video/`` (seed 0)."""
    from runtime.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt_video"), seed=0, video=True)


@pytest.fixture(scope="session")
def video_pipeline(tiny_video_checkpoint: Path):
    """The reference pipeline on the tiny video model (PyTorch runner, fp32, CPU)."""
    from runtime.pipeline import LancePipeline

    return LancePipeline.from_checkpoint(tiny_video_checkpoint, video=True)


@pytest.fixture(scope="session")
def video_engine_dir(tiny_video_checkpoint: Path, request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 graphs of every engine of the tiny video model (``lance-trt export --video``), cached as `engine_dir`."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("lance-trt-onnx")) if cache is not None else tmp_path_factory.getbasetemp() / "onnx"
    return export_cached(tiny_video_checkpoint, root, ("fp32",), EXPORT_GROUPS, video=True)
