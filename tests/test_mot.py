"""runtime/models/mot.py against checkpoint_keys.json, transformers' Qwen3 and Qwen2.5-VL text models, a hand-routed
MoT reference and hand-computed tables.

* Text rows (und expert, q/k-norm before RoPE) against ``Qwen3ForCausalLM``: the same block (Qwen2 attention with
  biases, QK-norm, SwiGLU, untied head) with its own rotary, causal mask and cache. Its o_proj bias is zeroed.
* mRoPE against ``Qwen2_5_VLTextModel`` (Lance with ``qk_norm`` off): its rotary tables and hidden states on 3-row
  positions that differ per axis.
* MoT routing against `routed_reference`, written here in upstream's style (index scatters per row, one sequence
  at a time with its own valid past, no additive mask), and by swapping expert weights.

All in fp32 on seeded random weights at realistic scales.
"""

from __future__ import annotations

import importlib
import copy
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from runtime.models.mot import (
    LanceLLMConfig,
    LanceMoT,
    apply_rotary,
    latent_pos_table,
    mrope_cos_sin,
    timestep_embedding,
)
from tests.parity import checkpoint_keys, compare, randomize

hf_qwen3 = importlib.import_module("transformers.models.qwen3.modeling_qwen3")
hf_qwen3_cfg = importlib.import_module("transformers.models.qwen3.configuration_qwen3")
hf_vl = importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
hf_vl_cfg = importlib.import_module("transformers.models.qwen2_5_vl.configuration_qwen2_5_vl")

TOKENS = 151665          # ids drawn below the tokenizer length: every one is a real Qwen2.5 token
Z = 48


# --- Helpers -------------------------------------------------------------------------------------------------------


def make_model(config: LanceLLMConfig, seed: int = 0, attn: str = "eager") -> LanceMoT:
    model = LanceMoT(config, attn_implementation=attn).eval()
    randomize(model, seed)
    return model


def text_positions(batch: int, start: int, length: int) -> torch.Tensor:
    """(B, 3, L) int64: one position per row, equal on the three axes."""
    return (torch.arange(length) + start).expand(batch, 3, length).contiguous()


def image_block_positions(start: int, grid_h: int, grid_w: int, t: int = 0) -> torch.Tensor:
    """(3, 2 + h*w): <vs> at `start`, latent (i, j) at (start+1+t, start+1+i, start+1+j), <ve> after the block's max."""
    i, j = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    cells = torch.stack([torch.full_like(i, t), i, j]).reshape(3, -1) + start + 1
    end = cells.max() + 1
    return torch.cat([torch.full((3, 1), start), cells, torch.full((3, 1), int(end))], dim=1)


