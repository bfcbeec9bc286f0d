"""TensorRT runner: one serialized plan behind the contract's tensor names (production).

Lifecycle, after NVIDIA's TensorRT demo ``Engine`` (docs/design/serving.md §6): load (the plan and its
``<engine>.json``
sidecar, both checked) -> activate (one execution context per optimization profile, all on one device-memory scratch
block that engines running one after another may share: `DeviceScratch`, TensorRT's USER_MANAGED allocation) ->
allocate (one persistent device buffer per contract tensor, sized for the largest profile) -> infer (copy the feed in,
``set_input_shape`` / ``set_tensor_address``, ``execute_async_v3`` on the caller's current CUDA stream).

``infer`` returns clones the caller owns; ``infer_into`` writes the outputs into caller buffers bound by address (the
KV cache, the latents). Every failure raises ``EngineError`` naming the engine and, where one is at fault, the tensor.
``import tensorrt`` happens in `import_tensorrt` only, so this module imports without TensorRT.

A plan is specific to its TensorRT version and GPU architecture and was built for one contract: the sidecar records
all three (``lance-trt build`` writes it), and a mismatch is refused with a message saying to rebuild.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import torch

from runtime.spec.contract import DType, EngineSpec, TensorSpec, torch_dtype
from runtime.runners import EngineError, check_feed

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or an `EngineError` saying in one line why it is unavailable."""
    try:
        import tensorrt
    except ImportError as err:
        raise EngineError(f"TensorRT is not available ({err}); install the 'tensorrt' extra on a machine with an "
                          "NVIDIA GPU, or use --runner onnxruntime / torch") from None
    return tensorrt


