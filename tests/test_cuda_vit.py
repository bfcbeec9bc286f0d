"""runtime/engines/cuda_vit.py against the reference tower `Qwen25VisionTransformer` (eager attention, additive
``(P, P)`` masks), in fp32 on CPU.

Two tiny configs with real patch and merge sizes: one whose MLP width (40) pads to 64, one with a width of 100 (pads
to 128) and 84-px windows (3 x 3 merge groups), so edge windows come in several lengths and segment groups take both
the view and the gather paths. The reference runs on its own copy of the seeded weights; the fast tower pads another
copy, which must keep computing the same. Graph capture and compiled chains need CUDA: their test skips without it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from runtime.spec.contract import EngineSpec, vit_spec
from runtime.runners import EngineError
from runtime.runners.cuda_vit import CudaVisionTower, CudaVitRunner, SegmentLayout, padded_width, segment_lengths
from runtime.models.vit import Qwen25VisionTransformer, VisionConfig, vision_inputs
from tests.parity import compare, randomize

OUT_HIDDEN = 48
CONFIGS = {
    "pad40": replace(VisionConfig.tiny(OUT_HIDDEN), intermediate_size=40),
    "pad100_win84": replace(VisionConfig.tiny(OUT_HIDDEN), intermediate_size=100, window_size=84,
                            fullatt_block_indexes=(0, 2)),
}
# (config, (t, h, w) in patches). pad40 windows are 8 x 8 patches, pad100_win84 windows 6 x 6.
CASES = [
    ("pad40", (1, 8, 8)),       # exactly one window
    ("pad40", (1, 16, 24)),     # six whole windows: one group, a view of every row
    ("pad40", (1, 20, 14)),     # edges cut on both axes: windows of 64, 48, 32, 24 rows, two groups gathered
    ("pad40", (2, 10, 12)),     # two frames (a 4-frame video), cut windows in each
    ("pad40", (1, 12, 28)),     # non-square, cut columns and rows
    ("pad40", (1, 4, 6)),       # non-square, smaller than a window
    ("pad100_win84", (1, 6, 6)),     # exactly one window
    ("pad100_win84", (1, 16, 20)),   # windows of 36, 12, 24, 8 rows
    ("pad100_win84", (2, 6, 10)),    # two frames, windows of 36 and 24 rows
]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and compile need a CUDA device")


def random_tower(config: VisionConfig, seed: int = 0) -> Qwen25VisionTransformer:
    tower = Qwen25VisionTransformer(config).eval()
    randomize(tower, seed)
    return tower


def feed(config: VisionConfig, grid: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    """A contract feed: random patches and the host inputs of ``grid``."""
    t, h, w = grid
    patches = torch.randn(t * h * w, config.patch_dim, generator=torch.Generator().manual_seed(seed))
    return {**vision_inputs(grid, config).engine_inputs(), "patches": patches}


def spec_of(config: VisionConfig) -> EngineSpec:
    return vit_spec(patch_dim=config.patch_dim, head_dim=config.head_dim, out_hidden=config.out_hidden_size,
                    merge_unit=config.merge_unit)


@pytest.fixture(scope="module")
def towers() -> dict[str, tuple[Qwen25VisionTransformer, Qwen25VisionTransformer, CudaVitRunner]]:
    """Per config: the untouched reference, the copy the fast tower padded, and the runner over the fast tower."""
    built = {}
    for name, config in CONFIGS.items():
        reference, source = random_tower(config), random_tower(config)
        built[name] = reference, source, CudaVitRunner(spec_of(config), CudaVisionTower(source))
    return built


@pytest.mark.parametrize("name,grid", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_runner_matches_reference(towers, name: str, grid: tuple[int, int, int]) -> None:
    reference, _, runner = towers[name]
    inputs = feed(reference.config, grid, seed=sum(grid))
    with torch.no_grad():
        expected = reference(**inputs)
    out = runner.infer(inputs)
    assert list(out) == ["hidden"]
    compare(f"cuda_vit {name} {grid}", out["hidden"], expected)


def test_padding_keeps_reference_module(towers) -> None:
    """The padded storage holds the module's own weights: same values, shared memory, zero padding, same output."""
    config = CONFIGS["pad100_win84"]
    before = random_tower(config)
    inputs = feed(config, (1, 16, 20), seed=11)
    with torch.no_grad():
        expected = before(**inputs)
    snapshot = {k: v.clone() for k, v in before.state_dict().items()}
    fast = CudaVisionTower(before)
    after = before.state_dict()
    assert after.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
    with torch.no_grad():
        compare("reference after padding", before(**inputs), expected, tol=1e-6)
    width = padded_width(config.intermediate_size)
    assert width == 128
    block, mlp = fast.blocks[1], before.blocks[1].mlp
    assert block.gate_up_weight.shape == (2 * width, config.hidden_size)
    assert block.down_weight.shape == (config.hidden_size, width)
    assert mlp.gate_proj.weight.data_ptr() == block.gate_up_weight.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == block.gate_up_weight[width].data_ptr()
    assert mlp.down_proj.weight.data_ptr() == block.down_weight.data_ptr()
    assert block.qkv_weight.data_ptr() == before.blocks[1].attn.qkv.weight.data_ptr()
    inner = config.intermediate_size
    for pad in (block.gate_up_weight[inner:width], block.gate_up_weight[width + inner:],
                block.gate_up_bias[inner:width], block.gate_up_bias[width + inner:], block.down_weight[:, inner:]):
        assert not pad.any()


