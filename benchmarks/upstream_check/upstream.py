"""Upstream's side of the cross-check: bytedance/Lance @4baeee0's own `Lance.validation_gen_KVcache` on the tiny
checkpoint in fp32 on CPU, fed the inputs and initial noise recorded by ours.py; compares every step's cond and
uncond velocities and the final latent. Stubs: flash_attn_varlen_func (exact attention in fp32, bottom-right causal);
upstream's hard-coded bf16 casts in modeling/lance/qwen2_navit.py are turned to fp32 in the checkout first (README)."""
import math, sys, types
import torch
UPSTREAM, CKPT, OURS = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, UPSTREAM)

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **_):
    outs = []
    for b in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].float()
        ks = k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].float()
        vs = v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].float()
        rep = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(qs.shape[-1])
        if causal:
            lq, lk = qs.shape[0], ks.shape[0]
            i = torch.arange(lq)[:, None]; j = torch.arange(lk)[None]
            scores = scores.masked_fill(j > i + (lk - lq), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).to(q.dtype))
    return torch.cat(outs)

import transformers.modeling_utils  # noqa: F401  (imported before the stub, which it must not see as flash-attn)
import importlib.machinery
fa = types.ModuleType("flash_attn"); fa.flash_attn_varlen_func = flash_attn_varlen_func
fa.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)   # find_spec works; no metadata, so "not available"
sys.modules["flash_attn"] = fa

from safetensors.torch import load_file
from modeling.lance import Lance, LanceConfig, Qwen2ForCausalLM
from modeling.qwen2.configuration_qwen2 import Qwen2Config
from modeling.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from modeling.vit.qwen2_5_vl_vit import Qwen2_5_VisionTransformerPretrainedModel
from common.utils.misc import AutoEncoderParams

llm_config = Qwen2Config.from_json_file(f"{CKPT}/Lance_3B/llm_config.json")
llm_config.layer_module = "Qwen2MoTDecoderLayer"
llm_config.qk_norm = llm_config.qk_norm_und = llm_config.qk_norm_gen = True
llm_config.tie_word_embeddings = False
llm_config.freeze_und = False
llm_config.apply_qwen_2_5_vl_pos_emb = True
llm_config._attn_implementation = "eager"
language_model = Qwen2ForCausalLM(llm_config)
vit_config = Qwen2_5_VLVisionConfig.from_pretrained(f"{CKPT}/Qwen2.5-VL-ViT")
vit_config._attn_implementation = "sdpa"
vit_model = Qwen2_5_VisionTransformerPretrainedModel(vit_config)
vit_model.load_state_dict(load_file(f"{CKPT}/Qwen2.5-VL-ViT/vit.safetensors"), strict=True)
config = LanceConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                     vae_config=AutoEncoderParams(downsample_spatial=16, downsample_temporal=4, z_channels=48),
                     latent_patch_size=(1, 1, 1), max_num_frames=1, max_latent_size=64, timestep_shift=3.5)
model = Lance(language_model=language_model, vit_model=vit_model, vit_type="qwen_2_5_vl_original", config=config)
state = load_file(f"{CKPT}/Lance_3B/model.safetensors")
state.pop("latent_pos_embed.pos_embed")                     # upstream regenerates it
missing, unexpected = model.load_state_dict(state, strict=False)
assert not unexpected and all(k.startswith(("vit_model.", "latent_pos_embed")) for k in missing), (missing, unexpected)
model = model.float().eval()

MODES = {"text": "causal", "vit": "full", "vae_ref": "full_noise", "noise": "noise"}
IM_END = 151645

