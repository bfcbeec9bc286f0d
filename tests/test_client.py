"""runtime.client: importable without torch, the `lance-client` command line, and its errors; then the client against a
real tritonserver serving a stand-in `lance` model (tests/triton_harness.py) built on runtime.spec.request."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.spec import constants, registry
from runtime.client import DEFAULT_URL, LanceClient, LanceClientError, build_parser, main
from runtime.serving.server import TritonServer, free_port
from tests.triton_harness import REPO_ROOT, running_server, triton_test, write_lance_standin

GENERATION_FLAGS = {"--prompt", "--image", "--video", "--height", "--width", "--frames", "--steps", "--cfg-scale", "--seed",
                    "--max-new-tokens", "-o", "--output"}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'safetensors', 'onnxruntime', 'diffusers'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "import runtime.client\n"
        "assert 'PIL' not in sys.modules and 'tqdm' not in sys.modules, 'pillow and tqdm load lazily'\n"
        "try:\n"
        "    runtime.client.main(['t2i', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--cfg-scale" in out.stdout and "--max-new-tokens" in out.stdout


def test_flags_match_lance_trt_run() -> None:
    from runtime.cli import _build_parser

    run_only = {"--checkpoint", "--runner", "--engines", "--device", "--precision", "--fp8-gen", "--fp8-fast-accum"}
    run_flags = _flags(_subparser(_build_parser(), "run")) - run_only
    for task in registry.TASKS:
        assert _flags(_subparser(build_parser(), task)) == run_flags == GENERATION_FLAGS


def test_parse_defaults() -> None:
    args = build_parser().parse_args(["t2i", "--prompt", "a fox", "-o", "fox.png"])
    assert (args.url, args.task, args.prompt, args.output) == (DEFAULT_URL, "t2i", "a fox", Path("fox.png"))
    # no size given: the server takes the task's default (768 x 768 for t2i, 480 x 848 for t2v)
    assert (args.height, args.width, args.steps, args.cfg_scale, args.seed, args.max_new_tokens) == (
        None, None, constants.DEFAULT_STEPS, constants.DEFAULT_CFG_SCALE,
        constants.DEFAULT_SEED, constants.DEFAULT_MAX_NEW_TOKENS)
    args = build_parser().parse_args(["--url", "gpu:9001", "-q", "x2t", "--image", "a.png", "--prompt", "q",
                                      "--max-new-tokens", "7"])
    assert (args.url, args.quiet, args.image, args.max_new_tokens) == ("gpu:9001", True, Path("a.png"), 7)


@pytest.mark.parametrize("argv, words", [
    (["x2t", "--prompt", "what?"], "--image or --video is required for x2t"),
    (["edit", "--prompt", "night", "-o", "o.png"], "--image is required for edit"),
    (["t2i", "--prompt", "a fox"], "-o/--output is required for t2i"),
    (["edit", "--image", "/nonexistent.png", "--prompt", "x", "-o", "o.png"], "/nonexistent.png is not a readable"),
    (["v2t", "--prompt", "x"], "invalid choice: 'v2t'"),
    (["t2i", "--prompt", "x", "-o", "o.png", "--steps", "many"], "--steps: invalid int value"),
    (["t2i", "-o", "o.png"], "the following arguments are required: --prompt"),
])
def test_usage_errors(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert words in capsys.readouterr().err


def test_failed_connection_draws_no_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """With the bar on (no -q), a server that cannot be reached gives one line and no "0step [00:00, ?step/s]"."""
    url = f"127.0.0.1:{free_port()}"
    assert main(["--url", url, "t2i", "--prompt", "a fox", "-o", "fox.png"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lance-client: UNAVAILABLE: ")


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(LanceClientError) as caught:
        LanceClient(url).generate("t2i", "a fox", timeout=30)
    assert caught.value.code == "UNAVAILABLE"   # refused at once, not DEADLINE_EXCEEDED after the 30 s
    assert main(["--url", url, "-q", "t2i", "--prompt", "a fox", "-o", "fox.png"]) == 1
    assert "lance-client: UNAVAILABLE: " in capsys.readouterr().err


def test_values_that_cannot_be_sent() -> None:
    with pytest.raises(LanceClientError, match="seed: .* does not fit INT64") as caught:
        LanceClient(f"127.0.0.1:{free_port()}").generate("t2i", "a fox", seed=2**70)
    assert caught.value.code == "INVALID_ARGUMENT"
    with pytest.raises(LanceClientError, match="image: cannot read /nonexistent.png"):
        LanceClient().generate("x2t", "what?", "/nonexistent.png")


# --- against a real server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lance_server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("client") / "repo"
    write_lance_standin(repo)
    with running_server(repo) as server:
        yield server


@triton_test
def test_t2i_streams_progress_and_writes_png(lance_server: TritonServer, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    progress: list[tuple[int, int]] = []
    result = LanceClient(lance_server.grpc_url).generate(
        "t2i", "a fox", height=256, width=272, steps=3, seed=300, on_progress=lambda d, t: progress.append((d, t)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert result.text is None and result.image.shape == (256, 272, 3) and result.image.dtype == np.uint8
    assert (result.image == 300 % 256).all()

    out = tmp_path / "fox.png"
    assert main(["--url", lance_server.grpc_url, "t2i", "--prompt", "a fox", "--height", "512", "--width", "256",
                 "--steps", "4", "--seed", "7", "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (256, 512) and image.getpixel((0, 0)) == (7, 7, 7)
    captured = capsys.readouterr()
    assert captured.out == "" and "4/4" in captured.err  # the progress bar


@triton_test
def test_x2t_prints_only_the_answer(lance_server: TritonServer, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")  # the stand-in does not decode it
    assert main(["--url", lance_server.grpc_url, "x2t", "--image", str(image), "--prompt", "Qu'est-ce ? \u00e9t\u00e9",
                 "--max-new-tokens", "64"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "QU'EST-CE ? \u00c9T\u00c9\n"
    result = LanceClient(lance_server.grpc_url).generate("edit", "night", image.read_bytes(), height=256, width=256,
                                                         steps=1)
    assert result.image.shape == (256, 256, 3)


@triton_test
@pytest.mark.parametrize("option, words", [
    (["--steps", "0"], "steps: must be in [1, 200], got 0"),
    (["--cfg-scale", "nan"], "cfg_scale: must be a finite number in [1, 20], got nan"),
    (["--height", "700"], "height: must be a multiple of 16 in [256, 1024], got 700"),
    (["--seed", "-1"], "seed: must be in [0, 4294967295], got -1"),
])
def test_server_refusal_is_surfaced(lance_server: TritonServer, option: list[str], words: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", lance_server.grpc_url, "-q", "t2i", "--prompt", "a fox", "-o", "x.png", *option]) == 1
    # no gRPC code without the triton_grpc_error header (runtime/client.py): the message names the field
    assert capsys.readouterr().err == f"lance-client: {words}\n"


@triton_test
def test_refused_image_names_the_file(lance_server: TritonServer, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The server knows only the field ("image: ..."); the command line names the file the user gave."""
    from runtime.spec.limits import MAX_IMAGE_BYTES

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(MAX_IMAGE_BYTES))
    assert main(["--url", lance_server.grpc_url, "-q", "x2t", "--image", str(big), "--prompt", "q"]) == 1
    assert capsys.readouterr().err == (f"lance-client: --image {big}: at most {MAX_IMAGE_BYTES} bytes encoded, "
                                       f"got {MAX_IMAGE_BYTES + 4}\n")


