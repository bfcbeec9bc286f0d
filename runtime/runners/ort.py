"""ONNX Runtime runner: one exported fp32 graph behind the contract's tensor names (CPU serving and export parity).

ONNX Runtime's CPU provider has no bf16 arithmetic (it cannot even load the ``bf16/`` graphs: it has no bf16 MatMul
kernel), so this runner takes the ``fp32/`` graphs; its tensors are the contract's at fp32. At load it compares the
session's inputs and outputs (names, order, element types, ranks) and the graph's own contract metadata with the spec
it is given, and refuses a mismatch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort
import torch

from runtime.spec.contract import META_CONTRACT, DType, EngineSpec, resolve, torch_dtype
from runtime.runners import EngineError, check_feed

logger = logging.getLogger(__name__)

PRECISION = "fp32"
_ORT_TYPES = {DType.FP32: "tensor(float)", DType.INT64: "tensor(int64)", DType.BOOL: "tensor(bool)",
              DType.UINT8: "tensor(uint8)"}


class OrtRunner:
    """Runs ``onnx_path`` with ONNX Runtime's CPU provider.

    Args:
        spec: the engine's contract.
        onnx_path: an fp32 graph exported by ``lance-trt export`` (``<engine>.onnx``, external data beside it).
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
    Raises:
        EngineError: a missing file, a graph that does not load, or I/O that differs from the contract.
    """

    host_inputs: tuple[str, ...] = ()

    def __init__(self, spec: EngineSpec, onnx_path: str | Path, *, threads: int | None = None) -> None:
        self.spec = spec
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise EngineError(f"engine {spec.name!r}: {self.path} does not exist; run lance-trt export")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types, all fatal here
            raise EngineError(f"engine {spec.name!r}: ONNX Runtime cannot load {self.path}: {err}") from err
        self._check_graph()
        logger.info("engine %s: ONNX Runtime session on %s (%s threads)", spec.name, self.path, threads or "default")

    def _check_graph(self) -> None:
        """Refuse a graph whose I/O (names, order, element types, ranks) or recorded contract differs from ``spec``."""
        name = self.spec.name
        for kind, values, tensors in (("input", self.session.get_inputs(), self.spec.inputs),
                                      ("output", self.session.get_outputs(), self.spec.outputs)):
            names = [v.name for v in values]
            if names != [t.name for t in tensors]:
                raise EngineError(f"engine {name!r}: {self.path} has {kind}s {names}, the contract "
                                  f"{[t.name for t in tensors]}")
            for value, t in zip(values, tensors):
                expected = _ORT_TYPES[t.dtype.concrete(PRECISION)]
                if value.type != expected:
                    raise EngineError(f"engine {name!r} {kind} {t.name!r}: {value.type} in {self.path}, the "
                                      f"contract says {expected}")
                if len(value.shape) != len(t.shape):
                    raise EngineError(f"engine {name!r} {kind} {t.name!r}: rank {len(value.shape)} in {self.path}, "
                                      f"the contract says {len(t.shape)}")
        recorded = self.session.get_modelmeta().custom_metadata_map.get(META_CONTRACT)
        if recorded is not None and json.loads(recorded) != self.spec.to_dict():
            raise EngineError(f"engine {name!r}: {self.path} was exported for another contract (sizes or profiles "
                              f"differ from this runtime's); export it again")

    def _array(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        """A feed tensor as the contiguous numpy array of the contract's dtype (a copy only where needed)."""
        spec = self.spec.tensor(name)
        dtype = torch_dtype(spec.dtype, PRECISION)
        if tensor.dtype.is_floating_point != dtype.is_floating_point:
            raise EngineError(f"engine {self.spec.name!r} input {name!r}: got {tensor.dtype}, the contract says "
                              f"{spec.dtype.concrete(PRECISION).value}")
        return tensor.detach().to(device="cpu", dtype=dtype).contiguous().numpy()

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the graph on ``feed`` (every input by name, any device; converted to the contract's dtypes).

        Returns:
            every output by name: new CPU tensors the caller owns.
        Raises:
            EngineError: missing or unexpected inputs, shapes that contradict the contract or fit no profile,
                integer inputs outside their bounds, or an ONNX Runtime failure (each names the engine and tensor).
        """
        check_feed(self.spec, feed)
        try:
            dims = self.spec.dims_of({name: tuple(t.shape) for name, t in feed.items()})
            self.spec.select_profile(dims)
        except ValueError as err:
            raise EngineError(str(err)) from None
        arrays = {name: self._array(name, feed[name]) for name in self.spec.input_names}
        self._check_bounds(arrays, dims)
        try:
            outputs = self.session.run(list(self.spec.output_names), arrays)
        except Exception as err:  # noqa: BLE001 - onnxruntime's own exception types
            raise EngineError(f"engine {self.spec.name!r}: ONNX Runtime failed: {err}") from err
        return {name: torch.from_numpy(value) for name, value in zip(self.spec.output_names, outputs)}

    def _check_bounds(self, arrays: Mapping[str, np.ndarray], dims: Mapping[str, int]) -> None:
        values = {**self.spec.sizes, **dims}
        for t in self.spec.inputs:
            array = arrays[t.name]
            if t.bounds is None or array.size == 0:
                continue
            low, high = (resolve(b, values) for b in t.bounds)
            if array.min() < low or array.max() > high:
                raise EngineError(f"engine {self.spec.name!r} input {t.name!r}: values in [{array.min()}, "
                                  f"{array.max()}], allowed [{low}, {high}]")
