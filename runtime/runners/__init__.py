"""Engine runners: one interface over TensorRT plans, ONNX Runtime sessions, the PyTorch modules and BLS calls.

Every runner serves one engine of `runtime.spec.contract` and binds tensors by the contract's names. ``infer(feed)``
returns tensors the caller owns (no internal buffer is handed out unannounced). The pipeline talks to an `Engines`
bundle and never branches on the backend; `runtime.runners.factory` is the one place a backend is chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import torch

from runtime.spec.contract import EngineSpec


class EngineError(RuntimeError):
    """A runner failed: names the engine (and tensor, where one is at fault)."""


class Runner(Protocol):
    """One engine behind the contract's tensor names."""

    spec: EngineSpec
    host_inputs: tuple[str, ...]
    """Inputs the runner reads on the host (call structure such as ``past_len``): callers pass them as CPU tensors,
    so reading them costs no device synchronisation. Every other input is expected on the runner's device."""

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the engine on ``feed`` (every input of ``spec`` by name); returns every output by name."""
        ...


class DecodeLoop(Protocol):
    """Greedy decoding of one sequence on the device (`runtime.runners.cuda_decode.GreedyLoop`)."""

    def start(self, past_key: torch.Tensor, past_value: torch.Tensor, token: int, cos: torch.Tensor,
              sin: torch.Tensor) -> None: ...

    def next_tokens(self) -> list[int]:
        """Decode the next few tokens (the stop token included, and possibly some past it)."""
        ...


@runtime_checkable
class DeviceDecoding(Protocol):
    """A ``mot`` runner that can also run x2t's greedy loop on its device (the pipeline then skips its host loop)."""

    def greedy_loop(self, past: int, steps: int, embed: torch.Tensor, allowed: int) -> DecodeLoop: ...


GPU_LIBRARIES = ("libcudart", "libcublas", "libcublasLt", "libcudnn", "libnccl")


def loaded_gpu_libraries() -> dict[str, list[str]]:
    """The CUDA libraries this process has loaded, by name: their files (from ``/proc/self/maps``; a Triton stub holds
    the server's CUDA runtime beside torch's). Two processes that should compute the same bits must load the same
    cuBLAS and cuDNN."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return {}
    paths = sorted({line.split()[-1] for line in lines if "/" in line})
    found = {name: [path for path in paths if Path(path).name.startswith((name + ".", name + "-"))]
             for name in GPU_LIBRARIES}
    return {name: files for name, files in found.items() if files}


def to_device(value: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None, *,
              copy: bool = False) -> torch.Tensor:
    """``value`` on ``device`` (as ``dtype``) without making the host wait for the device: a CPU tensor headed for a
    GPU is staged in pinned memory first, because a copy from pageable memory may synchronise with the stream
    (CUDA's rule for pageable transfers), which would serialise a host loop with the GPU work it queues."""
    device = torch.device(device)
    if value.device.type == "cpu" and device.type == "cuda":
        return value.to(dtype).pin_memory().to(device, non_blocking=True, copy=copy)
    return value.to(device, dtype, copy=copy)


def copy_into(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """``buffer.copy_(value)``, staged as `to_device` stages."""
    if value.device.type == "cpu" and buffer.device.type == "cuda":
        buffer.copy_(value.pin_memory(), non_blocking=True)
    else:
        buffer.copy_(value)


class TorchRunner:
    """Runs an engine-shaped ``nn.Module`` (`runtime.runners.graphs`) whose forward takes the contract's inputs in
    contract order (positionally: the video decoder's caches arrive as ``*past``) and returns its outputs in contract
    order."""

    host_inputs: tuple[str, ...] = ()

    def __init__(self, spec: EngineSpec, module: torch.nn.Module):
        self.spec = spec
        self.module = module

    @torch.inference_mode()
    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        outputs = self.module(*(feed[name] for name in self.spec.input_names))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return dict(zip(self.spec.output_names, outputs))


def check_feed(spec: EngineSpec, feed: Mapping[str, torch.Tensor]) -> None:
    """Refuse a feed whose names differ from the engine's inputs (a programming error, named precisely)."""
    missing = set(spec.input_names) - set(feed)
    unexpected = set(feed) - set(spec.input_names)
    if missing or unexpected:
        raise EngineError(f"engine {spec.name!r}: missing inputs {sorted(missing)}, unexpected {sorted(unexpected)}")


class Engines(dict):
    """The runners of a pipeline by engine name (`runtime.spec.registry.ENGINES`), each of any backend; also readable
    as attributes (``engines.mot``)."""

    def __getattr__(self, name: str) -> Runner:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no runner for engine {name!r}; these engines are bound: {sorted(self)}") from None
