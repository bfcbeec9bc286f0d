"""The one place a backend is chosen: the runners of a pipeline for ``--runner torch|onnxruntime|tensorrt``, the fast
CUDA engine set, one engine from a graph or plan file, and the BLS runners of the engines served as their own Triton
models. Backend modules are imported only when chosen, so TensorRT, ONNX Runtime and the CUDA kernels stay optional.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Mapping

import torch

from runtime.runners import EngineError, Engines, Runner, TorchRunner
from runtime.runners.graphs import (
    VaeDecodeChunkGraph,
    VaeDecodeFirstGraph,
    VaeDecodeGraph,
    VaeEncodeChunkGraph,
    VaeEncodeFirstGraph,
    VaeEncodeGraph,
    graph_modules,
)
from runtime.spec.contract import ENGINES, EngineSpec, engine_specs
from runtime.spec.registry import RUNNERS

if TYPE_CHECKING:
    from runtime.models.checkpoint import LanceModels
    from runtime.models.vae import WanVAE
    from runtime.models.vit import Qwen25VisionTransformer
    from runtime.runners.cuda_mot import CudaMoT

logger = logging.getLogger(__name__)

FILE_SUFFIXES = {"onnxruntime": ".onnx", "tensorrt": ".plan"}
"""The engine file each file-based backend runs, ``<engine><suffix>`` in a precision folder."""


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
    """The runners of every engine on one backend, so a pipeline is built with ``--runner`` without branching.

    Args:
        runner: one of `RUNNERS`.
        source: loaded models (``torch``) or an engine folder holding ``<precision>/<engine>.onnx`` (``onnxruntime``)
            or ``<precision>/<engine>.plan`` + ``.json`` (``tensorrt``), as ``lance-trt export`` / ``build`` write.
        specs: the contract per engine (`runtime.spec.contract.engine_specs`); for ``torch`` it defaults to the models'
            configs, the other backends need it (the host side knows the configs from the checkpoint).
        precision: ``"fp32"`` or ``"bf16"`` (engine folders); ONNX Runtime runs fp32 only.
        threads: ONNX Runtime intra-op threads (None: its default).
        device: the CUDA device of the TensorRT runners (the torch runner uses the models' device).
        fast: torch runner only: the fast CUDA engines (`cuda_engines`) instead of the plain modules; None: fast
            where the models are on CUDA.
        fp8_gen: fast engines only: FP8 GEMMs for the gen expert.
        fp8_fast_accum: with ``fp8_gen``, Hopper's fast FP8 accumulation.
    Raises:
        ValueError: an unknown runner, a source of the wrong kind, missing ``specs``, bf16 with ONNX Runtime.
        EngineError: the backend is not installed (TensorRT), or an engine file is missing or unusable.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner != "torch" and (fast or fp8_gen or fp8_fast_accum):
        raise ValueError(f"fast and fp8_gen select PyTorch engines; the {runner} runner has its own")
    if runner == "torch":
        return _torch_engines(source, specs, fast=fast, fp8_gen=fp8_gen, fp8_fast_accum=fp8_fast_accum)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"the {runner} runner needs an engine folder, got {type(source).__name__}")
    if specs is None:
        raise ValueError(f"the {runner} runner needs the engine specs (runtime.spec.contract.engine_specs)")
    if runner == "onnxruntime" and precision != "fp32":
        raise ValueError("ONNX Runtime's CPU provider has no bf16 arithmetic: use the fp32 graphs")
    folder = Path(source) / precision
    logger.info("engines: %s from %s", runner, folder)
    scratch = _device_scratch(device) if runner == "tensorrt" else None
    return Engines({name: file_runner(runner, specs[name], folder / f"{name}{FILE_SUFFIXES[runner]}",
                                      threads=threads, device=device, scratch=scratch)
                    for name in ENGINES})


def file_runner(runner: str, spec: EngineSpec, path: Path, *, threads: int | None = None,
                device: torch.device | str = "cuda", scratch: object | None = None) -> Runner:
    """One engine from its file: an ONNX graph in ONNX Runtime or a TensorRT plan on ``device``.

    Args:
        runner: ``"onnxruntime"`` or ``"tensorrt"``.
        scratch: TensorRT only: a ``DeviceScratch`` shared by engines that run one after another (None: its own).
    """
    if runner == "onnxruntime":
        from runtime.runners.ort import OrtRunner

        return OrtRunner(spec, path, threads=threads)
    if runner == "tensorrt":
        from runtime.runners.trt import TrtRunner

        return TrtRunner(spec, path, device=device, scratch=scratch)
    raise ValueError(f"no engine files for runner {runner!r}; file runners are {', '.join(FILE_SUFFIXES)}")


