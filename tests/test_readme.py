"""The README works as written: its set-up commands, its Python code runs, its links exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)

pytestmark = pytest.mark.skipif(not README.exists(), reason="needs a source checkout")


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def test_the_two_set_up_commands_come_first() -> None:
    kind, body = BLOCK.findall(README.read_text())[0]
    assert kind == "sh"
    assert body.splitlines() == [
        "pip install . && mlx5tlp demo",
        "pip install '.[test]' && python -m pytest",
    ]


def test_every_python_block_runs_as_written(tmp_path: Path) -> None:
    # Each block is a complete program: run as a script in a fresh interpreter, outside the
    # source tree, with no backend preset (the tour must choose the software device itself).
    blocks = _blocks("python")
    assert blocks, "the README has no Python code"
    env = {k: v for k, v in os.environ.items() if k != "MLX5TLP_BACKEND"}
    env["MLX5TLP_SIM_DIR"] = str(tmp_path / "sim")
    for i, code in enumerate(blocks):
        script = tmp_path / f"readme_{i}.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"README python block {i}:\n{code}\n{out.stdout}{out.stderr}"
    assert "completion checked: Tlp(CplD" in out.stdout


def test_relative_links_exist() -> None:
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert "examples/emulator.py" in links and "examples/native/" in links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
