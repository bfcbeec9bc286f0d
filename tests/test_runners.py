"""The runners behind one interface: `engines_for` builds each backend's four runners; OrtRunner refuses graphs and
feeds that differ from the contract and names the tensor; TrtRunner's plan/sidecar checks refuse a plan built for
another contract, TensorRT or GPU. TensorRT itself is absent here: its tests skip with the reason."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from runtime.spec import contract
from runtime.models.checkpoint import LanceModels
from runtime.spec.contract import ENGINES, EngineSpec
from runtime.runners import EngineError, Engines, TorchRunner
from runtime.runners.factory import engines_for
from runtime.runners.ort import OrtRunner
from runtime.runners.trt import DeviceScratch, Sidecar, TrtRunner, check_sidecar
from tests.parity import compare
from tests.test_export import MOT_CASES, mot_feed

HAS_TENSORRT = find_spec("tensorrt") is not None


# --- engines_for -----------------------------------------------------------------------------------------------------


def _feeds(models: LanceModels, specs: dict[str, EngineSpec]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "vit": contract.sample_inputs(specs["vit"], seed=4, M=50),
        "mot": mot_feed(models, specs["mot"], MOT_CASES["denoise, smallest grid, CFG batch"]),
        "vae_encode": contract.sample_inputs(specs["vae_encode"], seed=5, h=10, w=12),
        "vae_decode": contract.sample_inputs(specs["vae_decode"], seed=6, h=12, w=10),
        "vae_encode_first": contract.sample_inputs(specs["vae_encode_first"], seed=9, h=10, w=12),
        "vae_encode_chunk": contract.sample_inputs(specs["vae_encode_chunk"], seed=10, h=12, w=10),
        "vae_decode_first": contract.sample_inputs(specs["vae_decode_first"], seed=7, h=10, w=12),
        "vae_decode_chunk": contract.sample_inputs(specs["vae_decode_chunk"], seed=8, h=12, w=10),
    }


def test_torch_and_onnxruntime_bundles_agree(engine_dir: Path, tiny_models: LanceModels,  # noqa: F811
                                             tiny_specs: dict[str, EngineSpec]) -> None:  # noqa: F811
    torch_engines = engines_for("torch", tiny_models)
    ort_engines = engines_for("onnxruntime", engine_dir, specs=tiny_specs, threads=2)
    assert isinstance(torch_engines, Engines) and isinstance(ort_engines, Engines)
    for name, feed in _feeds(tiny_models, tiny_specs).items():
        ours, ref = getattr(ort_engines, name), getattr(torch_engines, name)
        assert isinstance(ours, OrtRunner) and isinstance(ref, TorchRunner) and ours.spec == ref.spec
        expected = ref.infer(feed)
        got = ours.infer(feed)
        assert list(got) == list(ref.spec.output_names)
        for key in expected:
            compare(f"engines_for {name} {key}", got[key], expected[key])


def test_engines_for_refuses_bad_arguments(engine_dir: Path, tiny_models: LanceModels,  # noqa: F811
                                           tiny_specs: dict[str, EngineSpec]) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="runner must be one of"):
        engines_for("openvino", engine_dir, specs=tiny_specs)
    with pytest.raises(ValueError, match="needs loaded models"):
        engines_for("torch", engine_dir)
    with pytest.raises(ValueError, match="needs an engine folder"):
        engines_for("onnxruntime", tiny_models, specs=tiny_specs)
    with pytest.raises(ValueError, match="needs the engine specs"):
        engines_for("onnxruntime", engine_dir)
    with pytest.raises(ValueError, match="no bf16 arithmetic"):
        engines_for("onnxruntime", engine_dir, specs=tiny_specs, precision="bf16")
    with pytest.raises(ValueError, match="fast torch engines run on CUDA"):
        engines_for("torch", tiny_models, fast=True)
    with pytest.raises(ValueError, match="fp8_gen needs the fast torch engines"):
        engines_for("torch", tiny_models, fp8_gen=True)
    with pytest.raises(ValueError, match="the onnxruntime runner has its own"):
        engines_for("onnxruntime", engine_dir, specs=tiny_specs, fp8_gen=True)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot run")
def test_tensorrt_bundle_without_tensorrt_says_why(engine_dir: Path,  # noqa: F811
                                                   tiny_specs: dict[str, EngineSpec]) -> None:  # noqa: F811
    with pytest.raises(EngineError, match="TensorRT is not available \\(No module named 'tensorrt'\\)"):
        engines_for("tensorrt", engine_dir, specs=tiny_specs)


# --- OrtRunner ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_runner(engine_dir: Path, tiny_specs: dict[str, EngineSpec]) -> OrtRunner:  # noqa: F811
    return OrtRunner(tiny_specs["vit"], engine_dir / "fp32" / "vit.onnx", threads=1)


def test_ort_runner_refuses_foreign_graphs(engine_dir: Path, tiny_specs: dict[str, EngineSpec],  # noqa: F811
                                           tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist; run lance-trt export"):
        OrtRunner(tiny_specs["vit"], tmp_path / "vit.onnx")
    with pytest.raises(EngineError, match="ONNX Runtime cannot load .*bf16/mot.onnx"):
        OrtRunner(tiny_specs["mot"], engine_dir / "bf16" / "mot.onnx")
    with pytest.raises(EngineError, match="has inputs \\['image', 'noise'\\], the contract \\['latent'\\]"):
        OrtRunner(tiny_specs["vae_decode"], engine_dir / "fp32" / "vae_encode.onnx")
    decode = tiny_specs["vae_decode"]
    as_int = replace(decode, inputs=(replace(decode.inputs[0], dtype=contract.DType.INT64),))
    with pytest.raises(EngineError, match="input 'latent': tensor\\(float\\) .* the contract says tensor\\(int64\\)"):
        OrtRunner(as_int, engine_dir / "fp32" / "vae_decode.onnx")
    # Same tensors, other sizes/profiles: only the graph's recorded contract tells.
    other = replace(decode, profiles=decode.profiles[:1])
    with pytest.raises(EngineError, match="exported for another contract"):
        OrtRunner(other, engine_dir / "fp32" / "vae_decode.onnx")


def test_ort_runner_names_the_tensor_at_fault(vit_runner: OrtRunner, tiny_specs: dict[str, EngineSpec]) -> None:  # noqa
    feed = contract.sample_inputs(tiny_specs["vit"], M=50)
    with pytest.raises(EngineError, match="missing inputs \\['sin'\\]"):
        vit_runner.infer({k: v for k, v in feed.items() if k != "sin"})
    with pytest.raises(EngineError, match="input 'cos': shape \\(199, 16\\)"):
        vit_runner.infer({**feed, "cos": feed["cos"][:199]})
    with pytest.raises(EngineError, match="input 'window_index': values in \\[0, 50\\], allowed \\[0, 49\\]"):
        vit_runner.infer({**feed, "window_index": torch.arange(50) + (torch.arange(50) == 7).long() * 43})
    with pytest.raises(EngineError, match="input 'reverse_index': got torch.float32"):
        vit_runner.infer({**feed, "reverse_index": feed["reverse_index"].float()})
    with pytest.raises(EngineError, match="fit no profile"):
        vit_runner.infer(contract.sample_inputs(tiny_specs["vit"], M=49))


def test_ort_runner_converts_dtypes_and_hands_out_owned_tensors(vit_runner: OrtRunner,
                                                                tiny_specs: dict[str, EngineSpec]) -> None:  # noqa
    feed = contract.sample_inputs(tiny_specs["vit"], M=50)
    first = vit_runner.infer(feed)["hidden"]
    # bf16 patches and int32 indices are converted to the contract's fp32 / int64.
    converted = {**feed, "patches": feed["patches"].bfloat16().float().bfloat16(),
                 "window_index": feed["window_index"].int()}
    second = vit_runner.infer(converted)["hidden"]
    assert first.dtype == torch.float32 and first.data_ptr() != second.data_ptr()
    first.zero_()
    assert vit_runner.infer(feed)["hidden"].abs().sum() > 0


# --- TrtRunner (checks that need no TensorRT) -------------------------------------------------------------------


def _sidecar(spec: EngineSpec) -> Sidecar:
    return Sidecar(engine=spec.name, precision="bf16", tensorrt="10.5.0", gpu="NVIDIA H100 80GB HBM3",
                   compute_capability="9.0", contract_sha256=spec.digest(), onnx=f"{spec.name}.onnx",
                   onnx_sha256="0" * 64, profiles={}, flags=["network:STRONGLY_TYPED"])


def test_sidecar_checks_refuse_mismatches(tiny_specs: dict[str, EngineSpec]) -> None:  # noqa: F811
    spec = tiny_specs["mot"]
    good = _sidecar(spec)
    check_sidecar(good, spec, "10.5.0", "9.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(EngineError, match="built with TensorRT 10.5.0, this is 10.6.0; rebuild it"):
        check_sidecar(good, spec, "10.6.0", "9.0")
    with pytest.raises(EngineError, match="compute capability 9.0 \\(NVIDIA H100 80GB HBM3\\), this GPU is 8.9"):
        check_sidecar(good, spec, "10.5.0", "8.9", "NVIDIA L40S")
    with pytest.raises(EngineError, match="built for another contract"):
        check_sidecar(replace(good, contract_sha256="1" * 64), spec, "10.5.0", "9.0")
    with pytest.raises(EngineError, match="the plan is engine 'vit', expected 'mot'"):
        check_sidecar(replace(good, engine="vit"), spec, "10.5.0", "9.0")


def test_sidecar_read_write(tiny_specs: dict[str, EngineSpec], tmp_path: Path) -> None:  # noqa: F811
    sidecar = _sidecar(tiny_specs["vit"])
    sidecar.write(tmp_path / "vit.json")
    assert Sidecar.read(tmp_path / "vit.json") == sidecar
    with pytest.raises(EngineError, match="is missing: every plan needs the sidecar"):
        Sidecar.read(tmp_path / "mot.json")
    (tmp_path / "bad.json").write_text(json.dumps({"engine": "vit"}))
    with pytest.raises(EngineError, match="is not a plan sidecar"):
        Sidecar.read(tmp_path / "bad.json")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot run")
def test_trt_runner_without_tensorrt_says_why(tiny_specs: dict[str, EngineSpec], tmp_path: Path) -> None:  # noqa
    with pytest.raises(EngineError, match="TensorRT is not available .*use --runner onnxruntime / torch"):
        TrtRunner(tiny_specs["vit"], tmp_path / "vit.plan")


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package and an NVIDIA GPU")
@pytest.mark.tensorrt
def test_trt_runner_matches_onnxruntime(engine_dir: Path, tiny_models: LanceModels,  # noqa: F811
                                        tiny_specs: dict[str, EngineSpec], tmp_path: Path) -> None:  # noqa: F811
    from export.build import build_main

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA device is visible")
    shutil.copytree(engine_dir / "fp32", tmp_path / "fp32")
    assert build_main([str(tmp_path), "--precision", "fp32"]) == 0
    scratch = DeviceScratch("cuda")
    for name, feed in _feeds(tiny_models, tiny_specs).items():
        runner = TrtRunner(tiny_specs[name], tmp_path / "fp32" / f"{name}.plan", scratch=scratch)
        ref = OrtRunner(tiny_specs[name], engine_dir / "fp32" / f"{name}.onnx").infer(feed)
        got = runner.infer(feed)
        for key in ref:
            compare(f"tensorrt {name} {key}", got[key].cpu(), ref[key], tol=1e-3, min_cos=0.9999)
        out = {key: torch.empty_like(value) for key, value in got.items()}
        runner.infer_into(feed, out)
        for key in ref:
            assert torch.equal(out[key], got[key])
    assert ENGINES == tuple(_feeds(tiny_models, tiny_specs))
