"""The fast PyTorch path of the ``vit`` engine on CUDA: padded fused MLP, attention per segment without masks,
compiled element-wise chains, CUDA graphs.

`CudaVisionTower` runs `Qwen25VisionTransformer.forward`'s math on the tower's own weights with three changes that
leave the function as it is:

* MLP. ``gate_proj`` and ``up_proj`` become one matrix ``[gate | up]`` and the intermediate width is zero-padded to a
  multiple of `MLP_WIDTH_MULTIPLE` (3420 -> 3456), ``down_proj``'s input columns likewise: 3420 sends the GEMMs to
  unaligned kernels. A padded row has zero weight and bias, so its activation is ``silu(0) * 0 = 0``, and it meets a
  zero column of ``down_proj``.
* Attention. The ``(P, P)`` masks are block-diagonal: each block (a window, or a frame for the full-attention blocks)
  attends only to itself. The host reads the blocks off the masks once per call (`segment_lengths`), and
  `SegmentLayout` groups them by length: each group runs as one batched, unmasked SDPA call ``(n, heads, L, hd)``
  over exactly the rows it needs, where the masked call computed ``P x P`` scores. Segments of one length that lie
  back to back (every window of a grid whose sides are multiples of the window, a video's frames) are a view of the
  rows; the others are gathered by an index built once per layout.
* Element-wise chains. Residual add + RMSNorm, the q/k rotary and SwiGLU are small functions, each one generated
  kernel under ``torch.compile`` (``compile=True``); eagerly they are the reference ops.

Numerics are the reference block's: RMSNorm statistics in fp32 (`runtime.models.layers.RMSNorm`), rotary in fp32 then
back to the compute dtype (`runtime.models.vit.apply_rotary`), softmax inside SDPA. Compiled chains may skip
intermediate roundings to the compute dtype; the padded GEMMs may sum in a different order.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.spec.contract import EngineSpec
from runtime.runners import EngineError, check_feed
from runtime.runners.cuda_kernels import (
    GraphCapture,
    add_rms_norm,
    compiled,
    copy_inputs,
    inputs_on,
    rms_norm,
    silu_mul,
)
from runtime.models.vit import Qwen25VisionMLP, Qwen25VisionTransformer, VisionConfig, apply_rotary

logger = logging.getLogger(__name__)

MLP_WIDTH_MULTIPLE = 64
"""The padded MLP width is a multiple of this (3420 -> 3456): aligned GEMM tiles for the gate/up and down GEMMs."""


# --- Element-wise chains (one generated kernel each under torch.compile) -------------------------------------------
# The tower's own functions, so that dynamo's cache (keyed by code object) and its automatic choice of symbolic dims
# are not shared with `CudaMoT`'s chains: there the hidden size differs, and sharing would make it symbolic in both.


def tower_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`runtime.runners.cuda_mot.rms_norm`: x ``(P, hidden)``, weight ``(hidden,)`` -> ``(P, hidden)``."""
    return rms_norm(x, weight, eps)


def tower_add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`runtime.runners.cuda_mot.add_rms_norm`: h, delta ``(P, hidden)`` -> ``h + delta`` and its normalised rows."""
    return add_rms_norm(h, delta, weight, eps)


def tower_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`runtime.runners.cuda_mot.silu_mul`: gate_up ``(P, 2 * I)`` -> ``(P, I)``."""
    return silu_mul(gate_up)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection into heads and rotate q and k (`apply_rotary`: fp32, then the compute dtype).

    Args:
        qkv: ``(P, 3 * heads * hd)`` output of the ``qkv`` projection (bias included).
        cos, sin: ``(P, 1, hd)`` fp32 rotary tables (broadcast over heads).
        heads: attention heads.
    Returns:
        q, k, v: ``(P, heads, hd)`` in ``qkv``'s dtype; v is a view of ``qkv``.
    """
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


@dataclass(frozen=True)
class _TowerKernels:
    """The element-wise chains `CudaVisionTower` calls: the functions above, or their compiled versions."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_qkv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]

    @classmethod
    @functools.cache
    def build(cls, compile: bool) -> "_TowerKernels":
        """The plain functions, or one shared set of compiled ones (every tower reuses the compiled code). The first
        input size compiles static, the next recompiles with the row count symbolic, which then serves every size."""
        functions = (tower_rms_norm, tower_add_rms_norm, rotary_qkv, tower_silu_mul)
        if not compile:
            return cls(*functions)
        return cls(*(compiled(f) for f in functions))