def gpu_identity(device: torch.device | str | int = "cuda") -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device."""
    if not torch.cuda.is_available():
        raise EngineError("no CUDA device: TensorRT plans run on NVIDIA GPUs only")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


@dataclass(frozen=True)
class Sidecar:
    """``<engine>.json`` beside ``<engine>.plan``: what the plan was built from, with and for.

    Attributes:
        engine, precision: the contract engine and the graph precision (``fp32``/``bf16``).
        tensorrt: ``tensorrt.__version__`` of the build.
        gpu, compute_capability: the build device (plans do not move across GPU architectures).
        contract_sha256: ``EngineSpec.digest()`` of the contract the graph was exported for.
        onnx, onnx_sha256: the source graph file name and its hash.
        profiles: ``{profile: {input: [min, opt, max] shapes}}``, as given to the builder.
        flags: network and builder flags of the build.
    """

    engine: str
    precision: str
    tensorrt: str
    gpu: str
    compute_capability: str
    contract_sha256: str
    onnx: str
    onnx_sha256: str
    profiles: dict[str, dict[str, list[list[int]]]]
    flags: list[str]

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "Sidecar":
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise EngineError(f"{path} is missing: every plan needs the sidecar lance-trt build writes; "
                              "rebuild the engine") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise EngineError(f"{path} is not a plan sidecar ({err}); rebuild the engine") from None


def check_sidecar(sidecar: Sidecar, spec: EngineSpec, tensorrt_version: str, compute_capability: str,
                  gpu: str = "") -> None:
    """Refuse a plan built for another engine, contract, TensorRT version or GPU architecture.

    Raises:
        EngineError: the first mismatch, with the fix (rebuild).
    """
    rebuild = f"rebuild it: lance-trt export, then lance-trt build (engine {spec.name!r})"
    if sidecar.engine != spec.name:
        raise EngineError(f"the plan is engine {sidecar.engine!r}, expected {spec.name!r}")
    if sidecar.contract_sha256 != spec.digest():
        raise EngineError(f"engine {spec.name!r}: the plan was built for another contract (tensors, sizes or "
                          f"profiles differ from this runtime's); {rebuild}")
    if sidecar.tensorrt != tensorrt_version:
        raise EngineError(f"engine {spec.name!r}: the plan was built with TensorRT {sidecar.tensorrt}, this is "
                          f"{tensorrt_version}; {rebuild}")
    if sidecar.compute_capability != compute_capability:
        raise EngineError(f"engine {spec.name!r}: the plan was built for compute capability "
                          f"{sidecar.compute_capability} ({sidecar.gpu}), this GPU is {compute_capability} ({gpu}); "
                          f"{rebuild}")
    if gpu and sidecar.gpu != gpu:
        logger.warning("engine %s: plan built on %s, running on %s (same architecture %s)", spec.name, sidecar.gpu,
                       gpu, compute_capability)


class DeviceScratch:
    """One device-memory block for the activations of engines that run one after another (TensorRT's USER_MANAGED
    allocation, as the demo's ``activate_engines``). It grows to the largest engine attached; when it grows, every
    attached engine's contexts are re-pointed at the new block."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self._block: torch.Tensor | None = None     # allocated by the first `attach`
        self._users: list[TrtRunner] = []

    def attach(self, runner: "TrtRunner", nbytes: int) -> None:
        """Serve ``runner``'s contexts (``nbytes`` for its largest profile) from this block."""
        self._users.append(runner)
        if self._block is None or nbytes > self._block.numel():
            # Nothing may still run on the old block when it is released.
            torch.cuda.current_stream(self.device).synchronize()
            self._block = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            for user in self._users:
                user.bind_scratch(self._block.data_ptr())
        else:
            runner.bind_scratch(self._block.data_ptr())

    @property
    def nbytes(self) -> int:
        return 0 if self._block is None else self._block.numel()


class TrtRunner:
    """Runs ``<engine>.plan`` with TensorRT.

    Args:
        spec: the engine's contract.
        plan_path: the plan; its sidecar is ``plan_path`` with suffix ``.json``.
        device: the CUDA device.
        scratch: a block shared with other engines (None: a block of its own).
    Raises:
        EngineError: TensorRT missing, a missing or mismatched plan/sidecar, I/O that differs from the contract.
    """

    host_inputs: tuple[str, ...] = ()

    def __init__(self, spec: EngineSpec, plan_path: str | Path, *, device: torch.device | str = "cuda",
                 scratch: DeviceScratch | None = None) -> None:
        self.spec = spec
        self.path = Path(plan_path)
        self.device = torch.device(device)
        self._trt = import_tensorrt()
        self.sidecar = Sidecar.read(self.path.with_suffix(SIDECAR_SUFFIX))
        gpu, capability = gpu_identity(self.device)
        check_sidecar(self.sidecar, spec, self._trt.__version__, capability, gpu)
        self.precision = self.sidecar.precision
        self._load()
        self._check_io()
        self.activate(scratch or DeviceScratch(self.device))
        self._allocate()

    # -- lifecycle --

    def _load(self) -> None:
        if not self.path.is_file():
            raise EngineError(f"engine {self.spec.name!r}: {self.path} does not exist; run lance-trt build")
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"engine {self.spec.name!r}: TensorRT cannot deserialize {self.path} (see its log); "
                              "rebuild it with lance-trt build")
        logger.info("engine %s: loaded %s (TensorRT %s, %s)", self.spec.name, self.path, self.sidecar.tensorrt,
                    self.precision)

    def _check_io(self) -> None:
        """The plan's tensors must be the contract's: names, input/output modes, dtypes, ranks, profile count."""
        trt, name = self._trt, self.spec.name
        dtypes = {trt.DataType.FLOAT: DType.FP32, trt.DataType.BF16: DType.BF16, trt.DataType.INT64: DType.INT64,
                  trt.DataType.BOOL: DType.BOOL, trt.DataType.UINT8: DType.UINT8}
        plan = {}
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            plan[tensor] = (self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT,
                            dtypes.get(self.engine.get_tensor_dtype(tensor)), len(self.engine.get_tensor_shape(tensor)))
        expected = {t.name: (t in self.spec.inputs, t.dtype.concrete(self.precision), len(t.shape))
                    for t in self.spec.tensors}
        for tensor in sorted(set(plan) | set(expected)):
            if plan.get(tensor) != expected.get(tensor):
                raise EngineError(f"engine {name!r} tensor {tensor!r}: the plan has (input, dtype, rank) "
                                  f"{plan.get(tensor)}, the contract {expected.get(tensor)}; rebuild the plan")
        if self.engine.num_optimization_profiles != len(self.spec.profiles):
            raise EngineError(f"engine {name!r}: the plan has {self.engine.num_optimization_profiles} profiles, the "
                              f"contract {len(self.spec.profiles)}; rebuild the plan")

    def activate(self, scratch: DeviceScratch) -> None:
        """One execution context per profile, their activations on ``scratch`` (``device_memory_size_v2`` bytes:
        the largest profile's need, the size the demo's ``activate_engines`` shares)."""
        trt = self._trt
        self.contexts = []
        for _ in self.spec.profiles:
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise EngineError(f"engine {self.spec.name!r}: TensorRT could not create an execution context")
            self.contexts.append(context)
        scratch.attach(self, self.engine.device_memory_size_v2)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for index, context in enumerate(self.contexts):
            if not context.set_optimization_profile_async(index, stream):
                raise EngineError(f"engine {self.spec.name!r}: cannot select profile {self.spec.profiles[index].name}")
        torch.cuda.current_stream(self.device).synchronize()

    def bind_scratch(self, address: int) -> None:
        """Point every context's activation memory at ``address`` (called by `DeviceScratch`)."""
        for context in self.contexts:
            context.device_memory = address

    def _allocate(self) -> None:
        """A persistent buffer per tensor, large enough for its largest shape in any profile."""
        self.buffers: dict[str, torch.Tensor] = {}
        for t in self.spec.tensors:
            numel = max(_numel(self.spec.shape(t, **p.point(2))) for p in self.spec.profiles)
            self.buffers[t.name] = torch.empty(max(numel, 1), dtype=torch_dtype(t.dtype, self.precision),
                                               device=self.device)

    def close(self) -> None:
        """Drop contexts, buffers and the engine (the scratch block belongs to whoever made it)."""
        self.contexts, self.buffers = [], {}
        self.engine = None

    # -- inference --

    def _bind_inputs(self, feed: Mapping[str, torch.Tensor]) -> tuple[Any, dict[str, int]]:
        """Copy the feed into the input buffers and bind them on the context of the profile the shapes fit."""
        check_feed(self.spec, feed)
        try:
            dims = self.spec.dims_of({name: tuple(t.shape) for name, t in feed.items()})
            context = self.contexts[self.spec.select_profile(dims)]
        except ValueError as err:
            raise EngineError(str(err)) from None
        for t in self.spec.inputs:
            source = feed[t.name]
            if source.dtype.is_floating_point != self.buffers[t.name].dtype.is_floating_point:
                raise EngineError(f"engine {self.spec.name!r} input {t.name!r}: got {source.dtype}, the plan takes "
                                  f"{self.buffers[t.name].dtype}")
            view = self.buffers[t.name][:source.numel()].view(source.shape)
            view.copy_(source, non_blocking=True)
            if not context.set_input_shape(t.name, tuple(source.shape)):
                raise EngineError(f"engine {self.spec.name!r} input {t.name!r}: TensorRT refuses shape "
                                  f"{tuple(source.shape)}")
            context.set_tensor_address(t.name, self.buffers[t.name].data_ptr())
        return context, dims

    def _output_shape(self, context: Any, tensor: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The contract's shape of an output, checked against what TensorRT infers for the bound inputs."""
        shape = self.spec.shape(tensor, **dims)
        inferred = tuple(context.get_tensor_shape(tensor.name))
        if inferred != shape:
            raise EngineError(f"engine {self.spec.name!r} output {tensor.name!r}: TensorRT infers {inferred}, the "
                              f"contract says {shape}; rebuild the plan from a current export")
        return shape

    def _run(self, context: Any) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not context.execute_async_v3(stream):
            raise EngineError(f"engine {self.spec.name!r}: execute_async_v3 failed (see the TensorRT log)")

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on ``feed`` (every input by name, any device; copied to the contract's dtypes), enqueued on the
        current CUDA stream.

        Returns:
            every output by name: new device tensors the caller owns (cloned on the same stream).
        Raises:
            EngineError: bad names, shapes outside every profile, or a TensorRT failure.
        """
        context, dims = self._bind_inputs(feed)
        outputs = {}
        for t in self.spec.outputs:
            shape = self._output_shape(context, t, dims)
            outputs[t.name] = self.buffers[t.name][:_numel(shape)].view(shape)
            context.set_tensor_address(t.name, self.buffers[t.name].data_ptr())
        self._run(context)
        return {name: value.clone() for name, value in outputs.items()}

    def infer_into(self, feed: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]) -> None:
        """Like `infer`, writing each output into ``out[name]`` (contiguous, on this device, of the contract's dtype
        and shape), bound by address: no copy.

        Raises:
            EngineError: an output missing from ``out`` or of the wrong dtype, shape, device or layout.
        """
        context, dims = self._bind_inputs(feed)
        for t in self.spec.outputs:
            target = out.get(t.name)
            shape = self._output_shape(context, t, dims)
            dtype = torch_dtype(t.dtype, self.precision)
            if (target is None or tuple(target.shape) != shape or target.dtype != dtype
                    or target.device != self.device or not target.is_contiguous()):
                got = None if target is None else (tuple(target.shape), target.dtype, str(target.device))
                raise EngineError(f"engine {self.spec.name!r} output {t.name!r}: needs a contiguous {shape} {dtype} "
                                  f"tensor on {self.device}, got {got}")
            context.set_tensor_address(t.name, target.data_ptr() if target.numel() else
                                       self.buffers[t.name].data_ptr())
        self._run(context)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count
