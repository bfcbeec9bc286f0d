"""Checkpoint I/O on tiny checkpoints written in the real HF layout: exact real key sets, verification errors that
name the file and the key, dtype conversion, the video ViT override, fail-fast offline resolution and byte-identical
tiny files per seed. The real key names and full-size shapes come from tests/data/checkpoint_keys.json."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.spec import constants
from runtime.models.checkpoint import (
    CheckpointError,
    CheckpointLayout,
    _vae_config,
    load_lance,
    parameters_on_meta,
    resolve_checkpoint,
    verify_tensors,
)
from runtime.models.mot import LanceLLMConfig, LanceMoT
from runtime.models.vae import WanVAE
from runtime.models.vit import Qwen25VisionTransformer, VisionConfig
from runtime.models.tiny import write_tiny_checkpoint
from tests.parity import checkpoint_keys

LLM_FILE = f"{constants.IMAGE_CKPT_DIR}/{constants.LLM_WEIGHTS_FILE}"
VIDEO_LLM_FILE = f"{constants.VIDEO_CKPT_DIR}/{constants.LLM_WEIGHTS_FILE}"
VIT_FILE = f"{constants.VIT_DIR}/{constants.VIT_WEIGHTS_FILE}"
VAE_FILE = constants.VAE_FILE
REPO = Path(__file__).resolve().parents[1]
_LAYER = re.compile(r"^(?:language_model\.model\.layers|blocks)\.(\d+)\.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0, video=True)


def _keys(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _real_keys_up_to_depth(real: dict[str, list[int]], depth: int) -> set[str]:
    """The real key names with per-layer keys kept for layers < depth (the tiny configs are shallower)."""
    return {k for k in real if (m := _LAYER.match(k)) is None or int(m.group(1)) < depth}


# --- Key sets and shapes ---------------------------------------------------------------------------------------------


def test_tiny_key_sets_are_the_real_ones(tiny: Path) -> None:
    real = checkpoint_keys()
    mot_depth = LanceLLMConfig.tiny().num_hidden_layers
    vit_depth = VisionConfig.tiny(out_hidden_size=1).depth
    expected = {
        LLM_FILE: _real_keys_up_to_depth(real[LLM_FILE], mot_depth),
        VIT_FILE: _real_keys_up_to_depth(real[VIT_FILE], vit_depth),
        VAE_FILE: set(real[VAE_FILE]),  # the tiny VAE keeps every stage and block: the full 196 names
    }
    for name, keys in expected.items():
        assert set(_keys(tiny / name)) == keys, name
    assert len(expected[VAE_FILE]) == 196
    # Video: the LLM set plus the ViT tower under vit_model.* (docs/design/model.md §7.1).
    video = set(_keys(tiny / VIDEO_LLM_FILE))
    assert video == expected[LLM_FILE] | {"vit_model." + k for k in expected[VIT_FILE]}


def test_file_dtypes_and_tables(tiny: Path) -> None:
    llm = _keys(tiny / LLM_FILE)
    assert {t.dtype for t in llm.values()} == {torch.bfloat16}
    assert {t.dtype for t in _keys(tiny / VAE_FILE).values()} == {torch.float32}
    hidden = LanceLLMConfig.tiny().hidden_size
    assert llm["latent_pos_embed.pos_embed"].shape == (64 * 64, hidden)
    assert _keys(tiny / VIDEO_LLM_FILE)["latent_pos_embed.pos_embed"].shape == (31 * 64 * 64, hidden)
    assert llm["language_model.model.embed_tokens.weight"].shape[0] == 151936


def test_full_size_modules_match_the_real_files() -> None:
    """The loader's verification accepts the real files' keys and shapes (checkpoint_keys.json) for full-size modules
    built on meta, including the VAE widths read off the tensors (160 / 256)."""
    real = {file: {k: tuple(v) for k, v in keys.items()} for file, keys in checkpoint_keys().items()}
    vae_config = _vae_config(real[VAE_FILE], Path(VAE_FILE))
    assert (vae_config.dim, vae_config.dec_dim) == (160, 256)
    with parameters_on_meta():
        modules = {LLM_FILE: LanceMoT(LanceLLMConfig()), VIT_FILE: Qwen25VisionTransformer(VisionConfig()),
                   VAE_FILE: WanVAE(vae_config)}
    for file, module in modules.items():
        assert all(p.is_meta for p in module.parameters()), file
        verify_tensors(file, {k: tuple(v.shape) for k, v in module.state_dict().items()}, real[file])
    assert len(real[LLM_FILE]) == 1021 and len(real[VIT_FILE]) == 390


# --- Loading ---------------------------------------------------------------------------------------------------------


def test_bf16_file_loads_into_fp32_modules(tiny: Path) -> None:
    models = load_lance(tiny)
    for name, module in (("mot", models.mot), ("vit", models.vit), ("vae", models.vae)):
        assert not module.training, name
        for key, param in module.named_parameters():
            assert param.dtype == torch.float32 and not param.requires_grad and not param.is_meta, (name, key)
        for key, buffer in module.named_buffers():
            assert not buffer.is_meta, (name, key)
    stored = _keys(tiny / LLM_FILE)
    loaded = models.mot.state_dict()
    for key, tensor in stored.items():
        if key != "latent_pos_embed.pos_embed":
            torch.testing.assert_close(loaded[key], tensor.float(), rtol=0, atol=0, msg=key)
    for key, tensor in _keys(tiny / VIT_FILE).items():
        torch.testing.assert_close(models.vit.state_dict()[key], tensor.float(), rtol=0, atol=0, msg=key)
    for key, tensor in _keys(tiny / VAE_FILE).items():
        torch.testing.assert_close(models.vae.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
    assert models.special_ids.im_end == 151645 and models.special_ids.len == constants.TOKENIZER_LEN
    assert models.vision_config.out_hidden_size == models.llm_config.hidden_size


def test_pos_table_is_regenerated(tiny: Path, tmp_path: Path) -> None:
    """The stored table is ignored (upstream pops it): a file holding zeros loads the sin-cos formula."""
    root = _copy_with(tiny, tmp_path, LLM_FILE, lambda sd: {**sd, "latent_pos_embed.pos_embed":
                                                             torch.zeros_like(sd["latent_pos_embed.pos_embed"])})
    reference = load_lance(tiny).mot.latent_pos_embed.pos_embed
    table = load_lance(root).mot.latent_pos_embed.pos_embed
    assert torch.isfinite(table).all() and table.abs().max() > 0.5
    torch.testing.assert_close(table, reference, rtol=0, atol=0)


def test_bf16_load(tiny: Path) -> None:
    models = load_lance(tiny, dtype=torch.bfloat16)
    for module in (models.mot, models.vit, models.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(models.mot.llm2vae.weight, _keys(tiny / LLM_FILE)["llm2vae.weight"], rtol=0, atol=0)


def test_video_vit_override(tiny: Path) -> None:
    """Lance_3B_Video: vit_model.* tensors of model.safetensors win over vit.safetensors (upstream's load order)."""
    models = load_lance(tiny, video=True)
    assert models.layout.llm_dir.name == constants.VIDEO_CKPT_DIR
    assert models.mot.latent_pos_embed.pos_embed.shape[0] == 31 * 64 * 64
    video = _keys(tiny / VIDEO_LLM_FILE)
    base = _keys(tiny / VIT_FILE)
    for key, value in models.vit.state_dict().items():
        torch.testing.assert_close(value, video["vit_model." + key].float(), rtol=0, atol=0, msg=key)
        assert not torch.equal(value, base[key].float()), key


def test_loaded_models_run_in_range(tiny: Path) -> None:
    """Fan-in-scaled tiny weights keep activations O(1): the VAE decodes a latent to a non-saturated image."""
    models = load_lance(tiny)
    image = models.vae.decode_image(torch.randn(1, 48, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert 0.05 < image.std() < 0.9 and (image.abs() == 1).float().mean() < 0.2


# --- Verification errors ---------------------------------------------------------------------------------------------


def _copy_with(tiny: Path, root: Path, file: str, edit) -> Path:
    """A checkpoint in `root` linking to every file of `tiny` except `file`, rewritten with `edit(state_dict)`."""
    for source in tiny.rglob("*"):
        if source.is_file():
            target = root / source.relative_to(tiny)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.relative_to(tiny).as_posix() != file:
                target.symlink_to(source)
    state = edit(_keys(tiny / file))
    if file.endswith(".safetensors"):
        save_file(state, root / file, metadata={"format": "pt"})
    else:
        torch.save(state, root / file)
    return root


def _first_layer_key(keys, prefix: str = "") -> str:
    return sorted(k for k in keys if k.startswith(prefix) and k.endswith(".weight"))[0]


@pytest.mark.parametrize("file", [LLM_FILE, VIT_FILE, VAE_FILE])
@pytest.mark.parametrize("change", ["remove", "rename", "reshape"])
def test_bad_tensor_is_named(tiny: Path, tmp_path: Path, file: str, change: str) -> None:
    key = _first_layer_key(_keys(tiny / file))

    def edit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensor = state.pop(key)
        if change == "rename":
            state[key + "_renamed"] = tensor
        elif change == "reshape":
            state[key] = torch.cat([tensor, tensor[:1]])
        return state

    root = _copy_with(tiny, tmp_path, file, edit)
    with pytest.raises(CheckpointError) as info:
        load_lance(root)
    message = str(info.value)
    assert file in message and re.search(rf"\b{re.escape(key)}\b", message), message
    if change == "rename":
        assert "missing" in message and key + "_renamed" in message and "unexpected" in message
    if change == "reshape":
        shape = list(_keys(tiny / file)[key].shape)
        assert f"expected {shape} found {[shape[0] + 1, *shape[1:]]}" in message


def test_pos_table_must_be_present_and_sized(tiny: Path, tmp_path: Path) -> None:
    key = "latent_pos_embed.pos_embed"
    root = _copy_with(tiny, tmp_path / "absent", LLM_FILE, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_lance(root)
    # The video-size table in the image model is a shape error, not silently regenerated.
    video_table = _keys(tiny / VIDEO_LLM_FILE)[key]
    root = _copy_with(tiny, tmp_path / "sized", LLM_FILE, lambda sd: {**sd, key: video_table})
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} expected \[4096, 64\] found \[126976, 64\]"):
        load_lance(root)


def test_unexpected_vit_model_key_in_video_file(tiny: Path, tmp_path: Path) -> None:
    extra = "vit_model.blocks.99.norm1.weight"
    root = _copy_with(tiny, tmp_path, VIDEO_LLM_FILE,
                      lambda sd: {**sd, extra: sd["vit_model.blocks.0.norm1.weight"].clone()})
    with pytest.raises(CheckpointError, match=r"Lance_3B_Video/model.safetensors.*blocks\.99\.norm1\.weight"):
        load_lance(root, video=True)


def test_missing_files_are_listed(tiny: Path, tmp_path: Path) -> None:
    for name in (LLM_FILE, f"{constants.IMAGE_CKPT_DIR}/{constants.LLM_CONFIG_FILE}", VAE_FILE):
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(tiny / name)
    layout = CheckpointLayout(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in layout.missing()} == {
        f"{constants.IMAGE_CKPT_DIR}/tokenizer.json", VIT_FILE, f"{constants.VIT_DIR}/{constants.VIT_CONFIG_FILE}"}
    with pytest.raises(CheckpointError, match=r"3 file\(s\): .*tokenizer\.json.*vit\.safetensors.*config\.json"):
        load_lance(tmp_path)
    with pytest.raises(CheckpointError, match=r"Lance_3B_Video/model\.safetensors"):
        CheckpointLayout(tmp_path, video=True).check()


@pytest.mark.parametrize("video", [False, True])
def test_hub_files_are_the_layout(video: bool) -> None:
    """Only the files the runtime reads (plus generation_config.json) are fetched: never the other model's LLM."""
    llm_dir = constants.VIDEO_CKPT_DIR if video else constants.IMAGE_CKPT_DIR
    assert set(CheckpointLayout(Path("."), video).hub_files) == {
        f"{llm_dir}/{name}" for name in (constants.LLM_WEIGHTS_FILE, constants.LLM_CONFIG_FILE,
                                         "generation_config.json", *constants.TOKENIZER_FILES)
    } | {VIT_FILE, f"{constants.VIT_DIR}/config.json", VAE_FILE}


# --- Resolution ------------------------------------------------------------------------------------------------------


def test_resolve_local_folder_and_bad_names(tiny: Path, tmp_path: Path) -> None:
    assert resolve_checkpoint(tiny) == tiny
    assert resolve_checkpoint(str(tiny), video=True) == tiny
    with pytest.raises(CheckpointError, match="not a folder, and not a Hugging Face repo id"):
        resolve_checkpoint(tmp_path / "does" / "not" / "exist")
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a folder"):
        resolve_checkpoint(tmp_path / "file.bin")


def test_offline_without_local_copy_fails_without_network(tmp_path: Path) -> None:
    """Offline and with no local copy, the loader says what to do without trying the network: any connection attempt
    in the child raises (so no retry loop or timeout can hide behind a slow failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(REPO)}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ENDPOINT"):
        env.pop(name, None)
    script = ("import socket\n"
              "def refuse(*args, **kwargs):\n    raise SystemExit('a network connection was attempted')\n"
              "socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse\n"
              "from runtime.models.checkpoint import CheckpointError, resolve_checkpoint\n"
              "try:\n    resolve_checkpoint('bytedance-research/Lance')\n"
              "except CheckpointError as err:\n    print(err)\n    raise SystemExit(3)\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert "a network connection was attempted" not in result.stderr
    assert result.returncode == 3, result.stderr    # CheckpointError, raised before any connection
    message = result.stdout
    for needle in ("bytedance-research/Lance", "HF_HUB_OFFLINE", "Lance_3B/model.safetensors",
                   "Wan2.2_VAE.pth", "lance-trt download"):
        assert needle in message, (needle, message)


# --- Determinism -----------------------------------------------------------------------------------------------------


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(tiny: Path, tmp_path: Path) -> None:
    again = _digests(write_tiny_checkpoint(tmp_path / "again", seed=0, video=True))
    assert again == _digests(tiny)
    other = _digests(write_tiny_checkpoint(tmp_path / "other", seed=1, video=True))
    assert other.keys() == again.keys()
    for name in (LLM_FILE, VIDEO_LLM_FILE, VIT_FILE, VAE_FILE):
        assert other[name] != again[name], name


def test_bf16_load_runs_every_network(tiny_checkpoint) -> None:
    """A bf16 load casts the VAE's latent statistics with its weights, so every network runs in bf16."""
    from runtime.models.checkpoint import load_lance

    models = load_lance(tiny_checkpoint, dtype=torch.bfloat16)
    assert models.vae.latent_mean.dtype == torch.bfloat16
    image = models.vae.decode_image(torch.randn(1, 48, 2, 3, dtype=torch.bfloat16))
    assert image.shape == (1, 3, 32, 48) and torch.isfinite(image.float()).all()