def rope(config: LanceLLMConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mrope_cos_sin(positions, config.head_dim, config.rope_theta, config.mrope_section)


def empty(batch: int, rows: int, width: int) -> torch.Tensor:
    return torch.zeros(batch, rows, width)


def step_args(model: LanceMoT, *, positions: torch.Tensor, head: torch.Tensor | None = None,
              latents: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
              latent_pos: torch.Tensor | None = None, tail: torch.Tensor | None = None,
              past: tuple[torch.Tensor, torch.Tensor] | None = None, past_len: list[int] | None = None,
              causal: bool = True) -> tuple[torch.Tensor, ...]:
    """`LanceMoT.step`'s positional arguments, absent groups as zero-row tensors and an absent past as P = 0."""
    c = model.config
    batch, d = positions.shape[0], c.hidden_size
    head = empty(batch, 0, d) if head is None else head
    tail = empty(batch, 0, d) if tail is None else tail
    latents = empty(batch, 0, Z) if latents is None else latents
    timestep = torch.zeros(batch, latents.shape[1]) if timestep is None else timestep
    latent_pos = torch.zeros(latents.shape[1], d) if latent_pos is None else latent_pos
    if past is None:
        shape = (c.num_hidden_layers, batch, 0, c.num_key_value_heads, c.head_dim)
        past = (torch.zeros(shape), torch.zeros(shape))
    past_len_t = torch.tensor(past_len if past_len is not None else [past[0].shape[2]] * batch)
    cos, sin = rope(c, positions)
    return head, latents, timestep, latent_pos, tail, cos, sin, past[0], past[1], past_len_t, torch.tensor(causal)


def run(model: LanceMoT, layers_only: bool = False, **inputs):
    """`LanceMoT.step` (or `forward_layers`) on `step_args`."""
    with torch.no_grad():
        return (model.forward_layers if layers_only else model.step)(*step_args(model, **inputs))


def swap_experts(model: LanceMoT, to_gen: bool) -> LanceMoT:
    """A copy whose und weights are the gen weights (``to_gen``) or whose gen weights are the und weights."""
    swapped = copy.deepcopy(model)
    state = swapped.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if "_moe_gen" in name:
                und = name.replace("_moe_gen", "")
                source, target = (tensor, state[und]) if to_gen else (state[und], tensor)
                target.copy_(source)
    return swapped


@pytest.fixture(scope="module")
def tiny() -> LanceMoT:
    return make_model(LanceLLMConfig.tiny(), seed=0)


# --- Config and checkpoint keys ------------------------------------------------------------------------------------


def test_full_config_matches_checkpoint_keys() -> None:
    expected = checkpoint_keys()["Lance_3B/model.safetensors"]
    with torch.device("meta"):
        model = LanceMoT()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == 1021
    config = model.config
    assert (config.head_dim, config.tokens_per_second, config.spatial_merge_size) == (128, 2, 2)


def test_video_table_size_is_read_from_rows() -> None:
    config = LanceLLMConfig().with_latent_table_rows(126976)
    assert config.max_latent_frames == 31 and config.latent_table_rows == 126976
    with torch.device("meta"):
        model = LanceMoT(config)
    assert tuple(model.state_dict()["latent_pos_embed.pos_embed"].shape) == (126976, 2048)
    assert LanceLLMConfig().with_latent_table_rows(4096) == LanceLLMConfig()
    with pytest.raises(ValueError, match="multiple"):
        LanceLLMConfig().with_latent_table_rows(5000)


def test_tiny_config_keeps_tree() -> None:
    with torch.device("meta"):
        full, small = LanceMoT(), LanceMoT(LanceLLMConfig.tiny())
    def tree(model: LanceMoT) -> set[str]:
        return {re.sub(r"layers\.\d+\.", "layers.N.", key) for key in model.state_dict()}

    assert tree(full) == tree(small)
    assert small.config.head_dim == 16 and small.config.vocab_size == 151936


def test_config_json_round_trip(tmp_path: Path) -> None:
    config = LanceLLMConfig.tiny()
    values = config.to_dict()
    assert values["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert values["model_type"] == "qwen2_5_vl" and values["vision_config"]["tokens_per_second"] == 2
    assert "qk_norm" not in values and "max_latent_frames" not in values
    path = tmp_path / "llm_config.json"
    path.write_text(json.dumps(values))
    assert LanceLLMConfig.from_json(path) == config
    assert LanceLLMConfig.from_json(path, qk_norm=False, max_latent_frames=31) == replace(
        config, qk_norm=False, max_latent_frames=31)
    # A transformers-5 style file: rope_parameters instead of rope_scaling, theta inside it.
    values.pop("rope_scaling")
    values.pop("rope_theta")
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3]}
    assert LanceLLMConfig.from_dict(values) == replace(config, rope_theta=5e5)
    assert LanceLLMConfig.from_dict(LanceLLMConfig().to_dict()) == LanceLLMConfig()


@pytest.mark.parametrize("bad", [
    {"mrope_section": (2, 3, 4)},
    {"num_key_value_heads": 3},
    {"hidden_act": "gelu"},
    {"vocab_size": 1000},                                   # special ids fall outside
    {"max_latent_frames": 0},
    {"vision_config": {"spatial_merge_size": 2}},           # no tokens_per_second
])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        replace(LanceLLMConfig.tiny(), **bad)


