"""`lance-trt` end to end: tiny checkpoint, then each task through `lance-trt run`, as a user types it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.cli import main


def lance_trt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True, timeout=300)


def test_tiny_then_t2i_x2t_edit(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ck", tmp_path / "a.png"
    assert lance_trt("tiny", str(ckpt)).returncode == 0
    run = lance_trt("run", "t2i", "--checkpoint", str(ckpt), "--prompt", "a red cube", "--height", "256",
                    "--width", "256", "--steps", "4", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (256, 256)

    answer = lance_trt("run", "x2t", "--checkpoint", str(ckpt), "--image", str(out), "--prompt", "What is this?",
                       "--max-new-tokens", "4")
    assert answer.returncode == 0, answer.stderr
    assert "INFO" not in answer.stdout  # stdout carries the answer only; logs go to stderr

    edited = tmp_path / "e.png"
    run = lance_trt("run", "edit", "--checkpoint", str(ckpt), "--image", str(out), "--prompt", "make it blue",
                    "--height", "256", "--width", "256", "--steps", "2", "-o", str(edited))
    assert run.returncode == 0, run.stderr
    assert np.asarray(Image.open(edited)).shape == (256, 256, 3)


def test_errors_name_the_field(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", "t2i", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--height", "100",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "height" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    assert main(["run", "x2t", "--checkpoint", str(tiny_checkpoint), "--image", str(bad), "--prompt", "q"]) == 2
    assert "image" in capsys.readouterr().err
    assert main(["run", "t2i", "--checkpoint", str(tiny_checkpoint), "--prompt", "x"]) == 2
    assert "--output" in capsys.readouterr().err


def _error_lines(stderr: str) -> list[str]:
    """What the command said besides its INFO logs."""
    return [line for line in stderr.splitlines() if line and not line.startswith("INFO ")]


def test_missing_backend_or_engines_is_one_line(tiny_checkpoint: Path, engine_dir: Path, tmp_path: Path,
                                                capsys) -> None:
    """No traceback: a runner that cannot start says why in one line, exit 2."""
    common = ["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--height", "256", "--width", "256", "--steps",
              "1", "-o", str(tmp_path / "x.png")]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["run", "t2i", "--runner", "tensorrt", "--engines", str(engine_dir), *common]) == 2
        (line,) = _error_lines(capsys.readouterr().err)
        assert line.startswith("lance-trt: TensorRT is not available") and "Traceback" not in line
    assert main(["run", "t2i", "--runner", "onnxruntime", "--engines", str(tmp_path / "none"), *common]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith("lance-trt: engine 'vit':") and "does not exist; run lance-trt export" in line


def test_image_errors_name_the_file(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("plain text")
    assert main(["run", "x2t", "--checkpoint", str(tiny_checkpoint), "--image", str(bad), "--prompt", "q"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == f"lance-trt: --image {bad}: not a decodable PNG/JPEG/WEBP image (it starts with b'plain te')"
    assert main(["run", "x2t", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "gone.png"),
                 "--prompt", "q"]) == 2
    assert f"--image {tmp_path / 'gone.png'}: cannot read it" in capsys.readouterr().err


def test_unusable_device_is_one_line(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A device torch cannot use here is one line naming --device, exit 2 (torch's own error is a traceback from
    the first tensor moved there)."""
    import torch

    common = ["run", "t2i", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "-o", str(tmp_path / "x.png")]
    assert main([*common, "--device", "gpu"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == "lance-trt: --device gpu: not a torch device such as cpu, cuda or cuda:1"
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert main([*common, "--device", missing]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"lance-trt: --device {missing}: ") and "Traceback" not in line