@triton_test
def test_bar_appears_with_the_first_progress(lance_server: TritonServer, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Against a server whose steps take 0.1 s: the bar is drawn only once the total is known, and ends at 3/3."""
    assert main(["--url", lance_server.grpc_url, "t2i", "--prompt", "sleep", "--height", "256", "--width", "256",
                 "--steps", "3", "-o", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert "0step [" not in err and err.lstrip("\r").startswith("  0%|") and "3/3" in err


@triton_test
def test_timeout_cancels_on_the_server(lance_server: TritonServer) -> None:
    before = lance_server.log_path.read_text().count("stand-in cancelled")
    with pytest.raises(LanceClientError) as caught:
        LanceClient(lance_server.grpc_url).generate("t2i", "sleep", steps=100, timeout=0.5)
    assert caught.value.code == "DEADLINE_EXCEEDED"
    _wait_for_log(lance_server, "stand-in cancelled", before + 1)


@triton_test
def test_interrupt_cancels_on_the_server(lance_server: TritonServer) -> None:
    """A Ctrl-C while waiting (here raised from the progress callback) cancels the request on the server."""
    before = lance_server.log_path.read_text().count("stand-in cancelled")

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LanceClient(lance_server.grpc_url).generate("t2i", "sleep", steps=100, on_progress=interrupt)
    _wait_for_log(lance_server, "stand-in cancelled", before + 1)
    result = LanceClient(lance_server.grpc_url).generate("t2i", "after", height=256, width=256, steps=1)
    assert result.image.shape == (256, 256, 3)  # the server serves on


def _wait_for_log(server: TritonServer, text: str, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.log_path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} did not reach {count} in the server log"
        time.sleep(0.05)


def test_progress_bar_waits_for_the_total() -> None:
    """Nothing is drawn before the first progress response (no "0step [00:00, ?step/s]"), and one 100 % at the
    end."""
    import io

    from runtime.spec.flags import ProgressBar

    out = io.StringIO()
    bar = ProgressBar("step", file=out)
    bar.close()                      # a request that failed before any progress
    assert out.getvalue() == ""
    for done in range(1, 5):
        bar.update(done, 4)
    bar.close()
    text = out.getvalue()
    assert "0step [" not in text and "0/4" in text     # drawn only with its total
    assert text.count("100%") == 1 and "4/4" in text


def test_progress_bar_draws_100_percent_once_with_slow_steps() -> None:
    """Real denoise steps are slower than tqdm's refresh interval, so the last update draws 100 % itself; close()
    must not draw it a second time ("edit shows 100 % twice")."""
    import io

    from runtime.spec.flags import ProgressBar

    out = io.StringIO()
    bar = ProgressBar("step", file=out)
    for done in range(1, 4):
        time.sleep(0.3)             # slower than tqdm's mininterval: each update draws
        bar.update(done, 3)
    bar.close()
    assert out.getvalue().count("100%") == 1, out.getvalue()
