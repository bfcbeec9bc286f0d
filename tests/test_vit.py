"""runtime/models/vit.py against checkpoint_keys.json and transformers' Qwen2.5-VL vision tower.

The reference is ``Qwen2_5_VisionTransformerPretrainedModel`` with eager attention, which runs window attention as a
loop over ``cu_seqlens`` chunks and builds its own rotary tables and window index from ``grid_thw``: an implementation
independent of our masks and host tables. Both run the tiny config (real patch/merge/window sizes) in fp32 on the same
seeded random weights.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import torch

from runtime.models.vit import (
    MASK_VALUE,
    Qwen25VisionTransformer,
    VisionConfig,
    check_grid,
    vision_inputs,
    vision_window_index,
)
from tests.parity import checkpoint_keys, compare, randomize

hf_vl = importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
hf_cfg = importlib.import_module("transformers.models.qwen2_5_vl.configuration_qwen2_5_vl")

OUT_HIDDEN = 64

# (t, h, w) in patches; a window is 8 x 8 patches.
GRIDS = [
    (1, 8, 8),      # exactly one window
    (1, 4, 6),      # smaller than a window, non-square
    (1, 16, 24),    # several whole windows, non-square
    (1, 20, 14),    # edge windows cut short on both axes
    (2, 10, 12),    # two temporal groups (a 4-frame video), padding windows
    (1, 36, 64),    # the real 16:9 grid at 672 px (504 x 896): 2304 patches
]



def reference_model(config: VisionConfig) -> torch.nn.Module:
    """transformers' tower from our config.json mapping, eager attention."""
    values = {k: v for k, v in config.to_dict().items() if k not in ("in_chans", "model_type")}
    ref_config = hf_cfg.Qwen2_5_VLVisionConfig(**values)
    ref_config._attn_implementation = "eager"
    return hf_vl.Qwen2_5_VisionTransformerPretrainedModel(ref_config).eval()


def reference_forward(model: torch.nn.Module, patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    out = model(patches, grid_thw=torch.tensor([grid_thw]))
    # transformers 5 returns the merged states as pooler_output; 4.x returns the tensor itself.
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.fixture(scope="module")
def towers() -> tuple[Qwen25VisionTransformer, torch.nn.Module]:
    config = VisionConfig.tiny(OUT_HIDDEN)
    ours = Qwen25VisionTransformer(config).eval()
    randomize(ours, seed=0)
    ref = reference_model(config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def run_ours(model: Qwen25VisionTransformer, patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    return model(patches, **vision_inputs(grid_thw, model.config).engine_inputs())


def test_full_config_matches_checkpoint_keys() -> None:
    expected = checkpoint_keys()["Qwen2.5-VL-ViT/vit.safetensors"]
    with torch.device("meta"):
        model = Qwen25VisionTransformer()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == 390
    assert VisionConfig().patch_dim == 1176 and VisionConfig().head_dim == 80


def test_tiny_config_keeps_tree() -> None:
    with torch.device("meta"):
        full, tiny = Qwen25VisionTransformer(), Qwen25VisionTransformer(VisionConfig.tiny(OUT_HIDDEN))
    strip = lambda keys: {k for k in keys if not k.startswith("blocks.")}  # noqa: E731
    assert strip(full.state_dict()) == strip(tiny.state_dict())
    assert {k.split(".", 2)[2] for k in full.state_dict() if k.startswith("blocks.")} == {
        k.split(".", 2)[2] for k in tiny.state_dict() if k.startswith("blocks.")
    }


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_parity_with_transformers(towers, grid: tuple[int, int, int]) -> None:
    ours, ref = towers
    t, h, w = grid
    patches = torch.randn(t * h * w, ours.config.patch_dim, generator=torch.Generator().manual_seed(t * 1000 + h * w))
    with torch.no_grad():
        expected = reference_forward(ref, patches, grid)
        got = run_ours(ours, patches, grid)
    compare(f"vit {grid}", got, expected)


def test_sdpa_matches_eager(towers) -> None:
    ours, _ = towers
    sdpa = Qwen25VisionTransformer(ours.config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(ours.state_dict())
    grid = (2, 10, 12)
    patches = torch.randn(240, ours.config.patch_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        compare("sdpa vs eager", run_ours(sdpa, patches, grid), run_ours(ours, patches, grid))


def test_masks_matter(towers) -> None:
    """The comparison can fail: full attention everywhere (no windows) is far from the reference."""
    ours, ref = towers
    grid = (1, 20, 14)
    patches = torch.randn(280, ours.config.patch_dim, generator=torch.Generator().manual_seed(3))
    inputs = vision_inputs(grid, ours.config).engine_inputs()
    inputs["window_mask"] = inputs["full_mask"]
    with torch.no_grad():
        wrong = ours(patches, **inputs)
        expected = reference_forward(ref, patches, grid)
    assert (wrong - expected).abs().max() > 1e-2


def test_video_is_separable_by_frame(towers) -> None:
    """A t=2 grid equals two t=1 runs concatenated (what lets long videos run frame by frame)."""
    ours, _ = towers
    t, h, w = 2, 10, 12
    patches = torch.randn(t * h * w, ours.config.patch_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = run_ours(ours, patches, (t, h, w))
        parts = torch.cat([run_ours(ours, chunk, (1, h, w)) for chunk in patches.split(h * w)])
    compare("t=2 vs 2 x t=1", whole, parts, tol=1e-5)


def test_host_inputs_structure() -> None:
    config = VisionConfig.tiny(OUT_HIDDEN)
    # 20 x 14 patches = 10 x 7 merge groups -> windows of 4 x 4 groups: rows 4,4,2 x cols 4,3.
    index, lengths = vision_window_index((1, 20, 14), config)
    assert lengths == [64, 48, 64, 48, 32, 24]
    assert index[:8].tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    assert sorted(index.tolist()) == list(range(70))
    inputs = vision_inputs((2, 4, 6), config)
    assert inputs.num_patches == 48
    assert inputs.full_mask[0, 23] == 0 and inputs.full_mask[0, 24] == MASK_VALUE
    assert torch.equal(inputs.window_index[inputs.reverse_index], torch.arange(12))
    assert inputs.window_mask.dtype == inputs.cos.dtype == torch.float32
    assert inputs.window_index.dtype == torch.int64


def test_config_json_round_trip(tmp_path: Path) -> None:
    real = {  # the Qwen2.5-VL-3B vision config as Lance's hack_qwen2_5_vl_config spells it, plus saved-file extras
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2, "_attn_implementation": "flash_attention_2", "model_type": "qwen2_5_vl",
    }
    assert VisionConfig.from_dict(real) == VisionConfig()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(VisionConfig.tiny(OUT_HIDDEN).to_dict()))
    assert VisionConfig.from_json(path) == VisionConfig.tiny(OUT_HIDDEN)
    written = VisionConfig().to_dict()
    assert written["in_channels"] == written["in_chans"] == 3
    assert written["fullatt_block_indexes"] == [7, 15, 23, 31]


@pytest.mark.parametrize("bad", [
    {"num_heads": 3},
    {"hidden_act": "gelu"},
    {"fullatt_block_indexes": [40]},
    {"window_size": 100},
    {"in_chans": 1, "in_channels": 3},
])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        VisionConfig.from_dict(bad)


@pytest.mark.parametrize("grid", [(1, 5, 8), (0, 8, 8), (1, 8), (1, -2, 4)])
def test_bad_grid(grid) -> None:
    with pytest.raises(ValueError):
        check_grid(grid, VisionConfig())
