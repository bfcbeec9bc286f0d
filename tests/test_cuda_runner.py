"""runtime/engines/cuda.py against `LanceMoT.step`: the fused projections, the block-first K/V workspace, the
per-branch unmasked attention and the masked decode layout compute the reference step, in fp32 on CPU.

Every call kind of the pipeline is covered (CFG denoise query with unequal past lengths, text prefill, ViT block,
decode with a stale cache tail, a latent-only block, a causal block that mixes experts), on a tiny model with random
weights at unit gain where the und and gen experts differ; the FP8 gen expert against the exact step, and
the benchmark script on tiny configs. The CUDA-only parts (graph capture and replay, compiled kernels, the Triton
SwiGLU kernel) have tests that skip without CUDA; `benchmarks.gpu_check` checks the full-size model on a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from runtime.spec.contract import EngineSpec, engine_specs, torch_dtype
from runtime.runners import EngineError
from runtime.runners.cuda_kernels import (
    FP8_MAX,
    Fp8Weight,
    add_rms_norm,
    quantize_rows,
    rms_norm,
    scaled_linear,
    silu_mul,
    silu_mul_quantize,
)
from runtime.runners.cuda_mot import CudaMoT, CudaMotRunner, StepLayout, layout_of, qk_norm_rope_
from runtime.models.mot import LanceLLMConfig, LanceMoT, apply_rotary, mrope_cos_sin
from runtime.models.vae import WanVAEConfig
from runtime.models.vit import VisionConfig
from tests.parity import compare, randomize

Z = 48
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA GPU; this machine has none")


def _fp8_skip_reason(device: str) -> str | None:
    """Why the FP8 GEMM cannot run on ``device`` here, or None: no CUDA GPU, a GPU before sm89, or a
    ``torch._scaled_mm`` without row-wise scales (torch 2.11's CPU kernel takes per-tensor scales only)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU; this machine has none"
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        return f"needs FP8 tensor cores (sm89+); this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    if not _rowwise_scaled_mm_on(device):
        return f"torch {torch.__version__}'s _scaled_mm on {device} takes no row-wise scales"
    return None


def _rowwise_scaled_mm_on(device: str) -> bool:
    """Whether ``torch._scaled_mm`` takes row-wise scales on ``device``."""
    if device == "cuda" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        return False
    data = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(data, data.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the reason is its own")
def test_fp8_skip_reason_names_the_missing_gpu() -> None:
    """Without CUDA the reason is the missing GPU, not a _scaled_mm limitation that was never probed."""
    assert _fp8_skip_reason("cuda") == "needs a CUDA GPU; this machine has none"


FP8_DEVICES = [pytest.param(device, marks=pytest.mark.skipif(
    _fp8_skip_reason(device) is not None, reason=str(_fp8_skip_reason(device))))
    for device in ("cpu", "cuda")]


def random_model(config: LanceLLMConfig, seed: int) -> LanceMoT:
    """A model with `tests.parity.randomize` weights (the two experts differ)."""
    model = LanceMoT(config).eval()
    randomize(model, seed)
    return model


def feed(config: LanceLLMConfig, *, batch: int, head: int, latent: int, tail: int, past_rows: int,
         past_len: list[int], causal: bool, seed: int) -> dict[str, torch.Tensor]:
    """A contract feed with random rows, random positions and a past buffer full of random values."""
    g = torch.Generator().manual_seed(seed)
    d, rows = config.hidden_size, head + latent + tail
    positions = torch.randint(0, 500, (batch, 3, rows), generator=g)
    cos, sin = mrope_cos_sin(positions, config.head_dim, config.rope_theta, config.mrope_section)
    kv_shape = (config.num_hidden_layers, batch, past_rows, config.num_key_value_heads, config.head_dim)
    return {
        "und_head": torch.randn(batch, head, d, generator=g),
        "latents": torch.randn(batch, latent, Z, generator=g),
        "timestep": torch.rand(batch, latent, generator=g),
        "latent_pos": torch.randn(latent, d, generator=g),
        "und_tail": torch.randn(batch, tail, d, generator=g),
        "cos": cos,
        "sin": sin,
        "past_key": 3 * torch.randn(kv_shape, generator=g),
        "past_value": 3 * torch.randn(kv_shape, generator=g),
        "past_len": torch.tensor(past_len, dtype=torch.int64),
        "causal": torch.tensor(causal),
    }


def placed(spec: EngineSpec, inputs: dict[str, torch.Tensor], device: str, precision: str) -> dict[str, torch.Tensor]:
    """A feed on ``device`` in the contract dtypes of ``precision``."""
    return {name: t.to(device, torch_dtype(spec.tensor(name).dtype, precision)) for name, t in inputs.items()}


def check(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """`compare`, or for an empty output (no latent rows) equal shapes and dtypes."""
    if ref.numel() == 0:
        assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{name}: {ours.shape} != {ref.shape}"
        return
    compare(name, ours, ref, tol=tol)


@pytest.fixture(scope="module")
def models() -> tuple[LanceMoT, LanceMoT, CudaMotRunner]:
    """The reference model, an identical copy whose weights the fast path re-packs, and the runner over it."""
    config = LanceLLMConfig.tiny()
    reference = random_model(config, seed=0)
    fused = random_model(config, seed=0)
    spec = engine_specs(config, VisionConfig.tiny(out_hidden_size=config.hidden_size), WanVAEConfig.tiny())["mot"]
    return reference, fused, CudaMotRunner(spec, CudaMoT(fused))


CASES = {
    # CFG denoise query: <vs> + latents + <ve>, both branches, unequal contexts (cond 7, cfg_text 4 of P = 7).
    "denoise_cfg": dict(batch=2, head=1, latent=12, tail=1, past_rows=7, past_len=[7, 4], causal=False),
    "denoise_equal_past": dict(batch=2, head=1, latent=9, tail=1, past_rows=6, past_len=[6, 6], causal=False),
    "denoise_single": dict(batch=1, head=1, latent=16, tail=1, past_rows=5, past_len=[5], causal=False),
    "text_prefill_first": dict(batch=1, head=6, latent=0, tail=0, past_rows=0, past_len=[0], causal=True),
    "text_prefill": dict(batch=1, head=5, latent=0, tail=0, past_rows=8, past_len=[6], causal=True),
    "vit_block": dict(batch=1, head=7, latent=0, tail=0, past_rows=4, past_len=[4], causal=False),
    # Decode: one text row; the past buffer has rows past the valid length (masked layout).
    "decode": dict(batch=1, head=1, latent=0, tail=0, past_rows=11, past_len=[9], causal=True),
    "decode_two_branches": dict(batch=2, head=1, latent=0, tail=0, past_rows=10, past_len=[10, 3], causal=True),
    "latent_only": dict(batch=1, head=0, latent=6, tail=0, past_rows=3, past_len=[3], causal=False),
    "causal_mixed": dict(batch=2, head=2, latent=3, tail=1, past_rows=4, past_len=[2, 4], causal=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_runner_matches_reference_step(models, case: str) -> None:
    reference, fused, runner = models
    inputs = feed(reference.config, seed=sorted(CASES).index(case), **CASES[case])
    names = [t.name for t in runner.spec.inputs]
    with torch.no_grad():
        expected = reference.step(*(inputs[name] for name in names))
        again = fused.step(*(inputs[name] for name in names))
    ours = runner.infer(inputs)
    for name, ref, same, out in zip(runner.spec.output_names, expected, again, ours.values()):
        assert torch.equal(ref, same), f"{name}: re-packing changed the model's own step"
        check(f"{case} {name}", out, ref)


def test_layout_reads_host_structure(models) -> None:
    config = models[0].config
    denoise = layout_of(feed(config, seed=0, **CASES["denoise_cfg"]))
    assert denoise == StepLayout(2, 1, 12, 1, 7, (7, 4), causal=False)
    assert (denoise.und, denoise.block, denoise.capacity, denoise.needs_mask) == (2, 14, 7, False)
    decode = layout_of(feed(config, seed=0, **CASES["decode"]))
    assert decode.masked and decode.needs_mask and not decode.causal
    assert decode.capacity == 255 and (decode.block + decode.capacity) % 256 == 0     # aligned key count
    # Decode steps share one graph key up to the capacity; exact layouts key on every past length.
    longer = layout_of(feed(config, seed=0, **{**CASES["decode"], "past_rows": 200, "past_len": [150]}))
    assert longer.graph_key == decode.graph_key
    other = layout_of(feed(config, seed=0, **{**CASES["denoise_cfg"], "past_len": [7, 5]}))
    assert other.graph_key != denoise.graph_key
    with pytest.raises(EngineError, match="past_len"):
        layout_of(feed(config, seed=0, **{**CASES["denoise_cfg"], "past_len": [8, 4]}))


def test_fusion_aliases_the_model_weights(models) -> None:
    """The model's q/k/v and gate/up parameters become views of the fused matrices: nothing is held twice."""
    _, fused, runner = models
    layer, expert = fused.language_model.model.layers[1], runner.model.layers[1][1]
    attn = layer.self_attn
    q_rows = attn.q_proj_moe_gen.out_features
    assert attn.q_proj_moe_gen.weight.data_ptr() == expert.qkv_weight.data_ptr()
    assert attn.k_proj_moe_gen.weight.data_ptr() == expert.qkv_weight[q_rows].data_ptr()
    assert attn.v_proj_moe_gen.bias.data_ptr() == expert.qkv_bias[-attn.v_proj_moe_gen.out_features].data_ptr()
    assert layer.mlp_moe_gen.up_proj.weight.data_ptr() == expert.gate_up_weight[
        layer.mlp_moe_gen.gate_proj.out_features].data_ptr()
    und = runner.model.layers[1][0]
    assert not torch.equal(und.qkv_weight, expert.qkv_weight)
    assert layer.self_attn.q_proj.weight.data_ptr() == und.qkv_weight.data_ptr()


def test_element_wise_chains_by_formula() -> None:
    g = torch.Generator().manual_seed(5)
    x, delta, w = torch.randn(4, 7, 32, generator=g), torch.randn(4, 7, 32, generator=g), torch.randn(32, generator=g)
    expected = w * (x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6))
    compare("rms_norm", rms_norm(x, w, 1e-6), expected, tol=1e-6)
    h, normed = add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(h, x + delta)
    compare("add_rms_norm", normed, rms_norm(x + delta, w, 1e-6), tol=0)
    gate_up = torch.randn(5, 2 * 6, generator=g)
    compare("silu_mul", silu_mul(gate_up), gate_up[:, :6] * torch.sigmoid(gate_up[:, :6]) * gate_up[:, 6:], tol=1e-6)

    heads, kv_heads, hd = 4, 2, 8
    qkv = torch.randn(2, 3, (heads + 2 * kv_heads) * hd, generator=g)
    cos, sin = torch.randn(2, 3, hd, generator=g), torch.randn(2, 3, hd, generator=g)
    wq, wk = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    q_out = torch.full((2, 3, heads, hd), float("nan"))
    # Outputs are written through strided views, as into the K/V workspace.
    k_buf, v_buf = torch.full((2, 5, kv_heads, hd), float("nan")), torch.full((2, 5, kv_heads, hd), float("nan"))
    qk_norm_rope_(qkv, cos, sin, wq, wk, 1e-6, q_out, k_buf[:, 1:4], v_buf[:, 1:4])
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q_ref, k_ref = apply_rotary(rms_norm(q.reshape(2, 3, heads, hd), wq, 1e-6),
                                rms_norm(k.reshape(2, 3, kv_heads, hd), wk, 1e-6), cos, sin)
    compare("qk_norm_rope q", q_out, q_ref, tol=1e-6)
    compare("qk_norm_rope k", k_buf[:, 1:4], k_ref, tol=1e-6)
    assert torch.equal(v_buf[:, 1:4], v.reshape(2, 3, kv_heads, hd))
    assert torch.isnan(k_buf[:, 0]).all() and torch.isnan(v_buf[:, 4]).all()


def test_without_qk_norm(models) -> None:
    """A model without q/k-norm (plain Qwen2.5-VL) takes the same path with the norms left out."""
    config = replace(LanceLLMConfig.tiny(), qk_norm=False)
    reference, fused = random_model(config, seed=4), random_model(config, seed=4)
    runner = CudaMotRunner(models[2].spec, CudaMoT(fused))
    inputs = feed(config, seed=9, **CASES["denoise_cfg"])
    with torch.no_grad():
        expected = reference.step(*(inputs[t.name] for t in runner.spec.inputs))
    for name, ref, out in zip(runner.spec.output_names, expected, runner.infer(inputs).values()):
        check(f"no qk-norm {name}", out, ref)


@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_quantization_by_formula(device: str) -> None:
    """Row-wise e4m3: each row's absolute maximum lands on 448 exactly, every element within e4m3's relative
    rounding (3 mantissa bits: <= 2**-4 for normal values), zero rows stay zero (no NaN), and the scaled GEMM equals
    the product of the dequantized operands (on CUDA with a bf16 output, as `CudaMoT` runs it)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 64, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0
    data, scale = quantize_rows(x)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.isfinite(data.float()).all() and torch.equal(data[2].float(), torch.zeros(64))
    nonzero = [0, 1, 3, 4, 5]
    assert torch.equal(data.float().abs().amax(-1)[nonzero], torch.full((5,), FP8_MAX))
    restored = data.float() * scale
    normal = (x / scale).abs() >= 2**-6            # e4m3's smallest normal; below it the step is absolute
    assert ((restored - x).abs() <= 2**-4 * x.abs() + 1e-30)[normal].all()
    weight, bias = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    w8 = Fp8Weight.quantize(weight)
    assert w8.data.shape == (32, 64) and w8.scale.shape == (1, 32)
    expected = restored @ (w8.data.float() * w8.scale.t()).t() + bias
    out_dtype = torch.bfloat16 if device == "cuda" else torch.float32     # CUDA's row-wise kernel writes bf16
    on = {"device": device}
    w8_on = Fp8Weight(w8.data.to(**on), w8.scale.to(**on))
    out = scaled_linear(data.to(**on), scale.to(**on), w8_on, bias.to(out_dtype).to(**on), out_dtype)
    compare(f"scaled_linear {device}", out.float().cpu(), expected, tol=1e-5 if device == "cpu" else 1e-2)
    gate_up = torch.randn(5, 2 * 48, generator=g)
    fused, reference = silu_mul_quantize(gate_up), quantize_rows(silu_mul(gate_up))
    assert torch.equal(fused[0].float(), reference[0].float()) and torch.equal(fused[1], reference[1])


@pytest.mark.parametrize("device", FP8_DEVICES)
def test_fp8_gen_expert(models, device: str) -> None:
    """`CudaMoT(fp8_gen=True)`: the gen expert's GEMMs in FP8 keep the velocity within the denoise gate of the exact
    fp32 step (cosine >= 0.995, gpu_check's velocity gate; e4m3 rounds each operand by up to 2**-4; on CUDA the model
    runs in bf16), und-only calls (prefill, decode) are bit-identical to the unquantized fast path, and the twin
    shares the und weights."""
    reference, _, runner = models
    if device == "cuda":
        fused = random_model(reference.config, seed=0).to("cuda", torch.bfloat16)
        runner = CudaMotRunner(runner.spec, CudaMoT(fused), graphs=False)
    fp8 = CudaMotRunner(runner.spec, runner.model.with_fp8_gen(), graphs=False)
    assert fp8.model.layers[0][0] is runner.model.layers[0][0]
    assert isinstance(fp8.model.layers[0][1].down_weight, Fp8Weight)
    inputs = feed(reference.config, seed=21, **CASES["denoise_cfg"])
    with torch.no_grad():
        _, expected, *_ = reference.step(*(inputs[t.name] for t in runner.spec.inputs))
    precision = "bf16" if device == "cuda" else "fp32"
    velocity = fp8.infer(placed(runner.spec, inputs, device, precision))["velocity"].float().cpu()
    assert torch.isfinite(velocity).all()
    cosine = F.cosine_similarity(velocity.flatten(), expected.flatten(), dim=0).item()
    print(f"fp8 gen velocity: cosine {cosine:.6f} vs the fp32 step")
    assert cosine >= 0.995
    for case in ("text_prefill", "decode"):
        text = placed(runner.spec, feed(reference.config, seed=22, **CASES[case]), device, precision)
        for name, ours, plain in zip(runner.spec.output_names, fp8.infer(text).values(), runner.infer(text).values()):
            assert torch.equal(ours, plain), f"{case} {name}: FP8 gen changed an und-only call"


def test_bad_feed_is_refused(models) -> None:
    runner = models[2]
    inputs = feed(runner.model.config, seed=0, **CASES["vit_block"])
    del inputs["causal"]
    with pytest.raises(EngineError, match="causal"):
        runner.infer(inputs)


@NEEDS_CUDA
@pytest.mark.parametrize("compile", [False, True])
def test_graph_replay_matches_eager_on_cuda(compile: bool) -> None:
    """Warm-up + capture on the first call, replays after: fp32 on the GPU (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    config = LanceLLMConfig.tiny()
    reference = random_model(config, seed=1).cuda()
    fused = random_model(config, seed=1).cuda()
    spec = engine_specs(config, VisionConfig.tiny(out_hidden_size=config.hidden_size), WanVAEConfig.tiny())["mot"]
    runner = CudaMotRunner(spec, CudaMoT(fused, compile=compile))
    names = [t.name for t in spec.inputs]
    for case in ("denoise_cfg", "decode"):
        for step in range(4):
            inputs = {k: v.cuda() for k, v in feed(config, seed=20 + step, **CASES[case]).items()}
            with torch.no_grad():
                expected = reference.step(*(inputs[name] for name in names))
            for name, ref, out in zip(spec.output_names, expected, runner.infer(inputs).values()):
                check(f"{case} graph step {step} {name}", out, ref, tol=1e-4)
    assert runner.num_graphs == 2


@NEEDS_CUDA
def test_graphs_beyond_the_bound_drop_the_least_recently_used() -> None:
    """Three denoise layouts through a runner that keeps two graphs: the first is dropped, and when it comes back it
    is captured again and still matches the reference (a server sees new prompt lengths all day; the graphs' memory
    stays bounded)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    config = LanceLLMConfig.tiny()
    reference = random_model(config, seed=1).cuda()
    spec = engine_specs(config, VisionConfig.tiny(out_hidden_size=config.hidden_size), WanVAEConfig.tiny())["mot"]
    runner = CudaMotRunner(spec, CudaMoT(random_model(config, seed=1).cuda()), max_graphs=2)
    names = [t.name for t in spec.inputs]
    layouts = [dict(CASES["denoise_cfg"], past_len=past) for past in ([7, 4], [7, 5], [7, 6], [7, 4])]
    for index, layout in enumerate(layouts):
        for step in range(3):
            inputs = {k: v.cuda() for k, v in feed(config, seed=40 + 3 * index + step, **layout).items()}
            with torch.no_grad():
                expected = reference.step(*(inputs[name] for name in names))
            for name, ref, out in zip(spec.output_names, expected, runner.infer(inputs).values()):
                check(f"layout {index} step {step} {name}", out, ref, tol=1e-4)
        assert runner.num_graphs == min(index + 1, 2)


@NEEDS_CUDA
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_triton_silu_mul_on_cuda(rows: int) -> None:
    from runtime.runners.cuda_kernels import silu_mul_triton

    gate_up = torch.randn(rows, 2 * 2500, device="cuda", generator=torch.Generator("cuda").manual_seed(rows))
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = gate_up.to(dtype)
        out = silu_mul_triton(x)
        assert out.dtype == dtype and out.shape == (rows, 2500)
        compare(f"triton silu_mul {dtype} rows={rows}", out.float(), silu_mul(x).float(), tol=tol)


def test_benchmark_script_runs_tiny_on_cpu(tmp_path) -> None:
    """`lance-trt bench gpu` end to end on the tiny configs (its GPU numbers are in docs/benchmarks.md)."""
    import json

    from benchmarks.gpu import bench_gpu_main

    out = tmp_path / "bench.json"
    fp8 = _rowwise_scaled_mm_on("cpu")
    assert bench_gpu_main(["--tiny", "--device", "cpu", "--parts", "denoise", "--sizes", "256", "--repeat", "1",
                           "--variants", "plain", *["plain-fp8"] * fp8, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert not result["failures"]
    rows = {(r["name"], r["variant"]): r for r in result["rows"]}
    assert ("denoise forward 256px B=2", "fast (runner.infer)") in rows
    assert ("denoise forward 256px B=1", "reference eager") in rows
    if fp8:
        row = rows[("denoise forward 256px B=2", "fast fp8-gen (runner.infer)")]
        assert 0.99 <= row["extra"]["velocity_cosine_vs_bf16"] < 1


def test_fp8_projections_are_chosen(models) -> None:
    """The FP8 mode quantizes the gen MLP only (the choice that passes the fp32 gate); any subset can be asked for,
    the und expert never changes, and unknown names are refused."""
    from runtime.runners.cuda_kernels import Fp8Weight

    model = models[2].model
    mlp = model.with_fp8_gen()
    und, gen = mlp.layers[0]
    assert isinstance(gen.gate_up_weight, Fp8Weight) and isinstance(gen.down_weight, Fp8Weight)
    assert not isinstance(gen.qkv_weight, Fp8Weight) and not isinstance(gen.o_weight, Fp8Weight)
    assert und is model.layers[0][0]
    attention = model.with_fp8_gen(projections=("qkv", "o")).layers[0][1]
    assert isinstance(attention.qkv_weight, Fp8Weight) and not isinstance(attention.down_weight, Fp8Weight)
    assert mlp.with_fp8_gen().layers[0][1].down_weight is gen.down_weight      # FP8 weights are shared, not redone
    with pytest.raises(ValueError, match="unknown FP8 projections"):
        model.with_fp8_gen(projections=("mlp",))
    with pytest.raises(ValueError, match="FP8 already"):
        mlp.with_fp8_gen(projections=("qkv",))       # no bf16 copy of the MLP left in the twin
