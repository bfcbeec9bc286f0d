"""GPU correctness of the bf16 fast path against fp32 on the same full-size random weights.

``python -m benchmarks.gpu_check`` first runs the fp32 reference in a child process of its own (so each process's
memory figures are its own): the eager `LanceMoT.step`, ViT and VAE in fp32 with TF32 off, through `LancePipeline`.
The child saves what it computed; this process then builds the same weights in bf16 (the same seeded fp32 draws,
cast), runs the same requests with the fast engines (`runtime.runners.cuda_mot`) and compares, component by component:

| what | gate |
|---|---|
| ViT at 672x672 (x2t image), prefill logits of every context split, VAE decode at each size | cosine >= 0.999 |
| one denoise step's velocity (both CFG branches, t = 1) | cosine >= 0.995 |
| x2t greedy tokens | the first 16 agree |
| t2i end to end (30 steps, CFG 4.0, free running) | reported, not gated |

It also compares the fast path with the bf16 eager reference in this process, which separates the fast path's own
deviation from bf16 rounding. ``--fp8-gen`` [``--fp8-fast-accum``] checks the fast path with the FP8 gen expert
against the same gates. Exit status 0 when every gate passes, 1 otherwise; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runtime.spec import constants
from benchmarks.gpu import PROMPT, QUESTION, SDPA_CHOICES, BenchModels, Recorder, fast_engines, \
    random_models, reference_engines, test_image
from runtime.runners import Engines
from runtime.runners.cuda_mot import CudaMoT
from runtime.pipeline import LancePipeline
from runtime.spec.request import GenerationRequest

logger = logging.getLogger(__name__)

COSINE_GATE = 0.999
VELOCITY_GATE = 0.995
TOKEN_GATE = 16


def run_workloads(models: BenchModels, engines: Engines, args: argparse.Namespace) -> dict[str, Any]:
    """The requests both processes run, and what they return (float tensors on the CPU in fp32).

    * t2i at ``--size``, one step: the logits of every prefill call, the velocity of the denoise call.
    * x2t on a 672x672 image: the ViT rows, the greedy tokens and the logits of every decode step.
    * the VAE decoder on seeded latents at each ``--vae-sizes``.
    * t2i at ``--size``, ``--steps`` steps, CFG 4.0: the final latent and the uint8 image.
    """
    out: dict[str, Any] = {}
    host = models.host()

    def pipeline(mot: Recorder | None = None, vit: Recorder | None = None,
                 decode: Recorder | None = None) -> LancePipeline:
        chosen = Engines(mot=mot or engines.mot, vit=vit or engines.vit, vae_encode=engines.vae_encode,
                         vae_decode=decode or engines.vae_decode)
        return LancePipeline(chosen, host, device=models.device, dtype=models.dtype)

    side = args.size
    mot = Recorder(engines.mot, keep=("logits", "velocity"))
    pipeline(mot=mot).generate(GenerationRequest("t2i", PROMPT, height=side, width=side, steps=1, seed=1))
    prefill = [outputs for feed, outputs in mot.calls if feed["latents"].shape[1] == 0]
    (denoise,) = [outputs for feed, outputs in mot.calls if feed["latents"].shape[1] > 0]
    out["prefill_logits"] = torch.cat([o["logits"] for o in prefill]).float().cpu()
    out["velocity"] = denoise["velocity"].float().cpu()

    mot, vit = Recorder(engines.mot, keep=("logits",)), Recorder(engines.vit, keep=("hidden",))
    result = pipeline(mot=mot, vit=vit).generate(
        GenerationRequest("x2t", QUESTION, image=test_image(), max_new_tokens=args.tokens))
    out["vit_hidden"] = vit.calls[0][1]["hidden"].float().cpu()
    decode_calls = [outputs for feed, outputs in mot.calls if feed["und_head"].shape[1] == 1]
    out["decode_logits"] = torch.cat([o["logits"] for o in decode_calls]).float().cpu()
    out["x2t_prefill_logits"] = torch.cat([o["logits"] for feed, o in mot.calls
                                           if feed["und_head"].shape[1] > 1]).float().cpu()
    out["tokens"] = list(result.token_ids or [])

    generator = torch.Generator().manual_seed(5)
    for vae_side in args.vae_sizes:
        latent = torch.randn(1, constants.LATENT_CHANNELS, vae_side // 16, vae_side // 16, generator=generator)
        with torch.inference_mode():
            image = engines.vae_decode.infer({"latent": latent.to(models.device)})["image"]
        out[f"vae_decode_{vae_side}"] = image.float().cpu()

    decode = Recorder(engines.vae_decode)
    start = time.perf_counter()
    result = pipeline(decode=decode).generate(GenerationRequest(
        "t2i", PROMPT, height=side, width=side, steps=args.steps, cfg_scale=constants.DEFAULT_CFG_SCALE, seed=1))
    out["t2i_seconds"] = time.perf_counter() - start
    out["t2i_latent"] = decode.calls[0][0]["latent"].float().cpu()
    out["t2i_image"] = torch.from_numpy(result.image.copy())
    return out


def _reference_main(args: argparse.Namespace) -> int:
    """The fp32 child: eager reference engines, TF32 off, results saved to ``args.reference``."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = random_models(dtype=torch.float32, device=args.device, seed=args.seed, tiny=args.tiny)
    _reset_peak(models.device)
    out = run_workloads(models, reference_engines(models), args)
    out["peak_allocated_gib"] = _peak_gib(models.device)
    torch.save(out, args.reference)
    return 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def metrics(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine, max-abs and relative L2 of ``ours`` against ``ref`` (NaN anywhere gives NaN figures)."""
    a, b = ours.double().flatten(), ref.double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} vs {tuple(ref.shape)}")
    return {"cosine": F.cosine_similarity(a, b, dim=0).item(), "max_abs": (a - b).abs().max().item(),
            "ref_max_abs": b.abs().max().item(), "rel_l2": ((a - b).norm() / b.norm()).item()}


def _tokens_report(ours: list[int], ref: list[int], ours_logits: torch.Tensor,
                   ref_logits: torch.Tensor) -> dict[str, Any]:
    """How many leading greedy tokens agree, and the fp32 top-2 logit margin where they first differ."""
    agree = 0
    for a, b in zip(ours, ref):
        if a != b:
            break
        agree += 1
    report: dict[str, Any] = {"agree": agree, "ours": len(ours), "reference": len(ref)}
    if agree < min(len(ours), len(ref)) and agree < len(ref_logits):
        top = ref_logits[agree].topk(2).values
        report["first_difference"] = agree
        report["reference_top2_margin"] = (top[0] - top[1]).item()
        report["logits_at_difference"] = metrics(ours_logits[agree], ref_logits[agree])
    # A complete, identical answer (both stopped at <|im_end|> together) agrees in full.
    report["passes"] = agree >= TOKEN_GATE or (ours == ref and len(ref) < TOKEN_GATE and len(ref) == len(ours))
    return report


def compare(ours: dict[str, Any], ref: dict[str, Any], fast_vs_bf16: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    gates = {"vit_hidden": COSINE_GATE, "prefill_logits": COSINE_GATE, "x2t_prefill_logits": COSINE_GATE,
             "velocity": VELOCITY_GATE, **{k: COSINE_GATE for k in ref if k.startswith("vae_decode_")}}
    for name, gate in gates.items():
        m = metrics(ours[name], ref[name])
        checks[name] = {**m, "gate": gate, "passes": bool(m["cosine"] >= gate)}
    checks["tokens"] = _tokens_report(ours["tokens"], ref["tokens"], ours["decode_logits"], ref["decode_logits"])
    image_ours, image_ref = ours["t2i_image"].float(), ref["t2i_image"].float()
    mse = ((image_ours - image_ref) ** 2).mean().item()
    checks["t2i_end_to_end"] = {
        "latent": metrics(ours["t2i_latent"], ref["t2i_latent"]),
        "image_mean_abs": (image_ours - image_ref).abs().mean().item(),
        "image_max_abs": (image_ours - image_ref).abs().max().item(),
        "image_psnr_db": 10 * np.log10(255.0**2 / mse) if mse > 0 else float("inf"),
        "gated": False,
    }
    checks["fast_vs_bf16_reference"] = fast_vs_bf16
    return checks


def _table(checks: dict[str, Any]) -> str:
    lines = [f"{'check':<26} {'cosine':>12} {'max-abs':>10} {'ref max':>9} {'rel-L2':>9} {'gate':>7}  result"]
    for name, c in checks.items():
        if "cosine" in c:
            lines.append(f"{name:<26} {c['cosine']:12.6f} {c['max_abs']:10.4g} {c['ref_max_abs']:9.4g} "
                         f"{c['rel_l2']:9.3g} {c['gate']:7.3f}  {'pass' if c['passes'] else 'FAIL'}")
    t = checks["tokens"]
    lines.append(f"{'x2t greedy tokens':<26} {t['agree']} of {t['reference']} agree (gate {TOKEN_GATE}): "
                 f"{'pass' if t['passes'] else 'FAIL'}"
                 + (f"; first difference at {t['first_difference']}, fp32 top-2 margin "
                    f"{t['reference_top2_margin']:.4f}" if "first_difference" in t else ""))
    e = checks["t2i_end_to_end"]
    lines.append(f"{'t2i end to end (free run)':<26} latent cosine {e['latent']['cosine']:.5f}, image mean-abs "
                 f"{e['image_mean_abs']:.2f}/255, max-abs {e['image_max_abs']:.0f}, PSNR {e['image_psnr_db']:.1f} dB "
                 "(reported, not gated)")
    for name, m in checks["fast_vs_bf16_reference"].items():
        lines.append(f"{'fast vs bf16 eager: ' + name:<40} cosine {m['cosine']:.6f}, rel-L2 {m['rel_l2']:.3g}")
    for choice, c in checks.get("fp8_choices", {}).items():
        lines.append(f"{'FP8 ' + choice:<40} velocity cosine {c['cosine']:.6f} ({'pass' if c['passes'] else 'FAIL'}), "
                     f"denoise {c['denoise_ms']:.2f} ms")
    return "\n".join(lines)


def _fast_vs_bf16_reference(models: BenchModels, args: argparse.Namespace,
                            fast: Engines) -> dict[str, dict[str, float]]:
    """The one-step t2i through the bf16 eager reference and through the fast engines, in this process."""
    results = {}
    for name, engines in (("reference", reference_engines(models)), ("fast", fast)):
        mot = Recorder(engines.mot, keep=("logits", "velocity"))
        pipeline = LancePipeline(Engines(mot=mot, vit=engines.vit, vae_encode=engines.vae_encode,
                                         vae_decode=engines.vae_decode), models.host(), device=models.device,
                                 dtype=models.dtype)
        pipeline.generate(GenerationRequest("t2i", PROMPT, height=args.size, width=args.size, steps=1, seed=1))
        results[name] = {
            "prefill_logits": torch.cat([o["logits"] for f, o in mot.calls if f["latents"].shape[1] == 0]),
            "velocity": torch.cat([o["velocity"] for f, o in mot.calls if f["latents"].shape[1] > 0])}
    return {key: metrics(results["fast"][key].float(), results["reference"][key].float())
            for key in results["fast"]}


def fp8_choices(models: BenchModels, fast: CudaMoT, ref: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy against speed per choice of FP8 projections: for each ``--fp8-choices`` entry (comma-separated
    projections of the gen expert, empty for none), the one-step t2i velocity against the fp32 reference (gate
    `VELOCITY_GATE`) and the median time of that denoise call (both CFG branches, graph replay)."""
    from benchmarks.gpu import cuda_times
    from runtime.runners.cuda_mot import CudaMotRunner

    report = {}
    engines = reference_engines(models)
    for choice in args.fp8_choices:
        projections = tuple(name for name in choice.split(",") if name)
        model = fast.with_fp8_gen(args.fp8_fast_accum, projections) if projections else fast
        runner = CudaMotRunner(models.specs["mot"], model)
        mot = Recorder(runner, keep=("velocity",))
        LancePipeline(Engines(mot=mot, vit=engines.vit, vae_encode=None, vae_decode=engines.vae_decode),
                      models.host(), device=models.device, dtype=models.dtype).generate(
            GenerationRequest("t2i", PROMPT, height=args.size, width=args.size, steps=1, seed=1))
        (feed, outputs), = [(f, o) for f, o in mot.calls if f["latents"].shape[1] > 0]
        m = metrics(outputs["velocity"].float().cpu(), ref["velocity"])
        times = cuda_times(lambda: runner.infer(feed), warmup=2, repeat=args.repeat)
        label = choice or "none (bf16)"
        report[label] = {**m, "gate": VELOCITY_GATE, "passes": bool(m["cosine"] >= VELOCITY_GATE),
                         "denoise_ms": float(np.median(times))}
        logger.info("FP8 %s: velocity cosine %.6f, denoise %.2f ms", label, m["cosine"], report[label]["denoise_ms"])
        runner.clear()
        if models.device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="t2i side for the velocity and end-to-end checks")
    parser.add_argument("--vae-sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--steps", type=int, default=constants.DEFAULT_STEPS)
    parser.add_argument("--tokens", type=int, default=24, help="x2t greedy tokens compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--attention", choices=sorted(SDPA_CHOICES), default="default",
                        help="SDPA backend of the fast path's unmasked attention")
    parser.add_argument("--fp8-gen", action="store_true", help="check the fast path with the FP8 gen expert")
    parser.add_argument("--fp8-fast-accum", action="store_true", help="with --fp8-gen or --fp8-choices: fast FP8 accumulation")
    parser.add_argument("--fp8-choices", nargs="*", default=[], metavar="PROJECTIONS",
                        help="also report velocity accuracy and denoise time per set of FP8 gen projections "
                             "(comma-separated: qkv,o,gate_up,down; '' for none)")
    parser.add_argument("--repeat", type=int, default=10, help="timed denoise calls per --fp8-choices entry")
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a smoke run of the script, CPU allowed)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)   # the fp32 child's output file
    return parser


