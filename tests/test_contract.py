"""runtime/contract.py: the engine specs are consistent, their limits are what the product's preprocessing produces,
their names are the modules' signatures, and every view (ONNX axes, torch.export Dims, TensorRT profiles, sample
inputs, Triton I/O, JSON) is generated correctly."""

from __future__ import annotations

import inspect
import math

import pytest
import sympy
import torch
from torch.export import Dim

from runtime.spec import constants, contract, limits
from runtime.spec.contract import DimExpr, DType, EngineSpec, Profile, TensorSpec, engine_specs, scaled, total
from runtime.runners.graphs import VaeDecodeGraph, VaeEncodeGraph
from runtime.models.mot import LanceLLMConfig, LanceMoT
from runtime.models.vae import WanVAE, WanVAEConfig
from runtime.models.vit import Qwen25VisionTransformer, VisionConfig
from runtime.pipeline.core import VIT_TO_VAE_SIDE
from runtime.pipeline.preprocess import aspect_bucket
from runtime.spec.limits import MAX_NEW_TOKENS_RANGE

REAL = engine_specs(LanceLLMConfig(), VisionConfig(), WanVAEConfig())
TINY_LLM = LanceLLMConfig.tiny()
TINY_VISION = VisionConfig.tiny(out_hidden_size=TINY_LLM.hidden_size)
TINY = engine_specs(TINY_LLM, TINY_VISION, WanVAEConfig.tiny())


# --- Consistency ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", contract.ENGINES)
def test_every_dim_has_a_range_in_every_profile(name: str) -> None:
    spec = REAL[name]
    assert tuple(REAL) == contract.ENGINES
    for profile in spec.profiles:
        assert set(profile.dims) == spec.dynamic_dims
        for lo, opt, hi in profile.dims.values():
            assert 0 <= lo <= opt <= hi
        for which in range(3):
            for t in spec.tensors:
                assert min(spec.shape(t, **profile.point(which)), default=0) >= 0


@pytest.mark.parametrize("name", contract.ENGINES)
def test_dim_names_parse_as_sympy_symbols(name: str) -> None:
    """torch.export sympifies Dim names: ``N`` (a function), ``S`` or ``Lt`` (a relation) would break it."""
    for dim in REAL[name].dynamic_dims:
        assert isinstance(sympy.sympify(dim), sympy.Symbol), dim


def test_invalid_specs_are_refused() -> None:
    x = TensorSpec("x", DType.FP32, ("B", "n"), "")
    with pytest.raises(ValueError, match="missing ranges \\['n'\\]"):
        EngineSpec("e", (x,), (), (Profile("p", {"B": (1, 1, 1)}),))
    with pytest.raises(ValueError, match="unknown dims \\['q'\\]"):
        EngineSpec("e", (x,), (), (Profile("p", {"B": (1, 1, 1), "n": (1, 1, 1), "q": (1, 1, 1)}),))
    with pytest.raises(ValueError, match="0 <= min <= opt <= max"):
        Profile("p", {"n": (2, 1, 3)})
    hidden = TensorSpec("x", DType.FP32, (scaled("n", 2),), "")
    with pytest.raises(ValueError, match="appear only inside expressions"):
        EngineSpec("e", (hidden,), (), (Profile("p", {"n": (1, 1, 1)}),))
    y = TensorSpec("y", DType.FP32, ("m",), "")
    with pytest.raises(ValueError, match="neither inputs' dims nor sizes"):
        EngineSpec("e", (x,), (y,), (Profile("p", {"B": (1, 1, 1), "n": (1, 1, 1)}),))
    with pytest.raises(ValueError, match="duplicate tensor names"):
        EngineSpec("e", (x, x), (), (Profile("p", {"B": (1, 1, 1), "n": (1, 1, 1)}),))


# --- Limits = what preprocessing produces ---------------------------------------------------------------------------


def _reachable_buckets(area_side: int) -> set[tuple[int, int]]:
    """Every bucket `aspect_bucket` gives at ``area_side`` for images from 1:4 to 4:1."""
    return {aspect_bucket(1000, width, area_side) for width in range(250, 4001, 25)}


