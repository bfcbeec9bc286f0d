"""runtime/models/vae.py against checkpoint_keys.json and diffusers' AutoencoderKLWan configured as the Wan2.2 VAE.

All numerics run the tiny config (same module tree, small widths, the real 48-channel latent) in fp32 on seeded random
weights of realistic scale. Diffusers applies no latent mean/std and clamps log-variance in its posterior; both are
accounted for explicitly below.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

import torch

from runtime.spec.constants import WAN22_LATENT_MEAN, WAN22_LATENT_STD
from runtime.models.vae import (
    CacheSlot,
    WanAvgDown3D,
    WanCausalConv3d,
    WanDupUp3D,
    WanVAE,
    WanVAEConfig,
    frame_conv,
    patchify,
    sample_posterior,
    unpatchify,
)
from tests.parity import checkpoint_keys, compare, randomize

diffusers_wan = importlib.import_module("diffusers.models.autoencoders.autoencoder_kl_wan")

MEAN = torch.tensor(WAN22_LATENT_MEAN)
INV_STD = 1.0 / torch.tensor(WAN22_LATENT_STD)
B, H, W = 2, 32, 48            # latent grid 2 x 3: non-square catches h/w swaps



def randomize_vae(model: torch.nn.Module, seed: int) -> None:
    """`tests.parity.randomize` with small biases; the output conv is damped so few pixels clamp."""
    randomize(model, seed, bias_scale=0.05)
    with torch.no_grad():
        model.decoder.head[2].weight.mul_(0.3)


def to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """Our (= Wan2.2_VAE.pth) key -> AutoencoderKLWan key (is_residual=True layout)."""
    def block(kind: str, last: int, resample: str):
        return lambda m: f"{kind}.{m[1]}." + (f"{resample}." if int(m[2]) == last else f"resnets.{m[2]}.")

    rules = [
        (r"^conv1\.", "quant_conv."),
        (r"^conv2\.", "post_quant_conv."),
        (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
        (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
        (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
        (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
        (r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.",
         block("encoder.down_blocks", num_res_blocks, "downsampler")),
        (r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.",
         block("decoder.up_blocks", num_res_blocks + 1, "upsampler")),
        (r"\.residual\.0\.", ".norm1."),
        (r"\.residual\.2\.", ".conv1."),
        (r"\.residual\.3\.", ".norm2."),
        (r"\.residual\.6\.", ".conv2."),
        (r"\.shortcut\.", ".conv_shortcut."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def diffusers_wan22(config: WanVAEConfig) -> torch.nn.Module:
    """AutoencoderKLWan with the Wan2.2 settings (diffusers' Wan2.2 TI2V VAE config) at our widths."""
    return diffusers_wan.AutoencoderKLWan(
        base_dim=config.dim, decoder_base_dim=config.dec_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks, attn_scales=[], temperal_downsample=list(config.temperal_downsample),
        dropout=0.0, latents_mean=list(WAN22_LATENT_MEAN), latents_std=list(WAN22_LATENT_STD), is_residual=True,
        in_channels=config.io_channels, out_channels=config.io_channels, patch_size=config.patch_size,
        scale_factor_temporal=config.temporal_factor, scale_factor_spatial=config.spatial_factor,
    ).eval()


@pytest.fixture(scope="module")
def models() -> tuple[WanVAE, torch.nn.Module]:
    config = WanVAEConfig.tiny()
    ours = WanVAE(config).eval()
    randomize_vae(ours, seed=0)
    ref = diffusers_wan22(config)
    mapped = {to_diffusers_key(k, config.num_res_blocks): v for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ref_shapes
    ref.load_state_dict(mapped, strict=True)
    return ours, ref


def video(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, frames, H, W, generator=g) * 2 - 1


def latent(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 48, frames, H // 16, W // 16, generator=g)


# --- Structure -------------------------------------------------------------------------------------------------------


def test_full_config_matches_checkpoint_keys() -> None:
    expected = checkpoint_keys()["Wan2.2_VAE.pth"]
    with torch.device("meta"):
        model = WanVAE()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.latent_mean.shape == model.latent_std.shape == (48,)


def test_tiny_config_keeps_tree_and_io() -> None:
    with torch.device("meta"):
        full, tiny = WanVAE(), WanVAE(WanVAEConfig.tiny())
    assert list(full.state_dict()) == list(tiny.state_dict())
    config = WanVAEConfig.tiny()
    assert (config.z_dim, config.io_channels, config.spatial_factor, config.temporal_factor) == (48, 12, 16, 4)
    assert tiny.encoder.conv1.weight.shape[1] == tiny.decoder.head[2].weight.shape[0] == 12


def test_config_from_dict_json_and_validation(tmp_path: Path) -> None:
    values = {"dim": 8, "dec_dim": 12, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]}
    path = tmp_path / "vae.json"
    path.write_text(json.dumps(values))
    assert WanVAEConfig.from_json(path) == WanVAEConfig.from_dict(values) == WanVAEConfig.tiny()
    with pytest.raises(ValueError, match="unknown keys"):
        WanVAEConfig.from_dict({"c_dim": 160})
    with pytest.raises(ValueError, match="z_dim"):
        WanVAEConfig(z_dim=16)
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAEConfig(temperal_downsample=(True, True))
    with pytest.raises(ValueError, match="regroup"):
        WanVAEConfig(dim=8, dim_mult=(1, 3, 4, 4))


def test_cache_slots_of_full_config() -> None:
    with torch.device("meta"):
        model = WanVAE()
    enc, dec = model.encoder_cache_slots(), model.decoder_cache_slots()
    assert (len(enc), len(dec)) == (24, 32)                          # docs/design/model.md §5.5
    for part, slots in (("encoder", enc), ("decoder", dec)):
        convs = [f"{part}.{n}" for n, m in getattr(model, part).named_modules() if isinstance(m, WanCausalConv3d)]
        assert [s.name for s in slots] == convs                       # execution order = module order
        for slot in slots:
            conv = model.get_submodule(slot.name)
            assert slot.channels == conv.in_channels
    assert [s.name for s in enc if s.frames == 1] == ["encoder.downsamples.1.downsamples.2.time_conv",
                                                     "encoder.downsamples.2.downsamples.2.time_conv"]
    assert enc[0] == CacheSlot("encoder.conv1", 12, 2, 8) and dec[-1] == CacheSlot("decoder.head.2", 256, 2, 8)


def test_cache_shapes_match_slots(models) -> None:
    ours, _ = models
    h, w = H // 16, W // 16
    with torch.no_grad():
        _, _, enc_first = ours.encode_first_chunk(video(1, seed=1))
        _, _, enc_next = ours.encode_chunk(video(4, seed=2), enc_first)
        _, dec_first = ours.decode_first_chunk(latent(1, seed=3))
        _, dec_next = ours.decode_chunk(latent(1, seed=4), dec_first)
    for slots, caches in ((ours.encoder_cache_slots(), enc_first), (ours.encoder_cache_slots(), enc_next),
                          (ours.decoder_cache_slots(), dec_first), (ours.decoder_cache_slots(), dec_next)):
        assert [tuple(c.shape) for c in caches] == [s.shape(B, h, w) for s in slots]
    # upsample3d's first-chunk cache is upstream's "Rep": the second chunk's time conv sees zero past frames.
    for slot, cache in zip(ours.decoder_cache_slots(), dec_first):
        if slot.name.endswith("time_conv"):
            assert not cache.any()


# --- Parity with diffusers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(models, frames: int) -> None:
    ours, ref = models
    x = video(frames, seed=10 + frames)
    with torch.no_grad():
        mu, log_var = ours.encode(x)
        posterior = ref.encode(x).latent_dist
    raw_mu, raw_log_var = posterior.parameters.chunk(2, dim=1)
    compare(f"encode T={frames} mu", mu, (raw_mu - MEAN.view(1, -1, 1, 1, 1)) * INV_STD.view(1, -1, 1, 1, 1))
    compare(f"encode T={frames} log_var (raw)", log_var, raw_log_var)
    compare(f"encode T={frames} log_var (clamped)", log_var.clamp(-30.0, 20.0), posterior.logvar)
    assert mu.shape == (B, 48, 1 + (frames - 1) // 4, H // 16, W // 16)


@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_matches_diffusers(models, latent_frames: int) -> None:
    ours, ref = models
    z = latent(latent_frames, seed=20 + latent_frames)
    with torch.no_grad():
        out = ours.decode(z)
        expected = ref.decode(z / INV_STD.view(1, -1, 1, 1, 1) + MEAN.view(1, -1, 1, 1, 1)).sample
    assert (expected.abs() < 1).float().mean() > 0.9, "weights too large: the clamp would hide differences"
    compare(f"decode t={latent_frames}", out, expected)
    assert out.shape == (B, 3, 1 + 4 * (latent_frames - 1), H, W)


def test_image_paths_equal_3d_module_at_t1(models) -> None:
    """The 2-D image networks against the 3-D causal module (diffusers, T=1), at a tight fp32 tolerance."""
    ours, ref = models
    image = video(1, seed=30)[:, :, 0]
    z = latent(1, seed=31)[:, :, 0]
    with torch.no_grad():
        mu, log_var = ours.encode_image(image)
        raw = ref.encode(image.unsqueeze(2)).latent_dist.parameters[:, :, 0]
        out = ours.decode_image(z)
        expected = ref.decode((z / INV_STD.view(1, -1, 1, 1) + MEAN.view(1, -1, 1, 1)).unsqueeze(2)).sample[:, :, 0]
    raw_mu, raw_log_var = raw.chunk(2, dim=1)
    compare("encode_image mu", mu, (raw_mu - MEAN.view(1, -1, 1, 1)) * INV_STD.view(1, -1, 1, 1), tol=1e-5)
    compare("encode_image log_var", log_var, raw_log_var, tol=1e-5)
    compare("decode_image", out, expected, tol=1e-5)
    assert mu.shape == (B, 48, H // 16, W // 16) and out.shape == (B, 3, H, W)


def test_first_chunk_leaves_equal_3d_forms() -> None:
    """Each first-chunk simplification (docs/design/model.md §5.4) against the 3-D op it replaces."""
    g = torch.Generator().manual_seed(40)
    x = torch.randn(B, 16, 6, 8, generator=g)
    conv = WanCausalConv3d(16, 8, (3, 3, 3))
    with torch.no_grad():
        y3d, cache = conv(x.unsqueeze(2), torch.zeros(B, 16, 2, 6, 8))   # upstream: two zero past frames
    compare("causal conv, last tap", frame_conv(conv, x), y3d[:, :, 0], tol=1e-6)
    torch.testing.assert_close(cache, conv.first_cache(x), rtol=0, atol=0)

    for factor_t, out_ch in ((2, 32), (1, 16)):
        ours, ref = WanAvgDown3D(16, out_ch, factor_t, 2), diffusers_wan.AvgDown3D(16, out_ch, factor_t, 2)
        compare(f"AvgDown3D first chunk ft={factor_t}", ours.forward_first(x), ref(x.unsqueeze(2))[:, :, 0], tol=1e-6)
        frames = torch.randn(B, 16, 4, 6, 8, generator=g)
        compare(f"AvgDown3D chunk ft={factor_t}", ours(frames), ref(frames), tol=1e-6)
        ours, ref = WanDupUp3D(16, out_ch // 2, factor_t, 2), diffusers_wan.DupUp3D(16, out_ch // 2, factor_t, 2)
        compare(f"DupUp3D first chunk ft={factor_t}", ours.forward_first(x),
                ref(x.unsqueeze(2), first_chunk=True)[:, :, 0], tol=0)
        compare(f"DupUp3D chunk ft={factor_t}", ours(frames[:, :, :2]), ref(frames[:, :, :2]), tol=0)

    rgb = torch.randn(B, 3, 5, 6, 8, generator=g)
    torch.testing.assert_close(patchify(rgb, 2), diffusers_wan.patchify(rgb, 2), rtol=0, atol=0)
    torch.testing.assert_close(patchify(rgb[:, :, 0], 2), diffusers_wan.patchify(rgb, 2)[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(rgb, 2), 2), rgb, rtol=0, atol=0)


# --- Explicit caches -------------------------------------------------------------------------------------------------


def test_decode_chunk_plan_invariance(models) -> None:
    """Two videos stepped alternately, caches passed as copies, equal whole-latent decodes; prefixes are causal."""
    ours, _ = models
    za, zb = latent(3, seed=50), latent(3, seed=51)
    with torch.no_grad():
        whole_a, whole_b = ours.decode(za), ours.decode(zb)
        out_a, caches_a = ours.decode_first_chunk(za[:, :, :1])
        out_b, caches_b = ours.decode_first_chunk(zb[:, :, :1])
        frames_a, frames_b = [out_a], [out_b]
        for i in (1, 2):
            out_a, caches_a = ours.decode_chunk(za[:, :, i:i + 1], tuple(c.clone() for c in caches_a))
            out_b, caches_b = ours.decode_chunk(zb[:, :, i:i + 1], caches_b)
            frames_a.append(out_a)
            frames_b.append(out_b)
        prefix = ours.decode(za[:, :, :2])
    compare("decode stepped (stream a) vs whole", torch.cat(frames_a, 2), whole_a, tol=1e-6)
    compare("decode stepped (stream b) vs whole", torch.cat(frames_b, 2), whole_b, tol=1e-6)
    compare("decode prefix t=2 vs whole[:5]", prefix, whole_a[:, :, :5], tol=1e-6)
    with torch.no_grad():
        image = ours.decode_image(za[:, :, 0])
    compare("decode_image vs first frame of video decode", image, whole_a[:, :, 0], tol=1e-6)


def test_encode_chunk_plan_invariance(models) -> None:
    ours, _ = models
    xa, xb = video(9, seed=60), video(9, seed=61)
    with torch.no_grad():
        whole_a, whole_b = ours.encode(xa)[0], ours.encode(xb)[0]
        mu_a, _, caches_a = ours.encode_first_chunk(xa[:, :, :1])
        mu_b, _, caches_b = ours.encode_first_chunk(xb[:, :, :1])
        mus_a, mus_b = [mu_a], [mu_b]
        for start in (1, 5):
            mu_a, _, caches_a = ours.encode_chunk(xa[:, :, start:start + 4], tuple(c.clone() for c in caches_a))
            mu_b, _, caches_b = ours.encode_chunk(xb[:, :, start:start + 4], caches_b)
            mus_a.append(mu_a)
            mus_b.append(mu_b)
        prefix = ours.encode(xa[:, :, :5])[0]
    compare("encode stepped (stream a) vs whole", torch.cat(mus_a, 2), whole_a, tol=1e-6)
    compare("encode stepped (stream b) vs whole", torch.cat(mus_b, 2), whole_b, tol=1e-6)
    compare("encode prefix T=5 vs whole[:2]", prefix, whole_a[:, :, :2], tol=1e-6)


# --- Posterior, input checks -----------------------------------------------------------------------------------------


def test_sample_posterior_is_lance_reparameterisation() -> None:
    g = torch.Generator().manual_seed(70)
    mu, noise = torch.randn(B, 48, 2, 2, 3, generator=g), torch.randn(B, 48, 2, 2, 3, generator=g)
    log_var = torch.randn(B, 48, 2, 2, 3, generator=g) * 3
    log_var[0, 0, 0, 0, 0] = 25.0                    # beyond diffusers' clamp at 20: Lance does not clamp
    z = sample_posterior(mu, log_var, noise)
    expected = mu.double() + torch.exp(0.5 * log_var.double()) * noise.double()
    torch.testing.assert_close(z.double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        sample_posterior(mu, log_var[:, :, :1], noise)


def test_inputs_are_validated(models) -> None:
    ours, _ = models
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ours.encode(video(6, seed=80))
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode_image(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match="latent"):
        ours.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="4 frames"):
        ours.encode_chunk(video(5, seed=81), ())
    with pytest.raises(ValueError, match="caches"):
        ours.decode_chunk(latent(1, seed=82), ())