def test_config_rejects_other_rope() -> None:
    values = LanceLLMConfig.tiny().to_dict()
    values["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="mRoPE"):
        LanceLLMConfig.from_dict(values)


def test_bad_attention_implementation() -> None:
    with pytest.raises(ValueError, match="attn_implementation"):
        LanceMoT(LanceLLMConfig.tiny(), attn_implementation="flash")


# --- Hand-checked tables -------------------------------------------------------------------------------------------


def test_timestep_embedding_by_formula() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    ours = timestep_embedding(t)
    assert ours.shape == (3, 256) and ours.dtype == torch.float32
    for row, tv in zip(ours, t.tolist()):
        args = [tv * math.exp(-math.log(10000.0) * k / 128) for k in range(128)]
        expected = torch.tensor([math.cos(a) for a in args] + [math.sin(a) for a in args])
        torch.testing.assert_close(row, expected.float(), atol=1e-6, rtol=0)
    assert torch.equal(ours[0], torch.cat([torch.ones(128), torch.zeros(128)]))   # cos first


def _sincos(pos: int, dim: int) -> list[float]:
    half = dim // 2
    omegas = [1.0 / 10000.0 ** (k / half) for k in range(half)]
    return [math.sin(pos * w) for w in omegas] + [math.cos(pos * w) for w in omegas]


def test_latent_pos_table_by_formula() -> None:
    table = latent_pos_table(3, 64, 2048)
    assert table.shape == (3 * 4096, 2048) and table.dtype == torch.float32
    for t, h, w in [(0, 0, 0), (0, 5, 63), (1, 17, 3), (2, 63, 62)]:
        expected = torch.tensor(_sincos(t, 682) + _sincos(h, 682) + _sincos(w, 684))
        torch.testing.assert_close(table[t * 4096 + h * 64 + w], expected.float(), atol=1e-6, rtol=0)
    zero = torch.cat([torch.zeros(341), torch.ones(341)])
    assert torch.equal(table[0, :682], zero)                               # t = 0: [0]*341 + [1]*341
    assert torch.equal(table[4096, 682:1364], zero)                        # h part starts at 682
    assert torch.equal(table[4096, 1364:], torch.cat([torch.zeros(342), torch.ones(342)]))   # w part: 684
    # Rows of frame 0 do not depend on the frame count (the image and video tables agree there).
    assert torch.equal(latent_pos_table(1, 64, 2048), table[:4096])


def test_position_table_is_regenerated_on_load(tiny: LanceMoT) -> None:
    model = LanceMoT(LanceLLMConfig.tiny())
    formula = latent_pos_table(1, 64, 64)
    assert torch.equal(model.latent_pos_embed.pos_embed, formula)
    state = {k: torch.randn_like(v) for k, v in tiny.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.latent_pos_embed.pos_embed, formula)
    assert torch.equal(model.vae2llm.weight, state["vae2llm.weight"])
    state["latent_pos_embed.pos_embed"] = torch.randn(2 * 4096, 64)
    with pytest.raises(RuntimeError, match="pos_embed"):
        model.load_state_dict(state, strict=True)
    ids = torch.tensor([0, 64 * 3 + 5, 4095])
    assert torch.equal(tiny.latent_pos_embed(ids), formula[ids])
    # Built on the meta device and loaded with assign=True: computed at load, in the checkpoint's dtype.
    with torch.device("meta"):
        model = LanceMoT(LanceLLMConfig.tiny())
    model.load_state_dict({k: v.bfloat16() for k, v in tiny.state_dict().items()}, strict=True, assign=True)
    assert torch.equal(model.latent_pos_embed.pos_embed, formula.bfloat16())


def test_mrope_merge_is_upstreams_section_split() -> None:
    """Upstream: cos of each axis over the full head dim, split into mrope_section * 2 chunks, chunk i from axis
    i % 3 (``apply_multimodal_rotary_pos_emb``)."""
    config = LanceLLMConfig()
    positions = torch.randint(0, 3000, (2, 3, 9), generator=torch.Generator().manual_seed(11))
    ours_cos, ours_sin = rope(config, positions)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, 128, 2).float() / 128))
    freqs = positions.float().permute(1, 0, 2)[..., None] * inv_freq           # (3, B, L, 64)
    emb = torch.cat([freqs, freqs], dim=-1)
    chunks = list(config.mrope_section) * 2
    for ours, ref in ((ours_cos, emb.cos()), (ours_sin, emb.sin())):
        expected = torch.cat([m[i % 3] for i, m in enumerate(ref.split(chunks, dim=-1))], dim=-1)
        compare("mrope vs upstream split", ours, expected, tol=1e-6)
    # Equal rows: ordinary 1-D RoPE.
    cos_1d, _ = rope(config, text_positions(1, 0, 5))
    angles = torch.arange(5).float()[:, None] * inv_freq
    torch.testing.assert_close(cos_1d[0], torch.cat([angles, angles], -1).cos(), atol=1e-6, rtol=0)


