"""x2t's device-side greedy loop (`runtime.runners.cuda_decode`) against the pipeline's host loop over the same
`CudaMotRunner`: the same tokens for answers shorter than, equal to and longer than a chunk, the stop token cut
where the host loop stops, loops reused across requests, and graphs on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime.pipeline import LancePipeline
from runtime.runners import DeviceDecoding, Engines
from runtime.runners.cuda_decode import CHUNK, DecodingMotRunner
from runtime.runners.cuda_mot import CudaMoT, CudaMotRunner
from runtime.spec.request import GenerationRequest
from tests.test_pipeline import png_bytes


class HostLoopOnly:
    """The same runner seen through the ``mot`` contract only, so the pipeline takes its host loop."""

    def __init__(self, runner: CudaMotRunner) -> None:
        self.spec, self.host_inputs, self.infer = runner.spec, runner.host_inputs, runner.infer


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint, torch_pipeline) -> tuple[LancePipeline, LancePipeline]:
    from runtime.models.checkpoint import load_lance

    models = load_lance(tiny_checkpoint, device="cpu", dtype=torch.float32)
    reference = torch_pipeline.engines
    runner = DecodingMotRunner(reference.mot.spec, CudaMoT(models.mot))
    engines = dict(vit=reference.vit, vae_encode=reference.vae_encode, vae_decode=reference.vae_decode)
    device = LancePipeline(Engines(mot=runner, **engines), torch_pipeline.host)
    host = LancePipeline(Engines(mot=HostLoopOnly(runner), **engines), torch_pipeline.host)
    assert isinstance(device.engines.mot, DeviceDecoding) and not isinstance(host.engines.mot, DeviceDecoding)
    return device, host


def x2t(max_new_tokens: int, prompt: str = "What is in the image?") -> GenerationRequest:
    return GenerationRequest("x2t", prompt, image=png_bytes(), max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("max_new_tokens", [3, CHUNK, 2 * CHUNK + 5])
def test_device_loop_equals_host_loop(pipelines, max_new_tokens: int) -> None:
    device, host = pipelines
    expected = host.generate(x2t(max_new_tokens))
    assert len(expected.token_ids) == max_new_tokens        # random weights: no stop token this early
    result = device.generate(x2t(max_new_tokens))
    assert result.token_ids == expected.token_ids and result.text == expected.text


def test_loops_are_reused_and_restarted(pipelines) -> None:
    """A second request on the same capacity reuses the first one's loop from a clean start; another prompt on it
    decodes its own answer."""
    device, host = pipelines
    runner = device.engines.mot
    first = device.generate(x2t(10)).token_ids
    loops = dict(runner._loops)
    assert device.generate(x2t(10)).token_ids == first
    other = x2t(10, prompt="Describe the colours.")
    assert device.generate(other).token_ids == host.generate(other).token_ids
    assert dict(runner._loops) == loops


def test_stop_token_cuts_the_answer_where_the_host_loop_stops(pipelines) -> None:
    """With the stop token set to the answer's 4th new token, both loops return the tokens before it (the device loop
    computed the rest of the chunk and drops it)."""
    device, host = pipelines
    answer = host.generate(x2t(2 * CHUNK)).token_ids
    cut = next(i for i in range(3, len(answer)) if answer[i] not in answer[:i])
    special = dataclasses.replace(host.host.special, im_end=answer[cut])
    stopping = [LancePipeline(p.engines, dataclasses.replace(p.host, special=special)) for p in (device, host)]
    results = [p.generate(x2t(2 * CHUNK)).token_ids for p in stopping]
    assert results == [answer[:cut], answer[:cut]]


def test_progress_and_cancellation_per_chunk(pipelines) -> None:
    from runtime.spec.request import Cancelled

    device, _ = pipelines
    seen: list[tuple[int, int]] = []
    device.generate(x2t(CHUNK + 2), on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (CHUNK + 2, CHUNK + 2) and (CHUNK, CHUNK + 2) in seen
    done: list[int] = []
    with pytest.raises(Cancelled):       # cancelled once the first chunk is reported
        device.generate(x2t(3 * CHUNK), on_progress=lambda n, total: done.append(n), is_cancelled=lambda: bool(done))
    assert done == [CHUNK]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_loop_equals_host_loop_on_cuda(tiny_checkpoint) -> None:
    """The fast engines on a GPU (compiled kernels, the loop's chunks captured as graphs, replayed by the second
    request) against the host loop over the same runner's graphs."""
    device = LancePipeline.from_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    host = LancePipeline(Engines({**device.engines, "mot": HostLoopOnly(device.engines.mot)}), device.host,
                         device="cuda", dtype=torch.bfloat16)
    expected = host.generate(x2t(2 * CHUNK + 5)).token_ids
    assert device.generate(x2t(2 * CHUNK + 5)).token_ids == expected
    assert device.generate(x2t(2 * CHUNK + 5)).token_ids == expected
