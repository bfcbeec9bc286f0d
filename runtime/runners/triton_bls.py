"""A `Runner` that runs an engine served as its own Triton model, called from inside the BLS model ``lance`` with
``pb_utils.InferenceRequest`` (docs/design/serving.md §2: ``vit``, ``vae_encode`` and ``vae_decode`` are
the Triton models ``lance_vit``, ``lance_vae_encode``, ``lance_vae_decode``).

Tensors cross by DLPack in both directions, so a GPU tensor stays on the GPU (Triton hands it over by CUDA IPC) and a
bf16 tensor, which has no numpy form, passes too; on CPU the same code moves the data through the Python backend's
shared memory. The runner is usable only inside a Triton Python-backend stub: ``runtime.serving.triton_adapter``, the one
module that imports ``triton_python_backend_utils``, hands that module in.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Mapping

import torch
from torch.utils import dlpack

from runtime.spec.contract import EngineSpec, torch_dtype
from runtime.runners import EngineError, check_feed

logger = logging.getLogger(__name__)


class BlsRunner:
    """Runs engine ``spec`` by a BLS call to Triton model ``model_name``.

    Args:
        spec: the engine's contract (the child model's config was generated from it).
        model_name: the Triton model serving the engine.
        pb_utils: the stub's ``triton_python_backend_utils`` module.
        precision: ``"fp32"`` or ``"bf16"``: the child's tensor types (``FLOAT`` tensors in this precision).
        device: where outputs are wanted; a CUDA device asks Triton for GPU outputs (``PreferredMemory``).
        timeout_us: BLS timeout in microseconds (0: none); a child that takes longer fails the call.
    """

    host_inputs: tuple[str, ...] = ()

    def __init__(self, spec: EngineSpec, model_name: str, pb_utils: ModuleType, *, precision: str = "fp32",
                 device: torch.device | str = "cpu", timeout_us: int = 0) -> None:
        self.spec = spec
        self.model_name = model_name
        self._pb = pb_utils
        self._dtypes = {t.name: torch_dtype(t.dtype, precision) for t in spec.inputs}
        self.device = torch.device(device)
        self._timeout_us = timeout_us
        if self.device.type == "cuda":
            self._memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index or 0)
        else:
            self._memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Send ``feed`` (every input by name) to the child model and wait for its response.

        Returns:
            every output by name, on ``device`` (Triton allocates them per call: the caller owns them).
        Raises:
            EngineError: wrong input names, a failed call or an error response (names the model and its message),
                or a response without an output of the contract.
        """
        check_feed(self.spec, feed)
        inputs = [self._pb.Tensor.from_dlpack(name, dlpack.to_dlpack(self._wire(name, feed[name])))
                  for name in self.spec.input_names]
        request = self._pb.InferenceRequest(model_name=self.model_name, inputs=inputs,
                                            requested_output_names=list(self.spec.output_names),
                                            preferred_memory=self._memory, timeout=self._timeout_us)
        try:
            response = request.exec()
        except Exception as err:  # noqa: BLE001 - the stub raises its own exception types
            raise EngineError(f"engine {self.spec.name!r}: BLS call to model {self.model_name!r} failed: {err}") from err
        if response.has_error():
            raise EngineError(f"engine {self.spec.name!r}: model {self.model_name!r} answered: "
                              f"{response.error().message()}")
        outputs = {}
        for name in self.spec.output_names:
            tensor = self._pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise EngineError(f"engine {self.spec.name!r}: model {self.model_name!r} returned no {name!r}")
            outputs[name] = dlpack.from_dlpack(tensor.to_dlpack())
        return outputs

    def _wire(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A feed tensor as the child expects it: contract dtype, contiguous, on this runner's device."""
        return tensor.to(device=self.device, dtype=self._dtypes[name]).contiguous()