# --- Text rows vs transformers' Qwen3 ------------------------------------------------------------------------------


def qwen3_reference(model: LanceMoT) -> torch.nn.Module:
    """Qwen3ForCausalLM with the und expert's weights and a zero o_proj bias."""
    c = model.config
    ref_config = hf_qwen3_cfg.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attention_bias=True,
        tie_word_embeddings=False, max_position_embeddings=4096)
    ref_config._attn_implementation = "eager"
    ref = hf_qwen3.Qwen3ForCausalLM(ref_config).eval()
    state = {k.removeprefix("language_model."): v for k, v in model.state_dict().items()
             if k.startswith("language_model.") and "_moe_gen" not in k}
    for i in range(c.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(c.hidden_size)
    ref.load_state_dict(state, strict=True)
    return ref


def test_text_prefill_matches_qwen3(tiny: LanceMoT) -> None:
    ref = qwen3_reference(tiny)
    ids = torch.randint(0, TOKENS, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    rows, key, value = run(tiny, positions=text_positions(2, 0, 13), head=tiny.embed_tokens(ids), layers_only=True)
    model = tiny.language_model
    compare("qwen3 prefill logits (all rows)", model.lm_head(model.model.norm(rows[0])), expected)
    logits, velocity, key2, _ = run(tiny, positions=text_positions(2, 0, 13), head=tiny.embed_tokens(ids))
    compare("qwen3 prefill logits (step, last row)", logits, expected[:, -1])
    assert velocity.shape == (2, 0, Z) and torch.equal(key, key2)


def test_incremental_decode_matches_qwen3_full_forward(tiny: LanceMoT) -> None:
    """Prefill 7 rows, a causal chunk of 3 against the cache, then 1-row decodes. The cache buffer is larger than
    needed and full of garbage past the valid rows: masking must hide it."""
    c = tiny.config
    ref = qwen3_reference(tiny)
    ids = torch.randint(0, TOKENS, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ref(ids, use_cache=True)
    capacity = 20
    shape = (c.num_hidden_layers, 1, capacity, c.num_key_value_heads, c.head_dim)
    cache_k, cache_v = 50 * torch.randn(shape), 50 * torch.randn(shape)
    past_len = 0
    for start, stop in [(0, 7), (7, 10), (10, 11), (11, 12), (12, 13), (13, 14)]:
        logits, _, key, value = run(tiny, positions=text_positions(1, start, stop - start),
                                    head=tiny.embed_tokens(ids[:, start:stop]), past=(cache_k, cache_v),
                                    past_len=[past_len], causal=True)
        compare(f"qwen3 logits at row {stop - 1} (past {past_len})", logits, out.logits[:, stop - 1])
        cache_k[:, :, start:stop], cache_v[:, :, start:stop] = key, value
        past_len = stop
    cache = getattr(out, "cache", None) or out.past_key_values      # renamed in transformers 5.x
    for i, layer in enumerate(cache.layers):
        compare(f"qwen3 cache keys layer {i}", cache_k[i, :, :14], layer.keys.transpose(1, 2))
        compare(f"qwen3 cache values layer {i}", cache_v[i, :, :14], layer.values.transpose(1, 2))


# --- mRoPE vs transformers' Qwen2.5-VL text model ------------------------------------------------------------------


def test_mrope_matches_qwen25_vl_text_model() -> None:
    config = replace(LanceLLMConfig.tiny(), qk_norm=False)
    model = make_model(config, seed=3)
    ref_config = hf_vl_cfg.Qwen2_5_VLTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta,
                         "mrope_section": list(config.mrope_section)})
    ref_config._attn_implementation = "eager"
    ref = hf_vl.Qwen2_5_VLTextModel(ref_config).eval()
    state = {k.removeprefix("language_model.model."): v for k, v in model.state_dict().items()
             if k.startswith("language_model.model.") and "_moe_gen" not in k}
    ref.load_state_dict(state, strict=True)

    # Text, an image block (3 x 4 cells, t = 0), text; a second sequence with a later block at t = 2.
    positions = torch.stack([
        torch.cat([text_positions(1, 0, 4)[0], image_block_positions(4, 3, 4), text_positions(1, 10, 2)[0]], 1),
        torch.cat([text_positions(1, 0, 2)[0], image_block_positions(2, 4, 3, t=2), text_positions(1, 9, 4)[0]], 1),
    ])
    assert not torch.equal(positions[:, 0], positions[:, 1])
    embeds = torch.randn(2, positions.shape[-1], config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_cos, ref_sin = ref.rotary_emb(embeds, positions.transpose(0, 1))
        expected = ref(inputs_embeds=embeds, position_ids=positions.transpose(0, 1)).last_hidden_state
    cos, sin = rope(config, positions)
    compare("mrope cos vs Qwen2.5-VL", cos, ref_cos, tol=1e-6)
    compare("mrope sin vs Qwen2.5-VL", sin, ref_sin, tol=1e-6)
    rows, _, _ = run(model, positions=positions, head=embeds, layers_only=True)
    compare("Qwen2.5-VL hidden states", model.language_model.model.norm(rows[0]), expected)


# --- MoT routing ---------------------------------------------------------------------------------------------------


def routed_reference(model: LanceMoT, x: torch.Tensor, gen: slice, cos: torch.Tensor, sin: torch.Tensor,
                     past_key: torch.Tensor, past_value: torch.Tensor, past_len: list[int], causal: bool):
    """Upstream's gen-mode forward, one sequence at a time: und/gen weights by index scatter, attention over exactly
    the valid past rows plus the block (flash-attn varlen semantics, bottom-right causal).

    Args: x ``(B, L, D)`` embedded rows with the latent rows at ``gen``; cos, sin ``(B, L, hd)``; past
    ``(layers, B, P, kvh, hd)``. Returns last-layer hidden ``(B, L, D)`` (before final norms) and K/V rows.
    """
    c = model.config
    heads, kv_heads, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    batch, length, _ = x.shape
    gen_idx = torch.arange(length)[gen]
    und_idx = torch.tensor([i for i in range(length) if i not in set(gen_idx.tolist())], dtype=torch.long)

    def routed(und, gen_fn, inp):
        out = torch.zeros(und(inp).shape)
        out[und_idx] = und(inp[und_idx])
        out[gen_idx] = gen_fn(inp[gen_idx])
        return out

    hidden, keys, values = [], [], []
    for b in range(batch):
        h = x[b]
        ks, vs = [], []
        for i, layer in enumerate(model.language_model.model.layers):
            a = layer.self_attn
            n = routed(layer.input_layernorm, layer.input_layernorm_moe_gen, h)
            q = routed(a.q_proj, a.q_proj_moe_gen, n).view(length, heads, hd)
            k = routed(a.k_proj, a.k_proj_moe_gen, n).view(length, kv_heads, hd)
            v = routed(a.v_proj, a.v_proj_moe_gen, n).view(length, kv_heads, hd)
            q, k = routed(a.q_norm, a.q_norm_moe_gen, q), routed(a.k_norm, a.k_norm_moe_gen, k)
            q, k = hf_qwen3.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 cos[b][None], sin[b][None])
            ks.append(k[0].transpose(0, 1))
            vs.append(v)
            k_all = torch.cat([past_key[i, b, :past_len[b]].transpose(0, 1)[None], k], dim=2)
            v_all = torch.cat([past_value[i, b, :past_len[b]].transpose(0, 1)[None], v.transpose(0, 1)[None]], 2)
            k_all = hf_qwen3.repeat_kv(k_all, heads // kv_heads)
            v_all = hf_qwen3.repeat_kv(v_all, heads // kv_heads)
            scores = q @ k_all.transpose(-1, -2) / math.sqrt(hd)
            if causal:
                blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
                scores[..., past_len[b]:] = scores[..., past_len[b]:].masked_fill(blocked, float("-inf"))
            o = (scores.softmax(-1) @ v_all)[0].transpose(0, 1).reshape(length, heads * hd)
            h = h + routed(a.o_proj, a.o_proj_moe_gen, o)
            n = routed(layer.post_attention_layernorm, layer.post_attention_layernorm_moe_gen, h)
            h = h + routed(layer.mlp, layer.mlp_moe_gen, n)
        hidden.append(h)
        keys.append(torch.stack(ks))
        values.append(torch.stack(vs))
    return torch.stack(hidden), torch.stack(keys, 1), torch.stack(values, 1)


def gen_call_inputs(model: LanceMoT, batch: int, n_head: int, n_latent: int, n_tail: int, past_lens: list[int],
                    seed: int) -> dict:
    """Random und rows, latents, timesteps and positions of an image block after a past of ``past_lens`` rows; the
    past buffer holds valid rows, then garbage up to the longest past."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    d, p = c.hidden_size, max(past_lens)
    shape = (c.num_hidden_layers, batch, p, c.num_key_value_heads, c.head_dim)
    positions = torch.stack([
        torch.cat([text_positions(1, n, n_head)[0], (torch.randint(0, 40, (3, n_latent), generator=g) + n + n_head),
                   text_positions(1, n + n_head + 40, n_tail)[0]], dim=1) for n in past_lens])
    return dict(
        positions=positions,
        head=torch.randn(batch, n_head, d, generator=g),
        latents=torch.randn(batch, n_latent, Z, generator=g),
        timestep=torch.rand(batch, n_latent, generator=g),
        latent_pos=latent_pos_table(1, 64, d)[torch.randint(0, 4096, (n_latent,), generator=g)],
        tail=torch.randn(batch, n_tail, d, generator=g),
        past=(torch.randn(shape, generator=g), torch.randn(shape, generator=g)),
        past_len=past_lens,
    )


@pytest.mark.parametrize("groups,causal", [
    ((1, 12, 1), False),     # denoise query / VAE-reference prefill: <vs> latents <ve>
    ((3, 5, 2), True),       # every group, causal
    ((0, 7, 0), False),      # latents only
    ((4, 0, 3), True),       # no latents: und rows split between head and tail
])
def test_routing_matches_hand_routed_reference(tiny: LanceMoT, groups: tuple[int, int, int], causal: bool) -> None:
    n_head, n_latent, n_tail = groups
    inputs = gen_call_inputs(tiny, 2, n_head, n_latent, n_tail, past_lens=[6, 3], seed=5)
    logits, velocity, key, value = run(tiny, causal=causal, **inputs)
    rows, key2, value2 = run(tiny, causal=causal, layers_only=True, **inputs)
    embedded = tiny.embed_latents(inputs["latents"], inputs["timestep"], inputs["latent_pos"])
    x = torch.cat([inputs["head"], embedded, inputs["tail"]], dim=1)
    cos, sin = rope(tiny.config, inputs["positions"])
    with torch.no_grad():
        hidden, ref_key, ref_value = routed_reference(tiny, x, slice(n_head, n_head + n_latent), cos, sin,
                                                      *inputs["past"], inputs["past_len"], causal)
        model = tiny.language_model
        ref_logits = model.lm_head(model.model.norm(hidden[:, -1]))
        ref_velocity = tiny.llm2vae(model.model.norm_moe_gen(hidden[:, n_head:n_head + n_latent]))
    tag = f"routing {groups} causal={causal}"
    compare(f"{tag} hidden", torch.cat(rows, dim=1), hidden)
    compare(f"{tag} key", key, ref_key)
    compare(f"{tag} value", value, ref_value)
    compare(f"{tag} logits", logits, ref_logits)
    if n_latent:
        compare(f"{tag} velocity", velocity, ref_velocity)
    assert velocity.shape == (2, n_latent, Z) and torch.equal(key, key2) and torch.equal(value, value2)


@pytest.mark.parametrize("to_gen", [True, False])
def test_expert_swap(tiny: LanceMoT, to_gen: bool) -> None:
    """Latent rows equal und rows of a copy whose und weights are the gen weights (``to_gen``), and und rows equal
    latent rows of a copy whose gen weights are the und weights. The context is all in the past, so the rows
    attend to the same keys in both runs."""
    inputs = gen_call_inputs(tiny, 1, 0, 9, 0, past_lens=[5], seed=6)
    embedded = tiny.embed_latents(inputs["latents"], inputs["timestep"], inputs["latent_pos"])
    as_und_inputs = {**inputs, "head": embedded, "latents": None, "timestep": None, "latent_pos": None}
    gen_rows, gen_key, gen_value = run(tiny, causal=False, layers_only=True, **inputs)
    und_rows, und_key, und_value = run(tiny, causal=False, layers_only=True, **as_und_inputs)
    # The experts really differ.
    assert (gen_rows[1] - und_rows[0]).abs().max() > 1e-2
    swapped = swap_experts(tiny, to_gen)
    if to_gen:
        rows, key, value = run(swapped, causal=False, layers_only=True, **as_und_inputs)
        ours, expected = (rows[0], key, value), (gen_rows[1], gen_key, gen_value)
    else:
        rows, key, value = run(swapped, causal=False, layers_only=True, **inputs)
        ours, expected = (rows[1], key, value), (und_rows[0], und_key, und_value)
    for name, a, b in zip(("rows", "key", "value"), ours, expected):
        compare(f"expert swap to_gen={to_gen} {name}", a, b)


def test_zero_row_groups_change_nothing(tiny: LanceMoT) -> None:
    x = torch.randn(2, 6, tiny.config.hidden_size, generator=torch.Generator().manual_seed(7))
    positions = text_positions(2, 0, 6)
    whole = run(tiny, positions=positions, head=x)
    for cut in (0, 2, 6):
        split = run(tiny, positions=positions, head=x[:, :cut], tail=x[:, cut:])
        for name, a, b in zip(("logits", "velocity", "key", "value"), split, whole):
            assert a.shape == b.shape
            if a.numel():
                compare(f"zero-row groups cut={cut} {name}", a, b, tol=1e-6)


def test_batch_with_different_past_equals_single_runs(tiny: LanceMoT) -> None:
    inputs = gen_call_inputs(tiny, 2, 1, 10, 1, past_lens=[8, 3], seed=8)
    batched = run(tiny, causal=False, **inputs)
    for b, n in enumerate(inputs["past_len"]):
        single = {k: v[b:b + 1] for k, v in inputs.items() if k in ("positions", "head", "latents", "timestep", "tail")}
        single |= {"latent_pos": inputs["latent_pos"], "past_len": [n],
                   "past": tuple(p[:, b:b + 1, :n] for p in inputs["past"])}
        alone = run(tiny, causal=False, **single)
        for name, a, s in zip(("logits", "velocity", "key", "value"), batched, alone):
            compare(f"batch entry {b} (past {n}) {name}", a[:, b:b + 1] if a.dim() == 5 else a[b:b + 1], s)


def test_step_does_not_write_inputs(tiny: LanceMoT) -> None:
    inputs = gen_call_inputs(tiny, 2, 1, 4, 1, past_lens=[4, 2], seed=9)
    tensors = [inputs[k] for k in ("head", "latents", "timestep", "latent_pos", "tail")] + list(inputs["past"])
    before = [t.clone() for t in tensors]
    run(tiny, causal=False, **inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))


def test_sdpa_matches_eager(tiny: LanceMoT) -> None:
    sdpa = LanceMoT(tiny.config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(tiny.state_dict())
    for causal in (False, True):
        inputs = gen_call_inputs(tiny, 2, 2, 6, 1, past_lens=[5, 2], seed=10)
        for name, a, b in zip(("logits", "velocity", "key", "value"), run(sdpa, causal=causal, **inputs),
                              run(tiny, causal=causal, **inputs)):
            compare(f"sdpa vs eager causal={causal} {name}", a, b, tol=1e-5)


def test_rotary_is_rotate_half() -> None:
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16)
    angle = torch.rand(1, 3, 8) * 6
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    rq, rk = apply_rotary(q, k, cos, sin)
    # Pair (i, i + 8) rotates by angle i: a 2-D rotation, so norms per pair are kept.
    x1, x2 = q[..., :8], q[..., 8:]
    c, s = angle.cos()[:, :, None], angle.sin()[:, :, None]
    torch.testing.assert_close(rq, torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1))
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))


# --- ONNX export ---------------------------------------------------------------------------------------------------


def test_onnx_export_opset20(tmp_path: Path) -> None:
    """The eager step (the graph export ships; SDPA is the PyTorch runner's path, equal to it above) exports with
    the dynamo exporter at opset 20 with decomposed attention and norms and no scatter, and ONNX Runtime runs it
    over every call shape: prefill, decode, gen blocks, zero-row groups, P = 0."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = make_model(replace(LanceLLMConfig.tiny(), num_hidden_layers=1), seed=12)
    names = ("und_head", "latents", "timestep", "latent_pos", "und_tail", "cos", "sin", "past_key", "past_value",
             "past_len", "causal")
    dyn = torch.export.Dim.DYNAMIC
    axes = {"und_head": {0: dyn, 1: dyn}, "latents": {0: dyn, 1: dyn}, "timestep": {0: dyn, 1: dyn},
            "latent_pos": {0: dyn}, "und_tail": {0: dyn, 1: dyn}, "cos": {0: dyn, 1: dyn}, "sin": {0: dyn, 1: dyn},
            "past_key": {1: dyn, 2: dyn}, "past_value": {1: dyn, 2: dyn}, "past_len": {0: dyn}, "causal": None}
    # Sizes >= 2 everywhere: the exporter would specialise a 0 or 1.
    sample = step_args(model, **gen_call_inputs(model, 2, 3, 4, 2, past_lens=[5, 3], seed=13))
    with torch.no_grad():
        program = torch.onnx.export(model, sample, dynamo=True, opset_version=20, dynamic_shapes=axes,
                                    output_names=["logits", "velocity", "key", "value"])
    path = tmp_path / "mot.onnx"
    program.save(str(path))
    graph = onnx.load(str(path))
    ops = {node.op_type for node in graph.graph.node}
    assert {(o.domain or "ai.onnx") for o in graph.opset_import} == {"ai.onnx"}
    assert max(o.version for o in graph.opset_import) <= 20
    assert not ops & {"Attention", "RMSNormalization", "ScatterND", "ScatterElements", "NonZero", "TensorScatter"}
    assert {"Softmax", "MatMul", "ReduceMean"} <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(names)
    calls = [((5, 0, 0), [0], True), ((1, 0, 0), [7], True), ((1, 6, 1), [4, 2], False), ((0, 3, 0), [1, 1], False),
             ((2, 0, 2), [3], True)]
    for (n_head, n_latent, n_tail), past_lens, causal in calls:
        inputs = gen_call_inputs(model, len(past_lens), n_head, n_latent, n_tail, past_lens, seed=14)
        args = step_args(model, causal=causal, **inputs)
        with torch.no_grad():
            expected = model.step(*args)
        outputs = session.run(None, {name: arg.numpy() for name, arg in zip(names, args)})
        for out_name, got, ref in zip(("logits", "velocity", "key", "value"), outputs, expected):
            assert got.shape == tuple(ref.shape)
            if ref.numel():
                tag = f"onnx {(n_head, n_latent, n_tail)} past {past_lens} {out_name}"
                compare(tag, torch.from_numpy(got), ref)
