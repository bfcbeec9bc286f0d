"""x2t's greedy decoding on the device: several tokens per CUDA graph, no host synchronisation per token.

The pipeline's host loop (`LancePipeline.decode_text` through the ``mot`` contract) embeds each token, builds its
cos/sin, copies the past in, reads the argmax back and appends K/V: per token a device synchronisation and ~1.5 ms
of host work beside the graph. `GreedyLoop` keeps all of that on the device: the token is fed back on the GPU
(embedding gather, cos/sin gathered from the request's table, the new K/V row appended to the past in the
workspace, logits past the tokenizer masked, argmax), and `CHUNK` steps are captured into one graph, so the host
reads the tokens (and checks the stop token) once per chunk. The step is `CudaMoT.forward`'s masked single-row
layout, the one the host loop's graphs replay, so both loops compute the same tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from runtime.runners.cuda_kernels import GraphCapture
from runtime.runners.cuda_mot import CudaMoT, CudaMotRunner, KVWorkspace, StepLayout

MAX_LOOPS = 4
"""`GreedyLoop`s a `DecodingMotRunner` keeps, one per workspace capacity (least recently used dropped first)."""
CHUNK = 8
"""Decode steps per graph replay: the host checks the stop token (and cancellation) once per chunk; a request pays
for at most ``CHUNK - 1`` steps past its stop token."""


@dataclass
class _LoopState:
    """The device tensors a captured chunk reads and writes (its graph replays on exactly these)."""

    workspace: KVWorkspace
    inputs: dict[str, torch.Tensor]   # `CudaMoT.forward`'s inputs; ``past_len`` is the valid past, advanced per step
    token: torch.Tensor               # (1,) int64: the step's input token, then its argmax
    step: torch.Tensor                # (1,) int64: index into the cos/sin tables
    cos: torch.Tensor                 # (1, capacity, hd) fp32 per decode step
    sin: torch.Tensor
    tokens: torch.Tensor              # (CHUNK,) int64: the chunk's tokens


class GreedyLoop:
    """Greedy decoding of one sequence (batch 1) on a `CudaMoT`; one instance per workspace capacity, reused by the
    requests whose context and answer fit it (`DecodingMotRunner.greedy_loop`).

    Args:
        model: the fused model.
        layout: the masked single-row layout (`StepLayout`) whose capacity holds context + answer + one chunk.
        embed: ``(vocab, D)`` token embedding on the model's device.
        allowed: the logits kept (``len(tokenizer)``: the rest are masked, as the host loop does).
        graphs: capture the chunk as a CUDA graph (None: run it eagerly, as off CUDA).
    ``embed`` and ``allowed`` are part of the captured graph: a loop serves one pair of them.
    """

    def __init__(self, model: CudaMoT, layout: StepLayout, embed: torch.Tensor, allowed: int,
                 graphs: GraphCapture | None) -> None:
        self.model, self.layout, self.embed, self.allowed, self.graphs = model, layout, embed, allowed, graphs
        device, c = model.device, model.config
        long = dict(dtype=torch.int64, device=device)
        table = dict(dtype=torch.float32, device=device)
        self.state = _LoopState(
            workspace=model.new_workspace(layout),
            inputs={"und_head": torch.zeros(1, 1, c.hidden_size, dtype=model.dtype, device=device),
                    "latents": torch.zeros(1, 0, model.mot.llm2vae.out_features, dtype=model.dtype, device=device),
                    "timestep": torch.zeros(1, 0, **table), "latent_pos": torch.zeros(0, c.hidden_size, **table),
                    "und_tail": torch.zeros(1, 0, c.hidden_size, dtype=model.dtype, device=device),
                    "cos": torch.zeros(1, 1, c.head_dim, **table), "sin": torch.zeros(1, 1, c.head_dim, **table),
                    "past_len": torch.zeros(1, **long)},
            token=torch.zeros(1, **long), step=torch.zeros(1, **long),
            cos=torch.zeros(1, layout.capacity, c.head_dim, **table),
            sin=torch.zeros(1, layout.capacity, c.head_dim, **table),
            tokens=torch.zeros(CHUNK, **long))
        self._graph: torch.cuda.CUDAGraph | None = None

    @staticmethod
    def capacity_for(past: int, steps: int) -> int:
        """Past rows the workspace needs: the context, the answer and the overshoot of the last chunk."""
        return past + -(-steps // CHUNK) * CHUNK

    def start(self, past_key: torch.Tensor, past_value: torch.Tensor, token: int, cos: torch.Tensor,
              sin: torch.Tensor) -> None:
        """Load a request: its prefilled past ``(layers, 1, P, KVH, hd)``, the first input token and the cos/sin of
        its decode positions ``(1, steps, hd)``."""
        state, past = self.state, past_key.shape[2]
        if self.capacity_for(past, cos.shape[1]) > self.layout.capacity:
            raise ValueError(f"{past} past rows and {cos.shape[1]} steps exceed the loop's capacity "
                             f"{self.layout.capacity}")
        for buffer, rows in ((state.workspace.key, past_key), (state.workspace.value, past_value)):
            buffer.zero_()          # masked rows must be finite: 0 * NaN survives the softmax's zero weight
            buffer[:, :, 1:1 + past].copy_(rows)
        state.inputs["past_len"].fill_(past)
        state.token.fill_(token)
        state.step.zero_()
        for table, values in ((state.cos, cos), (state.sin, sin)):
            table.zero_()
            table[:, :values.shape[1]].copy_(values)

    def next_tokens(self) -> list[int]:
        """Run `CHUNK` steps; returns their tokens (the one host synchronisation of the chunk)."""
        if self._graph is not None:
            self._graph.replay()
        elif self.graphs is not None:
            _, self._graph, _ = self.graphs.capture(self._chunk)   # the warm-up computed this chunk
        else:
            self._chunk()
        return self.state.tokens.tolist()

    def _chunk(self) -> torch.Tensor:
        for index in range(CHUNK):
            self._step(index)
        return self.state.tokens

    def _step(self, index: int) -> None:
        """One token: the host loop's `CudaMoT.forward` call, with its feed built and its result consumed here."""
        state, workspace, inputs = self.state, self.state.workspace, self.state.inputs
        inputs["und_head"].copy_(self.embed.index_select(0, state.token).view(1, 1, -1))
        inputs["cos"].copy_(state.cos.index_select(1, state.step))
        inputs["sin"].copy_(state.sin.index_select(1, state.step))
        logits, _ = self.model.forward(self.layout, inputs, workspace)
        # The block's row (workspace row 0) joins the past: the host loop's `KVCache.append`.
        row = inputs["past_len"] + 1
        workspace.key.index_copy_(2, row, workspace.key[:, :, :1])
        workspace.value.index_copy_(2, row, workspace.value[:, :, :1])
        inputs["past_len"].add_(1)
        state.step.add_(1)
        logits[:, self.allowed:] = float("-inf")
        state.token.copy_(logits[0].argmax())
        state.tokens[index:index + 1].copy_(state.token)


class DecodingMotRunner(CudaMotRunner):
    """`CudaMotRunner` that also runs x2t's greedy loop on its device (`runtime.runners.DeviceDecoding`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loops: OrderedDict[int, GreedyLoop] = OrderedDict()

    def clear(self) -> None:
        super().clear()
        self._loops.clear()

    def greedy_loop(self, past: int, steps: int, embed: torch.Tensor, allowed: int) -> GreedyLoop:
        """A `GreedyLoop` with room for ``past`` context rows and ``steps`` decoded tokens, over the token embedding
        ``embed`` with ``allowed`` logits kept; loops (and their graphs) are kept per capacity and reused by later
        requests with the same embedding and bound."""
        layout = StepLayout(1, 1, 0, 0, GreedyLoop.capacity_for(past, steps), None, causal=False)
        loop = self._loops.get(layout.capacity)
        if loop is None or loop.embed is not embed or loop.allowed != allowed:
            loop = self._loops[layout.capacity] = GreedyLoop(self.model, layout, embed, allowed, self._graphs)
            while len(self._loops) > MAX_LOOPS:
                self._loops.popitem(last=False)
        self._loops.move_to_end(layout.capacity)
        return loop
