"""Engine-shaped modules: each ``forward`` takes its engine's contract inputs by name and returns the outputs in
contract order (``runtime.contract``). ONNX export traces these; ``TorchRunner`` runs them. The ``mot`` and ``vit``
engines are the models themselves (`LanceMoT.forward` is its step; the vision tower's forward takes the host-computed
window/rotary inputs); the two VAE engines wrap the VAE's image paths.

They add no math of their own beyond the casts at the engine boundary: contract inputs declared fp32 (patches,
pixels, noise) enter the network in its compute dtype, and the VAE returns fp32 as upstream does (``u.float()``,
``decode(...).float()``). In an fp32 model every such cast is a no-op, so the fp32 and bf16 graphs differ only by
Cast nodes (tests/test_export.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from runtime.contract import ENGINES, EngineSpec, engine_specs
from runtime.engines import Engines, Runner, TorchRunner
from runtime.models.vae import WanVAE, sample_posterior

if TYPE_CHECKING:
    from runtime.checkpoint import LanceModels

logger = logging.getLogger(__name__)

RUNNERS = ("torch", "onnxruntime", "tensorrt")


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


def graph_modules(models: "LanceModels") -> dict[str, nn.Module]:
    """The four engine modules over loaded models, by engine name (`runtime.contract.ENGINES` order)."""
    return {"vit": models.vit, "mot": models.mot, "vae_encode": VaeEncodeGraph(models.vae),
            "vae_decode": VaeDecodeGraph(models.vae)}


def engines_for(
    runner: str,
    source: "LanceModels | str | Path",
    *,
    specs: Mapping[str, EngineSpec] | None = None,
    precision: str = "fp32",
    threads: int | None = None,
    device: torch.device | str = "cuda",
    fast: bool | None = None,
    fp8_gen: bool = False,
    fp8_fast_accum: bool = False,
) -> Engines:
    """The four runners of one backend, so a pipeline is built with ``--runner torch|onnxruntime|tensorrt`` without
    branching.

    Args:
        runner: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        source: loaded models (``torch``) or an engine folder holding ``<precision>/<engine>.onnx`` (``onnxruntime``)
            or ``<precision>/<engine>.plan`` + ``.json`` (``tensorrt``), as ``lance-trt export`` / ``build`` write.
        specs: the contract per engine (`runtime.contract.engine_specs`); for ``torch`` it defaults to the models'
            configs, the other backends need it (the host side knows the configs from the checkpoint).
        precision: ``"fp32"`` or ``"bf16"`` (engine folders); ONNX Runtime runs fp32 only.
        threads: ONNX Runtime intra-op threads (None: its default).
        device: the CUDA device of the TensorRT runners (the torch runner uses the models' device).
        fast: torch runner only: the fast CUDA engines (`runtime.engines.cuda.cuda_engines`: fused weights, CUDA
            graphs, compiled kernels) instead of the plain modules; None: fast where the models are on CUDA.
        fp8_gen: fast engines only: FP8 GEMMs for the gen expert.
        fp8_fast_accum: with ``fp8_gen``, Hopper's fast FP8 accumulation.
    Raises:
        ValueError: an unknown runner, a source of the wrong kind, missing ``specs``, bf16 with ONNX Runtime.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    if runner != "torch" and (fast or fp8_gen or fp8_fast_accum):
        raise ValueError(f"fast and fp8_gen select PyTorch engines; the {runner} runner has its own")
    if runner == "torch":
        if isinstance(source, (str, Path)):
            raise ValueError("the torch runner needs loaded models (runtime.checkpoint.load_lance), not a folder")
        specs = specs or engine_specs(source.llm_config, source.vision_config, source.vae_config)
        on_cuda = next(source.mot.parameters()).device.type == "cuda"
        if fast if fast is not None else on_cuda:
            if not on_cuda:
                raise ValueError("the fast torch engines run on CUDA: load the models on a GPU")
            from runtime.engines.cuda import CudaMoT, cuda_engines

            mot = CudaMoT(source.mot, compile=True, fp8_gen=fp8_gen, fp8_fast_accum=fp8_fast_accum)
            return cuda_engines(specs, mot, source.vit, source.vae)
        if fp8_gen or fp8_fast_accum:
            raise ValueError("fp8_gen needs the fast torch engines (CUDA)")
        modules = graph_modules(source)
        runners: dict[str, Runner] = {name: TorchRunner(specs[name], modules[name]) for name in ENGINES}
        return Engines(**runners)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"the {runner} runner needs an engine folder, got {type(source).__name__}")
    if specs is None:
        raise ValueError(f"the {runner} runner needs the engine specs (runtime.contract.engine_specs)")
    folder = Path(source) / precision
    logger.info("engines: %s from %s", runner, folder)
    if runner == "onnxruntime":
        from runtime.engines.ort import OrtRunner

        if precision != "fp32":
            raise ValueError("ONNX Runtime's CPU provider has no bf16 arithmetic: use the fp32 graphs")
        runners = {name: OrtRunner(specs[name], folder / f"{name}.onnx", threads=threads) for name in ENGINES}
    else:
        from runtime.engines.trt import DeviceScratch, TrtRunner, import_tensorrt

        import_tensorrt()                   # without TensorRT, say so before touching the device
        scratch = DeviceScratch(device)     # the engines run one after another: one activation block for all
        runners = {name: TrtRunner(specs[name], folder / f"{name}.plan", device=device, scratch=scratch)
                   for name in ENGINES}
    return Engines(**runners)