def test_layout_from_masks() -> None:
    config = CONFIGS["pad40"]
    # 20 x 14 patches: windows of 64, 48, 64, 48, 32, 24 rows (vision_window_index's order).
    inputs = vision_inputs((1, 20, 14), config)
    layout = SegmentLayout.from_masks(inputs.window_mask, inputs.full_mask, "cpu")
    assert layout.window_lengths == (64, 48, 64, 48, 32, 24) and layout.frame_lengths == (280,)
    groups = {g.length: g for g in layout.windows}
    assert groups[64].start is None and groups[64].index.tolist() == [*range(0, 64), *range(112, 176)]
    assert groups[48].start is None and groups[48].count == 2
    assert (groups[32].start, groups[24].start) == (224, 256)
    assert [(g.length, g.count, g.start) for g in layout.frames] == [(280, 1, 0)]
    # Two frames of 120 rows: one batched group, a view.
    video = vision_inputs((2, 10, 12), config)
    lengths = segment_lengths(video.window_mask, video.full_mask)
    assert lengths == ((64, 32, 16, 8) * 2, (120, 120))
    frames = SegmentLayout.build(*lengths, "cpu").frames
    assert [(g.length, g.count, g.start) for g in frames] == [(120, 2, 0)]
    # Equal and hashed by lengths alone: the runner's graph key.
    assert SegmentLayout.build(*lengths, "cpu") == SegmentLayout.build(*lengths, "cpu")
    assert len({SegmentLayout.build(*lengths, "cpu"), SegmentLayout.build(*lengths, "cpu")}) == 1


def test_windows_matter(towers) -> None:
    """The comparison can fail: attending over whole frames in the windowed blocks is far from the reference."""
    reference, _, runner = towers["pad40"]
    inputs = feed(reference.config, (1, 20, 14), seed=3)
    frames = (280,)
    wrong_layout = SegmentLayout.build(frames, frames, "cpu")
    tower_inputs = {k: inputs[k] for k in ("patches", "cos", "sin", "window_index", "reverse_index")}
    with torch.no_grad():
        wrong = runner.tower.forward(wrong_layout, **tower_inputs)
        expected = reference(**inputs)
    assert (wrong - expected).abs().max() > 1e-2


def test_bad_inputs(towers) -> None:
    reference, _, runner = towers["pad40"]
    inputs = feed(reference.config, (1, 8, 8), seed=1)
    with pytest.raises(EngineError, match="window_mask"):
        runner.infer({**inputs, "window_mask": inputs["window_mask"][:32, :32]})
    with pytest.raises(EngineError, match="missing inputs"):
        runner.infer({k: v for k, v in inputs.items() if k != "full_mask"})
    with pytest.raises(ValueError, match="cover the same rows"):
        SegmentLayout.build((64, 32), (64,), "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        CudaVisionTower(random_tower(reference.config), compile=True)


@NEEDS_CUDA
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_replay(compile: bool) -> None:
    """Capture (first call), replay (second call, new patches, masks on the host) and a second structure, each
    against the reference on the GPU; one graph per structure."""
    config = CONFIGS["pad40"]
    reference = random_tower(config).cuda()
    runner = CudaVitRunner(spec_of(config), CudaVisionTower(random_tower(config).cuda(), compile=compile))
    for step, grid in enumerate([(1, 20, 14), (1, 20, 14), (1, 16, 24)]):
        inputs = feed(config, grid, seed=step)
        device_inputs = {k: v.cuda() for k, v in inputs.items()}
        with torch.no_grad():
            expected = reference(**device_inputs)
        host_masks = {k: v.cuda() if k not in runner.host_inputs else v for k, v in inputs.items()}
        compare(f"cuda graph {grid} call {step}", runner.infer(host_masks)["hidden"], expected)
    assert runner.num_graphs == 2
