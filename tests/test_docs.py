"""The docs match the tree: the README's folder table lists every folder and names only paths that exist, and no
code cites a design note outside the repository (every cited ``docs/design/`` file exists)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_NOTES = ("lance_spec.md", "architecture.md", "style.md", "deploy_anchors.md", "triton_on_cpu.md",
                 "triton_on_gpu.md", "reliability.md")
"""The reference notes this project was written from; they live outside the repository (docs/design/ restates what
the code relies on)."""


def _tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [REPO_ROOT / line for line in out.stdout.splitlines()]


def _folder_table() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| folder | what |"):].split("\n\n", 1)[0]
    return [cell for row in table.splitlines()[2:] for cell in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_readme_folder_table_matches_the_tree() -> None:
    named = _folder_table()
    for entry in named:
        path = entry if "/" in entry or "." in entry else entry + "/"
        target = REPO_ROOT / path if path.startswith(("runtime", "docs", "export", "engines", "triton_repo", "tests",
                                                      "benchmarks", "deploy")) else REPO_ROOT / "runtime" / path
        assert target.exists(), f"README folder table names {entry!r}, which does not exist"
    top = {p.relative_to(REPO_ROOT).parts[0] for p in _tracked("*") if len(p.relative_to(REPO_ROOT).parts) > 1}
    top -= {".ci"}
    listed = {entry.split("/")[0] for entry in named}
    assert top <= listed, f"folders missing from the README table: {sorted(top - listed)}"
    packages = {p.parent.name for p in (REPO_ROOT / "runtime").glob("*/__init__.py")}
    assert {f"runtime/{name}/" for name in packages} <= set(named), "every runtime layer has a row"


def test_code_cites_only_notes_in_the_repository() -> None:
    for path in _tracked("*.py"):
        if path.name == "test_docs.py":
            continue
        text = path.read_text(encoding="utf-8")
        for note in OUTSIDE_NOTES:
            assert not re.search(rf"(?<![\w/]){re.escape(note)}", text), f"{path.relative_to(REPO_ROOT)} cites {note}"
        for cited in re.findall(r"docs/design/\w+\.md", text):
            assert (REPO_ROOT / cited).is_file(), f"{path.relative_to(REPO_ROOT)} cites {cited}, which does not exist"