def upstream_inputs(case):
    ids = torch.as_tensor(case["token_ids"], dtype=torch.long)
    ids = torch.cat([ids, torch.tensor([IM_END])])          # upstream's sequence ends with the never-computed <|im_end|>
    modality = torch.cat([torch.as_tensor(case["modalities"], dtype=torch.long), torch.tensor([-1])])
    split_lens, attn_modes, text_idx, vit_idx, vae_idx, mse_idx, sizes, latents = [], [], [], [], [], [], [], []
    start = 0
    for kind, mode, n, grid, lat in case["splits"]:
        split_lens.append(n); attn_modes.append(MODES[kind])
        rows = list(range(start, start + n))
        if kind == "text":
            text_idx += rows
        else:
            text_idx += [rows[0], rows[-1]]
            (vit_idx if kind == "vit" else vae_idx).extend(rows[1:-1])
            if kind == "noise":
                mse_idx.extend(rows[1:-1])
            if kind in ("noise", "vae_ref"):
                t, h, w = lat
                sizes.append([1 + 4 * (t - 1), 16 * h, 16 * w])
                latents.append((case["ref_latent"] if kind == "vae_ref" else torch.zeros(t * h * w, 48)).reshape(t, h, w, 48))
        start += n
    split_lens.append(1); attn_modes.append("causal"); text_idx.append(start)
    L = start + 1
    grids = torch.tensor([list(g) for g in case["visual_grids"]], dtype=torch.long)
    inputs = dict(
        val_packed_text_ids=ids, val_packed_text_indexes=torch.tensor(text_idx),
        val_packed_vit_tokens=[case["patches"]] if case["patches"] is not None else None,
        val_packed_vit_token_indexes=torch.tensor(vit_idx) if vit_idx else None,
        val_sample_lens=[L], val_packed_position_ids=torch.zeros(L, dtype=torch.long),
        val_split_lens=split_lens, val_attn_modes=attn_modes, val_sample_N_target=[1],
        vit_video_grid_thw=torch.tensor([list(case["vit_grid"])]) if case["vit_grid"] is not None else None,
        video_grid_thw=[grids], val_mse_loss_indexes=torch.tensor(mse_idx), val_packed_vae_token_indexes=torch.tensor(vae_idx),
        val_padded_latent=latents, sample_task=torch.zeros(L, dtype=torch.long), sample_modality=modality,
        video_sizes=sizes, timestep_shift=3.5, num_timesteps=case["steps"], cfg_interval=[0.4, 1.0],
        cfg_renorm_min=0.0, cfg_renorm_type="global", cfg_text_scale=case["cfg"], device="cpu", dtype=torch.float32,
        apply_qwen_2_5_vl_pos_emb=True, max_samples=1, validation_noise_seed=-1)
    n_vae = len(vae_idx)
    return inputs, n_vae

def run(case):
    inputs, n_vae = upstream_inputs(case)
    noise = case["noise"]
    real_randn = torch.randn
    def randn(*shape, **kw):        # the same initial noise as ours: the noise block's rows, after the reference's
        size = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        if size == (n_vae, 48):
            return torch.cat([torch.zeros(n_vae - noise.shape[0], 48), noise]).to(kw.get("dtype") or torch.float32)
        return real_randn(*shape, **kw)
    velocities = []
    hook = model.llm2vae.register_forward_hook(lambda m, i, o: velocities.append(o.detach()[1:-1].clone()))
    torch.randn = randn
    try:
        with torch.no_grad():
            out = model.validation_gen_KVcache(**inputs)
    finally:
        torch.randn = real_randn
        hook.remove()
    latent = out[0][-1].reshape(-1, 48)
    return velocities, latent

cases = torch.load(OURS, weights_only=False)
for task in ("t2i", "edit"):
    case = cases[task]
    theirs, latent = run(case)
    ours = case["velocities"][-case["steps"]:]                 # the denoise calls (edit's reference prefills first)
    # upstream: cond then (while CFG is active) uncond per step; ours: one batched call (cond, uncond)
    pairs, k = [], 0
    for call in ours:
        for b in range(call.shape[0]):
            pairs.append((call[b], theirs[k])); k += 1
    assert k == len(theirs), (k, len(theirs))
    worst_cond = max((a - b).abs().max().item() for i, (a, b) in enumerate(pairs))
    steps = []
    k = 0
    for s, call in enumerate(ours):
        for b in range(call.shape[0]):
            steps.append((s, "cond" if b == 0 else "uncond", (call[b] - theirs[k]).abs().max().item(), call[b].abs().max().item()))
            k += 1
    cond = max(e for _, kind, e, _ in steps if kind == "cond")
    uncond = max(e for _, kind, e, _ in steps if kind == "uncond")
    step0 = [e for s, kind, e, _ in steps if s == 0]
    scale = max(m for *_, m in steps)
    final = (case["latent"] - latent).abs().max().item()
    print(f"{task}: {len(ours)} steps, {len(theirs)} velocity queries; max |dv| cond {cond:.2e}, uncond {uncond:.2e} "
          f"(step 0: {step0}), |v| up to {scale:.2f}; final latent max |dx| {final:.2e} (|x| up to "
          f"{case['latent'].abs().max().item():.2f})")
