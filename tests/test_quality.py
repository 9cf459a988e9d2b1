"""Lint and type checks of the package: ruff and mypy (strict) must be clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> list[str]:
    if shutil.which(name) is None:
        pytest.fail(f"{name} is part of the test extras: pip install '.[test]'")
    return [name]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs a source checkout")
def test_ruff_clean() -> None:
    out = subprocess.run([*_tool("ruff"), "check", "python", "tests", "benchmarks", "examples"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs a source checkout")
def test_mypy_strict_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs a source checkout")
def test_core_stubs_match_the_compiled_module(tmp_path: Path) -> None:
    # python/mlx5tlp/_core/*.pyi are generated; regenerate them from the module under test and
    # insist they are what is committed (hand-edited stubs drift).
    out = subprocess.run(
        [sys.executable, "-m", "pybind11_stubgen", "mlx5tlp._core", "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    fresh = tmp_path / "mlx5tlp" / "_core"
    committed = ROOT / "python" / "mlx5tlp" / "_core"
    names = sorted(p.name for p in fresh.glob("*.pyi"))
    assert names == sorted(p.name for p in committed.glob("*.pyi"))
    for name in names:
        assert (fresh / name).read_text() == (committed / name).read_text(), (
            f"{name} drifted: regenerate with `pybind11-stubgen mlx5tlp._core -o python`"
        )
