"""The reference pipeline end to end on the tiny checkpoint: every task, determinism, progress, cancellation, CFG
batching, and the requests it refuses."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.spec.request import Cancelled, GenerationRequest, RequestError
from runtime.pipeline.sequence import cfg_text_branch, cond_branch, plan_t2i

SMALL = dict(height=256, width=256, steps=3)


def png_bytes(seed: int = 0, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_t2i_is_deterministic_and_seeded(torch_pipeline) -> None:
    request = GenerationRequest("t2i", "a red cube", **SMALL, seed=7)
    first = torch_pipeline.generate(request).image
    again = torch_pipeline.generate(request).image
    other = torch_pipeline.generate(GenerationRequest("t2i", "a red cube", **SMALL, seed=8)).image
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_t2i_non_square_size(torch_pipeline) -> None:
    image = torch_pipeline.generate(GenerationRequest("t2i", "a cat", height=256, width=384, steps=1)).image
    assert image.shape == (256, 384, 3)


def test_progress_counts_steps_and_timings(torch_pipeline) -> None:
    seen: list[tuple[int, int]] = []
    result = torch_pipeline.generate(GenerationRequest("t2i", "a red cube", **SMALL), on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert {"plan", "prefill", "denoise", "vae_decode"} <= set(result.timings)


def test_cancellation_stops_between_steps(torch_pipeline) -> None:
    seen: list[int] = []
    with pytest.raises(Cancelled):
        torch_pipeline.generate(GenerationRequest("t2i", "a red cube", **SMALL),
                                on_progress=lambda d, t: seen.append(d), is_cancelled=lambda: len(seen) >= 1)
    assert seen == [1]


def test_x2t_greedy_answer_is_deterministic(torch_pipeline) -> None:
    request = GenerationRequest("x2t", "What is in the image?", image=png_bytes(), max_new_tokens=8)
    first = torch_pipeline.generate(request)
    again = torch_pipeline.generate(request)
    assert first.token_ids == again.token_ids and first.text == again.text
    assert 0 < len(first.token_ids) <= 8 or first.token_ids == []
    assert all(t < torch_pipeline.host.special.len for t in first.token_ids)


def test_edit_takes_the_reference_bucket(torch_pipeline) -> None:
    # 320x240 is 4:3 landscape: the 4:3 bucket at area 256x256 is 224x304 (h x w; preprocess.bucket_table(256)).
    image = torch_pipeline.generate(GenerationRequest("edit", "make it blue", image=png_bytes(), **SMALL)).image
    assert image.shape == (224, 304, 3)
    again = torch_pipeline.generate(GenerationRequest("edit", "make it blue", image=png_bytes(), **SMALL)).image
    assert np.array_equal(image, again)


def test_batched_cfg_query_equals_separate_branches(torch_pipeline) -> None:
    """The denoise query stacks both CFG branches (rows batched, attention per branch): it must equal running the
    cond and cfg_text branches one at a time, as upstream does."""
    pipe = torch_pipeline
    plan = plan_t2i(pipe.host.tokenizer, "a red cube", 4, 6)
    branches = [cond_branch(plan), cfg_text_branch(plan)]
    cache = pipe.new_cache(max(b.context_length for b in branches), batch=2)
    for index, branch in enumerate(branches):
        pipe.prefill(branch.context, cache, index, vit_rows=None, ref_latent=None)
    noise = plan.splits[plan.noise_index]
    x = torch.randn(1, 24, 48, generator=torch.Generator().manual_seed(0))
    queries = [pipe.split_feed(noise, b.query_position_ids, None, x) for b in branches]
    batched = pipe.velocity(queries, x, 0.7, cache)
    for index, query in enumerate(queries):
        single_cache = pipe.new_cache(branches[index].context_length, batch=1)
        pipe.prefill(branches[index].context, single_cache, 0, vit_rows=None, ref_latent=None)
        single = pipe.velocity([query], x, 0.7, single_cache)
        torch.testing.assert_close(batched[index:index + 1], single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        (dict(task="t2i", prompt="x", height=250), "height"),
        (dict(task="t2i", prompt="x", width=2048), "width"),
        (dict(task="t2i", prompt="   "), "prompt"),
        (dict(task="t2i", prompt="x", steps=0), "steps"),
        (dict(task="edit", prompt="x"), "image"),
        (dict(task="x2t", prompt="x", image=b"not an image"), "image"),
        (dict(task="edit", prompt="x", image=png_bytes()[:100]), "image"),
        (dict(task="t2i", prompt="word " * 3000), "prompt"),
    ],
)
def test_bad_requests_are_refused(torch_pipeline, request_kwargs, field) -> None:
    with pytest.raises(RequestError) as err:
        torch_pipeline.generate(GenerationRequest(**request_kwargs))
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
    assert "<_io." not in str(err.value) and " object at 0x" not in str(err.value)   # the data, not the stream


def test_host_only_load_matches_the_full_load(tiny_checkpoint, torch_pipeline) -> None:
    """Runners whose engines hold the weights load only the host side; it must equal what the full load gives."""
    from runtime.pipeline import load_host

    host, specs = load_host(tiny_checkpoint)
    assert torch.equal(host.embed_weight, torch_pipeline.host.embed_weight)
    assert torch.equal(host.pos_table, torch_pipeline.host.pos_table)
    assert host.special == torch_pipeline.host.special and host.llm_config == torch_pipeline.host.llm_config
    assert {name: spec.digest() for name, spec in specs.items()} == {
        name: getattr(torch_pipeline.engines, name).spec.digest() for name in specs}


def test_pipeline_on_the_fast_mot_runner(tiny_checkpoint, torch_pipeline) -> None:
    """The pipeline over `CudaMotRunner` (its CPU path, fp32; the host inputs ``past_len`` and ``causal`` kept on the
    CPU): t2i (CFG, both branches batched) and x2t equal the reference runner's."""
    from runtime.models.checkpoint import load_lance
    from runtime.runners import Engines
    from runtime.runners.cuda_mot import CudaMoT, CudaMotRunner
    from runtime.pipeline import LancePipeline

    models = load_lance(tiny_checkpoint, device="cpu", dtype=torch.float32)
    reference = torch_pipeline.engines
    runner = CudaMotRunner(reference.mot.spec, CudaMoT(models.mot))
    fast = LancePipeline(Engines(mot=runner, vit=reference.vit, vae_encode=reference.vae_encode,
                                 vae_decode=reference.vae_decode), torch_pipeline.host)
    t2i = GenerationRequest("t2i", "a red cube", **SMALL, seed=3)
    image, expected = fast.generate(t2i).image, torch_pipeline.generate(t2i).image
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    x2t = GenerationRequest("x2t", "What is in the image?", image=png_bytes(), max_new_tokens=6)
    assert fast.generate(x2t).token_ids == torch_pipeline.generate(x2t).token_ids
