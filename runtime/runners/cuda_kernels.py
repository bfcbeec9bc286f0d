"""CUDA building blocks shared by the fast runners (`runtime.runners.cuda_mot`, `runtime.runners.cuda_vit`): the
element-wise chains that ``torch.compile`` fuses into one kernel each, the FP8 GEMM with row-wise scales, a Triton
SwiGLU kernel, host-to-device input moves that never wait for the device, and CUDA graph capture.

Each chain computes the reference modules' math (`runtime.models.layers`); compiled, intermediate roundings to the
compute dtype may be skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F

from runtime.runners import copy_into, to_device

try:  # Triton comes with PyTorch's CUDA wheels; CPU-only installs run the generic kernels.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

logger = logging.getLogger(__name__)


# --- Element-wise chains (one generated kernel each under torch.compile) ------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LanceRMSNorm` as a function: statistics in fp32, back to ``x``'s dtype, then times ``weight``.

    Args:
        x: ``(..., n)`` float.
        weight: ``(n,)``.
    Returns:
        ``(..., n)`` in the promoted dtype of ``weight`` and ``x``.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual update and the next pre-norm: ``h + delta`` and ``rms_norm(h + delta)``.

    Args:
        h, delta: ``(rows, D)`` compute dtype.
        weight: ``(D,)``.
    Returns:
        the new residual ``(rows, D)`` and its normalised rows ``(rows, D)``.
    """
    h = h + delta
    return h, rms_norm(h, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused projection: ``silu(gate) * up`` for ``gate_up = [gate | up]``.

    Args:
        gate_up: ``(rows, 2 * I)``.
    Returns:
        ``(rows, I)``.
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
"""448: the largest e4m3 value; a row's absolute maximum is scaled onto it."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 (e4m3) quantization: ``x ~= data * scale``.

    Args:
        x: ``(rows, K)`` float.
    Returns:
        data ``(rows, K)`` float8_e4m3fn and scale ``(rows, 1)`` fp32 (an all-zero row gets a tiny scale, not 0).
    """
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    # The clamp keeps a rounding overshoot of the row maximum from becoming NaN (e4m3fn has no infinity).
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def silu_mul_quantize(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`silu_mul` then `quantize_rows`: the down projection's FP8 input in one pass when compiled."""
    return quantize_rows(silu_mul(gate_up))


@dataclass(frozen=True)
class Fp8Weight:
    """A projection weight in FP8 with one scale per output row (``weight ~= data * scale.T``).

    Attributes:
        data: ``(N, K)`` float8_e4m3fn; ``data.t()`` is the column-major operand ``torch._scaled_mm`` takes.
        scale: ``(1, N)`` fp32.
    """

    data: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Fp8Weight":
        data, scale = quantize_rows(weight)
        return cls(data, scale.t().contiguous())


def scaled_linear(data: torch.Tensor, scale: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None,
                  out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """An FP8 GEMM with row-wise scales: ``(data * scale) @ (weight.data * weight.scale.T).T + bias``.

    Args:
        data, scale: ``(rows, K)`` float8_e4m3fn and ``(rows, 1)`` fp32 (`quantize_rows`).
        weight: ``(N, K)`` `Fp8Weight`.
        bias: ``(N,)`` in ``out_dtype``, or None.
        fast_accum: Hopper's fast FP8 accumulation (partial sums kept in the tensor cores' reduced precision,
            not promoted to fp32 every few steps): faster, less exact.
    Returns:
        ``(rows, N)`` in ``out_dtype``, accumulated in fp32 (or fast, above).
    """
    return torch._scaled_mm(data, weight.data.t(), scale_a=scale, scale_b=weight.scale, bias=bias,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(gate_up, out, columns, gate_up_stride, out_stride, BLOCK: tl.constexpr):
        """One row block of `silu_mul`: program (row, j) reads columns [j * BLOCK, (j + 1) * BLOCK) of both halves."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < columns
        base = gate_up + row * gate_up_stride
        gate = tl.load(base + cols, mask=keep, other=0.0).to(tl.float32)
        up = tl.load(base + columns + cols, mask=keep, other=0.0).to(tl.float32)
        # silu(gate) is rounded to the compute dtype before the product, as the two eager ops do.
        silu = (gate * tl.sigmoid(gate)).to(out.dtype.element_ty).to(tl.float32)
        tl.store(out + row * out_stride + cols, (silu * up).to(out.dtype.element_ty), mask=keep)


def silu_mul_triton(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`silu_mul` as one Triton kernel on CUDA: a single pass over ``gate_up`` in row x column-block programs (on an
    H100, 2.8 TB/s for the 4096 x 22016 projection, where the kernel ``torch.compile`` generated reached 1.3 TB/s).

    Args:
        gate_up: ``(rows, 2 * I)`` CUDA, last dim contiguous.
    Returns:
        ``(rows, I)``.
    """
    assert gate_up.stride(1) == 1, "the kernel indexes columns with unit stride"
    rows, width = gate_up.shape
    columns = width // 2
    out = torch.empty(rows, columns, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(columns, block))](gate_up, out, columns, gate_up.stride(0), out.stride(0),
                                                          BLOCK=block)
    return out


def triton_silu_mul_works() -> bool:
    """Whether `silu_mul_triton` runs here and matches `silu_mul` (checked once on the current CUDA device)."""
    if triton is None or not torch.cuda.is_available():
        return False
    try:
        generator = torch.Generator("cuda").manual_seed(0)
        gate_up = torch.randn(37, 2 * 1500, device="cuda", generator=generator).to(torch.bfloat16)
        error = (silu_mul_triton(gate_up).float() - silu_mul(gate_up).float()).abs().max().item()
    except Exception as err:  # a Triton that cannot build or launch the kernel: keep the generic path
        logger.warning("Triton SwiGLU kernel unavailable (%s): using the generic one", err)
        return False
    if not error <= 1e-2:
        logger.warning("Triton SwiGLU kernel differs from the reference by %s: using the generic one", error)
        return False
    return True


# --- Inputs and graph capture -------------------------------------------------------------------------------------


T = TypeVar("T")


def inputs_on(device: torch.device, feed: Mapping[str, torch.Tensor], names: Sequence[str], *,
              copy: bool = False) -> dict[str, torch.Tensor]:
    """``feed``'s tensors ``names`` on ``device``; host tensors go through pinned memory without waiting for the
    device (`runtime.runners.to_device`). ``copy``: new tensors even for those already there (a graph's own input
    buffers)."""
    return {name: to_device(feed[name], device, copy=copy) for name in names}


def copy_inputs(buffers: Mapping[str, torch.Tensor], feed: Mapping[str, torch.Tensor]) -> None:
    """Copy ``feed``'s tensors into a graph's input ``buffers`` of the same names, as `inputs_on` moves them."""
    for name, buffer in buffers.items():
        copy_into(buffer, feed[name])


def compiled(function: Callable[..., T], fullgraph: bool = True) -> Callable[..., T]:
    """``torch.compile(function, fullgraph=fullgraph)`` with Inductor's choices made without timing them: by default it
    benchmarks some kernels' launch configurations on first use and keeps the fastest, and a reduction's
    configuration decides its summation order, so two processes on one GPU could compute different bits (the
    served and the in-process pipeline must agree byte for byte). Its ``deterministic`` mode picks by heuristics
    instead (a PyTorch without the switch keeps its default)."""
    import torch._inductor.config as inductor

    if hasattr(inductor, "deterministic"):
        inductor.deterministic = True
    return torch.compile(function, fullgraph=fullgraph)


class GraphCapture:
    """The memory pool and side stream a runner captures its CUDA graphs with.

    Args:
        device: the CUDA device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def capture(self, run: Callable[[], T]) -> tuple[T, torch.cuda.CUDAGraph, T]:
        """Run ``run`` once on the side stream as the warm-up (compilation, allocator, cuBLAS handles), then capture
        it into a graph of the shared pool. Capture records kernels without running them, so whatever the warm-up
        wrote (its outputs, a workspace) still holds the warm-up's values afterwards.

        Returns:
            the warm-up's result, the graph, and the result tensors the graph writes on each replay.
        """
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            warm = run()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                captured = run()
        current.wait_stream(self.stream)
        return warm, graph, captured