# --- Segment layout (host side) -----------------------------------------------------------------------------------


def segment_lengths(window_mask: torch.Tensor, full_mask: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The diagonal blocks of the two block-diagonal masks of `runtime.models.vit.vision_inputs`, in row order.

    A block starts at row ``i`` where ``mask[i, i - 1]`` is masked. Only the first sub-diagonals are read, both in
    one transfer: a single device-to-host read where the masks live on a GPU, none where they are on the CPU.

    Args:
        window_mask, full_mask: ``(P, P)`` additive float (0 inside a block, `MASK_VALUE` across blocks).
    Returns:
        window lengths and frame lengths, each summing to ``P``.
    """
    starts = torch.stack((window_mask.diagonal(-1), full_mask.diagonal(-1))).ne(0).cpu()
    rows = window_mask.shape[0]
    lengths = []
    for flags in starts:
        bounds = [0, *(flags.nonzero().flatten() + 1).tolist(), rows]
        lengths.append(tuple(b - a for a, b in zip(bounds, bounds[1:])))
    return lengths[0], lengths[1]


@dataclass(frozen=True)
class SegmentGroup:
    """The segments of one length, attended as one batch ``(count, heads, length, hd)``.

    Attributes:
        length: rows per segment.
        count: segments.
        start: first row where the segments lie back to back (rows ``[start, start + count * length)``), else None.
        index: ``(count * length,)`` int64 rows of the segments in order, on the tower's device; None with ``start``.
    """

    length: int
    count: int
    start: int | None
    index: torch.Tensor | None = field(compare=False, repr=False)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(P, heads, hd)`` -> this group's rows ``(count, heads, length, hd)`` (a view where ``start`` is set)."""
        if self.start is None:
            rows = x.index_select(0, self.index)
        else:
            rows = x[self.start:self.start + self.count * self.length]
        return rows.unflatten(0, (self.count, self.length)).transpose(1, 2)

    def put(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Write y ``(count, heads, length, hd)`` into this group's rows of out ``(P, heads * hd)``."""
        rows = y.transpose(1, 2).flatten(0, 1).flatten(1)
        if self.start is None:
            out.index_copy_(0, self.index, rows)
        else:
            out[self.start:self.start + self.count * self.length] = rows


def _group_segments(lengths: Sequence[int], device: torch.device) -> tuple[SegmentGroup, ...]:
    """Segments grouped by length (in order of first appearance), each group a view or an index on ``device``."""
    starts: dict[int, list[int]] = {}
    row = 0
    for length in lengths:
        starts.setdefault(length, []).append(row)
        row += length
    groups = []
    for length, firsts in starts.items():
        if all(s == firsts[0] + i * length for i, s in enumerate(firsts)):
            groups.append(SegmentGroup(length, len(firsts), firsts[0], None))
        else:
            index = (torch.tensor(firsts)[:, None] + torch.arange(length)).flatten()
            groups.append(SegmentGroup(length, len(firsts), None, index.to(device)))
    return tuple(groups)


@dataclass(frozen=True)
class SegmentLayout:
    """The attention structure of one call: windows for the windowed blocks, frames for the full-attention blocks.

    Equal (and hashed) by the lengths alone, so it keys the runner's CUDA graphs; the groups' index tensors are built
    once per layout.

    Attributes:
        window_lengths, frame_lengths: segment lengths in row (window) order, each summing to P.
        windows, frames: the segments grouped by length.
    """

    window_lengths: tuple[int, ...]
    frame_lengths: tuple[int, ...]
    windows: tuple[SegmentGroup, ...] = field(compare=False, repr=False)
    frames: tuple[SegmentGroup, ...] = field(compare=False, repr=False)

    @classmethod
    def build(cls, window_lengths: Sequence[int], frame_lengths: Sequence[int],
              device: torch.device | str) -> "SegmentLayout":
        """The layout of the given segments, index tensors on ``device``.

        Raises:
            ValueError: the two lengths do not cover the same rows.
        """
        window_lengths, frame_lengths = tuple(window_lengths), tuple(frame_lengths)
        if sum(window_lengths) != sum(frame_lengths) or min(window_lengths + frame_lengths, default=0) < 1:
            raise ValueError(f"SegmentLayout: window lengths {window_lengths} and frame lengths {frame_lengths} must "
                             "be positive and cover the same rows")
        device = torch.device(device)
        return cls(window_lengths, frame_lengths, _group_segments(window_lengths, device),
                   _group_segments(frame_lengths, device))

    @classmethod
    def from_masks(cls, window_mask: torch.Tensor, full_mask: torch.Tensor,
                   device: torch.device | str) -> "SegmentLayout":
        """`build` on `segment_lengths` of the two ``(P, P)`` masks (one device-to-host read)."""
        return cls.build(*segment_lengths(window_mask, full_mask), device)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      groups: Sequence[SegmentGroup]) -> torch.Tensor:
    """Attention within each segment, one unmasked 4-D SDPA call per group: the masked reference attention
    (`runtime.models.vit.sdpa_attention`) where the mask is the segments' block-diagonal mask.

    Args:
        q, k, v: ``(P, heads, hd)`` (any row stride; the last dim contiguous for the fused kernels).
        groups: the segments, covering every row once.
    Returns:
        ``(P, heads * hd)`` in ``q``'s dtype, rows in the input order.
    """
    rows = q.shape[0]
    if len(groups) == 1 and groups[0].start == 0:
        # One run of equal segments over every row: the output needs no scatter.
        group = groups[0]
        out = F.scaled_dot_product_attention(group.take(q), group.take(k), group.take(v))
        return out.transpose(1, 2).reshape(rows, -1)
    out = q.new_empty(rows, q.shape[1] * q.shape[2])
    for group in groups:
        group.put(out, F.scaled_dot_product_attention(group.take(q), group.take(k), group.take(v)))
    return out


# --- Fused weights -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedVisionBlock:
    """One block's weights for `CudaVisionTower`: the tower's own tensors, the MLP fused and padded.

    Attributes:
        norm1, norm2: ``(hidden,)`` RMSNorm scales.
        qkv_weight: ``(3 * hidden, hidden)``; qkv_bias: ``(3 * hidden,)``.
        proj_weight: ``(hidden, hidden)``; proj_bias: ``(hidden,)``.
        gate_up_weight: ``(2 * W, hidden)`` rows ``[gate | 0 | up | 0]``, ``W`` the padded width.
        gate_up_bias: ``(2 * W,)`` likewise.
        down_weight: ``(hidden, W)``, zero past the real width; down_bias: ``(hidden,)``.
        full_attention: attends over whole frames rather than windows.
    """

    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    full_attention: bool


def padded_width(intermediate_size: int) -> int:
    """The MLP width rounded up to `MLP_WIDTH_MULTIPLE`."""
    return -(-intermediate_size // MLP_WIDTH_MULTIPLE) * MLP_WIDTH_MULTIPLE


def _pad_mlp(mlp: Qwen25VisionMLP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padded ``[gate | up]`` weight and bias and the padded ``down`` weight; the module's three weights and two
    biases become views of them, so the module computes the same on the same storage and nothing is held twice."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    inner, width = gate.out_features, padded_width(gate.out_features)
    gate_up_weight = gate.weight.new_zeros(2 * width, gate.in_features)
    gate_up_bias = gate.bias.new_zeros(2 * width)
    down_weight = down.weight.new_zeros(down.out_features, width)
    for linear, offset in ((gate, 0), (up, width)):
        gate_up_weight[offset:offset + inner] = linear.weight
        gate_up_bias[offset:offset + inner] = linear.bias
        linear.weight = nn.Parameter(gate_up_weight[offset:offset + inner], requires_grad=False)
        linear.bias = nn.Parameter(gate_up_bias[offset:offset + inner], requires_grad=False)
    down_weight[:, :inner] = down.weight
    # A column slice: down_proj's weight becomes a strided view (row stride W), which F.linear takes as it is.
    down.weight = nn.Parameter(down_weight[:, :inner], requires_grad=False)
    return gate_up_weight, gate_up_bias, down_weight


# --- Tower ---------------------------------------------------------------------------------------------------------


class CudaVisionTower:
    """`Qwen25VisionTransformer.forward` with the padded fused MLP, per-segment attention and (optionally) compiled
    element-wise chains, for CUDA (and CPU, for tests).

    Building it pads ``vit``'s MLPs into fused matrices and points the tower's own ``gate_proj``/``up_proj``/
    ``down_proj`` parameters at slices of them (the values do not change, ``vit`` keeps computing the same function);
    every other weight is used in place. Nothing is copied but the MLP weights, once, into their padded storage.

    Args:
        vit: the loaded tower (any device and float dtype; its weights are the compute dtype).
        compile: run the element-wise chains through ``torch.compile(fullgraph=True)`` (CUDA only).
    Raises:
        ValueError: ``compile`` on a tower that is not on a CUDA device.
    """

    def __init__(self, vit: Qwen25VisionTransformer, *, compile: bool = False) -> None:
        weight = vit.patch_embed.proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        if compile and self.device.type != "cuda":
            raise ValueError(f"CudaVisionTower: compile=True needs a CUDA tower, this one is on {self.device}")
        self.vit = vit
        self.config: VisionConfig = vit.config
        self.heads = vit.config.num_heads
        self.eps = vit.blocks[0].norm1.eps
        self.kernels = _TowerKernels.build(compile)
        with torch.no_grad():
            self.blocks = [self._fuse_block(i, block) for i, block in enumerate(vit.blocks)]
        self.merger_norm = vit.merger.ln_q.weight.detach()
        logger.info("CudaVisionTower: %d blocks on %s (%s), MLP width %d -> %d, compile=%s", len(self.blocks),
                    self.device, self.dtype, vit.config.intermediate_size,
                    padded_width(vit.config.intermediate_size), compile)

    def set_compile(self, compile: bool) -> None:
        """Switch the element-wise chains between the plain and the compiled functions (graphs captured before keep
        the kernels they captured)."""
        if compile and self.device.type != "cuda":
            raise ValueError(f"CudaVisionTower: compile=True needs a CUDA tower, this one is on {self.device}")
        self.kernels = _TowerKernels.build(compile)

    def _fuse_block(self, index: int, block: nn.Module) -> FusedVisionBlock:
        gate_up_weight, gate_up_bias, down_weight = _pad_mlp(block.mlp)
        return FusedVisionBlock(
            norm1=block.norm1.weight.detach(),
            norm2=block.norm2.weight.detach(),
            qkv_weight=block.attn.qkv.weight.detach(),
            qkv_bias=block.attn.qkv.bias.detach(),
            proj_weight=block.attn.proj.weight.detach(),
            proj_bias=block.attn.proj.bias.detach(),
            gate_up_weight=gate_up_weight,
            gate_up_bias=gate_up_bias,
            down_weight=down_weight,
            down_bias=block.mlp.down_proj.bias.detach(),
            full_attention=index in self.vit.full_attention,
        )

    def forward(self, layout: SegmentLayout, patches: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                window_index: torch.Tensor, reverse_index: torch.Tensor) -> torch.Tensor:
        """The tower on one call; the masks' content comes as ``layout``.

        Args:
            layout: the call's segments (`SegmentLayout.from_masks` of its ``window_mask`` and ``full_mask``), index
                tensors on this tower's device.
            patches: ``(P, patch_dim)`` float, preprocessing order.
            cos, sin: ``(P, head_dim)`` fp32 rotary tables, window order.
            window_index, reverse_index: ``(P / 4,)`` int64 permutation of merge groups and its inverse.
        Returns:
            ``(P / 4, out_hidden_size)`` in the compute dtype, raster order.
        """
        kernels, vit = self.kernels, self.vit
        x = vit.patch_embed(patches)
        x = x.unflatten(0, (-1, self.config.merge_unit)).index_select(0, window_index).flatten(0, 1)
        cos, sin = cos[:, None], sin[:, None]
        normed = kernels.rms_norm(x, self.blocks[0].norm1, self.eps)
        # Each residual update is fused with the norm that reads it next: norm2, the next block's norm1, ln_q.
        next_norms = [block.norm1 for block in self.blocks[1:]] + [self.merger_norm]
        for block, next_norm in zip(self.blocks, next_norms):
            q, k, v = kernels.rotary_qkv(F.linear(normed, block.qkv_weight, block.qkv_bias), cos, sin, self.heads)
            attn = segment_attention(q, k, v, layout.frames if block.full_attention else layout.windows)
            x, normed = kernels.add_rms_norm(x, F.linear(attn, block.proj_weight, block.proj_bias), block.norm2,
                                             self.eps)
            hidden = kernels.silu_mul(F.linear(normed, block.gate_up_weight, block.gate_up_bias))
            x, normed = kernels.add_rms_norm(x, F.linear(hidden, block.down_weight, block.down_bias), next_norm,
                                             self.eps)
        merger = vit.merger.mlp
        return merger(normed.reshape(-1, merger[0].in_features)).index_select(0, reverse_index)


# --- Runner --------------------------------------------------------------------------------------------------------

_TOWER_INPUTS = ("patches", "cos", "sin", "window_index", "reverse_index")
"""Contract inputs `CudaVisionTower.forward` reads as tensors (the masks reach it as the `SegmentLayout`)."""


@dataclass
class _CapturedTower:
    """A CUDA graph of one call structure with the buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    layout: SegmentLayout
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class CudaVitRunner:
    """`Runner` of the ``vit`` engine over a `CudaVisionTower`; outputs are new tensors the caller owns.

    Each call first derives its `SegmentLayout` from ``window_mask`` and ``full_mask`` (`segment_lengths`): the only
    host read of the call, before the graph lookup; the masks are host inputs, so a caller that keeps them on the CPU
    (`runtime.pipeline`) pays no device synchronisation and never copies them to the device. Layouts are cached by
    their lengths, so their index tensors are built once.

    On CUDA, each (input shapes and dtypes, layout) is captured once as a CUDA graph and replayed afterwards: the
    feed is copied into the graph's input buffers, the graph replays on the caller's stream, the output is cloned. The
    first call of a key runs on the runner's side stream as the capture's warm-up and returns that result; graphs
    share one memory pool. Off CUDA the tower runs eagerly.

    Args:
        spec: the ``vit`` contract (`runtime.spec.contract.engine_specs`).
        tower: the fast tower.
        graphs: capture CUDA graphs (ignored off CUDA).
    """

    host_inputs = ("window_mask", "full_mask")

    def __init__(self, spec: EngineSpec, tower: CudaVisionTower, *, graphs: bool = True) -> None:
        self.spec = spec
        self.tower = tower
        self.graphs = graphs and tower.device.type == "cuda"
        (self._output_name,) = spec.output_names
        self._layouts: dict[tuple[tuple[int, ...], tuple[int, ...]], SegmentLayout] = {}
        self._captured: dict[tuple, _CapturedTower] = {}
        self._graphs = GraphCapture(tower.device) if self.graphs else None

    @property
    def num_graphs(self) -> int:
        return len(self._captured)

    def clear(self) -> None:
        """Drop every captured graph and cached layout (their memory returns to PyTorch's cache)."""
        self._captured.clear()
        self._layouts.clear()

    @torch.inference_mode()
    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        layout = self._layout(feed)
        if not self.graphs:
            return {self._output_name: self.tower.forward(layout, **inputs_on(self.tower.device, feed, _TOWER_INPUTS))}
        key = (layout, tuple((tuple(feed[name].shape), feed[name].dtype) for name in _TOWER_INPUTS))
        captured = self._captured.get(key)
        if captured is None:
            return self._capture(key, layout, feed)
        copy_inputs(captured.inputs, feed)
        captured.graph.replay()
        return {self._output_name: captured.output.clone()}

    def _layout(self, feed: Mapping[str, torch.Tensor]) -> SegmentLayout:
        """The call's layout (the host read), from the cache where its lengths were seen before.

        Raises:
            EngineError: a mask that is not ``(P, P)`` for the ``P`` patch rows of the feed.
        """
        rows = feed["patches"].shape[0]
        for name in self.host_inputs:
            if tuple(feed[name].shape) != (rows, rows):
                raise EngineError(f"engine {self.spec.name!r}: {name} has shape {tuple(feed[name].shape)}, "
                                  f"expected ({rows}, {rows}) for {rows} patch rows")
        lengths = segment_lengths(feed["window_mask"], feed["full_mask"])
        layout = self._layouts.get(lengths)
        if layout is None:
            layout = self._layouts[lengths] = SegmentLayout.build(*lengths, self.tower.device)
        return layout

    def _capture(self, key: tuple, layout: SegmentLayout, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Warm up on the side stream (this call's result, and any compilation), then capture the same call."""
        inputs = inputs_on(self.tower.device, feed, _TOWER_INPUTS, copy=True)
        warm, graph, output = self._graphs.capture(lambda: self.tower.forward(layout, **inputs))
        self._captured[key] = _CapturedTower(graph, layout, inputs, output)
        logger.debug("vit: captured a CUDA graph for %d rows, %d window and %d frame segments (%d graphs)",
                     sum(layout.window_lengths), len(layout.window_lengths), len(layout.frame_lengths),
                     len(self._captured))
        return {self._output_name: warm.clone()}
