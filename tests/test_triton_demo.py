"""`lance-trt demo` end to end (on the session's tiny checkpoint and its export, so no second export), then
`lance-trt serve --cpu --repo DIR/triton_repo` serving the same repository again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.client import LanceClient
from runtime.demo import demo_main
from runtime.serving.server import free_port
from tests.triton_harness import REPO_ROOT, requires_triton

pytestmark = [pytest.mark.triton, requires_triton]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_demo_then_serve_again(tmp_path: Path, tiny_checkpoint: Path, engine_dir: Path) -> None:
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), "--checkpoint", str(tiny_checkpoint), "--engines", str(engine_dir),
                      "--steps", "2", "--max-new-tokens", "4"]) == 0
    for name in ("t2i.png", "edit.png"):
        image = np.asarray(Image.open(out / name))
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and image.std() > 0
    assert (out / "x2t.txt").read_text(encoding="utf-8").strip()
    assert "successfully loaded 'lance'" in (out / "tritonserver.log").read_text(errors="replace")

    grpc, http, metrics = free_port(), free_port(), free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--cpu", "--repo", str(out / "triton_repo"),
         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
         "--log-file", str(tmp_path / "again.log")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert serve.poll() is None, serve.communicate()[0]
            assert time.monotonic() < deadline, "not ready in 120 s"
            try:
                with _NO_PROXY.open(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        result = LanceClient(f"127.0.0.1:{grpc}").generate("t2i", "again", height=256, width=256, steps=2)
        assert result.image.shape == (256, 256, 3)
    finally:
        serve.send_signal(signal.SIGTERM)
        output = serve.communicate(timeout=60)[0]
    assert serve.returncode == 0, output


def test_demo_options_go_together(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        demo_main(["--out", str(tmp_path), "--checkpoint", str(tmp_path)])
    assert info.value.code == 2
    assert "--checkpoint and --engines go together" in capsys.readouterr().err
