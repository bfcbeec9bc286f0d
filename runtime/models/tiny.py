"""Tiny random checkpoints in exactly the real layout of `bytedance-research/Lance` (`lance-trt tiny`).

Same folders, file names, key names and special-token ids as the real checkpoint; only the widths and depths are the
`tiny()` configs. File dtypes: the LLM file is bf16 like the real one; the ViT file is bf16 and the VAE file fp32, as
their upstream releases (not verified against the Lance repo's files; the loader converts any float dtype). Everything
the runtime does with a real checkpoint (resolve, verify, load, tokenize, export) runs on it unchanged.

Weights are drawn from one seeded CPU generator, scaled by fan-in so activations stay O(1) through the stacks:
matrices and convolutions ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.1^2). The same seed gives
byte-identical files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from runtime.spec import constants
from runtime.models.checkpoint import REGENERATED_KEYS, VIDEO_LATENT_FRAMES, VIT_PREFIX, CheckpointLayout, parameters_on_meta
from runtime.models.mot import LanceLLMConfig, LanceMoT
from runtime.models.vae import WanVAE, WanVAEConfig
from runtime.models.vit import Qwen25VisionTransformer, VisionConfig
from runtime.models.tokenizer import build_tokenizer_files

logger = logging.getLogger(__name__)

_BIAS_STD = 0.02
_NORM_STD = 0.1
# The header metadata safetensors.torch writes for PyTorch files.
_SAFETENSORS_METADATA = {"format": "pt"}


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """A realistic fp32 value for checkpoint tensor `key`, chosen by its role (on the generator's device)."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
    if key.endswith(".bias"):
        return _BIAS_STD * noise
    # 1-D non-bias tensors are RMSNorm scales (LLM, q/k, ViT); `.gamma` are Wan's RMS_norm scales (C, 1, 1[, 1]).
    if len(shape) == 1 or key.endswith(".gamma"):
        return 1.0 + _NORM_STD * noise
    return noise / math.sqrt(math.prod(shape[1:]))


def random_state_dict(module: nn.Module, generator: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
    """Random values for every checkpoint tensor of `module` (built with `parameters_on_meta`), drawn in state-dict
    order; regenerated tensors keep the module's computed value, as the real file holds the real table."""
    state = {}
    for key, value in module.state_dict().items():
        tensor = value if key in REGENERATED_KEYS else _random_tensor(key, tuple(value.shape), generator)
        state[key] = tensor.to(dtype).cpu().contiguous()
    return state


def _write_json(path: Path, values: Mapping) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


def _build(module_cls: type[nn.Module], config: object) -> nn.Module:
    with parameters_on_meta():
        return module_cls(config)


def _write_llm_dir(layout: CheckpointLayout, llm: LanceLLMConfig, tensors: dict[str, Tensor]) -> None:
    """model.safetensors, llm_config.json (with its nested vision_config) and generation_config.json."""
    layout.llm_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, layout.llm_weights, metadata=_SAFETENSORS_METADATA)
    _write_json(layout.llm_config, llm.to_dict())
    _write_json(layout.generation_config, {
        "bos_token_id": constants.QWEN2_SPECIAL_TOKENS[constants.ENDOFTEXT],
        "eos_token_id": constants.QWEN2_SPECIAL_TOKENS[constants.IM_END],
    })


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, video: bool = False) -> Path:
    """Write a tiny random Lance checkpoint into `out_dir` (created if needed) and return it.

    `video` adds `Lance_3B_Video/`: the video-size position table (31 * 64 * 64 rows) and a full set of `vit_model.*`
    tensors, different from vit.safetensors (they override it when the video model loads, as upstream).
    """
    return write_random_checkpoint(out_dir, seed=seed, video=video)


def write_random_checkpoint(out_dir: str | Path, *, seed: int = 0, video: bool = False, full_size: bool = False,
                            device: str | torch.device = "cpu") -> Path:
    """`write_tiny_checkpoint`, or with ``full_size`` the real sizes (`LanceLLMConfig()`, `VisionConfig()`,
    `WanVAEConfig()`: about 16 GB of files): what GPU serving and benchmarks load where the real weights cannot be
    fetched. ``device``: where the values are drawn (a CUDA generator draws a full-size checkpoint in seconds; its
    values differ from the CPU generator's)."""
    root = Path(out_dir)
    generator = torch.Generator(device).manual_seed(seed)
    llm_base, vae_config = (LanceLLMConfig(), WanVAEConfig()) if full_size else (LanceLLMConfig.tiny(),
                                                                                  WanVAEConfig.tiny())
    vision_config = (VisionConfig if full_size else VisionConfig.tiny)(out_hidden_size=llm_base.hidden_size)
    # llm_config.json nests the config of the tower in Qwen2.5-VL-ViT/config.json, as the real files do.
    llm_config = replace(llm_base, vision_config=vision_config.to_dict())
    image = CheckpointLayout(root, video=False)

    mot_state = random_state_dict(_build(LanceMoT, llm_config), generator, torch.bfloat16)
    _write_llm_dir(image, llm_config, mot_state)
    build_tokenizer_files(image.tokenizer_dir)

    image.vit_dir.mkdir(parents=True, exist_ok=True)
    vit = _build(Qwen25VisionTransformer, vision_config)
    save_file(random_state_dict(vit, generator, torch.bfloat16), image.vit_weights, metadata=_SAFETENSORS_METADATA)
    _write_json(image.vit_config, vision_config.to_dict())

    torch.save(random_state_dict(_build(WanVAE, vae_config), generator, torch.float32), image.vae_weights)

    if video:
        video_config = replace(llm_config, max_latent_frames=VIDEO_LATENT_FRAMES)
        video_state = random_state_dict(_build(LanceMoT, video_config), generator, torch.bfloat16)
        video_state |= {VIT_PREFIX + k: v for k, v in random_state_dict(vit, generator, torch.bfloat16).items()}
        video_layout = CheckpointLayout(root, video=True)
        _write_llm_dir(video_layout, llm_config, video_state)
        for source, target in zip(image.tokenizer_files, video_layout.tokenizer_files):
            shutil.copyfile(source, target)
    logger.info("wrote a %s%s Lance checkpoint (seed %d) to %s", "full-size" if full_size else "tiny",
                " video" if video else "", seed, root)
    return root
