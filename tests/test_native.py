"""Builds and runs the C++ tests (ctest): plain, under AddressSanitizer and ThreadSanitizer.

The C++ tests use the core and the software device without Python (native callers). Build
trees are kept under build/ so that a second run only rebuilds what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # name: (extra cmake args, ctest regex or None for all)
    "plain": (["-DCMAKE_BUILD_TYPE=Release"], None),
    "asan": (["-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DMLX5TLP_SANITIZE=address"], None),
    # The lock-free code is what ThreadSanitizer is for; the process-level tests fork, which
    # TSan supports poorly.
    "tsan": (["-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DMLX5TLP_SANITIZE=thread"],
             "ring|gateway|engine"),
}


def _cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        pytest.fail("cmake is required for the C++ tests (pip install cmake)")
    return exe


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    if out.returncode != 0:
        tail = f"{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
        pytest.fail(f"{' '.join(cmd)} failed ({out.returncode}):\n{tail}")


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_cpp_suite(config: str, tmp_path: Path) -> None:
    if not (ROOT / "CMakeLists.txt").exists():
        pytest.fail("the C++ tests run from a source checkout")
    extra, regex = CONFIGS[config]
    build = ROOT / "build" / f"native-{config}"
    env = {**os.environ, "MLX5TLP_SIM_DIR": str(tmp_path)}
    env.pop("MLX5TLP_BACKEND", None)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([_cmake(), "-S", str(ROOT), "-B", str(build), *gen, "-DMLX5TLP_BUILD_TESTS=ON",
          "-DMLX5TLP_BUILD_PYTHON=OFF", "-DMLX5TLP_BUILD_BENCHMARKS=OFF", "-DMLX5TLP_WERROR=ON",
          f"-DPython_EXECUTABLE={sys.executable}", *extra], ROOT, env)
    _run([_cmake(), "--build", str(build), "-j", "2"], ROOT, env)
    ctest = [shutil.which("ctest") or "ctest", "--test-dir", str(build), "--output-on-failure"]
    if regex:
        ctest += ["-R", regex]
    _run(ctest, ROOT, env)
