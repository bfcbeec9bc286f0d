"""export/build.py: ``--dry-run`` prints exactly the contract's profiles and the flags for each precision, without
TensorRT; the command refuses missing or mislabelled graphs; without TensorRT it says why in one line. Building a plan
needs TensorRT and a GPU: that test skips here with the reason."""

from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest

from export.build import BuildError, build_main, plan_build
from runtime.spec.contract import ENGINES, EngineSpec

HAS_TENSORRT = find_spec("tensorrt") is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dry_run_prints_the_contract_profiles(engine_dir: Path, tiny_specs: dict[str, EngineSpec],  # noqa: F811
                                              precision: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_main([str(engine_dir), "--precision", precision, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ENGINES:
        spec = tiny_specs[name]
        assert f"{name} ({precision}): {engine_dir / precision / name}.onnx -> {engine_dir / precision / name}.plan" \
            in out
        for profile in spec.profiles:
            assert f"  profile {profile.name}:" in out
            for tensor, (lo, opt, hi) in spec.profile_shapes(profile.name).items():
                line = f"    {tensor}: min {list(lo)} opt {list(opt)} max {list(hi)}"
                # Only inputs with a dynamic axis get profile shapes (the scalar `causal` has none).
                assert (line in out) == (tensor != "causal"), line
    flags = "  flags: network:STRONGLY_TYPED " + ("builder:-TF32 " if precision == "fp32" else "")
    assert out.count(flags + "builder_optimization_level=3") == len(ENGINES)
    assert "timing cache: none; workspace: default" in out


def test_dry_run_options(engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    cache = tmp_path / "timing.cache"
    assert build_main([str(engine_dir), "--dry-run", "--engines", "vit", "--timing-cache", str(cache),
                       "--opt-level", "5", "--workspace-gib", "2"]) == 0
    out = capsys.readouterr().out
    # No --precision: every precision folder that export wrote, in order.
    assert out.startswith("vit (fp32):") and "vit (bf16):" in out and "mot (" not in out
    assert f"timing cache: {cache}; workspace: {2 * 2**30} bytes" in out
    assert "builder_optimization_level=5" in out
    assert not cache.exists()


def test_refuses_missing_and_mislabelled_graphs(engine_dir: Path, tmp_path: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert build_main([str(tmp_path), "--dry-run"]) == 2
    assert "holds no exported graphs" in capsys.readouterr().err
    assert build_main([str(tmp_path), "--dry-run", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert f"missing {tmp_path / 'bf16' / 'vit.onnx'}" in err and "run lance-trt export --precision bf16" in err
    (tmp_path / "bf16").mkdir()
    shutil.copy(engine_dir / "fp32" / "vit.onnx", tmp_path / "bf16" / "vit.onnx")
    assert build_main([str(tmp_path), "--dry-run", "--engines", "vit"]) == 1
    assert "vit.onnx: not bf16 graphs" in capsys.readouterr().err
    assert build_main([str(engine_dir), "--dry-run", "--engines", "vit,unet"]) == 2
    assert "unknown ['unet']" in capsys.readouterr().err


def test_builds_what_demo_exported(engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo exports fp32 only: build then plans fp32, where it used to look for bf16 graphs."""
    (tmp_path / "fp32").mkdir()
    for graph in (engine_dir / "fp32").glob("*.onnx*"):
        (tmp_path / "fp32" / graph.name).symlink_to(graph)
    assert build_main([str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "vit (fp32):" in out and "(bf16)" not in out


def test_plan_build_needs_contract_metadata(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "vit.onnx"))
    with pytest.raises(BuildError, match="no lance.engine"):
        plan_build(tmp_path / "vit.onnx")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot run")
def test_without_tensorrt_says_why_in_one_line(engine_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa
    assert build_main([str(engine_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "TensorRT is not available" in captured.err


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package and an NVIDIA GPU")
@pytest.mark.tensorrt
def test_build_writes_plan_and_sidecar(engine_dir: Path, tiny_specs: dict[str, EngineSpec],  # noqa: F811
                                       tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA device is visible")
    from runtime.runners.trt import Sidecar

    shutil.copytree(engine_dir / "fp32", tmp_path / "fp32")
    assert build_main([str(tmp_path), "--precision", "fp32", "--timing-cache", str(tmp_path / "cache")]) == 0
    for name in ENGINES:
        sidecar = Sidecar.read(tmp_path / "fp32" / f"{name}.json")
        assert sidecar.engine == name and sidecar.contract_sha256 == tiny_specs[name].digest()
        assert (tmp_path / "fp32" / f"{name}.plan").stat().st_size > 0
    assert (tmp_path / "cache").stat().st_size > 0