def _edit_latent_grids() -> set[tuple[int, int]]:
    """Latent grids of edit references (= edit targets): buckets at every requested area side (the pipeline's
    ``round(sqrt(height * width))`` for sides in [MIN_SIZE, MAX_SIZE]), 16 px per cell."""
    grids = set()
    for side in range(limits.MIN_SIZE, limits.MAX_SIZE + 1):
        grids |= {(h // 16, w // 16) for h, w in _reachable_buckets(side)}
    return grids


VISION = VisionConfig()


def _vit_grids() -> set[tuple[int, int]]:
    """Patch grids of ViT inputs: buckets at the pipeline's ViT side for every area side (and x2t's 672), cropped
    to multiples of 28."""
    crop, merge = constants.VIT_CROP_MULTIPLE, VISION.spatial_merge_size
    sides = {round(s * VIT_TO_VAE_SIDE) for s in range(limits.MIN_SIZE, limits.MAX_SIZE + 1)}
    sides.add(constants.VIT_RESOLUTION_IMAGE)
    return {(h // crop * merge, w // crop * merge) for s in sides for h, w in _reachable_buckets(s)}


def test_latent_limits_match_the_buckets() -> None:
    edit = _edit_latent_grids()
    t2i = {(h // 16, w // 16) for h in range(256, 1025, 16) for w in range(256, 1025, 16)}
    grids = edit | t2i
    assert min(min(g) for g in grids) == contract.MIN_LATENT_SIDE
    assert max(max(g) for g in grids) == contract.MAX_LATENT_SIDE
    assert max(min(g) for g in grids) == contract.MAX_LATENT_SHORT_SIDE
    assert min(h * w for h, w in grids) == contract.MIN_LATENT_TOKENS
    assert max(h * w for h, w in grids) == contract.MAX_LATENT_TOKENS
    assert contract.DEFAULT_LATENT_SIDE == constants.DEFAULT_HEIGHT // constants.VAE_DOWNSAMPLE_SPATIAL
    for h, w in grids:
        dims = {"h": h, "w": w}
        REAL["vae_encode"].select_profile(dims)
        REAL["vae_decode"].select_profile(dims)
        REAL["mot"].select_profile({"B": 2, "Lhead": 1, "Lgen": h * w, "Ltail": 1, "P": 300})


def test_vit_limits_match_the_buckets() -> None:
    grids = _vit_grids()
    patches = {h * w for h, w in grids}
    assert (min(patches), max(patches)) == (contract.MIN_VIT_PATCHES, contract.MAX_VIT_PATCHES)
    assert contract.VIT_MERGE_UNIT == VISION.merge_unit
    side = constants.VIT_RESOLUTION_IMAGE // VISION.patch_size
    assert contract.DEFAULT_VIT_ROWS == side * side // contract.VIT_MERGE_UNIT
    for count in patches:
        REAL["vit"].select_profile({"M": count // contract.VIT_MERGE_UNIT})


def test_prefill_and_past_cover_the_longest_requests() -> None:
    vit_block = contract.MAX_VIT_PATCHES // contract.VIT_MERGE_UNIT + 2
    ref_block = contract.MAX_LATENT_TOKENS + 2
    assert contract.MAX_PREFILL_ROWS >= max(vit_block, contract.MAX_TEXT_SPLIT)
    # System prompt and user text are bounded by a text split each.
    edit_context = 2 * contract.MAX_TEXT_SPLIT + vit_block + ref_block
    x2t_context = 2 * contract.MAX_TEXT_SPLIT + vit_block + MAX_NEW_TOKENS_RANGE[1]
    assert contract.MAX_PAST >= max(edit_context, x2t_context)
    mot = REAL["mot"]
    assert mot.select_profile({"B": 1, "Lhead": vit_block, "Lgen": 0, "Ltail": 0, "P": 0}) == 0
    assert mot.select_profile({"B": 1, "Lhead": 1, "Lgen": 0, "Ltail": 0, "P": contract.MAX_PAST}) in (0, 1)
    assert mot.select_profile({"B": 2, "Lhead": 1, "Lgen": ref_block - 2, "Ltail": 1, "P": edit_context}) == 2


def test_profile_selection() -> None:
    vae = REAL["vae_decode"]
    assert [p.name for p in vae.profiles] == ["landscape", "portrait"]
    assert vae.select_profile({"h": 42, "w": 98}) == 0 and vae.select_profile({"h": 98, "w": 42}) == 1
    with pytest.raises(ValueError, match="fit no profile"):
        vae.select_profile({"h": 98, "w": 98})


# --- Names = the modules' signatures; outputs = the modules' outputs ------------------------------------------------


@pytest.mark.parametrize("name, functions", [
    ("mot", (LanceMoT.forward, LanceMoT.step)),
    ("vit", (Qwen25VisionTransformer.forward,)),
    ("vae_encode", (VaeEncodeGraph.forward,)),
    ("vae_decode", (VaeDecodeGraph.forward,)),
])
def test_input_names_are_the_signatures(name: str, functions) -> None:
    for function in functions:
        assert tuple(inspect.signature(function).parameters)[1:] == REAL[name].input_names


def _tiny_modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.tiny())
    return {"vit": Qwen25VisionTransformer(TINY_VISION), "mot": LanceMoT(TINY_LLM),
            "vae_encode": VaeEncodeGraph(vae), "vae_decode": VaeDecodeGraph(vae)}


DIMS = {
    "vit": {"M": 50},
    "mot": {"B": 2, "Lhead": 1, "Lgen": 230, "Ltail": 1, "P": 3},
    "vae_encode": {"h": 10, "w": 23},
    "vae_decode": {"h": 23, "w": 10},
}


@pytest.mark.parametrize("precision", contract.PRECISIONS)
def test_outputs_have_the_contract_shapes_and_dtypes(precision: str) -> None:
    """Each engine module, fed `sample_inputs`, returns the contract's outputs in order, shapes and dtypes (bf16: the
    weights in bf16; the VAE modules keep fp32 I/O either way)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, module in _tiny_modules().items():
        spec = TINY[name]
        feed = contract.sample_inputs(spec, precision, **DIMS[name])
        with torch.no_grad():
            outputs = module.to(dtype)(**feed)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        assert len(outputs) == len(spec.outputs)
        for t, value in zip(spec.outputs, outputs):
            assert tuple(value.shape) == spec.shape(t, **DIMS[name]), (name, t.name)
            assert value.dtype == contract.torch_dtype(t.dtype, precision), (name, t.name)
            assert torch.isfinite(value.float()).all()


# --- Views ------------------------------------------------------------------------------------------------------------


def test_dynamic_axes_spell_the_contract() -> None:
    assert contract.dynamic_axes(REAL["vae_decode"]) == {"latent": {2: "h", 3: "w"},
                                                          "image": {2: "16*h", 3: "16*w"}}
    mot = contract.dynamic_axes(REAL["mot"])
    assert mot["cos"] == {0: "B", 1: "Lhead+Lgen+Ltail"} and mot["past_key"] == {1: "B", 2: "P"}
    assert "causal" not in mot and mot["logits"] == {0: "B"}
    assert contract.dynamic_axes(REAL["vit"])["window_mask"] == {0: "4*M", 1: "4*M"}


def test_torch_dynamic_shapes() -> None:
    shapes = contract.torch_dynamic_shapes(REAL["mot"])
    assert shapes["causal"] == {} and shapes["cos"][1] is Dim.AUTO
    assert shapes["und_head"][1].__name__ == "Lhead" and shapes["latents"][1].min == 0
    vae = contract.torch_dynamic_shapes(REAL["vae_encode"])
    assert vae["image"][2].__name__ == "16*h" and vae["noise"][2].__name__ == "h" and vae["noise"][2].min == 10


def test_export_dims_are_distinct_and_in_range() -> None:
    for spec in REAL.values():
        dims = contract.export_dims(spec)
        assert len(set(dims.values())) == len(dims)
        assert all(v >= max(2, spec.dim_range(k)[0]) for k, v in dims.items())


def test_profile_shapes() -> None:
    shapes = REAL["mot"].profile_shapes("gen")
    assert shapes["cos"] == ((1, 232, 128), (2, 2306, 128), (2, contract.MAX_VIDEO_LATENT_TOKENS + 2, 128))
    assert shapes["past_key"][2] == (36, 2, contract.MAX_PAST, 2, 128)
    assert REAL["vae_encode"].profile_shapes("portrait")["image"][2] == (1, 3, 98 * 16, 64 * 16)


def test_sample_inputs_follow_dtypes_bounds_and_seed() -> None:
    spec = REAL["vit"]
    a = contract.sample_inputs(spec, "bf16", seed=3, M=50)
    b = contract.sample_inputs(spec, "bf16", seed=3, M=50)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["patches"].dtype == torch.float32 and a["patches"].shape == (200, 1176)   # FP32 in every precision
    assert a["window_index"].dtype == torch.int64 and 0 <= a["window_index"].min() and a["window_index"].max() <= 49
    mot = contract.sample_inputs(TINY["mot"], "bf16", B=2, Lhead=1, Lgen=0, Ltail=0, P=4)
    assert mot["und_head"].dtype == torch.bfloat16 and mot["timestep"].dtype == torch.float32
    assert mot["causal"].dtype == torch.bool and mot["causal"].shape == ()
    assert mot["past_len"].max() <= 4 and mot["latents"].shape == (2, 0, 48)
    with pytest.raises(KeyError, match="no value for dims \\['Lgen'"):
        contract.sample_inputs(TINY["mot"], B=1, Lhead=1, Ltail=0, P=0)


def test_dims_of_reads_and_checks_a_feed() -> None:
    spec = TINY["vae_encode"]
    assert spec.dims_of({"image": (1, 3, 160, 368), "noise": (1, 48, 10, 23)}) == {"h": 10, "w": 23}
    with pytest.raises(ValueError, match="input 'image': shape \\(1, 3, 160, 360\\), expected \\(1, 3, 160, 368\\)"):
        spec.dims_of({"image": (1, 3, 160, 360), "noise": (1, 48, 10, 23)})
    with pytest.raises(ValueError, match="input 'noise': rank 3"):
        spec.dims_of({"image": (1, 3, 160, 368), "noise": (48, 10, 23)})
    mot = TINY["mot"]
    feed = {t.name: spec_shape for t, spec_shape in
            ((t, mot.shape(t, B=1, Lhead=2, Lgen=0, Ltail=0, P=5)) for t in mot.inputs)}
    feed["cos"] = (1, 3, 16)
    with pytest.raises(ValueError, match="input 'cos'"):
        mot.dims_of(feed)


def test_triton_io_blocks() -> None:
    text = contract.triton_io(REAL["vae_decode"], "bf16")
    assert text == ('input [\n  {\n    name: "latent"\n    data_type: TYPE_FP32\n    dims: [ 1, 48, -1, -1 ]\n  }\n]\n'
                    'output [\n  {\n    name: "image"\n    data_type: TYPE_FP32\n    dims: [ 1, 3, -1, -1 ]\n  }\n]\n')
    vit = contract.triton_io(REAL["vit"], "bf16")
    assert 'name: "hidden"\n    data_type: TYPE_BF16\n    dims: [ -1, 2048 ]' in vit
    assert 'name: "causal"\n    data_type: TYPE_BOOL\n    dims: [ 1 ]\n    reshape: { shape: [ ] }' in \
        contract.triton_io(REAL["mot"], "fp32")


def test_json_round_trip_and_digest() -> None:
    for spec in REAL.values():
        assert EngineSpec.from_dict(spec.to_dict()) == spec
    assert REAL["mot"].digest() != TINY["mot"].digest()
    assert engine_specs(LanceLLMConfig(), VisionConfig(), WanVAEConfig())["vit"].digest() == REAL["vit"].digest()


def test_dim_expressions() -> None:
    for text in ("16*h", "Lhead+Lgen+Ltail", "M-1", "2*a+3", "a+2*b-5"):
        assert str(DimExpr.parse(text)) == text
    assert total("a", "b").evaluate({"a": 2, "b": 5}) == 7 and scaled("h", 16).evaluate({"h": 3}) == 48
    for bad in ("16*", "a*b", "h**2", "-1"):
        with pytest.raises(ValueError):
            DimExpr.parse(bad)
    with pytest.raises(ValueError, match="positive coefficient"):
        DimExpr((("a", 0),))


def test_engine_specs_refuse_mismatched_configs() -> None:
    with pytest.raises(ValueError, match="out_hidden_size 64 != LLM hidden_size 2048"):
        engine_specs(LanceLLMConfig(), TINY_VISION, WanVAEConfig())
    assert REAL["vae_decode"].sizes == {"C": 3, "Z": 48}
    assert REAL["mot"].sizes == {"D": 2048, "Z": 48, "NL": 36, "KVH": 2, "HD": 128, "V": 151936}
    assert REAL["vit"].sizes == {"PD": 1176, "HD": 80, "DO": 2048}
    assert math.prod(REAL["vae_encode"].shape(REAL["vae_encode"].inputs[0], h=2, w=3)) == 3 * 32 * 48