def _device_scratch(device: torch.device | str) -> object:
    """One activation block for TensorRT engines that run one after another; says first when TensorRT is missing."""
    from runtime.runners.trt import DeviceScratch, import_tensorrt

    import_tensorrt()
    return DeviceScratch(device)


def _torch_engines(source: "LanceModels | str | Path", specs: Mapping[str, EngineSpec] | None, *, fast: bool | None,
                   fp8_gen: bool, fp8_fast_accum: bool) -> Engines:
    if isinstance(source, (str, Path)):
        raise ValueError("the torch runner needs loaded models (runtime.models.checkpoint.load_lance), not a folder")
    specs = specs or engine_specs(source.llm_config, source.vision_config, source.vae_config)
    on_cuda = next(source.mot.parameters()).device.type == "cuda"
    if fast if fast is not None else on_cuda:
        if not on_cuda:
            raise ValueError("the fast torch engines run on CUDA: load the models on a GPU")
        from runtime.runners.cuda_mot import CudaMoT

        mot = CudaMoT(source.mot, compile=True, fp8_gen=fp8_gen, fp8_fast_accum=fp8_fast_accum)
        return cuda_engines(specs, mot, source.vit, source.vae)
    if fp8_gen or fp8_fast_accum:
        raise ValueError("fp8_gen needs the fast torch engines (CUDA)")
    modules = graph_modules(source)
    return Engines({name: TorchRunner(specs[name], modules[name]) for name in ENGINES})


def cuda_engines(specs: Mapping[str, EngineSpec], mot: "CudaMoT", vit: "Qwen25VisionTransformer",
                 vae: "WanVAE") -> Engines:
    """The fast PyTorch engines over loaded modules on a CUDA device (weights shared with the modules, not copied):
    `runtime.runners.cuda_decode.DecodingMotRunner` (a `CudaMotRunner` with x2t's loop on the device) on a fused
    `CudaMoT`, `runtime.runners.cuda_vit.CudaVitRunner` (padded MLP, attention per window, CUDA graphs), the VAE
    decoder through ``torch.compile`` (its norms, activations and layout changes fused around the cuDNN convolutions:
    16.8 ms instead of 34.0 at 1024 px on an H100; the first output size compiles static, the second recompiles with
    symbolic sides, which then serves every size; each compile takes seconds, once per process), the VAE encoder
    eager (one call per edit request).

    Args:
        specs: the contract per engine.
        mot: the fused LLM.
        vit, vae: the loaded modules, in the compute dtype.
    """
    from runtime.runners.cuda_decode import DecodingMotRunner
    from runtime.runners.cuda_kernels import compiled
    from runtime.runners.cuda_vit import CudaVisionTower, CudaVitRunner

    on_cuda = mot.device.type == "cuda"      # off CUDA (tests, smoke runs) the same engines run uncompiled
    decode = VaeDecodeGraph(vae)
    return Engines(mot=DecodingMotRunner(specs["mot"], mot),
                   vit=CudaVitRunner(specs["vit"], CudaVisionTower(vit, compile=on_cuda)),
                   vae_encode=TorchRunner(specs["vae_encode"], VaeEncodeGraph(vae)),
                   vae_decode=TorchRunner(specs["vae_decode"],
                                          compiled(decode, fullgraph=False) if on_cuda else decode),
                   vae_encode_first=TorchRunner(specs["vae_encode_first"], VaeEncodeFirstGraph(vae)),
                   vae_encode_chunk=TorchRunner(specs["vae_encode_chunk"], VaeEncodeChunkGraph(vae)),
                   vae_decode_first=TorchRunner(specs["vae_decode_first"], VaeDecodeFirstGraph(vae)),
                   vae_decode_chunk=TorchRunner(specs["vae_decode_chunk"], VaeDecodeChunkGraph(vae)))


def bls_runners(specs: Mapping[str, EngineSpec], models: Mapping[str, str], pb_utils: ModuleType, *, precision: str,
                device: torch.device, timeout_us: int) -> dict[str, Runner]:
    """Runners that call the engines served as their own Triton models, from inside the BLS model ``lance``.

    Args:
        models: Triton model name per engine (``{"vit": "lance_vit", ...}``).
        pb_utils: ``triton_python_backend_utils``, which exists only inside a Python-backend stub.
    """
    from runtime.runners.triton_bls import BlsRunner

    unknown = set(models) - set(specs)
    if unknown:
        raise EngineError(f"no engine contract for {sorted(unknown)}; the engines are {', '.join(specs)}")
    return {name: BlsRunner(specs[name], model, pb_utils, precision=precision, device=device, timeout_us=timeout_us)
            for name, model in models.items()}
