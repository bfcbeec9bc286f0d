"""Engine runners: one interface over TensorRT plans, ONNX Runtime sessions, the PyTorch modules and BLS calls.

Every runner serves one engine of `runtime.spec.contract` and binds tensors by the contract's names. ``infer(feed)``
returns tensors the caller owns (no internal buffer is handed out unannounced). The pipeline talks to an `Engines`
bundle and never branches on the backend; `runtime.runners.factory` is the one place a backend is chosen.
"""

from __future__ import annotations

from typing import Mapping, Protocol

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