def gpu_check_main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv))
    if args.fp8_choices and args.fp8_gen:
        parser.error("--fp8-choices starts from the bf16 fast path (its '' entry is bf16): leave out --fp8-gen "
                     "(--fp8-fast-accum alone sets the choices' accumulation)")
    if args.fp8_fast_accum and not (args.fp8_gen or args.fp8_choices):
        parser.error("--fp8-fast-accum needs --fp8-gen or --fp8-choices")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (--tiny --device cpu runs a smoke test)", file=sys.stderr)
        return 2
    if args.reference is not None:
        return _reference_main(args)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fp32.pt"
        child = [sys.executable, "-m", "benchmarks.gpu_check", *argv, "--reference", str(path)]
        start = time.perf_counter()
        subprocess.run(child, check=True)
        logger.info("fp32 reference done in %.0f s", time.perf_counter() - start)
        ref = torch.load(path, weights_only=False)
    models = random_models(dtype=torch.bfloat16, device=device, seed=args.seed, tiny=args.tiny)
    fast = fast_engines(models, CudaMoT(models.mot, compile=args.compile and device.type == "cuda",
                                        sdpa_backends=SDPA_CHOICES[args.attention], fp8_gen=args.fp8_gen,
                                        fp8_fast_accum=args.fp8_gen and args.fp8_fast_accum))
    _reset_peak(device)
    ours = run_workloads(models, fast, args)
    peak = _peak_gib(device)
    checks = compare(ours, ref, _fast_vs_bf16_reference(models, args, fast))
    passed = all(c["passes"] for c in checks.values() if "passes" in c)
    if args.fp8_choices:
        checks["fp8_choices"] = fp8_choices(models, fast.mot.model, ref, args)
    report = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), "torch": torch.__version__, "passed": passed,
              "peak_allocated_gib": {"bf16_fast": peak, "fp32_reference": ref["peak_allocated_gib"]},
              "t2i_seconds": {"bf16_fast": ours["t2i_seconds"], "fp32_reference": ref["t2i_seconds"]},
              "tokens": {"bf16_fast": ours["tokens"], "fp32_reference": ref["tokens"]},
              "checks": checks, "argv": list(argv)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"GPU: {report['gpu']}; peak memory bf16 {peak:.1f} GiB, fp32 {ref['peak_allocated_gib']:.1f} GiB")
    print(_table(checks))
    print("ALL GATES PASS" if passed else "SOME GATES FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(gpu_check_main(sys.argv[1:]))
