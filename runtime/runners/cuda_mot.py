"""The fast PyTorch path of the ``mot`` engine on CUDA: fused weights, GQA attention without K/V copies, CUDA graphs.

`CudaMoT` re-packs a loaded `LanceMoT` (one ``qkv`` matrix and bias per expert and layer, one ``gate_up`` matrix per
MLP) and runs `LanceMoT.step`'s math on it; `CudaMotRunner` serves it behind the ``mot`` contract (`Runner`), replaying
CUDA graphs for calls whose shapes repeat (every denoise step, every decoded token), captured through `GraphCapture`;
`runtime.runners.factory` assembles the fast engine set (the vision tower's runner is in ``cuda_vit``; the shared
kernels and graph capture in ``cuda_kernels``).

Layout. The rows of a call are held per expert, each contiguous across the batch: gen rows ``(B * Lg, D)`` and und
rows ``(B * Lu, D)`` (``Lu = Lh + Lt``, head rows then tail rows), so every projection is one GEMM per expert whatever
the number of CFG branches. The block's keys and values go into a K/V workspace ``(layers, B, Lq + P, KVH, hd)`` with
``Lq = Lg + Lu``: the block's rows first (gen, then und), then the past rows. Putting the block first gives it the
same offset in every branch, so one strided write stores a group's keys for all branches; attention over a
bidirectional block does not depend on the order of its keys, and the causal cases build their mask in this order.

Attention. Where every branch's valid past is known on the host (``exact`` layout: prefill, denoise), branch ``b``
attends over its ``Lq + past_b`` workspace rows with no mask, one ``scaled_dot_product_attention(enable_gqa=True)``
call per run of equal past lengths: the fused kernel (cuDNN's on an H100 with torch 2.11) reads the 2 K/V heads in
place for the 16 query heads. Single-row decode steps take the ``masked`` layout, whose valid past stays a device
tensor so one graph serves every length up to a capacity; they, and causal blocks of several rows, use the reference
GQA attention (`runtime.models.mot.eager_attention`) with an additive mask.

Numerics are `LanceMoT.step`'s: RMSNorm statistics in fp32 then the weight in the compute dtype, q/k-norm and RoPE in
fp32 for every row, softmax in fp32. The fused GEMMs compute the same dot products as the separate ones. With
``compile=True`` the normalisation, rotary and SwiGLU element-wise chains each run as one generated kernel
(``torch.compile``, and a Triton kernel for SwiGLU); the math is unchanged, intermediate roundings to the compute
dtype may be skipped.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from runtime.models.mot import MASK_VALUE, LanceMoT, LanceMoTAttention, LanceMoTDecoderLayer, apply_rotary, \
    eager_attention
from runtime.runners import EngineError, check_feed
from runtime.runners.cuda_kernels import (
    Fp8Weight,
    GraphCapture,
    add_rms_norm,
    compiled as compiled_function,
    copy_inputs,
    inputs_on,
    quantize_rows,
    rms_norm,
    scaled_linear,
    silu_mul,
    silu_mul_quantize,
    silu_mul_triton,
    triton_silu_mul_works,
)
from runtime.spec.contract import EngineSpec

logger = logging.getLogger(__name__)

DECODE_CAPACITY_STEP = 256
"""Masked-layout workspaces hold a multiple of this many rows: one decode graph serves 256 consecutive lengths."""
DEFAULT_MAX_GRAPHS = 16
"""CUDA graphs a `CudaMotRunner` keeps (least recently used dropped first)."""
FP8_PROJECTIONS = ("qkv", "o", "gate_up", "down")
"""The gen expert's projections `CudaMoT`'s FP8 mode can run as FP8 GEMMs."""
FP8_GEN_PROJECTIONS = ("gate_up", "down")
"""The ones the FP8 mode runs in FP8: the MLP. Measured by ``benchmarks.gpu_check --fp8-choices`` (H100, 512 px,
one step's velocity against fp32; gate 0.995): all four 0.9945 (fails), q/k/v and o alone 0.9968, the MLP alone
0.9974 (passes) at the speed of all four (denoise 21.6 vs 21.9 ms, bf16 26.2 ms): the attention projections carry
most of the error and, at these sizes, none of the gain."""


def qk_norm_rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                  k_weight: torch.Tensor | None, eps: float, q_out: torch.Tensor, k_out: torch.Tensor,
                  v_out: torch.Tensor) -> None:
    """Split a fused projection, q/k-norm and rotate q and k in fp32, and store q, k, v in the compute dtype.

    Args:
        qkv: ``(B, rows, (H + 2 * KVH) * hd)`` output of the fused projection (bias included).
        cos, sin: ``(B, rows, hd)`` fp32 mRoPE tables.
        q_weight, k_weight: ``(hd,)`` q/k-norm scales, or None without q/k-norm.
        q_out: ``(B, rows, H, hd)`` written.
        k_out, v_out: ``(B, rows, KVH, hd)`` written (views into the K/V workspace).
    """
    batch, rows, heads, head_dim = q_out.shape
    kv_heads = k_out.shape[2]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(batch, rows, heads, head_dim).float()
    k = k.reshape(batch, rows, kv_heads, head_dim).float()
    if q_weight is not None:
        q = rms_norm(q, q_weight, eps)
    if k_weight is not None:
        k = rms_norm(k, k_weight, eps)
    q, k = apply_rotary(q, k, cos, sin)
    q_out.copy_(q)
    k_out.copy_(k)
    v_out.copy_(v.reshape(batch, rows, kv_heads, head_dim))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`runtime.models.mot.eager_attention` on block-first workspace rows (the masked layout), returning rows:
    ``(B, Lq, H, hd)`` queries over ``(B, S, KVH, hd)`` keys and values -> ``(B, Lq, H * hd)``."""
    out = eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


@dataclass(frozen=True)
class _Kernels:
    """The element-wise chains and the masked attention `CudaMoT` calls: the functions above, or their compiled
    versions."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    qk_norm_rope_: Callable[..., None]
    silu_mul: Callable[..., torch.Tensor]
    masked_attention: Callable[..., torch.Tensor]
    quantize_rows: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul_quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    @functools.cache
    def build(cls, compile: bool) -> "_Kernels":
        """The plain functions, or one shared set of compiled ones (so every model reuses the compiled code); the
        compiled set takes the Triton SwiGLU kernel where it works."""
        functions = (rms_norm, add_rms_norm, qk_norm_rope_, silu_mul, masked_attention, quantize_rows,
                     silu_mul_quantize)
        if not compile:
            return cls(*functions)
        # Default dynamic handling: the first shape compiles static, the next one recompiles with the row
        # dimension symbolic, and that version then serves every size (sizes 0 and 1 get their own).
        compiled = [compiled_function(f) for f in functions]
        if triton_silu_mul_works():
            compiled[3] = silu_mul_triton
        return cls(*compiled)


# --- Fused weights -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedExpert:
    """One expert of one decoder layer with its projections fused.

    Attributes:
        input_norm, post_norm: ``(D,)`` `input_layernorm` / `post_attention_layernorm` scales.
        q_norm, k_norm: ``(hd,)`` q/k-norm scales, or None when the model has no q/k-norm.
        qkv_weight: ``(H*hd + 2*KVH*hd, D)`` rows of ``q_proj``, ``k_proj``, ``v_proj``.
        qkv_bias: ``(H*hd + 2*KVH*hd,)``.
        o_weight: ``(D, H*hd)`` ``o_proj`` (no bias).
        gate_up_weight: ``(2*I, D)`` rows of ``gate_proj`` then ``up_proj``.
        down_weight: ``(D, I)``.
    The four projection weights are `Fp8Weight`s in an expert quantized by `quantized`.
    """

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv_weight: torch.Tensor | Fp8Weight
    qkv_bias: torch.Tensor
    o_weight: torch.Tensor | Fp8Weight
    gate_up_weight: torch.Tensor | Fp8Weight
    down_weight: torch.Tensor | Fp8Weight

    def quantized(self, projections: Sequence[str] = FP8_PROJECTIONS) -> "FusedExpert":
        """This expert with ``projections`` in FP8 (new storage, or the FP8 weights it already has; norms, the bias
        and the other projections stay as they are)."""
        already = [name for name in FP8_PROJECTIONS
                   if name not in projections and isinstance(getattr(self, f"{name}_weight"), Fp8Weight)]
        if already:
            raise ValueError(f"the {', '.join(already)} projections are FP8 already, outside {list(projections)}: "
                             "quantize the model in the compute dtype instead")
        weights = {name: getattr(self, f"{name}_weight") for name in projections}
        return replace(self, **{f"{name}_weight": weight if isinstance(weight, Fp8Weight) else Fp8Weight.quantize(weight)
                                for name, weight in weights.items()})


def _fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the rows of ``linears`` into one weight (and bias), and make each module's parameters views of it,
    so the source model keeps working on the same storage and no weight is held twice."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([linear.bias.detach() for linear in linears]) if has_bias else None
    start = 0
    for linear in linears:
        stop = start + linear.out_features
        linear.weight = nn.Parameter(weight[start:stop], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start:stop], requires_grad=False)
        start = stop
    return weight, bias


def _norm_weight(norm: nn.Module) -> torch.Tensor | None:
    """The scale of a q/k-norm, None for the ``nn.Identity`` of a model without q/k-norm."""
    weight = getattr(norm, "weight", None)
    return None if weight is None else weight.detach()


def _fuse_expert(layer: LanceMoTDecoderLayer, gen: bool) -> FusedExpert:
    suffix = "_moe_gen" if gen else ""
    attn: LanceMoTAttention = layer.self_attn
    mlp = layer.mlp_moe_gen if gen else layer.mlp
    qkv_weight, qkv_bias = _fuse_linears([getattr(attn, f"{name}_proj{suffix}") for name in "qkv"])
    gate_up_weight, _ = _fuse_linears([mlp.gate_proj, mlp.up_proj])
    assert qkv_bias is not None, "Qwen2 q/k/v projections carry biases"
    return FusedExpert(
        input_norm=getattr(layer, f"input_layernorm{suffix}").weight.detach(),
        post_norm=getattr(layer, f"post_attention_layernorm{suffix}").weight.detach(),
        q_norm=_norm_weight(getattr(attn, f"q_norm{suffix}")),
        k_norm=_norm_weight(getattr(attn, f"k_norm{suffix}")),
        qkv_weight=qkv_weight,
        qkv_bias=qkv_bias,
        o_weight=getattr(attn, f"o_proj{suffix}").weight.detach(),
        gate_up_weight=gate_up_weight,
        down_weight=mlp.down_proj.weight.detach(),
    )


# --- Call layout ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepLayout:
    """The host-side structure of one ``mot`` call: what decides its kernels, and the key of its CUDA graph.

    Attributes:
        batch: B, batch entries (CFG branches).
        head, latent, tail: Lh, Lg, Lt rows of the three groups.
        past_rows: P, past rows present in the feed (valid or not).
        past: ``exact`` layout: valid past rows per batch entry, known on the host. None for the ``masked`` layout,
            whose valid lengths stay on the device (decode: one graph serves every length up to `capacity`).
        causal: causal among the block's rows (only recorded where it matters: blocks of more than one row).
    """

    batch: int
    head: int
    latent: int
    tail: int
    past_rows: int
    past: tuple[int, ...] | None
    causal: bool

    @property
    def und(self) -> int:
        """Lu: und rows per batch entry (head then tail)."""
        return self.head + self.tail

    @property
    def block(self) -> int:
        """Lq: the block's rows per batch entry."""
        return self.latent + self.und

    @property
    def masked(self) -> bool:
        return self.past is None

    @property
    def capacity(self) -> int:
        """Past rows of the K/V workspace: P, or in the masked layout the most that keeps ``block + capacity`` at
        the next multiple of `DECODE_CAPACITY_STEP` (an aligned key count: the masked attention's matmuls over
        769 keys took a slow unaligned kernel on an H100, 4x the time of 768)."""
        if self.past is not None:
            return self.past_rows
        step = DECODE_CAPACITY_STEP
        return max(1, -(-(self.past_rows + self.block) // step)) * step - self.block

    @property
    def needs_mask(self) -> bool:
        return self.masked or (self.causal and self.block > 1)

    @property
    def graph_key(self) -> tuple:
        """Calls with equal keys run the same kernels on same-shaped buffers (the masked layout keys on capacity)."""
        past = ("cap", self.capacity) if self.masked else ("past", self.past_rows, self.past)
        return self.batch, self.head, self.latent, self.tail, self.causal, past


def layout_of(feed: Mapping[str, torch.Tensor]) -> StepLayout:
    """The layout of a contract feed. Single-row text steps (AR decode) take the masked layout and need no host
    sync; every other call reads ``past_len`` (and ``causal``) on the host: a device sync where they live on a GPU."""
    batch, head = feed["und_head"].shape[:2]
    latent, tail = feed["latents"].shape[1], feed["und_tail"].shape[1]
    past_rows = feed["past_key"].shape[2]
    rows = head + latent + tail
    if rows == 1 and latent == 0:
        return StepLayout(batch, head, latent, tail, past_rows, None, causal=False)
    past = tuple(int(n) for n in feed["past_len"].tolist())
    if any(not 0 <= n <= past_rows for n in past):
        raise EngineError(f"engine 'mot': past_len {past} outside [0, {past_rows}]")
    causal = bool(feed["causal"]) and rows > 1
    return StepLayout(batch, head, latent, tail, past_rows, past, causal)


@dataclass
class KVWorkspace:
    """The K/V rows one call attends over, ``(layers, B, Lq + capacity, KVH, hd)`` each: the block's rows (gen, then
    und) followed by the past rows."""

    key: torch.Tensor
    value: torch.Tensor

    @classmethod
    def empty(cls, layout: StepLayout, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> "KVWorkspace":
        shape = (layers, layout.batch, layout.block + layout.capacity, kv_heads, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def load_past(self, layout: StepLayout, past_key: torch.Tensor, past_value: torch.Tensor) -> None:
        """Copy the feed's past rows ``(layers, B, P, KVH, hd)`` behind the block."""
        start = layout.block
        self.key[:, :, start:start + layout.past_rows].copy_(past_key)
        self.value[:, :, start:start + layout.past_rows].copy_(past_value)
        if layout.masked and layout.capacity > layout.past_rows:
            # Masked rows must hold finite values: 0 * NaN would survive the softmax's zero weight.
            self.value[:, :, start + layout.past_rows:].zero_()
            self.key[:, :, start + layout.past_rows:].zero_()

    def block_rows(self, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's key and value rows in sequence order (head, latents, tail), ``(layers, B, L, KVH, hd)``,
        as new tensors."""
        lg, lh, lq = layout.latent, layout.head, layout.block
        return tuple(torch.cat([t[:, :, lg:lg + lh], t[:, :, :lg], t[:, :, lg + lh:lq]], dim=2)
                     for t in (self.key, self.value))


def attention_mask(layout: StepLayout, past_len: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask over the workspace rows, `runtime.models.mot.attention_mask` in block-first order.

    Query and key rows of the block are ordered gen, head, tail; a query sees the past rows ``j < past_len[b]`` and
    the block rows at sequence positions ``<=`` its own (causal) or all of them. Built with device ops only, so it
    can be captured in a graph.

    Args:
        past_len: ``(B,)`` int64 valid past rows per batch entry.
    Returns:
        ``(B, 1, Lq, Lq + capacity)`` in ``dtype``: 0 where allowed, `MASK_VALUE` elsewhere.
    """
    device = past_len.device
    lh, lg, lt = layout.head, layout.latent, layout.tail
    position = torch.cat([torch.arange(lh, lh + lg, device=device), torch.arange(lh, device=device),
                          torch.arange(lh + lg, lh + lg + lt, device=device)])
    block_ok = position[None, :] <= position[:, None] if layout.causal else \
        torch.ones(layout.block, layout.block, dtype=torch.bool, device=device)
    past_ok = torch.arange(layout.capacity, device=device)[None, :] < past_len[:, None]
    allowed = torch.cat([block_ok[None].expand(layout.batch, -1, -1),
                         past_ok[:, None, :].expand(-1, layout.block, -1)], dim=-1)
    return torch.where(allowed, 0.0, MASK_VALUE).to(dtype)[:, None]


# --- The model ---------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """One expert's rows during a call: residual ``h``, its normalised rows, and where its rows sit in the block."""

    gen: bool
    rows: int                 # per batch entry
    start: int                # first block row in the workspace order
    h: torch.Tensor           # (B * rows, D)
    normed: torch.Tensor      # (B * rows, D)
    cos: torch.Tensor         # (B, rows, hd) fp32
    sin: torch.Tensor


class CudaMoT:
    """`LanceMoT.step` on re-packed weights, for CUDA (and CPU, for tests).

    Building it re-packs ``mot``'s q/k/v and gate/up projections into fused matrices and points the model's own
    parameters at slices of them: ``mot`` keeps computing the same function on the same storage (the eager reference
    and this path share the weights), and no projection is held twice.

    Args:
        mot: the loaded model (any device and float dtype; its weights are the compute dtype).
        compile: run the element-wise chains through ``torch.compile`` (CUDA only).
        sdpa_backends: SDPA backends allowed for the unmasked attention (None: PyTorch's choice).
        fp8_gen: run the gen expert's MLP (`FP8_GEN_PROJECTIONS`) as FP8 GEMMs (`Fp8Weight`: e4m3, a scale per
            weight row and per activation row; accumulation in fp32). The gen rows carry nearly all of a denoise
            step's FLOPs; the und expert (text, decode) and the gen attention projections stay in the compute dtype.
            Holds an FP8 copy of the gen MLP weights.
        fp8_fast_accum: with ``fp8_gen``, Hopper's fast FP8 accumulation (`scaled_linear`).
    """

    def __init__(self, mot: LanceMoT, *, compile: bool = False, sdpa_backends: Sequence[SDPBackend] | None = None,
                 fp8_gen: bool = False, fp8_fast_accum: bool = False) -> None:
        self.mot = mot
        self.config = config = mot.config
        self.dtype = mot.vae2llm.weight.dtype
        self.device = mot.vae2llm.weight.device
        self.eps = config.rms_norm_eps
        self.kernels = _Kernels.build(compile)
        self.sdpa_backends = list(sdpa_backends) if sdpa_backends else None
        stack = mot.language_model.model
        self.layers = [(_fuse_expert(layer, gen=False), _fuse_expert(layer, gen=True)) for layer in stack.layers]
        self.fp8_gen = False
        self.fp8_fast_accum = False
        if fp8_fast_accum and not fp8_gen:
            raise ValueError("fp8_fast_accum needs fp8_gen")
        if fp8_gen:
            self.layers = self.with_fp8_gen().layers
            self.fp8_gen, self.fp8_fast_accum = True, fp8_fast_accum
        self.final_norm = stack.norm.weight.detach()
        self.final_norm_gen = stack.norm_moe_gen.weight.detach()
        logger.info("CudaMoT: %d layers fused on %s (%s), compile=%s, fp8_gen=%s (fast accumulation %s)",
                    len(self.layers), self.device, self.dtype, compile, fp8_gen, fp8_fast_accum)

    def with_fp8_gen(self, fast_accum: bool = False, projections: Sequence[str] = FP8_GEN_PROJECTIONS) -> "CudaMoT":
        """A twin whose gen expert runs ``projections`` as FP8 GEMMs (with Hopper's fast accumulation if
        ``fast_accum``); it shares this model's und weights, norms and kernels, and its FP8 weights if it has them
        (a projection outside ``projections`` that is FP8 here is refused: there is no compute-dtype copy of it)."""
        unknown = set(projections) - set(FP8_PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown FP8 projections {sorted(unknown)}; choose from {', '.join(FP8_PROJECTIONS)}")
        twin = copy.copy(self)
        twin.layers = [(und, gen.quantized(projections)) for und, gen in self.layers]
        twin.fp8_gen = True
        twin.fp8_fast_accum = fast_accum
        return twin

    def set_compile(self, compile: bool) -> None:
        """Switch the element-wise chains between the plain and the compiled functions (graphs captured before keep
        the kernels they captured)."""
        self.kernels = _Kernels.build(compile)

    def new_workspace(self, layout: StepLayout) -> KVWorkspace:
        c = self.config
        return KVWorkspace.empty(layout, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype,
                                 self.device)

    # -- the step ---------------------------------------------------------------------------------------------------

    def forward(self, layout: StepLayout, inputs: Mapping[str, torch.Tensor],
                workspace: KVWorkspace) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on a workspace whose past rows are loaded; writes the block's K/V rows into it.

        Args:
            layout: the call's structure.
            inputs: the contract inputs but the past: ``und_head`` ``(B, Lh, D)``, ``latents`` ``(B, Lg, 48)``,
                ``timestep`` ``(B, Lg)`` fp32, ``latent_pos`` ``(Lg, D)``, ``und_tail`` ``(B, Lt, D)``, ``cos``/``sin``
                ``(B, L, hd)`` fp32, ``past_len`` ``(B,)`` int64 (read on the device by the masked layout only).
            workspace: `KVWorkspace` of ``layout``.
        Returns:
            logits ``(B, vocab)`` fp32 and velocity ``(B, Lg, 48)``, as `LanceMoT.step`.
        """
        batch, lh, lg = layout.batch, layout.head, layout.latent
        mot, kernels = self.mot, self.kernels
        cos, sin = inputs["cos"], inputs["sin"]
        groups = []
        if lg:
            h = mot.embed_latents(inputs["latents"], inputs["timestep"], inputs["latent_pos"]).to(self.dtype)
            groups.append(self._group(True, h, cos[:, lh:lh + lg], sin[:, lh:lh + lg], 0))
        if layout.und:
            h = torch.cat([inputs["und_head"], inputs["und_tail"]], dim=1)
            tail = slice(lh + lg, None)
            groups.append(self._group(False, h, torch.cat([cos[:, :lh], cos[:, tail]], dim=1),
                                      torch.cat([sin[:, :lh], sin[:, tail]], dim=1), lg))
        mask = attention_mask(layout, inputs["past_len"], self.dtype) if layout.needs_mask else None
        c = self.config
        query = torch.empty(batch, layout.block, c.num_attention_heads, c.head_dim, dtype=self.dtype,
                            device=self.device)
        last = len(self.layers) - 1
        for index, experts in enumerate(self.layers):
            key, value = workspace.key[index], workspace.value[index]
            for group in groups:
                expert = experts[group.gen]
                qkv = self._linear(group.normed, expert.qkv_weight, expert.qkv_bias)
                span = slice(group.start, group.start + group.rows)
                kernels.qk_norm_rope_(qkv.view(batch, group.rows, -1), group.cos, group.sin, expert.q_norm,
                                      expert.k_norm, self.eps, query[:, span], key[:, span], value[:, span])
            attended = self._attention(layout, query, key, value, mask)
            for group in groups:
                expert = experts[group.gen]
                delta = self._output_projection(attended, group, expert.o_weight)
                group.h, normed = kernels.add_rms_norm(group.h, delta, expert.post_norm, self.eps)
                mlp = self._mlp(normed, expert)
                if index < last:
                    next_norm = self.layers[index + 1][group.gen].input_norm
                else:
                    next_norm = self.final_norm_gen if group.gen else self.final_norm
                group.h, group.normed = kernels.add_rms_norm(group.h, mlp, next_norm, self.eps)
        return self._heads(layout, groups)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor | Fp8Weight,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias``; an `Fp8Weight` quantizes ``x`` per row first."""
        if isinstance(weight, Fp8Weight):
            return scaled_linear(*self.kernels.quantize_rows(x), weight, bias, x.dtype, self.fp8_fast_accum)
        return F.linear(x, weight, bias)

    def _mlp(self, normed: torch.Tensor, expert: FusedExpert) -> torch.Tensor:
        """SwiGLU MLP on fused gate/up; in FP8 the SwiGLU product is quantized in the same pass."""
        gate_up = self._linear(normed, expert.gate_up_weight)
        if isinstance(expert.down_weight, Fp8Weight):
            return scaled_linear(*self.kernels.silu_mul_quantize(gate_up), expert.down_weight, None, normed.dtype,
                                 self.fp8_fast_accum)
        return F.linear(self.kernels.silu_mul(gate_up), expert.down_weight)

    def _output_projection(self, attended: list[torch.Tensor], group: _Group,
                           weight: torch.Tensor | Fp8Weight) -> torch.Tensor:
        """``o_proj`` of a group's attention rows, per batch entry, into ``(B * rows, D)``."""
        delta = torch.empty_like(group.h).view(len(attended), group.rows, -1)
        for branch, out in enumerate(attended):
            rows = out[group.start:group.start + group.rows]
            if isinstance(weight, Fp8Weight):
                delta[branch] = self._linear(rows, weight)
            else:
                torch.mm(rows, weight.t(), out=delta[branch])
        return delta.view_as(group.h)

    def _group(self, gen: bool, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> _Group:
        batch, rows = h.shape[:2]
        h = h.reshape(batch * rows, -1)
        first = self.layers[0][gen].input_norm
        return _Group(gen, rows, start, h, self.kernels.rms_norm(h, first, self.eps), cos, sin)

    def _attention(self, layout: StepLayout, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Joint attention of the block's queries over the workspace rows of one layer.

        Args:
            query: ``(B, Lq, H, hd)``.
            key, value: ``(B, Lq + capacity, KVH, hd)``.
            mask: additive mask (`attention_mask`) for the masked cases, None for unmasked attention over each
                branch's ``Lq + past_b`` rows.
        Returns:
            per batch entry, ``(Lq, H * hd)``.
        """
        batch, rows = query.shape[:2]
        if mask is not None:
            return list(self.kernels.masked_attention(query, key, value, mask).unbind(0))
        assert layout.past is not None
        outputs: list[torch.Tensor] = []
        start = 0
        while start < batch:
            # Consecutive branches with equal past lengths share one call (B = 1, or CFG branches alike).
            stop = start + 1
            while stop < batch and layout.past[stop] == layout.past[start]:
                stop += 1
            keys = rows + layout.past[start]
            out = self._sdpa(query[start:stop], key[start:stop, :keys], value[start:stop, :keys])
            outputs.extend(out.unbind(0))
            start = stop
        return outputs

    def _sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Unmasked GQA attention: ``(n, Lq, H, hd)`` over ``(n, S, KVH, hd)`` -> ``(n, Lq, H * hd)``."""
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.sdpa_backends is None:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            with sdpa_kernel(self.sdpa_backends):
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)

    def _heads(self, layout: StepLayout, groups: list[_Group]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits of the block's last row (``norm`` and ``lm_head``) and the latent rows' velocity."""
        mot, batch = self.mot, layout.batch
        by_kind = {group.gen: group for group in groups}
        if layout.tail or not layout.latent:
            # The last row is und (a tail row, or the last head row): its final norm is already applied.
            und = by_kind[False]
            last = und.normed.view(batch, und.rows, -1)[:, -1]
        else:
            gen = by_kind[True]
            last = self.kernels.rms_norm(gen.h.view(batch, gen.rows, -1)[:, -1], self.final_norm, self.eps)
        logits = mot.language_model.lm_head(last).float()
        if layout.latent:
            gen = by_kind[True]
            velocity = mot.llm2vae(gen.normed).view(batch, gen.rows, -1)
        else:
            velocity = torch.empty(batch, 0, mot.llm2vae.out_features, dtype=self.dtype, device=self.device)
        return logits, velocity


# --- Runners -------------------------------------------------------------------------------------------------------

_STEP_INPUTS = ("und_head", "latents", "timestep", "latent_pos", "und_tail", "cos", "sin", "past_len")
"""Contract inputs `CudaMoT.forward` reads (the past goes into the workspace; ``causal`` is in the layout)."""


@dataclass
class _CapturedStep:
    """A CUDA graph of one call layout with the buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    workspace: KVWorkspace
    logits: torch.Tensor
    velocity: torch.Tensor


class CudaMotRunner:
    """`Runner` of the ``mot`` engine over a `CudaMoT`; outputs are new tensors the caller owns.

    On CUDA, every call layout (`StepLayout.graph_key`) is captured as a CUDA graph the first time it comes and
    replayed afterwards: the feed is copied into the graph's input buffers and its past rows into the graph's
    workspace, the graph replays, and the outputs are copied out. The first call runs on the runner's side stream as
    the capture's warm-up and returns that result, so no call is computed twice, and every result comes from the
    same kernels on the same buffers: a request's bytes do not depend on which layouts earlier requests left
    captured (served t2i requests that ran their first calls eagerly differed by up to 3/255 from those that
    replayed, measured on an H100). Graphs share one memory pool and replay on the caller's stream.

    A graph's key holds the prompt lengths, so a server meets new keys for as long as it runs: at most ``max_graphs``
    are kept, the least recently used one is dropped first (its memory returns to the shared pool, where the next
    capture reuses it), which bounds the memory the graphs hold.

    Args:
        spec: the ``mot`` contract (`runtime.spec.contract.engine_specs`).
        model: the fused model.
        graphs: capture CUDA graphs (ignored off CUDA).
        max_graphs: graphs kept (a t2i request uses 4: a prefill per CFG branch, the denoise query of both branches
            and of the conditional one alone).
    """

    host_inputs = ("past_len", "causal")
    """Read on the host to choose the layout; copied to the device (asynchronously) where the step reads them."""

    def __init__(self, spec: EngineSpec, model: CudaMoT, *, graphs: bool = True,
                 max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        self.spec = spec
        self.model = model
        self.graphs = graphs and model.device.type == "cuda"
        self.max_graphs = max_graphs
        self._captured: OrderedDict[tuple, _CapturedStep] = OrderedDict()
        self._graphs = GraphCapture(model.device) if self.graphs else None

    @property
    def num_graphs(self) -> int:
        return len(self._captured)

    def captured_graphs(self) -> list[torch.cuda.CUDAGraph]:
        """The captured graphs (benchmarks time their bare replays)."""
        return [captured.graph for captured in self._captured.values()]

    def clear(self) -> None:
        """Drop every captured graph and its buffers (the memory returns to PyTorch's cache)."""
        self._captured.clear()

    @torch.inference_mode()
    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        layout = layout_of(feed)
        key = layout.graph_key
        captured = self._captured.get(key)
        if captured is not None:
            self._captured.move_to_end(key)
            return self._replay(captured, layout, feed)
        if self.graphs:
            return self._capture(layout, feed)
        workspace = self.model.new_workspace(layout)
        workspace.load_past(layout, feed["past_key"], feed["past_value"])
        logits, velocity = self.model.forward(layout, inputs_on(self.model.device, feed, _STEP_INPUTS), workspace)
        return self._outputs(layout, logits, velocity, workspace)

    @staticmethod
    def _outputs(layout: StepLayout, logits: torch.Tensor, velocity: torch.Tensor,
                 workspace: KVWorkspace) -> dict[str, torch.Tensor]:
        key, value = workspace.block_rows(layout)
        return {"logits": logits, "velocity": velocity, "key": key, "value": value}

    def _capture(self, layout: StepLayout, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Warm up on the runner's side stream (this call's result), then capture the same call."""
        inputs = inputs_on(self.model.device, feed, _STEP_INPUTS, copy=True)
        workspace = self.model.new_workspace(layout)
        workspace.load_past(layout, feed["past_key"], feed["past_value"])
        (warm_logits, warm_velocity), graph, (logits, velocity) = self._graphs.capture(
            lambda: self.model.forward(layout, inputs, workspace))
        self._captured[layout.graph_key] = _CapturedStep(graph, inputs, workspace, logits, velocity)
        while len(self._captured) > self.max_graphs:
            self._captured.popitem(last=False)
        logger.debug("mot: captured a CUDA graph for %s (%d graphs)", layout.graph_key, len(self._captured))
        # The workspace holds the warm-up's block rows: capturing ran no kernel.
        return self._outputs(layout, warm_logits.clone(), warm_velocity.clone(), workspace)

    def _replay(self, captured: _CapturedStep, layout: StepLayout,
                feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        copy_inputs(captured.inputs, feed)
        captured.workspace.load_past(layout, feed["past_key"], feed["past_value"])
        captured.graph.replay()
        return self._outputs(layout, captured.logits.clone(), captured.velocity.clone(), captured.workspace)
