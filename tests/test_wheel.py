"""The wheel works outside a source checkout: it is built from this tree, installed on its own into a folder, and
`lance-trt repo` run from another directory writes a complete repository (the model.py templates are package data);
`lance-trt bench` and `gpu-check` load the benchmark layer from the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, installed without dependencies (this environment has them) into a folder of its own."""
    dist, source = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("source")
    # Build from a copy of the files git sees: a build in the checkout would leave build/ behind, and a stale build/
    # would leak into later wheels.
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name, follow_symlinks=False)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("lance_trt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"runtime/serving/templates/lance_model.py", "runtime/serving/templates/engine_model.py",
            "benchmarks/gpu.py", "benchmarks/bls_overhead.py", "export/onnx_export.py"} <= names
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    return target


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A console script of the installed wheel, with the wheel's packages first on the path (before this
    checkout's editable install)."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, str(target / "bin" / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_repo_from_another_directory(installed: Path, tmp_path: Path, tiny_checkpoint: Path,
                                     engine_dir: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import runtime, export, benchmarks; print(runtime.__file__)"],
                           cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True,
                           text=True, check=True)
    assert Path(probe.stdout.strip()).is_relative_to(installed), probe.stdout
    out = _run(installed, elsewhere, "lance-trt", "repo", str(engine_dir), "--checkpoint", str(tiny_checkpoint),
               "--out", "repo")
    assert out.returncode == 0, out.stderr[-3000:]
    repo = elsewhere / "repo"
    templates = installed / "runtime" / "serving" / "templates"
    assert (repo / "lance" / "1" / "model.py").read_text() == (templates / "lance_model.py").read_text()
    for model in ("lance_vit", "lance_vae_encode", "lance_vae_decode"):
        assert (repo / model / "1" / "model.py").read_text() == (templates / "engine_model.py").read_text()
        assert (repo / model / "configs" / "cpu.pbtxt").is_file() and (repo / model / "1" / f"{model[6:]}.onnx").is_file()
    assert (repo / "lance" / "configs" / "cpu.pbtxt").is_file()


def test_benchmarks_load_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    bench = _run(installed, tmp_path, "lance-trt", "bench", "triton", "--help")
    assert bench.returncode == 0 and "--runs" in bench.stdout, bench.stderr[-2000:]
    check = _run(installed, tmp_path, "lance-trt", "gpu-check", "--help")
    assert check.returncode == 0 and "--fp8-gen" in check.stdout, check.stderr[-2000:]
