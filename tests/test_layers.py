"""The layers of `runtime` (spec <- models <- runners <- pipeline <- serving; the client on the spec only; the
benchmarks outside the product's import graph; no circles), checked by import-linter on the contracts in
pyproject.toml. A wrong import anywhere fails this test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is missing: pip install -e '.[test]'"
    out = subprocess.run([lint, "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "Contracts: 6 kept" in out.stdout, out.stdout[-2000:]
