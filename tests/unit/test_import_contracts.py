"""The architecture's never-arrows (pyproject.toml, [tool.importlinter]) hold, and would catch a forbidden import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "sagas", root / "sagas", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_package_keeps_every_contract(tmp_path: Path) -> None:
    """lint-imports passes on the package as it is."""
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "contract"),
    [
        ("engine/state.py", "import sagas.adapters.memory", "the engine owns its seams and imports no adapter"),
        ("definitions/model.py", "import sagas.engine.machine", "definitions know nothing of how sagas run"),
        ("adapters/memory.py", "import sagas.cli", "nothing in the library imports the CLI"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, forbidden: str, contract: str) -> None:
    """Adding one import across a never-arrow makes lint-imports fail and name the broken contract."""
    root = _copy(tmp_path)
    path = root / "sagas" / module
    path.write_text(path.read_text() + f"\n{forbidden}  # noqa\n")
    result = _lint(root)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
